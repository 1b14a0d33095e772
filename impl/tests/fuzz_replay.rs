//! Replays the `tcp_data_frame` and `tls_data_frame` fuzz corpora and crash inputs without a
//! fuzzer.

#[test]
fn fuzz_replay_tcp_data_frame() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut n = 0;
    for dir in ["corpus", "artifacts"] {
        let Ok(rd) = std::fs::read_dir(root.join(dir).join("tcp_data_frame")) else {
            continue;
        };
        for e in rd.flatten() {
            rdmig::transport::tcp::fuzz_data_frames(&std::fs::read(e.path()).unwrap());
            n += 1;
        }
    }
    assert!(n >= 5, "tcp_data_frame seed corpus missing");
    // A deterministic random smoke on top of the corpus.
    let mut rng = rdmig_check::rng::Rng::new(0x1234_5678_9abc_def1);
    for _ in 0..2000 {
        let mut data = vec![0u8; rng.below(300) as usize];
        rng.fill(&mut data);
        rdmig::transport::tcp::fuzz_data_frames(&data);
    }
}

#[test]
fn fuzz_replay_tls_data_frame() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut n = 0;
    for dir in ["corpus", "artifacts"] {
        let Ok(rd) = std::fs::read_dir(root.join(dir).join("tls_data_frame")) else {
            continue;
        };
        for e in rd.flatten() {
            rdmig::transport::tcp::fuzz_tls_data_frames(&std::fs::read(e.path()).unwrap());
            n += 1;
        }
    }
    assert!(n >= 5, "tls_data_frame seed corpus missing");
    // A deterministic random smoke on top: every tamper mode, at random positions.
    let mut rng = rdmig_check::rng::Rng::new(0x0ddb_a11c_0ffe_e123);
    for _ in 0..60 {
        let mut data = vec![0u8; 3 + rng.below(300) as usize];
        rng.fill(&mut data);
        rdmig::transport::tcp::fuzz_tls_data_frames(&data);
    }
}
