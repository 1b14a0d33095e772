//! Device state over the data channels (spec: STATE-1 .. STATE-5): the source's state buffer,
//! which the VMM fills over time, and the destination's consumer, which takes the state
//! area's pages as the source announces them placed.
//!
//! The device state is page versions, like memory: page `p` of it is `base + p` once the
//! VMM produced it and `UNPRODUCED` before, in the source's buffer; the destination's area
//! holds `GARBAGE` until a write places a page. Writes read the buffer when they are placed,
//! as a NIC reads memory, so a write of a page not yet produced lands a stale version. The
//! consumer checks every page it is fed against the version the source produced: feeding a
//! page that is not placed (or placed stale) is a STATE-3 violation.

use rdmig_model::wire::AbortReason;
use rdmig_model::Detail;

use crate::guest::{versions_digest, STATE_PAGE_LOG2, UNPRODUCED};

use super::*;

/// Bytes the VMM adds to the state buffer per production step, at the configured rate.
pub const STATE_STEP: u64 = 1 << 20;

/// A negotiated state area: both ends of the device state's path.
#[derive(Debug)]
pub(super) struct StateArea {
    /// The area both sides settle on, bytes (spec: STATE-1).
    pub(super) area: u64,
    /// The device state's length, bytes.
    len: u64,
    /// Page `p` of the device state, produced, has version `base + p`.
    base: u32,
    /// The source's state buffer: a version per 4 KiB page of the device state.
    pub(super) buf: Vec<u32>,
    /// Bytes the VMM produced so far.
    produced: u64,
    /// The state buffer's source block index (after the RAM blocks), and the area's local
    /// index at the destination (after its RAM blocks) (spec: STATE-2).
    pub(super) src_block: usize,
    pub(super) dst_block: usize,
    /// When the source asked for the device state.
    requested_at: Option<u64>,
    /// The consumer: bytes handed to it, the pages it got, and when it has taken them all.
    fed_bytes: u64,
    fed: Vec<u32>,
    consumer_free: u64,
}

impl StateArea {
    /// The state area of `cfg` (which has one), the device state's versions counting from
    /// `base`, `src_blocks` and `dst_blocks` RAM blocks on each side.
    pub(super) fn new(cfg: &SimConfig, base: u32, src_blocks: usize, dst_blocks: usize) -> Self {
        let len = cfg.guest.device_state_bytes;
        StateArea {
            area: cfg.state_area_bytes(),
            len,
            base,
            buf: vec![UNPRODUCED; len.div_ceil(1 << STATE_PAGE_LOG2) as usize],
            produced: 0,
            src_block: src_blocks,
            dst_block: dst_blocks,
            requested_at: None,
            fed_bytes: 0,
            fed: Vec::new(),
            consumer_free: 0,
        }
    }

    /// The area's pages.
    pub(super) fn pages(&self) -> u64 {
        self.area >> STATE_PAGE_LOG2
    }

    /// The version page `p` of the device state takes once produced.
    fn version(&self, p: usize) -> u32 {
        self.base + p as u32
    }

    /// The consumer holds the whole device state, every page as produced.
    fn consumer_complete(&self) -> bool {
        self.fed_bytes == self.len
            && self.fed.len() == self.buf.len()
            && self
                .fed
                .iter()
                .enumerate()
                .all(|(p, &v)| v == self.version(p))
    }
}

/// Nanoseconds `bytes` take at `rate` bytes per second (0: no time).
fn at_rate(bytes: u64, rate: u64) -> u64 {
    match rate {
        0 => 0,
        r => (bytes as u128 * 1_000_000_000).div_ceil(r as u128) as u64,
    }
}

impl Sim {
    /// The page size of source block `b`, as log2 of bytes.
    pub(super) fn src_page_log2(&self, b: usize) -> u8 {
        self.guest.block_page_log2(b)
    }

