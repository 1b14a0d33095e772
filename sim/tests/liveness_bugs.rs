//! Liveness failures the swarm found in the machines, kept as regression replays: the source
//! once waited forever when blocked on credits towards a silent destination (spec: ERR-4).
//!
//!
//! The idle timer used to be armed in Sending and Finalizing only when the outbox was blocked
//! on credits, while pump_round and pump_tail build their frames outside the outbox. Now being
//! out of credits in those phases counts as waiting on the peer.

use rdmig_sim::guest::GuestConfig;
use rdmig_sim::profile::Profile;
use rdmig_sim::{run, SimConfig};

/// The base `rdmig-sim swarm --ram 16MiB` draws from.
fn swarm_seed(seed: u64) -> SimConfig {
    let base = SimConfig::new(
        seed,
        Profile::named("rdma-100g").unwrap(),
        GuestConfig::new(16 << 20),
    );
    SimConfig::swarm(seed, &base)
}

fn assert_live(seed: u64) {
    let r = run(swarm_seed(seed)).unwrap();
    if let Some(f) = r.failure {
        panic!("{f}");
    }
}

/// The destination crashes silently while DEVICE_STATE frames use up the source's credits;
/// the source waits in Finalizing for a credit to send DIGESTS and PREPARE.
#[test]
fn source_waits_forever_in_finalizing_after_silent_crash() {
    assert_live(10348);
}

/// A long receive stall at the source starves the destination of frames; the destination
/// times out with no credit left for ABORT, and the source, once the stall ends, waits in
/// Finalizing for a credit that never comes.
#[test]
fn source_waits_forever_in_finalizing_after_peer_timeout() {
    assert_live(13741);
}

/// The same in Sending: the destination timed out during a receive stall and could not send
/// ABORT; the source waits for a credit to send its next message of the round.
#[test]
fn source_waits_forever_in_sending() {
    assert_live(19248);
}
