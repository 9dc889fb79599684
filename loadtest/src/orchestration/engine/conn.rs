//! The connections of one event-loop thread: connect (bounded concurrency, timeouts), upgrade,
//! read and parse frames, queue and flush writes, close. What a frame means is in `messages`.

use super::{Engine, State, MAX_FRAME};
use crate::transport::codec::{self, Handshake, Parse};
use crate::transport::nonblocking::{connect_done, connect_socket, reason, ReadResult};
use mio::net::TcpStream;
use mio::Token;
use std::io;
use std::sync::atomic::Ordering;

impl Engine {
    // ---- connecting -------------------------------------------------------------------

    pub(super) fn start_connects(&mut self, now: u64) {
        while self.inflight < self.shared.connect_concurrency
            && self.next_pending < self.conns.len()
        {
            let local = self.next_pending;
            self.next_pending += 1;
            self.conns[local].started_ns = now;
            match self.open_socket(local) {
                Ok(stream) => {
                    self.conns[local].ws.stream = Some(stream);
                    self.conns[local].state = State::Connecting;
                    self.inflight += 1;
                }
                Err(e) => {
                    self.conns[local].state = State::Closed;
                    self.resolved += 1;
                    *self.connect_failures.entry(reason(&e)).or_default() += 1;
                }
            }
        }
    }

    pub(super) fn open_socket(&self, local: usize) -> io::Result<TcpStream> {
        let g = self.global(local);
        let spec = self.shared.pop.conns[g];
        let addr = self.shared.addrs[spec.addr as usize];
        let ips = &self.shared.source_ips;
        let source = (!ips.is_empty()).then(|| ips[g % ips.len()]);
        connect_socket(self.poll.registry(), Token(local), addr, source)
    }

    pub(super) fn expire_connects(&mut self, now: u64) {
        let limit = self.shared.connect_timeout.as_nanos() as u64;
        for local in 0..self.next_pending {
            let c = &self.conns[local];
            if matches!(
                c.state,
                State::Connecting | State::Handshaking | State::Upgraded
            ) && now.saturating_sub(c.started_ns) > limit
            {
                self.fail_connect(local, "timeout".into());
            }
        }
    }

    pub(super) fn fail_connect(&mut self, local: usize, why: String) {
        self.drop_stream(local);
        self.inflight -= 1;
        self.resolved += 1;
        *self.connect_failures.entry(why).or_default() += 1;
    }

    pub(super) fn drop_stream(&mut self, local: usize) {
        let c = &mut self.conns[local];
        c.ws.close(self.poll.registry());
        c.state = State::Closed;
        c.frag = None;
        let g = self.global(local);
        self.shared.open[g].store(false, Ordering::Relaxed);
    }

    pub(super) fn on_event(&mut self, local: usize, readable: bool, writable: bool) {
        match self.conns[local].state {
            State::Connecting => {
                if writable || readable {
                    self.on_connected(local);
                }
            }
            State::Handshaking | State::Upgraded | State::Open => {
                if writable {
                    self.flush(local);
                }
                if readable {
                    self.on_readable(local);
                }
            }
            State::Pending | State::Closed => {}
        }
    }

    pub(super) fn on_connected(&mut self, local: usize) {
        let Some(stream) = self.conns[local].ws.stream.as_ref() else {
            return;
        };
        match connect_done(stream) {
            Ok(true) => {
                let took = self
                    .shared
                    .now_ns()
                    .saturating_sub(self.conns[local].started_ns);
                self.tcp_us.saturating_record((took / 1000).max(1));
            }
            Ok(false) => return,
            Err(e) => return self.fail_connect(local, reason(&e)),
        }
        let g = self.global(local);
        let spec = self.shared.pop.conns[g];
        let addr = self.shared.addrs[spec.addr as usize];
        let c = &mut self.conns[local];
        let path = &self.shared.paths[spec.user as usize];
        c.ws.start_upgrade(&addr.to_string(), path, &mut self.rng);
        c.state = State::Handshaking;
        self.flush(local);
        // The response may already be waiting; edge-triggered readiness won't repeat it.
        self.on_readable(local);
    }

    // ---- reading ----------------------------------------------------------------------

