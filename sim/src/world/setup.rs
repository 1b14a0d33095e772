//! Building the world for a configuration: the block layout, the session's secrets, both
//! machines configured from the profile and migration knobs, and the state at time zero.
//!
//! Everything drawn here comes from the run's seed streams, in a fixed order per stream: the
//! same seed must name the same layout, memory and keys, so no draw may move.

use rdmig_model::wire::BlockDesc;

use super::*;

/// The guest's blocks on both sides. The destination may list them in another order (a
/// permuted layout); the two are paired by name, as the protocol pairs them.
pub(super) struct BlockLayout {
    /// The source's blocks, in the source's order.
    pub(super) src: Vec<BlockDesc>,
    /// The same blocks, in the destination's order.
    pub(super) dst: Vec<BlockDesc>,
    /// For each destination block, the index of the source block it holds.
    pub(super) src_of_dst: Vec<usize>,
    /// For each source block, the index of its destination block.
    pub(super) dst_of_src: Vec<u16>,
}

impl BlockLayout {
    /// Draws the layout, and the destination's order if it is permuted, from `rng`.
    pub(super) fn draw(cfg: &SimConfig, rng: &mut Rng) -> BlockLayout {
        let src = cfg.guest.layout(rng);
        let mut dst = src.clone();
        if cfg.migration.permute_dst_blocks {
            rng.shuffle(&mut dst);
        }
        let src_of_dst: Vec<usize> = dst
            .iter()
            .map(|d| rdmig_model::wire::block_index(&src, &d.name).expect("same names"))
            .collect();
        let mut dst_of_src = vec![0u16; src.len()];
        for (d, &s) in src_of_dst.iter().enumerate() {
            dst_of_src[s] = d as u16;
        }
        BlockLayout {
            src,
            dst,
            src_of_dst,
            dst_of_src,
        }
    }
}

/// The session's identity and secrets.
pub(super) struct SessionKeys {
    pub(super) session_id: u64,
    pub(super) src_nonce: [u8; wire::NONCE_LEN],
    pub(super) dst_nonce: [u8; wire::NONCE_LEN],
    /// The source's pre-shared key (`None`: insecure).
    pub(super) src_psk: Option<Vec<u8>>,
    /// The destination's: the same key, or another one under the wrong-key fault.
    pub(super) dst_psk: Option<Vec<u8>>,
}

impl SessionKeys {
    /// Draws the keys from `rng`. The key is drawn even for an insecure run, so the session
    /// id and nonces of a seed do not depend on `authenticate`.
    pub(super) fn draw(cfg: &SimConfig, rng: &mut Rng) -> SessionKeys {
        let mut key = vec![0u8; 32];
        rng.fill(&mut key);
        let session_id = rng.next_u64();
        let mut src_nonce = [0u8; wire::NONCE_LEN];
        let mut dst_nonce = [0u8; wire::NONCE_LEN];
        rng.fill(&mut src_nonce);
        rng.fill(&mut dst_nonce);
        let src_psk = cfg.migration.authenticate.then(|| key.clone());
        let dst_psk = if cfg.faults.wrong_key {
            let mut other = vec![0u8; 32];
            rng.fill(&mut other);
            Some(other)
        } else {
            src_psk.clone()
        };
        SessionKeys {
            session_id,
            src_nonce,
            dst_nonce,
            src_psk,
            dst_psk,
        }
    }
}

/// The parameters the source proposes in its HELLO, from the migration knobs.
fn proposed_params(cfg: &SimConfig) -> Params {
    let m = &cfg.migration;
    Params {
        chunk_log2: m.chunk_log2,
        mode: if m.pin_all {
            RegMode::PinAll
        } else {
            RegMode::Dynamic
        },
        flags: if m.zero_elision {
            wire::flag::ZERO_ELISION
        } else {
            0
        },
        channels: cfg.channels(),
        // What `rdmig send --verify` negotiates.
        digest: if m.verify_digests {
            DigestAlg::Xxh3PageTree
        } else {
            DigestAlg::None
        },
        auth: if m.authenticate {
            AuthMode::HmacSha256
        } else {
            AuthMode::Insecure
        },
        max_reg_inflight: m.max_reg_inflight,
    }
}

/// The source machine's configuration; its send-queue depth defaults to the profile's.
pub(super) fn source_config(
    cfg: &SimConfig,
    session_id: u64,
    blocks: Vec<BlockDesc>,
    psk: Option<Vec<u8>>,
) -> SourceConfig {
    let m = &cfg.migration;
    let mut scfg = SourceConfig::with_defaults(session_id, blocks, psk);
    scfg.params = proposed_params(cfg);
    scfg.credit_window = m.src_credit_window;
    scfg.writes_per_channel = m.writes_per_channel.unwrap_or(cfg.profile.sq_depth);
    scfg.reg_batch = m.reg_batch;
    scfg.downtime_limit_ms = m.downtime_limit_ms;
    scfg.max_rounds = m.max_rounds;
    scfg.on_limit = if m.on_limit_abort {
        LimitPolicy::Abort
    } else {
        LimitPolicy::Switchover
    };
    scfg.idle_timeout_ms = m.idle_timeout_ms;
    scfg.keepalive_ms = m.keepalive_ms;
    scfg.state_max = cfg.state_max();
    scfg
}

