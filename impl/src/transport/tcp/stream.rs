//! One TCP connection of the binding, in clear or inside TLS 1.3: what the source's and the
//! destination's threads read, write and close. A clone shares the connection (its TLS state
//! included), so a reader and a writer can each hold one.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Instant;

use super::super::tls::{ClientTls, ServerTls, TlsStream};
use crate::memory::ram::{send_frames, wait_readable, FramePart, RamBlock};

pub struct Stream {
    tcp: TcpStream,
    tls: Option<Arc<TlsStream>>,
}

/// Plaintext bytes moved per piece through TLS: a TLS record's payload is at most 16 KiB;
/// a few records per call keep the system calls few and the buffer in cache.
const TLS_PIECE: usize = 64 << 10;

impl Stream {
    pub fn plain(tcp: TcpStream) -> Stream {
        Stream { tcp, tls: None }
    }

    /// The source's end of a connection: TLS when `tls` is given, handshake by `deadline`.
    pub fn client(
        tcp: TcpStream,
        tls: Option<&ClientTls>,
        deadline: Instant,
    ) -> io::Result<Stream> {
        match tls {
            None => Ok(Stream::plain(tcp)),
            Some(t) => {
                let s = TlsStream::client(tcp.try_clone()?, t, deadline)?;
                Ok(Stream {
                    tcp,
                    tls: Some(Arc::new(s)),
                })
            }
        }
    }

    /// The destination's end of an accepted connection.
    pub fn server(
        tcp: TcpStream,
        tls: Option<&ServerTls>,
        deadline: Instant,
    ) -> io::Result<Stream> {
        match tls {
            None => Ok(Stream::plain(tcp)),
            Some(t) => {
                let s = TlsStream::server(tcp.try_clone()?, t, deadline)?;
                Ok(Stream {
                    tcp,
                    tls: Some(Arc::new(s)),
                })
            }
        }
    }

    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(Stream {
            tcp: self.tcp.try_clone()?,
            tls: self.tls.clone(),
        })
    }

    /// The TLS session's channel binding (spec: AUTH-1), for a TLS connection.
    pub fn binding(&self) -> Option<[u8; 32]> {
        self.tls.as_ref().map(|t| t.binding())
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Reads some bytes, waiting until `deadline` (None: as long as it takes). `Ok(0)`: end of
    /// the stream.
    pub fn read_some(&mut self, buf: &mut [u8], deadline: Option<Instant>) -> io::Result<usize> {
        if let Some(t) = &self.tls {
            return t.read_some(buf, deadline);
        }
        loop {
            if let Some(d) = deadline {
                wait_readable(self.tcp.as_fd(), d)?;
            }
            match self.tcp.read(buf) {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted
                            | io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                    ) => {}
                r => return r,
            }
        }
    }

    /// Whether bytes are waiting to be read now (in clear: the socket is readable; under TLS
    /// always false, so that a caller deciding whether to acknowledge before a read does).
    pub fn has_input(&self) -> bool {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        if self.tls.is_some() {
            return false;
        }
        let mut fds = [PollFd::new(&self.tcp, PollFlags::IN)];
        let now = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        matches!(poll(&mut fds, Some(&now)), Ok(n) if n > 0)
    }

    pub fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match &self.tls {
            Some(t) => t.write_all(buf),
            None => self.tcp.write_all(buf),
        }
    }

    pub fn shutdown(&self, how: Shutdown) {
        match &self.tls {
            Some(t) => t.shutdown(how),
            None => {
                let _ = self.tcp.shutdown(how);
            }
        }
    }

    /// Receives exactly `len` bytes into `[offset, offset+len)` of `block` by `deadline`:
    /// straight from the kernel into memory in clear, through a bounded buffer under TLS (only
    /// bytes that passed the record's integrity check are ever written to memory).
    pub fn recv_into(
        &mut self,
        block: &RamBlock,
        offset: u64,
        len: u64,
        deadline: Instant,
    ) -> io::Result<()> {
        let Some(t) = &self.tls else {
            return block.recv_range(self.tcp.as_fd(), offset, len, deadline);
        };
        let mut buf = vec![0u8; (len as usize).min(TLS_PIECE)];
        let mut done = 0u64;
        while done < len {
            let want = ((len - done) as usize).min(buf.len());
            let n = t.read_some(&mut buf[..want], Some(deadline))?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            block.write(offset + done, &buf[..n]);
            done += n as u64;
        }
        Ok(())
    }

    /// Sends frames back to back: in one `writev` where it can in clear, one after the other
    /// under TLS.
    pub fn send_frames(&mut self, frames: &[FramePart<'_>]) -> io::Result<()> {
        if self.tls.is_none() {
            return send_frames(self.tcp.as_fd(), frames);
        }
        for f in frames {
            self.send_from(f.block, f.header, f.offset, f.len)?;
        }
        Ok(())
    }

    /// Sends `header` and then `[offset, offset+len)` of `block`: from the mapping with one
    /// `writev` in clear, sealed piece by piece under TLS.
    pub fn send_from(
        &mut self,
        block: &RamBlock,
        header: &[u8],
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let Some(t) = &self.tls else {
            return block.send_range(self.tcp.as_fd(), header, offset, len);
        };
        let mut buf = Vec::with_capacity(header.len() + (len as usize).min(TLS_PIECE));
        buf.extend_from_slice(header);
        let mut done = 0u64;
        loop {
            let room = TLS_PIECE.saturating_sub(buf.len()).max(1);
            let n = ((len - done) as usize).min(room);
            let at = buf.len();
            buf.resize(at + n, 0);
            block.read(offset + done, &mut buf[at..]);
            done += n as u64;
            t.write_all(&buf)?;
            buf.clear();
            if done == len {
                return Ok(());
            }
        }
    }
}