    pub(super) fn on_readable(&mut self, local: usize) {
        let mut buf = std::mem::take(&mut self.scratch);
        loop {
            let state = self.conns[local].state;
            if !matches!(state, State::Handshaking | State::Upgraded | State::Open) {
                break;
            }
            match self.conns[local].ws.read(&mut buf) {
                ReadResult::Data(n) => {
                    self.phase_counters.bytes_read += n as u64;
                    let now = self.shared.now_ns();
                    if state == State::Handshaking {
                        self.conns[local].ws.rbuf.extend_from_slice(&buf[..n]);
                        self.on_handshake_bytes(local, now);
                    } else {
                        self.on_frame_bytes(local, &buf[..n], now);
                    }
                    if n < buf.len() {
                        // A short read means the socket is drained; skip the WouldBlock syscall.
                        break;
                    }
                }
                ReadResult::Drained => break,
                ReadResult::Gone(why) => {
                    self.close(local, &why);
                    break;
                }
            }
        }
        self.scratch = buf;
    }

    pub(super) fn on_handshake_bytes(&mut self, local: usize, now: u64) {
        match self.conns[local].ws.upgrade_response() {
            Handshake::Incomplete => {}
            Handshake::Rejected(why) => self.fail_connect(local, why),
            Handshake::Accepted { .. } => {
                if self.shared.sio_connect.is_empty() {
                    self.established(local, now);
                } else {
                    // Counted once the Socket.IO CONNECT is acknowledged.
                    self.conns[local].state = State::Upgraded;
                }
                if !self.conns[local].ws.rbuf.is_empty() {
                    let rest = std::mem::take(&mut self.conns[local].ws.rbuf);
                    self.on_frame_bytes(local, &rest, now);
                }
            }
        }
    }

    /// The connection is ready for traffic: count it as connected.
    pub(super) fn established(&mut self, local: usize, now: u64) {
        let c = &mut self.conns[local];
        c.state = State::Open;
        let took = now.saturating_sub(c.started_ns) / 1000;
        self.connect_us.saturating_record(took.max(1));
        self.inflight -= 1;
        self.resolved += 1;
        self.connect_ok += 1;
        let g = self.global(local);
        self.shared.open[g].store(true, Ordering::Relaxed);
    }

    /// Parses frames straight out of `data` when nothing is buffered (the common case),
    /// keeping only an incomplete tail; otherwise appends and parses the connection buffer.
    pub(super) fn on_frame_bytes(&mut self, local: usize, data: &[u8], now: u64) {
        if self.conns[local].ws.rbuf.is_empty() {
            let used = self.parse_frames(local, data, now);
            if self.conns[local].state.framed() && used < data.len() {
                self.conns[local].ws.rbuf.extend_from_slice(&data[used..]);
            }
        } else {
            let mut rbuf = std::mem::take(&mut self.conns[local].ws.rbuf);
            rbuf.extend_from_slice(data);
            let used = self.parse_frames(local, &rbuf, now);
            if self.conns[local].state.framed() {
                rbuf.drain(..used);
                self.conns[local].ws.rbuf = rbuf;
            }
        }
    }

    pub(super) fn parse_frames(&mut self, local: usize, data: &[u8], now: u64) -> usize {
        let mut pos = 0;
        while self.conns[local].state.framed() {
            match codec::parse_frame(&data[pos..], MAX_FRAME) {
                Parse::Incomplete => break,
                Parse::Error(_) => {
                    self.protocol_error(local);
                    break;
                }
                Parse::Frame(h) => {
                    let payload = &data[pos + h.header_len..pos + h.total_len()];
                    pos += h.total_len();
                    self.on_frame(local, h.fin, h.opcode, payload, now);
                }
            }
        }
        pos
    }

    pub(super) fn close(&mut self, local: usize, why: &str) {
        if matches!(
            self.conns[local].state,
            State::Handshaking | State::Upgraded
        ) {
            return self.fail_connect(local, format!("{why} during handshake"));
        }
        if self.conns[local].state == State::Open {
            self.phase_counters.disconnects += 1;
            self.tick_counters.disconnects += 1;
            *self.disconnect_reasons.entry(why.to_owned()).or_default() += 1;
        }
        self.drop_stream(local);
    }

    // ---- writing ----------------------------------------------------------------------

    pub(super) fn mark_dirty(&mut self, local: usize) {
        if !self.conns[local].dirty {
            self.conns[local].dirty = true;
            self.dirty.push(local);
        }
    }

    pub(super) fn flush_dirty(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        for &local in &dirty {
            self.conns[local].dirty = false;
            self.flush(local);
        }
        let mut dirty = dirty;
        dirty.clear();
        if self.dirty.is_empty() {
            self.dirty = dirty;
        }
    }

    pub(super) fn flush(&mut self, local: usize) {
        let (n, failed) = self.conns[local].ws.flush();
        self.phase_counters.bytes_written += n as u64;
        if let Some(why) = failed {
            self.close(local, &why);
        }
    }
}
