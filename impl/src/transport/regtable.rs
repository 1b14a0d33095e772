//! The destination's registration table: which remote keys may be written, and where.
//!
//! This is what an RDMA NIC enforces in hardware; the TCP transport enforces it in software
//! with the same semantics: a write lands only if its key is registered at the moment it is
//! applied and its range lies inside the registration, and once `unregister` returns no write
//! under that key can land (spec: INV-REG-1). Lookup-and-copy happens under the read lock,
//! unregister takes the write lock, so an unregister waits for a copy in progress and every
//! later copy sees the key gone.

#[cfg(loom)]
use loom::sync::RwLock;
#[cfg(not(loom))]
use std::sync::RwLock;

use std::collections::HashMap;

/// One registration: a range of a local block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub block: u16,
    pub offset: u64,
    pub len: u64,
}

/// Why a write was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    #[error("write to key {0:#x}, which is not registered")]
    UnknownKey(u32),
    #[error("write of {len} bytes at {offset} outside the {region_len}-byte registration")]
    OutOfRange {
        offset: u64,
        len: u64,
        region_len: u64,
    },
}

/// Keys to regions, safe to share between the driver and the data-channel threads.
#[derive(Debug, Default)]
pub struct RegTable {
    inner: RwLock<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<u32, Region>,
    next: u32,
}

impl RegTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `region` under a fresh key. Keys are not guessable in sequence only by a peer
    /// that has not seen REG_RESULT; a peer that guesses still only reaches registered memory.
    pub fn register(&self, region: Region, salt: u32) -> u32 {
        let mut g = self.inner.write().unwrap();
        loop {
            g.next = g.next.wrapping_add(1);
            let key = g.next.wrapping_mul(0x9E37_79B1) ^ salt;
            if key != 0 && !g.map.contains_key(&key) {
                g.map.insert(key, region);
                return key;
            }
        }
    }

    /// Removes a key; returns false if it was not registered. After this returns, no write
    /// under `key` can land.
    pub fn unregister(&self, key: u32) -> bool {
        self.inner.write().unwrap().map.remove(&key).is_some()
    }

    /// Removes every key.
    pub fn clear(&self) {
        self.inner.write().unwrap().map.clear();
    }

    pub fn len(&self) -> usize {
        self.inner.read().unwrap().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks a write against the table and, if allowed, runs `apply(block, block_offset)`
    /// while the registration is held, so it cannot be unregistered mid-copy.
    pub fn with_write<R>(
        &self,
        key: u32,
        offset: u64,
        len: u64,
        apply: impl FnOnce(u16, u64) -> R,
    ) -> Result<R, AccessError> {
        let g = self.inner.read().unwrap();
        let r = *g.map.get(&key).ok_or(AccessError::UnknownKey(key))?;
        let end = offset.checked_add(len);
        if end.is_none_or(|e| e > r.len) {
            return Err(AccessError::OutOfRange {
                offset,
                len,
                region_len: r.len,
            });
        }
        Ok(apply(r.block, r.offset + offset))
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn inv_reg_1_writes_only_inside_registered_ranges() {
        let t = RegTable::new();
        let k = t.register(
            Region {
                block: 1,
                offset: 4096,
                len: 8192,
            },
            7,
        );
        assert_eq!(t.with_write(k, 0, 8192, |b, o| (b, o)), Ok((1, 4096)));
        assert!(matches!(
            t.with_write(k, 4096, 4097, |_, _| ()),
            Err(AccessError::OutOfRange { .. })
        ));
        assert!(matches!(
            t.with_write(k, u64::MAX, 2, |_, _| ()),
            Err(AccessError::OutOfRange { .. })
        ));
        assert!(matches!(
            t.with_write(k ^ 1, 0, 1, |_, _| ()),
            Err(AccessError::UnknownKey(_))
        ));
        assert!(t.unregister(k));
        assert!(!t.unregister(k));
        assert_eq!(
            t.with_write(k, 0, 1, |_, _| ()),
            Err(AccessError::UnknownKey(k))
        );
    }
}
