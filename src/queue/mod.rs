//! Between `/send` and the sockets: the queue backends behind one trait.
//!
//! The reactor hands each accepted batch to [`Queue::publish`], which must not block:
//! a backend either answers at once or later through an [`Inbound::Published`] event.
//! Every backend runs its own thread(s) that feed [`Inbound`] events into one
//! crossbeam channel and wake the reactor through the shared [`Notifier`].

pub mod cluster;
pub mod disque;
pub mod driver;
pub mod interests;
pub mod list;
pub mod nodes;
pub mod presence;
pub mod publisher;
pub mod reader;
pub mod redis;
pub mod shard;
pub mod shards;
pub mod streams;
pub mod subconn;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::{Sender, TrySendError};

use crate::message::Envelope;

/// Names the HTTP request waiting for a publish result: the connection's slab key
/// and its serial number, so a reply never reaches a newer connection in the same slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    pub key: usize,
    pub serial: u64,
}

/// What the queue side tells the reactor.
#[derive(Debug)]
pub enum Inbound {
    /// Messages to push to this node's connections.
    Deliver(Vec<Envelope>),
    /// Messages this node accepted itself (the list): the reactor pushes them,
    /// then answers the `/send` requests that brought them, so that the `200`
    /// leaves after the pushes and each reply's round trip carries its delivery.
    DeliverThenAnswer {
        batch: Vec<Envelope>,
        tickets: Vec<Ticket>,
    },
    /// Like `Deliver`, for a backend that must hear when the reactor has taken the
    /// messages: the reactor delivers, then hands `job` back through [`Queue::ack`].
    DeliverJob { batch: Vec<Envelope>, job: String },
    /// The outcome of a publish that answered `Submit::Pending`.
    Published {
        ticket: Ticket,
        result: Result<(), QueueError>,
    },
    /// After [`Queue::close`]: everything the backend had accepted has been delivered.
    Drained,
    /// A subscription that was lost is live again. What was published in between
    /// never reached this node: this is where the gap is filled from history.
    Resubscribed,
    /// A lost subscription's gap could not be filled (history trimmed past it, or
    /// Redis lost its data): the node's connections may have missed messages and
    /// are told to reconnect, so that each resumes from its own last id.
    Unfilled,
    /// Like `Unfilled`, for the connections of these uids only (Redis Cluster: one
    /// uid's stream could not fill its gap).
    UnfilledFor(Vec<String>),
    /// The answer to a `/presence` read ([`Queue::presence`]): each uid asked for
    /// with its connections on every live node.
    Presence {
        ticket: Ticket,
        result: Result<Vec<(String, u64)>, String>,
    },
    /// The history a resuming connection asked for ([`Queue::resume`]).
    History {
        ticket: Ticket,
        fetched: Result<streams::Fetched, String>,
    },
}

/// Where a resume's history comes from.
#[derive(Debug, PartialEq, Eq)]
pub enum Resume {
    /// The node's own retention (`list`, Disque): the reactor replays at once.
    Local,
    /// The backend reads it and answers with [`Inbound::History`].
    Pending,
    /// It cannot be read now (too many reads waiting): answer `complete:false`.
    Unavailable,
}

/// How a push connection of a uid starts receiving ([`Queue::join`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Joined {
    /// Live messages for the uid already reach this node.
    Live,
    /// The backend first makes them reach this node, then reads what the uid got
    /// since the connection joined (or since its `since`) and answers with
    /// [`Inbound::History`]; live pushes to the connection are held meanwhile.
    Pending,
    /// Too many connections are starting at once: the connection is turned away.
    Refused,
}

/// Where a `/presence` answer comes from ([`Queue::presence`]).
#[derive(Debug, PartialEq, Eq)]
pub enum PresenceRead {
    /// This node's hub: it is the whole deployment (`list`), or the backend keeps
    /// no presence.
    Local,
    /// The backend reads it and answers with [`Inbound::Presence`].
    Pending,
    /// It cannot be read now (too many reads waiting): 503.
    Unavailable,
    /// The backend cannot know other nodes' connections (Disque): 501.
    Unsupported,
}

/// What a backend that routes by interest received, for `/stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoutingCounts {
    /// Messages read from the backend by this node (repeats included).
    pub received: u64,
    /// Uids whose channel this node is subscribed to.
    pub channels: usize,
    /// Connections turned away because the subscriber had too many joins waiting.
    pub refused: u64,
}

