//! The reconnect loop that the receiving thread of each networked backend runs
//! (the Redis subscriber, the Disque consumer): connect, work until the link
//! breaks, back off, again; `Inbound::Drained` when asked to stop.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::{Backoff, Inbound, Link, Notifier, QueueState, ReactorGone};

/// How often a waiting thread looks at its stop flag. Shutdown waits at most this
/// long for it; it bounds no resource.
const TICK: Duration = Duration::from_millis(100);

/// How one session ended.
pub enum Ended {
    /// Asked to stop, and what had arrived is handed over.
    Stopped,
    /// The reactor is gone; nobody is left to tell.
    ReactorGone,
    /// Connection lost or refused: try again after a backoff.
    Lost(String),
}

/// One connection's worth of work.
pub trait Session {
    /// Connects, works, and returns how it ended; calls [`Driver::up`] once the
    /// link is live.
    fn session(&mut self, driver: &mut Driver) -> Ended;

    /// After each session, before any backoff: hand over what was received.
    fn after(&mut self, _notifier: &Notifier) -> Result<(), ReactorGone> {
        Ok(())
    }
}

/// What a session shares with the loop around it.
pub struct Driver {
    /// "Redis subscriber", "Disque consumer": for log lines.
    what: &'static str,
    /// `HOST:PORT`, never the password.
    display: String,
    link: Arc<Link>,
    stop: Arc<AtomicBool>,
    pub notifier: Notifier,
    backoff: Backoff,
    reconnects: Arc<AtomicU64>,
    connected_before: bool,
}

impl Driver {
    pub fn new(
        what: &'static str,
        display: String,
        stop: Arc<AtomicBool>,
        notifier: Notifier,
        backoff: Backoff,
        reconnects: Arc<AtomicU64>,
    ) -> Self {
        Driver {
            what,
            display,
            link: Arc::new(Link::default()),
            stop,
            notifier,
            backoff,
            reconnects,
            connected_before: false,
        }
    }

    /// The link's health, for the backend's `state()`.
    pub fn link(&self) -> Arc<Link> {
        self.link.clone()
    }

    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// The session's link is live. True when it is a re-connection, i.e. there
    /// was a time before this one when the link was down.
    pub fn up(&mut self) -> bool {
        let again = self.connected_before;
        if again {
            self.reconnects.fetch_add(1, Ordering::Relaxed);
            info!("{} connected again to {}", self.what, self.display);
        }
        self.connected_before = true;
        self.link.set_up(true);
        self.backoff.reset();
        again
    }

    /// Runs sessions until stopped or the reactor is gone.
    pub fn run(mut self, mut session: impl Session) {
        while !self.stop_requested() {
            let ended = session.session(&mut self);
            if session.after(&self.notifier).is_err() {
                return;
            }
            match ended {
                Ended::Stopped => break,
                Ended::ReactorGone => return,
                Ended::Lost(why) => {
                    if self.link.state() != QueueState::Down {
                        warn!("{}: {} unreachable: {why}", self.what, self.display);
                    }
                    self.link.set_up(false);
                    let wait = self.backoff.next_delay();
                    self.pause(wait);
                }
            }
        }
        let _ = self.notifier.send(Inbound::Drained);
    }

    /// Sleeps, but notices the stop flag within a tick.
    fn pause(&self, wait: Duration) {
        let until = Instant::now() + wait;
        while !self.stop_requested() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            thread::sleep(left.min(TICK));
        }
    }
}
