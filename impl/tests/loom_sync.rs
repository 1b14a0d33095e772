//! loom models of the structures shared between the driver and the transport threads:
//! the registration table (no write lands after unregister returns) and completion routing
//! (every acknowledgement completes exactly its own write, in order).
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p rdmig --release --test loom_sync`.
#![cfg(loom)]

use loom::sync::atomic::{AtomicU64, Ordering};
use loom::sync::Arc;
use loom::thread;
use rdmig::transport::completions::ChannelCompletions;
use rdmig::transport::regtable::{RegTable, Region};

/// spec: INV-REG-1: once `unregister` returns, no write under that key can land, even when a
/// data thread is applying a write concurrently.
#[test]
fn inv_reg_1_no_write_lands_after_unregister_returns() {
    loom::model(|| {
        let table = Arc::new(RegTable::new());
        let key = table.register(
            Region {
                block: 0,
                offset: 0,
                len: 4096,
            },
            1,
        );
        let landed = Arc::new(AtomicU64::new(0));
        let after_unregister = Arc::new(AtomicU64::new(0));
        let (t2, l2, a2) = (table.clone(), landed.clone(), after_unregister.clone());
        let writer = thread::spawn(move || {
            t2.with_write(key, 0, 4096, |_, _| {
                // A write that lands must do so before the unregister completed.
                assert_eq!(
                    a2.load(Ordering::SeqCst),
                    0,
                    "write landed after unregister returned"
                );
                l2.fetch_add(1, Ordering::SeqCst);
            })
            .is_ok()
        });
        assert!(table.unregister(key));
        after_unregister.store(1, Ordering::SeqCst);
        assert!(table.with_write(key, 0, 1, |_, _| ()).is_err());
        // A write is reported placed exactly when it landed: never a success that wrote
        // nothing, nor a refusal that wrote anyway.
        let placed = writer.join().unwrap();
        assert_eq!(landed.load(Ordering::SeqCst), placed as u64);
    });
}

/// Completion routing: a sender posting frames and an acknowledgement reader running
/// concurrently deliver every write id exactly once, in posting order.
#[test]
fn completions_route_every_ack_once_in_order() {
    loom::model(|| {
        let c = Arc::new(ChannelCompletions::new());
        let c2 = c.clone();
        let sender = thread::spawn(move || {
            c2.posted(None);
            c2.posted(Some(1));
            c2.posted(Some(2));
        });
        let mut done = Vec::new();
        let mut acked = 0;
        while acked < 3 {
            // The reader only acknowledges frames that were sent: as many as are outstanding.
            let n = c.outstanding() as u64;
            if n == 0 {
                thread::yield_now();
                continue;
            }
            done.extend(c.acked(1).unwrap());
            acked += 1;
        }
        sender.join().unwrap();
        assert_eq!(done, vec![1, 2]);
        assert_eq!(c.acked(1), Err(1), "no frame left to acknowledge");
    });
}