    /// The page size of destination block `b` (local index), as log2 of bytes.
    pub(super) fn dst_page_log2(&self, b: usize) -> u8 {
        match &self.state {
            Some(s) if s.dst_block == b => STATE_PAGE_LOG2,
            _ => self.guest.page_log2(),
        }
    }

    /// Destination blocks that hold RAM (the state area, if any, follows them).
    pub(super) fn dst_ram_blocks(&self) -> usize {
        self.src_of_dst.len()
    }

    /// `CaptureDeviceState { area }` with a state area: the VMM streams the device state
    /// into the state buffer, `STATE_STEP` bytes at a time at the save rate after the
    /// capture delay, or all of it at once after that delay (spec: STATE-3).
    pub(super) fn capture_state(&mut self, area: u64) -> R {
        let want = self.state.as_ref().map_or(0, |s| s.area);
        if area != want {
            return Err(self.fail(
                "STATE-1",
                format!(
                    "the source asked for device state into an area of {area} bytes; the handshake settled on {want}"
                ),
            ));
        }
        let Some(s) = self.state.as_mut() else {
            return Err(self.fail("STATE-1", "a state area without one configured".into()));
        };
        if s.requested_at.is_some() {
            return Err(self.fail("SW-2", "the device state was requested twice".into()));
        }
        s.requested_at = Some(self.now);
        let len = s.len;
        self.trace.rec(self.now, Tag::DeviceState, len, 1);
        let at = self.next_step_at();
        self.push(at, Ev::StateStep);
        Ok(())
    }

    /// When the VMM reports its next step of device state.
    fn next_step_at(&self) -> u64 {
        let s = self.state.as_ref().expect("a state area");
        let start = s.requested_at.expect("requested") + self.cfg.guest.capture_ns;
        let rate = self.cfg.guest.state_save_bytes_per_s;
        let upto = if rate == 0 {
            s.len
        } else {
            (s.produced + STATE_STEP).min(s.len)
        };
        start + at_rate(upto, rate)
    }

    /// The VMM wrote the next step of device state: its pages take their versions now, and
    /// the source learns it (`StateProduced`, or `StateDone` with the digest at the end).
    pub(super) fn state_step(&mut self) -> R {
        if self.crashed[SRC] || self.done(SRC) {
            return Ok(());
        }
        let rate = self.cfg.guest.state_save_bytes_per_s;
        let s = self.state.as_mut().expect("steps only with a state area");
        let from = s.produced.div_ceil(1 << STATE_PAGE_LOG2) as usize;
        s.produced = if rate == 0 {
            s.len
        } else {
            (s.produced + STATE_STEP).min(s.len)
        };
        let to = s.produced.div_ceil(1 << STATE_PAGE_LOG2) as usize;
        for p in from..to {
            s.buf[p] = s.version(p);
        }
        let (len, done) = (s.produced, s.produced == s.len);
        self.trace
            .rec(self.now, Tag::StateProduced, len, done as u64);
        if !done {
            let at = self.next_step_at();
            self.push(at, Ev::StateStep);
            return self.feed_src(SrcInput::StateProduced { len });
        }
        self.stats.state_done_ns = Some(self.now);
        let digest = versions_digest(&self.state.as_ref().expect("a state area").buf);
        self.feed_src(SrcInput::StateDone { len, digest })
    }

