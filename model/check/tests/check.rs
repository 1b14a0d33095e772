//! The stateright model of a migration (`rdmig_check::check`): every invariant holds on the
//! small configuration, every "sometimes" property is reached, liveness is checked soundly,
//! counterexample traces are readable, and the Explorer serves the model.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use rdmig_check::check::{self, CheckConfig, ProtocolModel, Stop, Strategy};
use rdmig_model::Outcome;
use stateright::{Expectation, Model};

/// Checks `cfg` exhaustively: every always-property holds, the liveness property holds, and
/// every sometimes-property has an example (so none holds vacuously). A model that stopped
/// early (a machine stuck in its first phase) would have far fewer than `min_states` states.
fn exhaustive(cfg: CheckConfig, min_states: usize) {
    let name = cfg.name;
    let run = check::run(ProtocolModel::new(cfg), Strategy::Dfs, 2, Stop::Exhaustive);
    eprintln!(
        "{name}: {} states, {} unique, depth {}, {:.1}s, {:.0} states/s",
        run.total_states,
        run.unique_states,
        run.max_depth,
        run.elapsed.as_secs_f64(),
        run.states_per_sec()
    );
    for p in &run.properties {
        if let Some(path) = p.discovery.as_ref().filter(|_| !p.ok()) {
            panic!(
                "{}",
                check::render_path(&format!("counterexample for \"{}\"", p.name), path)
            );
        }
        assert!(p.ok(), "\"{}\" never reached", p.name);
    }
    assert!(
        run.properties
            .iter()
            .any(|p| p.expectation == Expectation::Eventually),
        "liveness is checked"
    );
    assert!(
        run.unique_states > min_states,
        "{} states",
        run.unique_states
    );
}

/// spec: INV-MEM-1, INV-REG-1, INV-OWN-1, INV-OWN-2, INV-FC-1, INV-PIN-1, INV-DOUBT-1, SW-6,
/// ERR-4: the small configuration (one fault of any kind, silent links included, two guest
/// writes, a half-open stray connection, a block with a short last chunk).
#[test]
fn inv_all_hold_exhaustively_on_small_config() {
    exhaustive(CheckConfig::small(), 4_000_000);
}

/// spec: STATE-1 .. STATE-5, INV-MEM-1, INV-REG-1, INV-PIN-1: device state carried over the
/// data channels into a state area, produced in two steps, registered after the final round
/// under a pin budget that forces RAM chunks out first, in both registration modes, with one
/// fault of any kind: the consumer only ever gets placed bytes and holds the source's state
/// when the workload starts.
#[test]
fn state_all_hold_exhaustively_with_a_state_area() {
    exhaustive(CheckConfig::state_area(), 50_000);
}

/// spec: SAVE-1, INV-OWN-2: a workload paused before the source started (a save that is not
/// live) runs again after every abort, whenever the fault strikes.
#[test]
fn save_1_a_workload_paused_before_the_start_runs_again_after_every_abort() {
    exhaustive(CheckConfig::paused_save(), 30_000);
}

/// spec: LIVE-4, LIVE-5, AUTH-6: every kind of stray connection beside a fault-free migration:
/// the migration still completes and no stray becomes the session.
#[test]
fn live_5_strays_never_disturb_the_migration() {
    exhaustive(CheckConfig::strays(), 500_000);
}

/// spec: ERR-4, INV-OWN-2, SW-6: an honest source against a destination that also sends frames
/// of its own choosing stays safe and reaches an outcome.
#[test]
fn err_4_honest_source_survives_a_hostile_destination() {
    exhaustive(CheckConfig::hostile_destination(), 100_000);
}

/// spec: AUTH-2, INV-PIN-1, SW-7, SW-8: an honest destination against a source that also sends
/// frames of its own choosing stays safe and reaches an outcome.
#[test]
fn auth_2_honest_destination_survives_a_hostile_source() {
    exhaustive(CheckConfig::hostile_source(), 500_000);
}