/// The destination machine's configuration, with the run's pin budget.
pub(super) fn dest_config(
    cfg: &SimConfig,
    blocks: Vec<BlockDesc>,
    psk: Option<Vec<u8>>,
) -> DestConfig {
    let m = &cfg.migration;
    let mut dcfg = DestConfig::with_defaults(blocks, psk, cfg.pin_budget());
    dcfg.credit_window = m.dst_credit_window;
    dcfg.max_channels = m.dst_max_channels;
    dcfg.max_reg_inflight = m.dst_max_reg_inflight;
    dcfg.idle_timeout_ms = m.idle_timeout_ms;
    dcfg.keepalive_ms = m.keepalive_ms;
    dcfg.state_capacity = cfg.state_capacity();
    dcfg
}

/// How long faults strike before the run is left to recover (0 without faults).
pub(super) fn safety_ns(cfg: &SimConfig) -> u64 {
    if cfg.faults.any() {
        cfg.faults.safety_ns
    } else {
        0
    }
}

/// Destination memory before anything arrives: every page garbage (so a page never sent is
/// caught by verification), and untouched unless the destination was pre-faulted. The state
/// area, if any, is one more block after the RAM blocks (spec: STATE-2).
fn destination_memory(
    cfg: &SimConfig,
    blocks: &[BlockDesc],
    state_pages: Option<u64>,
) -> (Vec<Vec<u32>>, Vec<Bits>) {
    let pages: Vec<u64> = blocks
        .iter()
        .map(|b| b.length >> b.page_log2)
        .chain(state_pages)
        .collect();
    let dmem: Vec<Vec<u32>> = pages.iter().map(|&n| vec![GARBAGE; n as usize]).collect();
    let touched = pages
        .iter()
        .map(|&n| {
            let mut t = Bits::new(n);
            if cfg.guest.dst_pretouched {
                t.fill();
            }
            t
        })
        .collect();
    (dmem, touched)
}

impl Sim {
    /// The world at time zero, before any event: the source's guest running, every channel
    /// and the control connection up, nothing in flight.
    pub(super) fn at_time_zero(
        cfg: SimConfig,
        (src, lsn): (Source, Listener),
        guest: Guest,
        layout: BlockLayout,
        (device_state, state): (Vec<u8>, Option<StateArea>),
        fault_rng: Rng,
    ) -> Sim {
        let (dmem, touched) =
            destination_memory(&cfg, &layout.dst, state.as_ref().map(|s| s.pages()));
        // The state buffer, source block `blocks.len()`, lands in the area (spec: STATE-2).
        let mut dst_of_src = layout.dst_of_src;
        if let Some(s) = &state {
            dst_of_src.push(s.dst_block as u16);
        }
        let costs = cfg.profile.costs();
        Sim {
            deadline: safety_ns(&cfg) + cfg.liveness_bound_ns(),
            chans: (0..cfg.channels())
                .map(|_| Chan {
                    alive: true,
                    ..Chan::default()
                })
                .collect(),
            reg_free: vec![0; costs.reg_threads],
            costs,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            src,
            lsn,
            src_stats: SourceStats::default(),
            dst_stats: DestStats::default(),
            guest,
            dmem,
            touched,
            dst_of_src,
            src_of_dst: layout.src_of_dst,
            state,
            link_free: 0,
            ctrl: [CtrlDir::default(), CtrlDir::default()],
            ctrl_alive: true,
            ctrl_silence: Silence::default(),
            nic: Nic::default(),
            reg_jobs: 0,
            timer_at: [None; 2],
            strays: Vec::new(),
            next_stray: 100,
            relinquished: false,
            hostile_frames: 0,
            hello: None,
            ctrl_closed_at: None,
            last_sent: [None, None],
            crashed: [false; 2],
            src_running: true,
            dst_running: false,
            pause_pending: false,
            tick_scheduled: false,
            guest_since: 0,
            stall_until: [0; 2],
            snapshot: None,
            device_state,
            received_state: Vec::new(),
            fault_rng,
            faults_active: false,
            commit_sent: false,
            started_received: false,
            cause: Cause::Other,
            scratch: Vec::new(),
            cqe_buf: Vec::new(),
            trace: Trace::new(cfg.trace_tail),
            stats: Stats::default(),
            cfg,
        }
    }

    /// The first events: the listener accepts the source's control connection, the source
    /// starts, the guest ticks, and with faults the fault clock and the end of the window in
    /// which they strike.
    pub(super) fn schedule_start(&mut self, dst_nonce: [u8; wire::NONCE_LEN]) {
        // The source connects; the listener accepts with a fresh nonce for the session.
        self.push(
            0,
            Ev::Lsn(Box::new(LsnInput::Accepted {
                conn: CTRL_CONN,
                nonce: dst_nonce,
                binding: None,
            })),
        );
        self.push(0, Ev::Src(Box::new(SrcInput::Start)));
        self.ensure_tick();
        if self.cfg.faults.any() {
            self.faults_active = true;
            let tick = self.cfg.faults.tick_ns.max(1);
            self.push(tick, Ev::FaultTick);
            self.push(safety_ns(&self.cfg), Ev::SafetyEnd);
        }
    }
}