    /// `FeedState { upto }`: the consumer takes the area's pages from where the previous feed
    /// ended up to the one holding byte `upto - 1`, each of which must hold what the source
    /// produced: the destination feeds only placed device state (spec: STATE-3, STATE-4).
    pub(super) fn feed_state(&mut self, upto: u64) -> R {
        let Some(s) = self.state.as_ref() else {
            return Err(self.fail(
                "STATE-1",
                format!("device state fed up to {upto} in a session without a state area"),
            ));
        };
        if upto <= s.fed_bytes || upto > s.area {
            return Err(self.fail(
                "STATE-4",
                format!(
                    "device state fed up to {upto} after {} bytes, in an area of {}",
                    s.fed_bytes, s.area
                ),
            ));
        }
        let (from, to) = (s.fed.len(), upto.div_ceil(1 << STATE_PAGE_LOG2) as usize);
        // A hostile source may announce what it never wrote; only the digest catches it then.
        let honest_source = !(self.hostile_frames > 0 && self.cfg.faults.hostile_side == SRC as u8);
        let area = &self.dmem[s.dst_block];
        if let Some(p) = (from..to).find(|&p| area[p] != s.version(p)) {
            if honest_source {
                let held = area[p];
                let what = match held {
                    GARBAGE => "never placed".to_string(),
                    UNPRODUCED => "placed before the VMM produced it".to_string(),
                    v => format!("holding version {v:#x}"),
                };
                return Err(self.fail(
                    "STATE-3",
                    format!(
                        "STATE_PLACED {upto}: the destination fed its consumer page {p} of the state area, {what}; the source produced version {:#x}",
                        s.version(p)
                    ),
                ));
            }
        }
        let load = at_rate(upto - s.fed_bytes, self.cfg.guest.state_load_bytes_per_s);
        let now = self.now;
        let s = self.state.as_mut().expect("checked above");
        let area = &self.dmem[s.dst_block];
        s.fed.extend_from_slice(&area[from..to]);
        s.consumer_free = s.consumer_free.max(now) + load;
        s.fed_bytes = upto;
        self.stats.state_fed_bytes = upto;
        self.trace
            .rec(self.now, Tag::StateFed, upto, (to - from) as u64);
        Ok(())
    }

    /// `FinishState { len }`: the consumer finishes taking the device state and answers with
    /// the digest of what it got. On the control channel's path it is done at once; with a
    /// state area when it has taken every byte fed at the load rate (spec: STATE-4).
    pub(super) fn finish_state(&mut self, len: u64) -> R {
        let (held, digest, at) = match self.state.as_ref() {
            None => {
                let n = self.received_state.len() as u64;
                let d = rdmig_model::digest::chunk_digest(&self.received_state);
                (n, d, self.now)
            }
            Some(s) => (
                s.fed_bytes,
                versions_digest(&s.fed),
                s.consumer_free.max(self.now),
            ),
        };
        if len != held {
            return Err(self.fail(
                "STATE-4",
                format!("the destination finishes a device state of {len} bytes; its consumer got {held}"),
            ));
        }
        self.trace
            .rec(self.now, Tag::StateLoaded, len, at - self.now);
        self.stats.state_loaded_ns = Some(at);
        let input = DstInput::StateLoaded { digest };
        if at == self.now {
            self.feed_dst(input)
        } else {
            self.push(at, Ev::Lsn(Box::new(LsnInput::Local(input))));
            Ok(())
        }
    }

    /// At start, the destination's consumer holds exactly the source's device state: the
    /// control channel's blob, or every page of the state area as produced.
    pub(super) fn check_state_at_start(&self) -> R {
        let ok = match &self.state {
            None => self.received_state == self.device_state,
            Some(s) => s.consumer_complete(),
        };
        if ok {
            return Ok(());
        }
        let (got, want) = match &self.state {
            None => (
                self.received_state.len() as u64,
                self.device_state.len() as u64,
            ),
            Some(s) => (s.fed_bytes, s.len),
        };
        Err(self.fail(
            "INV-MEM-1",
            format!("device state differs at start ({got} bytes received, {want} captured)"),
        ))
    }

    /// An abort the configuration asks for: the destination's area is smaller than the
    /// device state, so the source stops at capture (LocalError, StateOverArea) and tells
    /// the destination, which aborts by the peer's word (spec: STATE-3).
    pub(super) fn expected_state_abort(&self, side: usize, a: &rdmig_model::AbortInfo) -> bool {
        self.cfg.state_exceeds_area()
            && a.reason == AbortReason::LocalError
            && match side {
                SRC => a.detail == Detail::StateOverArea,
                _ => a.by_peer,
            }
    }
}