/// The liveness property uses stateright's `eventually`, which is sound only on an acyclic
/// state graph. This checks the graph has no cycle (every budget only decreases, and every
/// free action consumes something), on configurations small enough for a plain DFS.
#[test]
fn live_eventually_is_sound_because_the_state_graph_is_acyclic() {
    for (faults, guest) in [(0, 1), (1, 0)] {
        let mut cfg = CheckConfig::small();
        cfg.faults = faults;
        cfg.guest_writes = guest;
        let (states, cycle) = find_cycle(&ProtocolModel::new(cfg));
        assert!(
            cycle.is_none(),
            "cycle in the state graph (faults {faults}, guest {guest}): {cycle:?}"
        );
        assert!(states > 10_000, "only {states} states");
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Color {
    OnStack,
    Done,
}

fn fingerprint<T: Hash>(t: &T) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    t.hash(&mut h);
    h.finish()
}

/// A DFS stack entry: a state's fingerprint, its successors still to visit, and the action
/// that led to it.
type Frame = (
    u64,
    Vec<(check::Action, check::State)>,
    Option<check::Action>,
);

/// Iterative DFS with the classic white/grey/black colouring; returns the number of states
/// and the actions of a back edge's source path if a cycle exists.
fn find_cycle(m: &ProtocolModel) -> (usize, Option<Vec<check::Action>>) {
    let mut color: HashMap<u64, Color> = HashMap::new();
    for init in m.init_states() {
        let mut stack: Vec<Frame> = Vec::new();
        let fp = fingerprint(&init);
        if color.contains_key(&fp) {
            continue;
        }
        color.insert(fp, Color::OnStack);
        stack.push((fp, m.next_steps(&init), None));
        while let Some((fp, succ, _)) = stack.last_mut() {
            let fp = *fp;
            match succ.pop() {
                Some((a, next)) => {
                    let nfp = fingerprint(&next);
                    match color.get(&nfp) {
                        Some(Color::OnStack) => {
                            let mut path: Vec<_> =
                                stack.iter().filter_map(|(_, _, a)| a.clone()).collect();
                            path.push(a);
                            return (color.len(), Some(path));
                        }
                        Some(Color::Done) => {}
                        None => {
                            color.insert(nfp, Color::OnStack);
                            let steps = m.next_steps(&next);
                            stack.push((nfp, steps, Some(a)));
                        }
                    }
                }
                None => {
                    color.insert(fp, Color::Done);
                    stack.pop();
                }
            }
        }
    }
    (color.len(), None)
}

/// Without guest writes or faults the space is tiny; its example of a completed migration
/// renders as a trace naming every message of the switchover in order.
#[test]
fn sw_7_trace_of_a_completed_migration_is_readable() {
    let mut cfg = CheckConfig::small();
    cfg.faults = 0;
    cfg.guest_writes = 0;
    let run = check::run(ProtocolModel::new(cfg), Strategy::Bfs, 1, Stop::Exhaustive);
    assert!(run.violations().is_empty(), "{:?}", run.violations());
    let path = run
        .result(check::P_DONE)
        .and_then(|r| r.discovery.clone())
        .expect("a migration completes");
    let last = path.last_state();
    assert_eq!(last.src.outcome(), Some(Outcome::Completed));
    assert_eq!(last.lsn.outcome(), Some(Outcome::Completed));
    let trace = check::render_path("completed migration", &path);
    let mut at = 0;
    for needle in [
        "step 0: initial state",
        "source -> destination: HELLO ",
        "destination -> source: HELLO_ACK",
        "source -> destination: BLOCK_TABLE ",
        "Join(0)",
        "Opened(0)",
        "ROUND_END r1 last=false",
        "ROUND_END r2 last=true",
        "source -> destination: PREPARE",
        "destination -> source: PREPARED",
        "source -> destination: COMMIT",
        "DstDriver(Start)",
        "destination -> source: STARTED",
    ] {
        match trace[at..].find(needle) {
            Some(i) => at += i + needle.len(),
            None => panic!("trace lacks {needle:?} after byte {at}:\n{trace}"),
        }
    }
    assert!(trace.contains("workload RUNNING"));
    assert_eq!(
        check::trace_file_name(check::P_OWN1),
        "counterexample-inv-own-1-source-and-destination-workloads-never-both-run.txt"
    );
}

/// The Explorer serves the model over HTTP: its status page and the initial state. The
/// Explorer binds its own address, so the test tries random ports until one serves this model
/// (a port another process holds makes that attempt's server fail, not the test).
#[test]
fn explorer_serves_status_and_states() {
    let mut rng = rdmig_check::rng::Rng::new(std::process::id() as u64);
    for _ in 0..20 {
        let port = rng.between(20_000, 49_999) as u16;
        let server = std::thread::spawn(move || {
            ProtocolModel::new(CheckConfig::small())
                .checker()
                .serve(("127.0.0.1", port));
        });
        let Some(status) = http_get(port, "/.status", &server) else {
            continue; // the port was taken: that server thread failed to bind
        };
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        assert!(status.contains("\"unique_state_count\""), "{status}");
        assert!(status.contains("ProtocolModel"), "{status}");
        assert!(status.contains(check::P_OWN1), "{status}");
        let states = http_get(port, "/.states", &server).expect("the server answers");
        assert!(states.starts_with("HTTP/1.1 200"), "{states}");
        assert!(states.contains("AwaitHelloAck"), "{states}");
        return;
    }
    panic!("no port served the explorer");
}

/// A plain HTTP/1.1 GET, retried until the server is listening; `None` if the server thread
/// ended first (it could not bind).
fn http_get(port: u16, path: &str, server: &std::thread::JoinHandle<()>) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                write!(
                    s,
                    "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                )
                .unwrap();
                let mut out = String::new();
                s.read_to_string(&mut out).expect("read the response");
                return Some(out);
            }
            Err(_) if server.is_finished() => return None,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("explorer not reachable on port {port}: {e}"),
        }
    }
}

