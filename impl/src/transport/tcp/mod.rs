//! TCP transport (spec: section 1.3, "TCP binding"): one control connection carrying protocol
//! frames, and one connection per data channel carrying one-sided writes as frames that the
//! destination applies straight into registered memory, refusing anything an RDMA NIC would
//! refuse (spec: DATA-1, INV-REG-1).
//!
//! Data connection, source to destination: DATA_HELLO (56 bytes, `wire::DataHello`), then data
//! frames (`frames`). Destination to source, on the same connection: DATA_JOIN_ACK (8 bytes)
//! once the session admitted the channel (spec: AUTH-6), then after each applied frame the
//! cumulative number of frames applied as u64 LE. A write completes at the source only when
//! its frames are acknowledged, so "complete" means "placed", as with RDMA (spec: RND-2).
//!
//! Every wait on the peer is bounded (spec: LIVE-2, LIVE-3): sockets carry the liveness
//! options of [`tune`](super::tune), and a frame whose first byte arrived must arrive whole
//! within the frame deadline.

mod destination;
pub mod frames;
mod source;
pub mod stream;

use std::io;
use std::time::{Duration, Instant};

use rdmig_model::wire;

pub use destination::{fuzz_tls_data_frames, DestTcp};
pub use frames::*;
pub use source::SourceTcp;

pub use stream::Stream;

/// Reads exactly `buf.len()` bytes, all of them by `deadline`.
fn read_exact_by(s: &mut Stream, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match s.read_some(&mut buf[got..], Some(deadline))? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
    }
    Ok(())
}

/// Waits, without a bound, for the first byte of the next message: a silent peer is the
/// machines' to time out (their idle and progress deadlines), and closing the socket ends
/// the wait. `Ok(None)` is the end of the stream. A receive timeout left on the socket (see
/// `RamBlock::recv_range`) only means nothing came yet.
fn read_first_byte(s: &mut Stream) -> io::Result<Option<u8>> {
    let mut b = [0u8; 1];
    match s.read_some(&mut b, None)? {
        0 => Ok(None),
        _ => Ok(Some(b[0])),
    }
}

/// Reads one control frame whose first byte is `first`: the rest by `frame` after it (spec:
/// LIVE-3). A header that fails to decode is returned as-is, so the machine sees the
/// malformed bytes and aborts.
fn read_control_frame(s: &mut Stream, first: u8, frame: Duration) -> io::Result<Vec<u8>> {
    let deadline = Instant::now() + frame;
    let mut buf = vec![0u8; wire::HEADER_LEN];
    buf[0] = first;
    read_exact_by(s, &mut buf[1..], deadline)?;
    if let Ok(h) = wire::decode_header(&buf) {
        buf.resize(wire::HEADER_LEN + h.payload_len, 0);
        read_exact_by(s, &mut buf[wire::HEADER_LEN..], deadline)?;
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    /// A connected pair and a thread that writes `bytes` one per `gap` to its far end.
    fn trickle(bytes: Vec<u8>, gap: Duration) -> TcpStream {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut w = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (r, _) = l.accept().unwrap();
        std::thread::spawn(move || {
            for b in bytes {
                std::thread::sleep(gap);
                if w.write_all(&[b]).is_err() {
                    return;
                }
            }
            std::thread::sleep(Duration::from_secs(5));
        });
        r
    }

    /// spec: LIVE-3: a control frame whose bytes keep coming, each within any per-read
    /// timeout, is still cut off at the whole-frame deadline.
    #[test]
    fn live_3_trickling_control_frame_times_out_at_the_frame_deadline() {
        let frame = wire::encode_to_vec(&wire::Frame {
            credits: 1,
            msg: wire::Message::Digests {
                first_chunk: 0,
                digests: vec![1; 8],
            },
        })
        .unwrap();
        let mut r = Stream::plain(trickle(frame.clone(), Duration::from_millis(40)));
        let t = Instant::now();
        let first = read_first_byte(&mut r).unwrap().unwrap();
        let e = read_control_frame(&mut r, first, Duration::from_millis(200)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(
            t.elapsed() < Duration::from_millis(600),
            "{:?}",
            t.elapsed()
        );
        // The same bytes sent at once arrive whole.
        let mut r = Stream::plain(trickle(frame.clone(), Duration::ZERO));
        let first = read_first_byte(&mut r).unwrap().unwrap();
        assert_eq!(
            read_control_frame(&mut r, first, Duration::from_secs(5)).unwrap(),
            frame
        );
    }

    /// spec: LIVE-3: a data payload that trickles into registered memory is cut off at the
    /// frame deadline too.
    #[test]
    fn live_3_trickling_data_payload_times_out_at_the_frame_deadline() {
        let block = crate::memory::ram::RamBlock::anonymous("ram", 64 << 10, 12).unwrap();
        let r = trickle(vec![7u8; 4096], Duration::from_millis(20));
        let t = Instant::now();
        let e = block
            .recv_range(r.as_fd(), 0, 4096, t + Duration::from_millis(200))
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(
            t.elapsed() < Duration::from_millis(600),
            "{:?}",
            t.elapsed()
        );
    }
}
