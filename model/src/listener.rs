//! The destination's front door: every connection a listening destination accepts, from
//! accept until it is either part of the one authenticated session or closed (spec: LIVE-4,
//! LIVE-5, AUTH-6).
//!
//! A connection identifies itself by what it sends first: a control frame makes it a
//! candidate control connection with its own [`Destination`] machine (and its own fresh
//! nonce), DATA_HELLO makes it a data connection asking to join. Each connection has a
//! handshake deadline from its accept until it is bound (AUTH verified for a control
//! connection, admission for a data connection). The first candidate whose source proves the
//! key becomes the session; the others are closed, and from then on no other control
//! connection is accepted. Nothing a connection does before AUTH reaches memory (AUTH-2), so
//! an unauthenticated, malformed or silent connection costs one slot until its deadline, and
//! never ends the listening destination nor delays another connection.

use std::collections::BTreeMap;

use crate::destination::{
    DestConfig, DestStats, Destination, DstCommand, DstInput, DstOut, DstTimer, DstTimers,
};
use crate::detail::Detail;
use crate::types::*;
use crate::wire::{AbortReason, DataHello, Frame, WireError, NONCE_LEN};

/// The driver's name for a connection; unique over the listener's life, increasing in accept
/// order.
pub type ConnId = u64;

/// Most connections in their handshake at once (spec: LIVE-5).
pub const MAX_PENDING: usize = 128;

/// Listener settings.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ListenerConfig {
    pub dest: DestConfig,
    /// Longest a connection may take from accept until it is bound (spec: LIVE-4).
    pub handshake_timeout_ms: u64,
    /// Most connections in their handshake at once; one more closes the oldest (spec: LIVE-5).
    pub max_pending: usize,
}

impl ListenerConfig {
    /// A handshake deadline of the idle timeout, at most 10 s.
    pub fn new(dest: DestConfig) -> ListenerConfig {
        ListenerConfig {
            handshake_timeout_ms: dest.idle_timeout_ms.min(10_000),
            dest,
            max_pending: MAX_PENDING,
        }
    }
}

/// Everything that can happen to a listening destination.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LsnInput {
    /// A connection was accepted. `nonce` comes from a CSPRNG, fresh for the session this
    /// connection may start (spec: AUTH-1); `binding` is its TLS channel binding when it runs
    /// inside TLS.
    Accepted {
        conn: ConnId,
        nonce: [u8; NONCE_LEN],
        binding: Option<crate::auth::Binding>,
    },
    /// A control frame arrived on `conn` (the first one makes it a control connection).
    Frame {
        conn: ConnId,
        frame: Result<Frame, WireError>,
    },
    /// `conn` opened with DATA_HELLO (spec: AUTH-6).
    DataHello {
        conn: ConnId,
        hello: Result<DataHello, WireError>,
    },
    /// `conn` closed or failed (for an admitted data connection: also a data frame an RDMA
    /// NIC would refuse).
    Closed {
        conn: ConnId,
    },
    /// A driver answer for the session: Registered, RegisterFailed, Digests, WorkloadStarted,
    /// WorkloadFailed.
    Local(DstInput),
    Timer(LsnTimer),
    /// The operator cancels.
    Cancel,
}

/// Which deadline fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LsnTimer {
    /// `conn` is past its handshake deadline (spec: LIVE-4).
    Handshake(ConnId),
    /// One of the session's timers.
    Session(DstTimer),
}

/// What the listener asks its driver to do, in order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LsnCommand {
    Send {
        conn: ConnId,
        frame: Frame,
    },
    /// Close `conn` (after the frames sent on it before this command).
    Close {
        conn: ConnId,
    },
    /// `conn` joins the session as data channel `channel` (the TCP binding answers
    /// DATA_JOIN_ACK on it).
    Admit {
        conn: ConnId,
        channel: u8,
    },
    /// A command of the session's destination machine (never Send or Finish).
    Session(DstCommand),
    /// The listener is done: the session's outcome, or a cancel before any session.
    Finish(Outcome),
}

