//! Time: the periodic scan that fires each phase's timer (each phase decides
//! what its timeout means: `session.rs`), and the graceful shutdown with its deadline.

use std::time::{Duration, Instant};

use super::session::{Action, Timeouts};
use super::{Reason, Server};
use crate::config::Config;
use crate::http::response::Response;

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
        let t = Timeouts {
            idle: self.cfg.idle_timeout,
            ping: self.cfg.ping_interval,
        };
        self.apply_where(|c| c.timer_due(now, &t), |c| c.on_timeout(now, &t));
        if self.shutdown.overdue(now) {
            warn!("shutdown timeout: closing {} connections", self.conns.len());
            self.apply_where(|_| true, |_| Action::Remove(Reason::Shutdown));
            self.shutdown.set_queue_drained();
        }
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
        self.apply_where(|_| true, |c| c.on_shutdown());
    }
}
