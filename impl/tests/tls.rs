//! TLS on the TCP transport, end to end with real processes: a migration inside TLS, and the
//! refusals an operator meets (a plaintext peer on either side, a CA the other side does not
//! trust), each ending the source with its workload running and the destination listening.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

fn tls_init(d: &Path, name: &str) -> String {
    let p = d.join(name);
    let o = Command::new(BIN).arg("tls-init").arg(&p).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    p.display().to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A two-channel migration of a writing workload with every connection inside TLS 1.3 and the
/// PSK bound to the sessions: completed, verified, memory identical.
#[test]
fn tls_live_migration_two_channels_verified() {
    let d = dir("tls-live");
    let creds = tls_init(&d.0, "creds");
    let k = key(&d.0, "psk", "0123456789abcdef0123");
    let w = workload(&d.0, "32MiB", "40");
    let (r, addr, dst) = recv(&d.0, &k, "32MiB", &["--tls-creds", &creds]);
    let s = send(
        &addr,
        &k,
        &w,
        &["--tls-creds", &creds, "--channels", "2", "--verify"],
    )
    .wait_with_output()
    .unwrap();
    let r = r.wait_with_output().unwrap();
    let (sr, rr) = (report(&s), report(&r));
    assert_eq!(sr["status"], "completed", "{sr} {}", stderr(&s));
    assert_eq!(rr["status"], "completed", "{rr} {}", stderr(&r));
    assert!(sr["verified"].as_bool().unwrap());
    assert_eq!(state(w.child.id()), 'T');
    assert_eq!(digest(&w.ram), digest(&dst));
}

/// A plaintext source at a TLS destination (aborted: its HELLO went out), then a source that
/// does not trust the destination's CA (refused while connecting): each fails in bounded time
/// with its workload running; the destination listens on and completes the migration of the
/// right source after them.
#[test]
fn tls_destination_refuses_plaintext_and_untrusted_sources_and_listens_on() {
    let d = dir("tls-refuse");
    let creds = tls_init(&d.0, "creds");
    let other = tls_init(&d.0, "other");
    let k = key(&d.0, "psk", "0123456789abcdef0123");
    let w = workload(&d.0, "8MiB", "10");
    let (mut r, addr, dst) = recv(&d.0, &k, "8MiB", &["--tls-creds", &creds]);
    let (plain, took, ended) =
        exit_within(send(&addr, &k, &w, &[]), std::time::Duration::from_secs(20));
    assert!(ended, "a plaintext source at a TLS destination did not end");
    assert_eq!(
        plain.status.code(),
        Some(2),
        "{} {}",
        stderr(&plain),
        String::from_utf8_lossy(&plain.stdout)
    );
    assert_eq!(report(&plain)["status"], "aborted");
    assert!(took.as_secs() <= 10, "took {took:?}");
    let detail = report(&plain)["detail"].to_string();
    assert!(detail.contains("--tls-creds"), "{detail}");
    assert_ne!(state(w.child.id()), 'T');
    let untrusted = send(&addr, &k, &w, &["--tls-creds", &other])
        .wait_with_output()
        .unwrap();
    // Refused while connecting, before the workload was ever paused: a setup failure.
    assert_eq!(untrusted.status.code(), Some(1));
    assert!(
        stderr(&untrusted).contains("not signed by the CA"),
        "{}",
        stderr(&untrusted)
    );
    assert_ne!(state(w.child.id()), 'T');
    assert!(
        r.try_wait().unwrap().is_none(),
        "the destination stopped listening"
    );
    let good = send(&addr, &k, &w, &["--tls-creds", &creds, "--verify"])
        .wait_with_output()
        .unwrap();
    let r = r.wait_with_output().unwrap();
    assert_eq!(report(&good)["status"], "completed", "{}", stderr(&good));
    assert_eq!(report(&r)["status"], "completed", "{}", stderr(&r));
    assert_eq!(digest(&w.ram), digest(&dst));
}

/// A TLS source at a plaintext destination fails while connecting, with its workload running,
/// and says why.
#[test]
fn tls_source_refuses_a_plaintext_destination() {
    let d = dir("tls-plain-dst");
    let creds = tls_init(&d.0, "creds");
    let k = key(&d.0, "psk", "0123456789abcdef0123");
    let w = workload(&d.0, "8MiB", "10");
    let (r, addr, _dst) = recv(&d.0, &k, "8MiB", &[]);
    let (s, took, ended) = exit_within(
        send(&addr, &k, &w, &["--tls-creds", &creds]),
        std::time::Duration::from_secs(20),
    );
    assert!(ended, "a TLS source at a plaintext destination did not end");
    // Refused while connecting, before the workload was ever paused: a setup failure.
    assert_eq!(s.status.code(), Some(1), "{}", stderr(&s));
    // Reset while it reads the first reply, or the destination's ABORT read as a record.
    let e = stderr(&s);
    assert!(
        e.contains("TLS handshake") || e.contains("does not speak TLS"),
        "{e}"
    );
    assert!(e.contains("--tls-creds"), "{e}");
    assert!(took.as_secs() <= 10, "took {took:?}");
    assert_ne!(state(w.child.id()), 'T');
    terminate(&r);
    let _ = r.wait_with_output();
}

/// spec: TLS-2: connections that open and never finish a TLS handshake, more of them than
/// the destination holds handshakes for, neither end it nor keep the right source out.
#[test]
fn tls_2_stalled_handshakes_do_not_keep_a_source_out() {
    let d = dir("tls-stalled");
    let creds = tls_init(&d.0, "creds");
    let k = key(&d.0, "psk", "0123456789abcdef0123");
    let w = workload(&d.0, "8MiB", "10");
    let (r, addr, dst) = recv(&d.0, &k, "8MiB", &["--tls-creds", &creds]);
    let stalled: Vec<_> = (0..150)
        .map(|_| std::net::TcpStream::connect(addr.trim()).unwrap())
        .collect();
    // The destination holds 128 handshakes (a thread each): the oldest were cut at once,
    // long before their 5 s handshake deadline.
    let mut oldest = &stalled[0];
    oldest
        .set_read_timeout(Some(std::time::Duration::from_millis(2500)))
        .unwrap();
    let mut b = [0u8; 1];
    match std::io::Read::read(&mut oldest, &mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the oldest stalled handshake was not cut: {other:?}"),
    }
    let started = std::time::Instant::now();
    let (s, _, ended) = exit_within(
        send(&addr, &k, &w, &["--tls-creds", &creds, "--verify"]),
        std::time::Duration::from_secs(30),
    );
    assert!(ended, "the source did not end");
    assert_eq!(report(&s)["status"], "completed", "{}", stderr(&s));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "took {:?}: the stalled handshakes held the source up",
        started.elapsed()
    );
    let r = r.wait_with_output().unwrap();
    assert_eq!(report(&r)["status"], "completed", "{}", stderr(&r));
    assert_eq!(digest(&w.ram), digest(&dst));
    drop(stalled);
}