/// The listener's deadlines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct LsnTimers {
    /// The earliest handshake deadline and its connection.
    pub handshake: Option<(Millis, ConnId)>,
    pub session: DstTimers,
}

impl LsnTimers {
    /// The earliest deadline and its kind.
    pub fn next(&self) -> Option<(Millis, LsnTimer)> {
        let h = self.handshake.map(|(t, c)| (t, LsnTimer::Handshake(c)));
        let s = self.session.next().map(|(t, k)| (t, LsnTimer::Session(k)));
        [h, s].into_iter().flatten().min()
    }
}

pub type LsnOut = Out<LsnCommand, DestStats>;

/// A connection that has not said what it is yet.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Pending {
    deadline: Millis,
    nonce: [u8; NONCE_LEN],
    binding: Option<crate::auth::Binding>,
}

/// A control connection in its handshake.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Candidate {
    deadline: Millis,
    dst: Destination,
}

/// The authenticated session: its control connection, its machine, its data connections.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Bound {
    conn: ConnId,
    dst: Destination,
    data: BTreeMap<ConnId, u8>,
}

/// The listening destination (spec: LIVE-4, LIVE-5).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Listener {
    cfg: ListenerConfig,
    now: Millis,
    pending: BTreeMap<ConnId, Pending>,
    candidates: BTreeMap<ConnId, Candidate>,
    session: Option<Bound>,
    outcome: Option<Outcome>,
}

impl Listener {
    pub fn new(cfg: ListenerConfig) -> Result<Listener, crate::source::ConfigError> {
        cfg.dest.validate()?;
        if cfg.handshake_timeout_ms == 0 || cfg.max_pending == 0 {
            return Err(crate::source::ConfigError(
                "the handshake timeout and the pending limit must be positive",
            ));
        }
        Ok(Listener {
            cfg,
            now: 0,
            pending: BTreeMap::new(),
            candidates: BTreeMap::new(),
            session: None,
            outcome: None,
        })
    }

    pub fn outcome(&self) -> Option<Outcome> {
        self.outcome
    }

    /// The authenticated session's machine, once a source proved the key.
    pub fn session(&self) -> Option<&Destination> {
        self.session.as_ref().map(|b| &b.dst)
    }

    /// The control connection of the authenticated session.
    pub fn session_conn(&self) -> Option<ConnId> {
        self.session.as_ref().map(|b| b.conn)
    }

    /// Connections in their handshake (pending and candidates).
    pub fn handshaking(&self) -> usize {
        self.pending.len() + self.candidates.len()
    }

    /// The candidate machine of a control connection in its handshake.
    pub fn candidate(&self, conn: ConnId) -> Option<&Destination> {
        self.candidates.get(&conn).map(|c| &c.dst)
    }

    pub fn config(&self) -> &ListenerConfig {
        &self.cfg
    }

    /// Every connection in its handshake with its deadline, oldest first.
    pub fn handshake_deadlines(&self) -> Vec<(ConnId, Millis)> {
        let p = self.pending.iter().map(|(&c, p)| (c, p.deadline));
        let q = self.candidates.iter().map(|(&c, p)| (c, p.deadline));
        let mut v: Vec<_> = p.chain(q).collect();
        v.sort();
        v
    }

    pub fn timers(&self) -> LsnTimers {
        if self.outcome.is_some() {
            return LsnTimers::default();
        }
        let p = self.pending.iter().map(|(&c, p)| (p.deadline, c));
        let q = self.candidates.iter().map(|(&c, p)| (p.deadline, c));
        LsnTimers {
            handshake: p.chain(q).min(),
            session: self
                .session
                .as_ref()
                .map_or(DstTimers::default(), |b| b.dst.timers()),
        }
    }

