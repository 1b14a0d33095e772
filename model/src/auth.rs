//! Pre-shared-key mutual authentication (spec: AUTH-1 .. AUTH-5).
//!
//! Both MACs cover the full HELLO and HELLO_ACK payloads, so they bind the session id, both
//! nonces and every negotiated parameter: a peer that tampers with the negotiation, or replays
//! an old session, fails verification.

use crate::wire::{self, Frame, Message, MAC_LEN};
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const DST_LABEL: &[u8] = b"rdmig/1 dst";
const SRC_LABEL: &[u8] = b"rdmig/1 src";

/// The encoded payload of a message (the bytes after the frame header).
pub fn payload(msg: &Message) -> Vec<u8> {
    let mut v = wire::encode_to_vec(&Frame {
        credits: 0,
        msg: msg.clone(),
    })
    .expect("machines only build messages within spec bounds");
    v.drain(..wire::HEADER_LEN);
    v
}

/// The channel binding of a connection inside TLS: an exporter value of the TLS session
/// (spec: AUTH-1). Both MACs cover it, so a handshake relayed between two TLS sessions fails.
pub type Binding = [u8; 32];

fn mac(key: &[u8], label: &[u8], parts: &[&[u8]], binding: Option<&Binding>) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    m.update(label);
    for p in parts.iter().copied().chain(binding.map(|b| &b[..])) {
        m.update(&(p.len() as u32).to_le_bytes());
        m.update(p);
    }
    m
}

/// Destination's proof: over HELLO and HELLO_ACK with its mac field zeroed, and the channel
/// binding inside TLS.
pub fn dst_mac(
    key: &[u8],
    hello: &[u8],
    ack_zero_mac: &[u8],
    binding: Option<&Binding>,
) -> [u8; MAC_LEN] {
    mac(key, DST_LABEL, &[hello, ack_zero_mac], binding)
        .finalize()
        .into_bytes()
        .into()
}

/// Source's proof: over HELLO and the complete HELLO_ACK, and the channel binding inside TLS.
pub fn src_mac(key: &[u8], hello: &[u8], ack: &[u8], binding: Option<&Binding>) -> [u8; MAC_LEN] {
    mac(key, SRC_LABEL, &[hello, ack], binding)
        .finalize()
        .into_bytes()
        .into()
}

/// Constant-time check of the destination's proof (spec: AUTH-5).
pub fn verify_dst(
    key: &[u8],
    hello: &[u8],
    ack_zero_mac: &[u8],
    binding: Option<&Binding>,
    tag: &[u8; MAC_LEN],
) -> bool {
    mac(key, DST_LABEL, &[hello, ack_zero_mac], binding)
        .verify_slice(tag)
        .is_ok()
}

/// Constant-time check of the source's proof (spec: AUTH-5).
pub fn verify_src(
    key: &[u8],
    hello: &[u8],
    ack: &[u8],
    binding: Option<&Binding>,
    tag: &[u8; MAC_LEN],
) -> bool {
    mac(key, SRC_LABEL, &[hello, ack], binding)
        .verify_slice(tag)
        .is_ok()
}

const DATA_LABEL: &[u8] = b"rdmig/1 data";

/// Token a data-channel connection presents to join an authenticated session (spec: AUTH-6).
/// It binds the session id, the channel index and the destination's fresh nonce, so it cannot
/// be forged without the key nor replayed into another session. Insecure mode uses zeros.
pub fn data_token(
    key: Option<&[u8]>,
    session_id: u64,
    channel: u8,
    dst_nonce: &[u8; 32],
) -> [u8; MAC_LEN] {
    match key {
        Some(k) => mac(
            k,
            DATA_LABEL,
            &[&session_id.to_le_bytes(), &[channel], dst_nonce],
            None,
        )
        .finalize()
        .into_bytes()
        .into(),
        None => [0; MAC_LEN],
    }
}

/// Constant-time check of a data-channel token (spec: AUTH-6).
pub fn verify_data_token(
    key: Option<&[u8]>,
    session_id: u64,
    channel: u8,
    dst_nonce: &[u8; 32],
    tag: &[u8; MAC_LEN],
) -> bool {
    match key {
        Some(k) => mac(
            k,
            DATA_LABEL,
            &[&session_id.to_le_bytes(), &[channel], dst_nonce],
            None,
        )
        .verify_slice(tag)
        .is_ok(),
        None => *tag == [0; MAC_LEN],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// spec: AUTH-1: inside TLS both proofs cover the session's binding: a proof made on one
    /// TLS session (or outside TLS) does not verify on another.
    #[test]
    fn auth_1_proofs_are_bound_to_the_tls_session() {
        let (key, hello, ack) = (b"k".as_slice(), b"hello".as_slice(), b"ack".as_slice());
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let d = dst_mac(key, hello, ack, Some(&a));
        assert!(verify_dst(key, hello, ack, Some(&a), &d));
        assert!(!verify_dst(key, hello, ack, Some(&b), &d));
        assert!(!verify_dst(key, hello, ack, None, &d));
        let s = src_mac(key, hello, ack, Some(&a));
        assert!(verify_src(key, hello, ack, Some(&a), &s));
        assert!(!verify_src(key, hello, ack, Some(&b), &s));
        let plain = src_mac(key, hello, ack, None);
        assert!(!verify_src(key, hello, ack, Some(&a), &plain));
        // The parts are length-prefixed: moving bytes between them changes the proof.
        assert!(!verify_src(key, b"hell", b"oack", None, &plain));
    }
}
