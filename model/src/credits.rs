//! Credit accounting for the control channel, identical on both sides (spec: FC-1 .. FC-5).

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Credits {
    /// Frames this side may still send.
    pub send: u16,
    /// The peer's receive window, once known.
    pub peer_window: u16,
    /// This side's receive window.
    pub window: u16,
    /// Frames received whose buffers were re-posted but not yet granted back.
    pub ungranted: u16,
    /// Frames the peer may still send, as this side accounts them.
    pub peer_may_send: u16,
}

/// Frames either side may send before it learns the peer's window (spec: FC-1).
pub const INITIAL_CREDITS: u16 = crate::wire::MIN_CREDIT_WINDOW;

impl Credits {
    pub fn new(window: u16) -> Self {
        Credits {
            send: INITIAL_CREDITS,
            peer_window: INITIAL_CREDITS,
            window,
            ungranted: 0,
            peer_may_send: INITIAL_CREDITS,
        }
    }
    /// This side announced its full window in HELLO or HELLO_ACK.
    pub fn announce_window(&mut self) {
        self.peer_may_send += self.window - INITIAL_CREDITS;
    }
    /// The peer announced its window.
    pub fn learn_peer_window(&mut self, w: u16) {
        self.send += w - INITIAL_CREDITS;
        self.peer_window = w;
    }
    /// spec: FC-3: the last credit is kept for a frame that returns credits, so two sides
    /// that are both down to one credit can always unblock each other.
    pub fn can_send(&self) -> bool {
        self.send >= 2 || (self.send == 1 && self.ungranted >= 1)
    }
    /// Takes a credit and returns the grant to put in the frame.
    pub fn take(&mut self) -> u16 {
        assert!(self.can_send(), "INV-FC-1: sending without credit");
        self.send -= 1;
        let g = self.ungranted;
        self.ungranted = 0;
        self.peer_may_send += g;
        g
    }
    /// Accounts a received frame; `Err` if the peer overran its credits or over-granted.
    pub fn on_receive(&mut self, grant: u16) -> Result<(), crate::Detail> {
        if self.peer_may_send == 0 {
            return Err(crate::Detail::NoCredit); // spec: FC-5
        }
        self.peer_may_send -= 1;
        self.ungranted += 1;
        let send = self.send as u32 + grant as u32;
        if send > self.peer_window as u32 {
            return Err(crate::Detail::OverGrant); // spec: FC-5
        }
        self.send = send as u16;
        Ok(())
    }
    /// spec: FC-4: return credits with a NOP once half the window is ungranted.
    pub fn wants_nop(&self) -> bool {
        self.ungranted >= 1 && self.ungranted >= self.window / 2 && self.can_send()
    }
}
