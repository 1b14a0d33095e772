//! The control channel: frames serialised on the link, delivered in order.

use super::*;

impl Sim {
    // spec: WIRE-5: every frame goes through the real codec, both ways.
    pub(super) fn send_frame(&mut self, from: usize, f: Frame) -> R {
        let code = f.msg.code();
        let bytes = match wire::encode_to_vec(&f) {
            Ok(b) => b,
            Err(e) => {
                return Err(self.fail(
                    "WIRE-5",
                    format!("a machine sent an unencodable {}: {e}", f.msg.name()),
                ))
            }
        };
        let len = bytes.len() as u64;
        if code == wire::code::ZERO {
            self.stats.zero_frames += 1;
            self.stats.zero_frame_bytes += len;
        } else {
            self.stats.control_frames += 1;
            self.stats.control_bytes += len;
        }
        self.stats.cpu[from].control_ns += self.costs.frame_ns;
        if from == SRC && code == wire::code::COMMIT {
            self.commit_sent = true;
            self.stats.commit_sent_ns = Some(self.now);
        }
        if from == SRC && code == wire::code::PREPARE {
            self.stats.prepare_sent_ns.get_or_insert(self.now);
        }
        let dir = from;
        if from == SRC && code == wire::code::HELLO {
            self.hello = Some(bytes.clone());
        }
        self.last_sent[from] = Some(bytes.clone());
        if !self.ctrl_alive {
            self.stats.frames_lost += 1;
            self.trace
                .rec(self.now, Tag::FrameLost, dir as u64, code as u64);
            return Ok(());
        }
        self.trace
            .rec(self.now, Tag::FrameSent, dir as u64, code as u64);
        let wire_ns = self.costs.wire_ns(len);
        if dir == SRC {
            // Control shares the source-to-destination link with the data; the NIC
            // interleaves queues, so a frame does not wait behind queued writes.
            self.stats.link_busy_ns += wire_ns;
        }
        let arrive = (self.now + self.costs.frame_ns + self.costs.latency_ns + wire_ns)
            .max(self.ctrl[dir].last_arrive);
        self.ctrl[dir].last_arrive = arrive;
        self.ctrl[dir].queue.push_back((arrive, bytes));
        // spec: INV-FC-1: frames in flight never exceed what the receiver has buffers for,
        // nor what it has granted.
        let rx = 1 - dir;
        let receiver = match rx {
            SRC => Some(self.src.credits()),
            _ => self
                .lsn
                .session()
                .or_else(|| self.lsn.candidate(CTRL_CONN))
                .map(|d| d.credits()),
        };
        if let (Some(c), false) = (receiver, self.crashed[rx] || self.done(rx)) {
            let inflight = self.ctrl[dir].queue.len();
            if inflight > c.window as usize || inflight > c.peer_may_send as usize {
                return Err(self.fail(
                    "INV-FC-1",
                    format!(
                        "{} frames in flight to the {}, whose window is {} and who granted {}",
                        inflight,
                        ["source", "destination"][rx],
                        c.window,
                        c.peer_may_send
                    ),
                ));
            }
        }
        let at = self.ctrl_ready(rx, arrive);
        self.schedule_ctrl(dir, at);
        Ok(())
    }

    /// When a frame that reaches the wire's end at `arrive` can be delivered to `rx`: after
    /// any receive stall and any silence of the link (never, if it is silent for good).
    pub(super) fn ctrl_ready(&self, rx: usize, arrive: u64) -> u64 {
        arrive
            .max(self.stall_until[rx])
            .max(self.ctrl_silence.until)
    }

    pub(super) fn schedule_ctrl(&mut self, dir: usize, at: u64) {
        if at == u64::MAX || self.ctrl[dir].at.is_some_and(|x| x <= at) {
            return;
        }
        self.ctrl[dir].at = Some(at);
        self.push(at, Ev::Ctrl(dir, at));
    }

    pub(super) fn deliver_ctrl(&mut self, dir: usize) -> R {
        let rx = 1 - dir;
        let Some(&(arrive, _)) = self.ctrl[dir].queue.front() else {
            return Ok(());
        };
        let ready = self.ctrl_ready(rx, arrive);
        if ready > self.now {
            self.schedule_ctrl(dir, ready);
            return Ok(());
        }
        let (_, bytes) = self.ctrl[dir].queue.pop_front().expect("front exists");
        self.stats.cpu[rx].control_ns += self.costs.frame_ns;
        let frame = wire::decode(&bytes);
        match rx {
            SRC => self.feed_src(frame.map_or_else(SrcInput::Malformed, SrcInput::Frame))?,
            _ => self.feed_lsn(LsnInput::Frame {
                conn: CTRL_CONN,
                frame,
            })?,
        }
        if let Some(&(next, _)) = self.ctrl[dir].queue.front() {
            let at = self.ctrl_ready(rx, next).max(self.now);
            self.schedule_ctrl(dir, at);
        }
        Ok(())
    }
}
