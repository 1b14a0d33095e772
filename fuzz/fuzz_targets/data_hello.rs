#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| rdmig_check::fuzzing::data_hello(data));
