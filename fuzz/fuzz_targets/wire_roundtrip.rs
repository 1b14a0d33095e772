#![no_main]
libfuzzer_sys::fuzz_target!(
    |frame: rdmig_model::wire::Frame| rdmig_check::fuzzing::wire_roundtrip(&frame)
);