/// The immediate answer to a publish.
#[derive(Debug)]
pub enum Submit {
    Done(Result<(), QueueError>),
    Pending,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueueError {
    /// The backend holds as many messages as it may.
    Full,
    /// The backend cannot be reached or refused the message.
    Unavailable(String),
    /// The node is shutting down.
    Closed,
}

impl QueueError {
    /// Every queue failure means "try again later / elsewhere" to a publisher.
    pub fn status(&self) -> u16 {
        503
    }
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueueError::Full => write!(f, "queue is full"),
            QueueError::Unavailable(why) => write!(f, "queue backend unavailable: {why}"),
            QueueError::Closed => write!(f, "server is shutting down"),
        }
    }
}

impl std::error::Error for QueueError {}

/// Backend health as shown by `/healthz`, `/stats` and `/metrics`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueState {
    Up,
    Connecting,
    Down,
}

impl QueueState {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueState::Up => "up",
            QueueState::Connecting => "connecting",
            QueueState::Down => "down",
        }
    }
}

pub trait Queue: Send {
    /// The backend's name for `/stats`.
    fn name(&self) -> &'static str;
    fn state(&self) -> QueueState;
    /// Takes one validated batch. Runs on the reactor thread: never blocks.
    fn publish(&mut self, ticket: Ticket, batch: Vec<Envelope>) -> Submit;
    /// The poll round is over and its replies are written: a backend that gathers
    /// what `publish` accepted hands it on now, in one go. Runs on the reactor
    /// thread: must not block.
    fn end_round(&mut self) {}
    /// Stops taking messages (publish answers `Closed`); the backend sends
    /// [`Inbound::Drained`] once what it had accepted is handed over.
    fn close(&mut self);
    /// The reactor has delivered an [`Inbound::DeliverJob`]; runs on the reactor
    /// thread, so it only passes the id on. Backends without jobs ignore it.
    fn ack(&mut self, _job: String) {}

    /// Asks for the history after `since` for a resuming connection. Runs on the
    /// reactor thread: must not block.
    fn resume(&mut self, _ticket: Ticket, _uid: Option<&str>, _since: &str) -> Resume {
        Resume::Local
    }

    /// A push connection of `uid` joined the hub. Runs on the reactor thread:
    /// must not block. Backends that hand every node every message answer `Live`.
    fn join(&mut self, _ticket: Ticket, _uid: &str, _since: Option<&str>) -> Joined {
        Joined::Live
    }

    /// The last push connection of `uid` on this node left.
    fn left(&mut self, _uid: &str) {}

    /// A connection of `uid` got its [`Inbound::History`]: live messages for the
    /// uid reach this node from now on, later connections of it start at once.
    fn subscribed(&mut self, _uid: &str) {}

    /// A uid's connections on this node are now `n` (after every join and leave).
    fn presence_changed(&mut self, _uid: &str, _n: usize) {}

    /// Asks which of `uids` are online across the deployment. Runs on the reactor
    /// thread: must not block.
    fn presence(&mut self, _ticket: Ticket, _uids: Vec<String>) -> PresenceRead {
        PresenceRead::Local
    }

    /// What interest routing received; zero for backends without it.
    fn routing(&self) -> RoutingCounts {
        RoutingCounts::default()
    }

    /// How often the backend has re-established a lost connection.
    fn reconnects(&self) -> u64 {
        0
    }

    /// Messages received for this node but dropped because delivery was too far
    /// behind (`-queue-backlog` full), and `/send` batches refused for that reason.
    fn backlog(&self) -> BacklogCounts {
        BacklogCounts::default()
    }

    /// Sends on what the reactor queued for the backend this turn (interest and
    /// presence changes). Runs on the reactor thread, after a join and on every
    /// timer tick: must not block.
    fn flush(&mut self) {}
}

/// See [`Queue::backlog`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BacklogCounts {
    pub dropped: u64,
    pub refused: u64,
}

/// Capped exponential backoff between reconnect attempts, with jitter so that
/// many nodes do not hammer a restarted server in lockstep.
#[derive(Debug)]
pub struct Backoff {
    first: std::time::Duration,
    max: std::time::Duration,
    next: std::time::Duration,
}

