//! The operations the driver needs from a transport, whatever carries the bytes (TCP, RDMA
//! verbs). Transports report what happens asynchronously as [`Event`]s on a channel the
//! driver owns; everything else is a direct call.

use std::io;

use rdmig_model::auth;

pub mod completions;
pub mod regtable;
pub mod tcp;
pub mod verbs;

/// Bytes of the DATA_HELLO a data channel opens with (both bindings, spec: AUTH-6).
pub const DATA_HELLO_LEN: usize = 56;
const HELLO_MAGIC: &[u8; 8] = b"RDMGDATA";

/// What the transport tells the driver.
#[derive(Debug)]
pub enum Event {
    /// A complete control frame (header and payload), not yet decoded.
    Control(Vec<u8>),
    /// The control connection ended or broke.
    ControlClosed(String),
    /// A write is placed at the destination.
    WriteDone(u64),
    /// A data connection failed.
    DataFailed(String),
    /// The peer sent a data frame an RDMA NIC would refuse.
    DataViolation(String),
}

/// One write as the source driver posts it.
#[derive(Debug, Clone, Copy)]
pub struct WriteReq {
    pub wr_id: u64,
    pub block: u16,
    pub offset: u64,
    pub len: u64,
    pub rkey: u32,
    pub remote_offset: u64,
}

pub fn hello_bytes(session_id: u64, channel: u8, token: &[u8; 32]) -> [u8; DATA_HELLO_LEN] {
    let mut b = [0u8; DATA_HELLO_LEN];
    b[..8].copy_from_slice(HELLO_MAGIC);
    b[8..16].copy_from_slice(&session_id.to_le_bytes());
    b[16] = channel;
    b[24..56].copy_from_slice(token);
    b
}

pub fn parse_hello(b: &[u8; DATA_HELLO_LEN]) -> Option<(u64, u8, [u8; 32])> {
    if &b[..8] != HELLO_MAGIC || b[17..24] != [0; 7] {
        return None;
    }
    let mut s = [0u8; 8];
    s.copy_from_slice(&b[8..16]);
    let mut token = [0u8; 32];
    token.copy_from_slice(&b[24..56]);
    Some((u64::from_le_bytes(s), b[16], token))
}

/// What a data connection must prove to join the session (spec: AUTH-6).
#[derive(Clone)]
pub struct DataAuth {
    pub session_id: u64,
    pub key: Option<Vec<u8>>,
    pub nonce: [u8; 32],
    pub channels: u8,
}

impl DataAuth {
    /// Admits a data channel that presented `hello`: the current session, a channel index
    /// below the negotiated count and not joined yet, and a token that verifies (spec: AUTH-6).
    /// Returns the channel index and records it as joined.
    pub(crate) fn admit(
        &self,
        hello: &[u8; DATA_HELLO_LEN],
        joined: &mut std::collections::BTreeSet<u8>,
    ) -> Option<u8> {
        let (sid, ch, token) = parse_hello(hello)?;
        let ok = sid == self.session_id
            && ch < self.channels
            && !joined.contains(&ch)
            && auth::verify_data_token(self.key.as_deref(), sid, ch, &self.nonce, &token);
        (ok && joined.insert(ch)).then_some(ch)
    }
}

/// The source's end of a migration.
pub trait SourceLink {
    /// Sends one encoded control frame, in order.
    fn send_control(&mut self, frame: &[u8]) -> io::Result<()>;
    /// Opens `n` data channels for the authenticated session (spec: AUTH-6).
    fn open_data(
        &mut self,
        n: u8,
        session_id: u64,
        key: Option<&[u8]>,
        dst_nonce: &[u8; 32],
    ) -> io::Result<()>;
    /// Posts a one-sided write; its completion arrives as `Event::WriteDone` once placed.
    fn post_write(&mut self, channel: u8, w: WriteReq) -> io::Result<()>;
    fn channels_open(&self) -> usize;
    /// Closes everything; outstanding operations are abandoned.
    fn shutdown(&mut self);
    /// Short name for reports (`tcp`, `rdma`).
    fn name(&self) -> &'static str;
}

/// The destination's end of a migration.
pub trait DestLink {
    fn send_control(&mut self, frame: &[u8]) -> io::Result<()>;
    /// From now on data channels proving `auth` may join (spec: AUTH-2, AUTH-6).
    fn allow_data(&mut self, auth: DataAuth);
    /// Exposes `[offset, offset+len)` of local block `block` for remote writes, least
    /// privilege: remote write on exactly that range. Returns the remote key.
    fn register(&mut self, block: u16, offset: u64, len: u64) -> io::Result<u32>;
    /// Revokes a key; no write under it lands after this returns.
    fn unregister(&mut self, key: u32) -> bool;
    fn shutdown(&mut self);
    fn name(&self) -> &'static str;
}

impl SourceLink for crate::transport::tcp::SourceTcp {
    fn send_control(&mut self, frame: &[u8]) -> io::Result<()> {
        crate::transport::tcp::SourceTcp::send_control(self, frame)
    }
    fn open_data(
        &mut self,
        n: u8,
        session_id: u64,
        key: Option<&[u8]>,
        dst_nonce: &[u8; 32],
    ) -> io::Result<()> {
        crate::transport::tcp::SourceTcp::open_data(self, n, session_id, key, dst_nonce)
    }
    fn post_write(&mut self, channel: u8, w: WriteReq) -> io::Result<()> {
        crate::transport::tcp::SourceTcp::post_write(self, channel, w)
    }
    fn channels_open(&self) -> usize {
        crate::transport::tcp::SourceTcp::channels_open(self)
    }
    fn shutdown(&mut self) {
        crate::transport::tcp::SourceTcp::shutdown(self)
    }
    fn name(&self) -> &'static str {
        "tcp"
    }
}

impl DestLink for crate::transport::tcp::DestTcp {
    fn send_control(&mut self, frame: &[u8]) -> io::Result<()> {
        crate::transport::tcp::DestTcp::send_control(self, frame)
    }
    fn allow_data(&mut self, auth: DataAuth) {
        crate::transport::tcp::DestTcp::allow_data(self, auth)
    }
    fn register(&mut self, block: u16, offset: u64, len: u64) -> io::Result<u32> {
        Ok(crate::transport::tcp::DestTcp::register(
            self, block, offset, len,
        ))
    }
    fn unregister(&mut self, key: u32) -> bool {
        crate::transport::tcp::DestTcp::unregister(self, key)
    }
    fn shutdown(&mut self) {
        crate::transport::tcp::DestTcp::shutdown(self)
    }
    fn name(&self) -> &'static str {
        "tcp"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_roundtrip() {
        let t = [7u8; 32];
        assert_eq!(parse_hello(&hello_bytes(42, 3, &t)), Some((42, 3, t)));
    }
}
