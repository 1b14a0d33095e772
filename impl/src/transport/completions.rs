//! Routes data-channel acknowledgements to the writes they complete.
//!
//! A data channel is ordered, so the n-th acknowledgement completes the n-th frame posted on
//! that channel. Writes larger than one frame are split; only the last frame carries the
//! write's id, so a write completes only when all of its bytes are placed. Every
//! acknowledgement is routed to its owner: none is dropped, none completes twice.

#[cfg(loom)]
use loom::sync::Mutex;
#[cfg(not(loom))]
use std::sync::Mutex;

use std::collections::VecDeque;

/// Frames posted on one channel and not yet acknowledged.
#[derive(Debug, Default)]
pub struct ChannelCompletions {
    pending: Mutex<VecDeque<Option<u64>>>,
}

impl ChannelCompletions {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a frame about to be sent; `wr_id` on the last frame of a write.
    pub fn posted(&self, wr_id: Option<u64>) {
        self.pending.lock().unwrap().push_back(wr_id);
    }

    /// `frames` more frames were acknowledged: returns the writes they complete, in order, or
    /// `Err` if the peer acknowledged frames that were never sent.
    pub fn acked(&self, frames: u64) -> Result<Vec<u64>, u64> {
        let mut q = self.pending.lock().unwrap();
        if frames > q.len() as u64 {
            return Err(frames);
        }
        Ok(q.drain(..frames as usize).flatten().collect())
    }

    pub fn outstanding(&self) -> usize {
        self.pending.lock().unwrap().len()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn split_write_completes_on_its_last_frame() {
        let c = ChannelCompletions::new();
        c.posted(None);
        c.posted(Some(7));
        c.posted(Some(8));
        assert_eq!(c.acked(1), Ok(vec![]));
        assert_eq!(c.acked(1), Ok(vec![7]));
        assert_eq!(c.acked(2), Err(2), "over-acknowledgement is refused");
        assert_eq!(c.acked(1), Ok(vec![8]));
    }
}