    pub fn handle(&mut self, now: Millis, input: LsnInput, out: &mut LsnOut) {
        self.now = now;
        if self.outcome.is_some() {
            if let LsnInput::Accepted { conn, .. } = input {
                out.cmds.push(LsnCommand::Close { conn });
            }
            return;
        }
        match input {
            LsnInput::Accepted {
                conn,
                nonce,
                binding,
            } => self.on_accepted(conn, nonce, binding, out),
            LsnInput::Frame { conn, frame } => self.on_frame(conn, frame, out),
            LsnInput::DataHello { conn, hello } => self.on_data_hello(conn, hello, out),
            LsnInput::Closed { conn } => self.on_closed(conn, out),
            LsnInput::Local(i) => {
                if self.session.is_some() {
                    self.feed_session(i, out);
                }
            }
            LsnInput::Timer(LsnTimer::Handshake(conn)) => {
                if self.pending.remove(&conn).is_some() || self.candidates.remove(&conn).is_some() {
                    out.cmds.push(LsnCommand::Close { conn }); // spec: LIVE-4
                }
            }
            LsnInput::Timer(LsnTimer::Session(k)) => {
                if self.session.is_some() {
                    self.feed_session(DstInput::Timer(k), out);
                }
            }
            LsnInput::Cancel => match self.session {
                Some(_) => self.feed_session(DstInput::Cancel, out),
                None => {
                    let o = Outcome::Aborted(AbortInfo {
                        reason: AbortReason::Cancelled,
                        by_peer: false,
                        detail: Detail::Cancelled,
                    });
                    self.finish(o, out);
                }
            },
        }
    }

    /// Convenience form of [`handle`](Self::handle) that returns the commands only.
    pub fn step(&mut self, now: Millis, input: LsnInput) -> Vec<LsnCommand> {
        let mut out = LsnOut::new();
        self.handle(now, input, &mut out);
        out.cmds
    }

    fn on_accepted(
        &mut self,
        conn: ConnId,
        nonce: [u8; NONCE_LEN],
        binding: Option<crate::auth::Binding>,
        out: &mut LsnOut,
    ) {
        let deadline = self.now + self.cfg.handshake_timeout_ms;
        self.pending.insert(
            conn,
            Pending {
                deadline,
                nonce,
                binding,
            },
        );
        // spec: LIVE-5: a bounded number in their handshake; the oldest makes room.
        while self.handshaking() > self.cfg.max_pending {
            let oldest_pending = self.pending.keys().next().copied();
            let oldest_candidate = self.candidates.keys().next().copied();
            let oldest = match (oldest_pending, oldest_candidate) {
                (Some(p), Some(c)) => p.min(c),
                (p, c) => p.or(c).expect("over the limit, so not empty"),
            };
            self.pending.remove(&oldest);
            self.candidates.remove(&oldest);
            out.cmds.push(LsnCommand::Close { conn: oldest });
        }
    }

    fn on_frame(&mut self, conn: ConnId, frame: Result<Frame, WireError>, out: &mut LsnOut) {
        let input = match frame {
            Ok(f) => DstInput::Frame(f),
            Err(e) => DstInput::Malformed(e),
        };
        if self.session.as_ref().is_some_and(|b| b.conn == conn) {
            return self.feed_session(input, out);
        }
        if let Some(p) = self.pending.remove(&conn) {
            if self.session.is_some() {
                // A second control connection once a session is bound is refused.
                return out.cmds.push(LsnCommand::Close { conn });
            }
            let dst = Destination::new(self.cfg.dest.clone(), p.nonce)
                .expect("configuration validated in Listener::new")
                .with_binding(p.binding)
                .with_clock(self.now);
            self.candidates.insert(
                conn,
                Candidate {
                    deadline: p.deadline,
                    dst,
                },
            );
        }
        let Some(c) = self.candidates.get_mut(&conn) else {
            // Unknown, closed already, or a data connection: nothing more is read from it.
            return out.cmds.push(LsnCommand::Close { conn });
        };
        let mut scratch = DstOut::new();
        c.dst.handle(self.now, input, &mut scratch);
        for cmd in scratch.cmds {
            match cmd {
                DstCommand::Send(frame) => out.cmds.push(LsnCommand::Send { conn, frame }),
                DstCommand::Finish(_) => {}
                other => unreachable!("a machine before AUTH issues only frames: {other:?}"),
            }
        }
        if c.dst.outcome().is_some() {
            // A failed handshake ends that connection only.
            self.candidates.remove(&conn);
            return out.cmds.push(LsnCommand::Close { conn });
        }
        if c.dst.authenticated() {
            // spec: AUTH-2: the first source to prove the key is the session; every other
            // control connection in its handshake is closed.
            let c = self.candidates.remove(&conn).expect("present");
            out.stats.authenticated_ms = Some(self.now);
            self.session = Some(Bound {
                conn,
                dst: c.dst,
                data: BTreeMap::new(),
            });
            for other in std::mem::take(&mut self.candidates).into_keys() {
                out.cmds.push(LsnCommand::Close { conn: other });
            }
        }
    }