impl Backoff {
    pub fn new(first: std::time::Duration, max: std::time::Duration) -> Self {
        let first = first.min(max);
        Backoff {
            first,
            max,
            next: first,
        }
    }

    /// The wait before the next attempt: between half and all of the current
    /// step, which then doubles up to the cap.
    pub fn next_delay(&mut self) -> std::time::Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        // Sub-second clock noise is jitter enough here; no random generator needed.
        let noise = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let half = step / 2;
        half + half.mul_f64(f64::from(noise % 1000) / 1000.0)
    }

    /// A connection succeeded: start again from the shortest wait.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

/// One connection's health, written by a backend thread, read by the reactor.
#[derive(Debug, Default)]
pub struct Link {
    /// Connected and working.
    up: AtomicBool,
    /// At least one attempt has finished, so "not up" means down, not "still starting".
    tried: AtomicBool,
}

impl Link {
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Release);
        self.tried.store(true, Ordering::Release);
    }
    pub fn state(&self) -> QueueState {
        if self.up.load(Ordering::Acquire) {
            QueueState::Up
        } else if self.tried.load(Ordering::Acquire) {
            QueueState::Down
        } else {
            QueueState::Connecting
        }
    }
    /// The worse of two links: a backend is up only when all its connections are.
    pub fn combined(a: &Link, b: &Link) -> QueueState {
        match (a.state(), b.state()) {
            (QueueState::Down, _) | (_, QueueState::Down) => QueueState::Down,
            (QueueState::Up, QueueState::Up) => QueueState::Up,
            _ => QueueState::Connecting,
        }
    }
}

/// Why [`Notifier::try_deliver`] did not send.
#[derive(Debug)]
pub enum TrySend {
    /// The reactor is behind: here is the event back.
    Full(Inbound),
    /// The reactor is gone.
    Gone,
}

/// The reactor has stopped; backend threads should end.
#[derive(Debug)]
pub struct ReactorGone;

/// The sending half of the reactor's inbound channel plus its waker.
///
/// Wake-ups are coalesced: while the reactor has not drained the channel yet,
/// further sends skip the syscall.
#[derive(Clone)]
pub struct Notifier {
    tx: Sender<Inbound>,
    waker: Arc<mio::Waker>,
    pending: Arc<AtomicBool>,
    /// SIGINT/SIGTERM. A flag rather than a channel event, so a shutdown is seen
    /// at once, not behind deliveries already queued, and asking never blocks.
    shutdown: Arc<AtomicBool>,
}

impl Notifier {
    pub fn new(tx: Sender<Inbound>, waker: Arc<mio::Waker>) -> Self {
        Notifier {
            tx,
            waker,
            pending: Arc::new(AtomicBool::new(false)),
            shutdown: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Asks the reactor for a graceful shutdown.
    pub fn request_shutdown(&self) {
        self.shutdown.store(true, Ordering::Release);
        let _ = self.waker.wake();
    }

    pub fn shutdown_requested(&self) -> bool {
        self.shutdown.load(Ordering::Acquire)
    }

    /// Sends an event, blocking while the channel is full (back-pressure on the
    /// backend thread, never on the reactor). Err when the reactor is gone.
    pub fn send(&self, event: Inbound) -> Result<(), ReactorGone> {
        self.tx.send(event).map_err(|_| ReactorGone)?;
        if !self.pending.swap(true, Ordering::AcqRel) {
            // A failed wake means the poller is gone, i.e. the process is exiting.
            let _ = self.waker.wake();
        }
        Ok(())
    }

    /// Sends `event` if the channel has room, else gives it back, so a backend
    /// thread that must keep reading elsewhere can hold it meanwhile.
    pub fn try_deliver(&self, event: Inbound) -> Result<(), TrySend> {
        match self.tx.try_send(event) {
            Ok(()) => {}
            Err(TrySendError::Full(event)) => return Err(TrySend::Full(event)),
            Err(TrySendError::Disconnected(_)) => return Err(TrySend::Gone),
        }
        if !self.pending.swap(true, Ordering::AcqRel) {
            let _ = self.waker.wake();
        }
        Ok(())
    }

    /// Called by the reactor before it drains the channel.
    pub fn clear(&self) {
        self.pending.store(false, Ordering::Release);
    }
}
