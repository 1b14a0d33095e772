//! The operations the driver needs from a transport, whatever carries the bytes (TCP, RDMA
//! verbs). Transports report what happens asynchronously as [`Event`]s on a channel the
//! driver owns; everything else is a direct call.

use std::io;

pub use crate::tcp::{DataAuth, Event, WriteReq};

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

impl SourceLink for crate::tcp::SourceTcp {
    fn send_control(&mut self, frame: &[u8]) -> io::Result<()> {
        crate::tcp::SourceTcp::send_control(self, frame)
    }
    fn open_data(
        &mut self,
        n: u8,
        session_id: u64,
        key: Option<&[u8]>,
        dst_nonce: &[u8; 32],
    ) -> io::Result<()> {
        crate::tcp::SourceTcp::open_data(self, n, session_id, key, dst_nonce)
    }
    fn post_write(&mut self, channel: u8, w: WriteReq) -> io::Result<()> {
        crate::tcp::SourceTcp::post_write(self, channel, w)
    }
    fn channels_open(&self) -> usize {
        crate::tcp::SourceTcp::channels_open(self)
    }
    fn shutdown(&mut self) {
        crate::tcp::SourceTcp::shutdown(self)
    }
    fn name(&self) -> &'static str {
        "tcp"
    }
}

impl DestLink for crate::tcp::DestTcp {
    fn send_control(&mut self, frame: &[u8]) -> io::Result<()> {
        crate::tcp::DestTcp::send_control(self, frame)
    }
    fn allow_data(&mut self, auth: DataAuth) {
        crate::tcp::DestTcp::allow_data(self, auth)
    }
    fn register(&mut self, block: u16, offset: u64, len: u64) -> io::Result<u32> {
        Ok(crate::tcp::DestTcp::register(self, block, offset, len))
    }
    fn unregister(&mut self, key: u32) -> bool {
        crate::tcp::DestTcp::unregister(self, key)
    }
    fn shutdown(&mut self) {
        crate::tcp::DestTcp::shutdown(self)
    }
    fn name(&self) -> &'static str {
        "tcp"
    }
}