    fn on_data_hello(
        &mut self,
        conn: ConnId,
        hello: Result<DataHello, WireError>,
        out: &mut LsnOut,
    ) {
        if self.pending.remove(&conn).is_none() {
            // Not a connection's first message: the peer broke the transport's contract. The
            // connection is closed, and a connection of the session that is closed is lost
            // to it like any other (spec: ERR-3), so nothing is sent on it afterwards.
            out.cmds.push(LsnCommand::Close { conn });
            return self.on_closed(conn, out);
        }
        // spec: AUTH-6
        let admitted = match (&mut self.session, hello) {
            (Some(b), Ok(h)) => b.dst.admit_data(&h).ok().inspect(|&ch| {
                b.data.insert(conn, ch);
            }),
            _ => None,
        };
        out.cmds.push(match admitted {
            Some(channel) => LsnCommand::Admit { conn, channel },
            None => LsnCommand::Close { conn },
        });
    }

    fn on_closed(&mut self, conn: ConnId, out: &mut LsnOut) {
        if self.pending.remove(&conn).is_some() || self.candidates.remove(&conn).is_some() {
            return;
        }
        let Some(b) = &self.session else {
            return;
        };
        // spec: ERR-3
        if b.conn == conn {
            self.feed_session(DstInput::TransportFailed, out);
        } else if let Some(&channel) = b.data.get(&conn) {
            self.feed_session(DstInput::DataLost { channel }, out);
        }
    }

    /// Feeds the session and carries its commands out; ends the listener with it.
    fn feed_session(&mut self, input: DstInput, out: &mut LsnOut) {
        let b = self.session.as_mut().expect("checked by the caller");
        let mut dout = DstOut {
            cmds: Vec::new(),
            stats: std::mem::take(&mut out.stats),
        };
        b.dst.handle(self.now, input, &mut dout);
        out.stats = dout.stats;
        let conn = b.conn;
        let mut finished = None;
        for cmd in dout.cmds {
            match cmd {
                DstCommand::Send(frame) => out.cmds.push(LsnCommand::Send { conn, frame }),
                DstCommand::Finish(o) => finished = Some(o),
                other => out.cmds.push(LsnCommand::Session(other)),
            }
        }
        if let Some(o) = finished {
            self.finish(o, out);
        }
    }

    /// Ends the listener: closes every connection still open, the session's control
    /// connection first (its last frame, STARTED or ABORT, reaches the source before the data
    /// connections go).
    fn finish(&mut self, o: Outcome, out: &mut LsnOut) {
        self.outcome = Some(o);
        let mut conns: Vec<ConnId> = Vec::new();
        if let Some(b) = &self.session {
            conns.push(b.conn);
            conns.extend(b.data.keys().copied());
        }
        conns.extend(self.pending.keys().copied());
        conns.extend(self.candidates.keys().copied());
        self.pending.clear();
        self.candidates.clear();
        for conn in conns {
            out.cmds.push(LsnCommand::Close { conn });
        }
        out.cmds.push(LsnCommand::Finish(o));
    }
}
