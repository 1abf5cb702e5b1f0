//! A node's side of interest routing, shared by Redis and Redis Cluster: which
//! uids its subscriber already receives, the first joins and last leaves waiting
//! for the subscriber thread (bounded by `-queue-interest`), and the presence
//! counts that follow the same connections.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use crossbeam_channel::Sender;

use super::presence::Presence;
use super::redis::{Interest, Join};
use super::{Joined, PresenceRead, RoutingCounts, Ticket};

pub struct Interests {
    /// To the subscriber thread.
    tx: Sender<Interest>,
    /// Uids whose messages already reach this node.
    live: HashSet<Arc<str>>,
    /// Leaves the channel had no room for, sent on a later turn. A join of the
    /// uid meanwhile takes it back (the channel stays subscribed).
    leaves: HashSet<Arc<str>>,
    joins_refused: u64,
    /// Kept by the subscriber thread, read for `/stats`.
    received: Arc<AtomicU64>,
    channels: Arc<AtomicUsize>,
    presence: Presence,
}

impl Interests {
    pub fn new(
        tx: Sender<Interest>,
        received: Arc<AtomicU64>,
        channels: Arc<AtomicUsize>,
        presence: Presence,
    ) -> Self {
        Interests {
            tx,
            live: HashSet::new(),
            leaves: HashSet::new(),
            joins_refused: 0,
            received,
            channels,
            presence,
        }
    }

    /// [`super::Queue::join`].
    pub fn join(&mut self, ticket: Ticket, uid: &str, since: Option<&str>) -> Joined {
        self.leaves.remove(uid);
        self.send_leaves();
        if self.live.contains(uid) {
            return Joined::Live;
        }
        let join = Join {
            uid: Arc::from(uid),
            ticket,
            since: since.map(str::to_owned),
            at: Instant::now(),
        };
        match self.tx.try_send(Interest::Join(join)) {
            Ok(()) => Joined::Pending,
            Err(_) => {
                self.joins_refused += 1;
                Joined::Refused
            }
        }
    }

    /// [`super::Queue::left`].
    pub fn left(&mut self, uid: &str) {
        self.live.remove(uid);
        let uid: Arc<str> = Arc::from(uid);
        if self.tx.try_send(Interest::Leave(uid.clone())).is_err() {
            self.leaves.insert(uid);
        }
    }

    /// [`super::Queue::subscribed`].
    pub fn subscribed(&mut self, uid: &str) {
        if !self.live.contains(uid) {
            self.live.insert(Arc::from(uid));
        }
    }

    /// [`super::Queue::flush`]: what found a channel full before.
    pub fn flush(&mut self) {
        self.send_leaves();
        self.presence.retry();
    }

    pub fn presence_changed(&mut self, uid: &str, n: usize) {
        self.presence.count(uid, n);
    }

    pub fn presence(&mut self, ticket: Ticket, uids: Vec<String>) -> PresenceRead {
        match self.presence.read(ticket, uids) {
            Ok(()) => PresenceRead::Pending,
            Err(_) => PresenceRead::Unavailable,
        }
    }

    /// The node stops: others stop counting its connections now.
    pub fn stop(&self) {
        self.presence.stop();
    }

    pub fn routing(&self) -> RoutingCounts {
        RoutingCounts {
            received: self.received.load(Ordering::Relaxed),
            channels: self.channels.load(Ordering::Relaxed),
            refused: self.joins_refused,
        }
    }

    fn send_leaves(&mut self) {
        while let Some(uid) = self.leaves.iter().next().cloned() {
            if self.tx.try_send(Interest::Leave(uid.clone())).is_err() {
                return;
            }
            self.leaves.remove(&uid);
        }
    }
}
