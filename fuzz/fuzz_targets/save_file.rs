#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| rdmig::fuzzing::save_file(data));
