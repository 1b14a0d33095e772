#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| rdmig::transport::tcp::fuzz_tls_data_frames(data));
