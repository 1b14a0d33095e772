//! In-memory live migration: the real source and destination machines, a guest that keeps
//! writing, two blocks, a pin budget small enough to force evictions, and verification.
//! `make demo` runs this until the `rdmig` binary provides a migration between processes.

use rdmig_model::pair::{Guest, Pair};
use rdmig_model::wire::BlockDesc;
use rdmig_model::*;

fn main() {
    let blocks = vec![
        BlockDesc {
            name: b"pc.ram".to_vec(),
            length: 48 << 20,
            page_log2: 12,
        },
        BlockDesc {
            name: b"vga.vram".to_vec(),
            length: 16 << 20,
            page_log2: 12,
        },
    ];
    let key = b"demo pre-shared key".to_vec();
    let mut s = SourceConfig::with_defaults(0xD3_40, blocks.clone(), Some(key.clone()));
    s.params.channels = 2;
    s.downtime_limit_ms = 20;
    let pin_budget = 24 << 20;
    let d = DestConfig::with_defaults(blocks, Some(key), pin_budget);
    let guest = Guest {
        pages_per_step: 2,
        active_steps: 20_000,
        zero_one_in: 8,
        seed: 2026,
    };
    let mut pair =
        Pair::new(s, d, guest, b"opaque device state ".repeat(1000)).expect("valid configuration");
    let t = std::time::Instant::now();
    let r = pair.run(10_000_000);
    let wall = t.elapsed();

    println!("rdmig in-memory migration (model machines, in-memory fabric)");
    println!("  memory            64 MiB in 2 blocks, 1 MiB chunks, 2 data channels");
    println!(
        "  pin budget        {} MiB (dynamic registration with eviction)",
        pin_budget >> 20
    );
    println!("  source outcome    {:?}", r.source);
    println!("  dest outcome      {:?}", r.destination);
    println!("  rounds            {}", r.rounds);
    for round in &pair.src.stats.rounds {
        println!(
            "    round {:>2}{}  dirty {:>6} pages  zero {:>6}  sent {:>9} bytes in {:>5} writes",
            round.round,
            if round.last { " (final)" } else { "        " },
            round.dirty_pages,
            round.zero_pages,
            round.data_bytes,
            round.writes
        );
    }
    println!("  guest page writes {}", r.guest_writes);
    println!("  data bytes        {}", r.data_bytes);
    println!("  zero pages        {}", r.zero_pages);
    println!(
        "  control frames    {} ({} bytes)",
        r.control_frames, r.control_bytes
    );
    println!(
        "  registrations     {} chunks registered, {} evicted",
        r.reg_chunks, r.unreg_chunks
    );
    println!("  peak registered   {} MiB", r.max_registered_bytes >> 20);
    println!("  wall time         {:.2?} ({} steps)", wall, r.steps);
    match (r.source, r.destination, r.memory_equal_at_start) {
        (Some(Outcome::Completed), Some(Outcome::Completed), Some(true)) => {
            println!("destination memory verified equal to source at pause");
        }
        _ => {
            eprintln!("migration did not complete with verified memory");
            std::process::exit(1);
        }
    }
}
