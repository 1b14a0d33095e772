#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| rdmig_model::fuzzing::source_session(data));
