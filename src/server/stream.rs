//! A connection's socket: reads within a per-wake budget, writes through its
//! output queue, and hands input to whatever phase the connection is in.

use std::io::{self, Read};
use std::time::Instant;

use super::conn::{Chunk, Phase};
use super::session::Action;
use super::{Liveness, Reason, Server};

/// What a phase did with the input it was given.
pub(super) enum Step {
    /// Consumed this many bytes; go on.
    Progress(usize),
    /// Wait for more input.
    NeedMore,
    /// Stop reading: the phase no longer takes input now (or the connection is gone).
    Stop,
    /// Consumed this many bytes, and reacted: `apply` carries the action out; the
    /// input goes on unless the action ends the phase.
    Act(usize, Action),
}

impl Step {
    /// The input was answered with `action`: nothing more is read in this phase
    /// if it ends it.
    pub(super) fn then(used: usize, action: Action) -> Step {
        match action {
            Action::Stay => Step::Progress(used),
            action => Step::Act(used, action),
        }
    }
}

impl Server {
    pub(super) fn on_event(&mut self, key: usize, read_closed: bool) {
        if self.flush(key).alive() {
            self.read(key, read_closed);
        }
    }

    /// Reads again the connections whose budget ran out on the last round.
    pub(super) fn read_unread(&mut self) {
        for (key, serial) in std::mem::take(&mut self.unread) {
            if self.conns.get(key).is_some_and(|c| c.serial == serial) {
                self.read(key, true);
            }
        }
    }

    /// Writes what is queued; the phase then says what follows (a FIN, or input
    /// taken again).
    pub(super) fn flush(&mut self, key: usize) -> Liveness {
        let Some(conn) = self.conns.get_mut(key) else {
            return Liveness::Closed;
        };
        let max_backlog = self.cfg.max_backlog;
        let was_over = conn.out.bytes() > max_backlog;
        let action = match conn.flush() {
            Ok(()) => conn.on_written(was_over, max_backlog),
            Err(e) => Action::Remove(Reason::Io(e.0)),
        };
        self.apply(key, action)
    }

    /// Queues or writes bytes. A broken socket ends the connection, and a push
    /// receiver whose backlog passes the limit is evicted.
    pub(super) fn send(&mut self, key: usize, chunk: Chunk) -> Liveness {
        let Some(conn) = self.conns.get_mut(key) else {
            return Liveness::Closed;
        };
        if let Err(e) = conn.send(chunk) {
            return self.apply(key, Action::Remove(Reason::Io(e.0)));
        }
        self.check_backlog(key)
    }

    /// Reads, handing each chunk to the phase, until `WouldBlock`, the read budget,
    /// or, unless `drain`, a read that did not fill the buffer: that one emptied the
    /// socket, and edge-triggered readiness reports any later data, so the
    /// `WouldBlock` read would only cost a syscall. `drain` reads on to `WouldBlock`
    /// (and so to EOF) when the peer has closed or input was paused, as no new edge
    /// may come then; so does a closing connection, to free its slot soon. Past the
    /// budget the connection waits in `unread` so the others get their turn.
    pub(super) fn read(&mut self, key: usize, drain: bool) {
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut taken = 0;
        while self.takes_input(key) {
            let Some(conn) = self.conns.get_mut(key) else {
                break;
            };
            if taken >= self.cfg.read_budget {
                self.unread.push((key, conn.serial));
                break;
            }
            match conn.sock.read(&mut scratch) {
                Ok(0) => {
                    self.peer_closed(key);
                    break;
                }
                Ok(n) => {
                    conn.last_seen = Instant::now();
                    taken += n;
                    self.ingest(key, &mut scratch[..n]);
                    // A closing connection reads on: its peer's EOF may be there already.
                    let closing = matches!(
                        self.conns.get(key).map(|c| &c.phase),
                        Some(Phase::Draining { .. } | Phase::Closing)
                    );
                    if n < scratch.len() && !drain && !closing {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let _ = self.apply(key, Action::Remove(Reason::Io(e)));
                    break;
                }
            }
        }
        self.scratch = scratch;
    }

    /// Whether the connection's phase reads input now. A paused connection's bytes
    /// stay in the kernel, which pushes back on the client through TCP.
    pub(super) fn takes_input(&self, key: usize) -> bool {
        let max_backlog = self.cfg.max_backlog;
        self.conns
            .get(key)
            .is_some_and(|c| c.takes_input(max_backlog))
    }

    /// Continues a paused connection: first what it already buffered, then the socket.
    pub(super) fn resume(&mut self, key: usize) -> Liveness {
        if self.takes_input(key) {
            self.ingest(key, &mut []);
            self.read(key, true);
        }
        self.liveness(key)
    }

    pub(super) fn liveness(&self, key: usize) -> Liveness {
        if self.conns.contains(key) {
            Liveness::Alive
        } else {
            Liveness::Closed
        }
    }

    fn peer_closed(&mut self, key: usize) {
        let close_timeout = self.cfg.close_timeout;
        if let Some(action) = self
            .conns
            .get_mut(key)
            .map(|c| c.on_peer_closed(Instant::now(), close_timeout))
        {
            let _ = self.apply(key, action);
        }
    }

    /// Appends new bytes to what the connection had buffered and consumes what it can.
    fn ingest(&mut self, key: usize, input: &mut [u8]) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.rbuf.is_empty() {
            // The common case parses straight from the shared buffer, without a copy.
            let used = self.process(key, input);
            if let Some(conn) = self.conns.get_mut(key) {
                conn.rbuf.extend_from_slice(&input[used..]);
            }
        } else {
            let mut buf = std::mem::take(&mut conn.rbuf);
            buf.extend_from_slice(input);
            let used = self.process(key, &mut buf);
            if let Some(conn) = self.conns.get_mut(key) {
                buf.drain(..used);
                if !buf.is_empty() {
                    conn.rbuf = buf;
                }
            }
        }
    }

    /// Feeds `buf` to the connection's current phase until it needs more or stops.
    fn process(&mut self, key: usize, buf: &mut [u8]) -> usize {
        let mut pos = 0;
        loop {
            let Some(conn) = self.conns.get(key) else {
                return buf.len();
            };
            let step = match conn.phase {
                Phase::Http { .. } => self.http_step(key, &mut buf[pos..]),
                Phase::Ws(_) | Phase::Closing => self.ws_step(key, &mut buf[pos..]),
                // Input on an event stream is not part of the protocol: discarded.
                Phase::Sse(_) => Step::Progress(buf.len() - pos),
                Phase::Publishing { .. } | Phase::Asking { .. } => Step::Stop,
                // Nothing more is answered; input is read only to notice the peer leaving.
                Phase::Draining { .. } => Step::Progress(buf.len() - pos),
            };
            pos += match step {
                Step::Progress(n) => n,
                Step::NeedMore | Step::Stop => return pos,
                Step::Act(n, action) => {
                    let ends = action.ends();
                    if !self.apply(key, action).alive() || ends {
                        return pos;
                    }
                    n
                }
            };
            // Pipelined requests whose replies are not being read wait here,
            // unparsed: one read must not queue a reply for each of them.
            if !self.takes_input(key) {
                return pos;
            }
            let pending = self
                .conns
                .get(key)
                .is_some_and(|c| c.phase.has_pending_request());
            if pos == buf.len() && !pending {
                return pos;
            }
        }
    }
}
