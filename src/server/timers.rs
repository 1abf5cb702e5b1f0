//! Time: the periodic scan that fires each phase's timeout, pings silent push
//! receivers, and the graceful shutdown with its deadline.

use std::time::{Duration, Instant};

use super::conn::{Chunk, Phase};
use super::stats::Limit;
use super::{Reason, Server};
use crate::config::Config;
use crate::http::response::Response;
use crate::ws::frame::{self, OpCode};

/// Where the server is in its life.
#[derive(Debug, Default)]
pub(super) enum Shutdown {
    #[default]
    Running,
    /// SIGINT/SIGTERM arrived: no new work; what was accepted is delivered.
    Draining {
        /// When to give up waiting and close everything.
        deadline: Instant,
        /// The queue has handed over everything it had accepted.
        queue_drained: bool,
    },
}

impl Shutdown {
    pub(super) fn running(&self) -> bool {
        matches!(self, Shutdown::Running)
    }

    /// The answer to new work once shutting down.
    pub(super) fn refusal(&self) -> Option<Response> {
        (!self.running()).then(|| Response::error(503, "server is shutting down"))
    }

    pub(super) fn queue_drained(&self) -> bool {
        matches!(
            self,
            Shutdown::Draining {
                queue_drained: true,
                ..
            }
        )
    }

    pub(super) fn set_queue_drained(&mut self) {
        if let Shutdown::Draining { queue_drained, .. } = self {
            *queue_drained = true;
        }
    }

    fn overdue(&self, now: Instant) -> bool {
        matches!(self, Shutdown::Draining { deadline, .. } if now >= *deadline)
    }

    /// Shutdown is complete once the queue is drained and no connection is left.
    pub(super) fn complete(&self, no_connections: bool) -> bool {
        self.queue_drained() && no_connections
    }
}

/// Timers fire up to one tick late; a quarter of the shortest timeout keeps that small.
pub(super) fn tick_for(cfg: &Config) -> Duration {
    let shortest = [
        cfg.ping_interval,
        cfg.request_timeout,
        cfg.close_timeout,
        cfg.keepalive_timeout,
    ]
    .into_iter()
    .min()
    .unwrap_or(Duration::from_secs(1));
    (shortest / 4).clamp(Duration::from_millis(20), Duration::from_secs(1))
}

impl Server {
    pub(super) fn on_tick(&mut self, now: Instant) {
        self.queue.flush();
        self.history.sweep(crate::message::unix_now());
        self.admission.restore_spare();
        if self.admission.paused {
            self.admission.paused = false;
            self.accept();
        }
        let (idle, ping) = (self.cfg.idle_timeout, self.cfg.ping_interval);
        let due = self.keys_where(|conn| match &conn.phase {
            Phase::Ws(ws) => {
                let silent = now.saturating_duration_since(conn.last_seen);
                silent >= idle || (silent >= ping && !ws.ping_sent)
            }
            _ => now >= conn.deadline,
        });
        for key in due {
            self.on_timer(key, now);
        }
        if self.shutdown.overdue(now) {
            warn!("shutdown timeout: closing {} connections", self.conns.len());
            for key in self.keys_where(|_| true) {
                let _ = self.remove(key, Reason::Shutdown);
            }
            self.shutdown.set_queue_drained();
        }
    }

    /// A connection's timer fired: what that means is its phase's business.
    fn on_timer(&mut self, key: usize, now: Instant) {
        let idle = self.cfg.idle_timeout;
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let _ = match &mut conn.phase {
            Phase::Ws(ws) => {
                if now.saturating_duration_since(conn.last_seen) >= idle {
                    self.remove(key, Reason::Timeout("idle"))
                } else {
                    ws.ping_sent = true;
                    self.send(key, Chunk::Owned(frame::encode(OpCode::Ping, b"")))
                }
            }
            Phase::Http { busy: true, .. } => {
                self.counters.limited[Limit::RequestTimeout.index()] += 1;
                self.reply(key, &Response::error(408, "request timeout"), false, false)
            }
            Phase::Publishing { .. } | Phase::Asking { .. } => {
                let resp = Response::error(503, "queue backend did not answer in time");
                self.reply(key, &resp, false, false)
            }
            // No idle timeout: an event-stream client never sends.
            Phase::Sse(_) => self.sse_heartbeat(key, now),
            Phase::Http { busy: false, .. } => self.remove(key, Reason::Timeout("keep-alive")),
            Phase::Closing | Phase::Draining { .. } => self.remove(key, Reason::Timeout("close")),
        };
    }

    pub(super) fn begin_shutdown(&mut self) {
        if !self.shutdown.running() {
            return;
        }
        info!("shutting down: {} connections", self.conns.len());
        self.shutdown = Shutdown::Draining {
            deadline: Instant::now() + self.cfg.shutdown_timeout,
            queue_drained: false,
        };
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        // Stop taking messages; what the queue already accepted is still delivered.
        self.queue.close();
        let idle = self.keys_where(|c| {
            matches!(c.phase, Phase::Http { busy: false, .. }) && c.rbuf.is_empty()
        });
        for key in idle {
            let _ = self.remove(key, Reason::Shutdown);
        }
    }
}