/// spec: SCAN-1, SCAN-2, INV-MEM-1: the `scan` dirty log (content hashes compared with the
/// previous scan and with what the destination holds) against a guest that writes, zeroes
/// and undoes writes while writes read memory as late as they can: no update is lost.
#[test]
fn scan_1_hash_log_loses_no_update_exhaustively() {
    exhaustive(CheckConfig::hash_log(check::HashCompare::Both), 200_000);
}

/// The first loss of a content-hash log that compares as `compare`, by breadth-first search:
/// the names of the properties it violates.
fn hash_log_violations(compare: check::HashCompare) -> Vec<&'static str> {
    let run = check::run(
        ProtocolModel::new(CheckConfig::hash_log(compare)),
        Strategy::Bfs,
        2,
        Stop::FirstFailure,
    );
    if let Some(trace) = run.first_violation_trace() {
        eprintln!("{trace}");
    }
    run.violations()
}

/// spec: SCAN-1: a log that compares only with its previous scan loses a page the guest
/// changed back after a write carried the change; the checker must find it.
#[test]
fn scan_1_previous_scan_only_loses_an_undone_write() {
    let v = hash_log_violations(check::HashCompare::LastScanOnly);
    assert!(
        v.iter().any(|p| p.starts_with("INV-MEM-1")),
        "not caught: {v:?}"
    );
}

/// spec: SCAN-1: a log that compares only with what was sent loses a page that the scan
/// triggering switchover read as zero and a later write changed; the checker must find it.
#[test]
fn scan_1_sent_only_loses_a_page_carried_as_zero() {
    let v = hash_log_violations(check::HashCompare::SentOnly);
    assert!(
        v.iter().any(|p| p.starts_with("INV-MEM-1")),
        "not caught: {v:?}"
    );
}
