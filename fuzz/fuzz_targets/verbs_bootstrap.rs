#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| rdmig::fuzzing::verbs_bootstrap(data));
