//! Redis: `/send` on any node appends each message to the history streams and
//! PUBLISHes it in one script (`streams.rs`); every node SUBSCRIBEs to the channel
//! and pushes what arrives to its own connections (active/active).
//!
//! Three threads, three connections: the shared publisher thread (`publisher.rs`),
//! a subscriber that decodes messages and builds their frames (with their delivery
//! ids) before the reactor sees them, and a reader for resumes (`reader.rs`). Each
//! reconnects by itself. Pub/sub keeps nothing, the history does: a subscriber that
//! was cut off reads what it missed from the log stream before it goes on with live
//! messages, skipping those it already has by their ids, so a Redis restart or a
//! network fault costs this node's connections nothing. While it is not subscribed
//! `/healthz` and `/send` answer 503, as before.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::driver::{Driver, Ended, Session};
use super::interests::Interests;
use super::presence::{Presence, Store};
use super::publisher::{self, BackendError, Endpoint, Publisher, SendError, SendFn, Settings};
use super::reader::{self, Answer, From, Reader};
use super::streams::{Streams, parse_place};
use super::{
    BacklogCounts, Backoff, Inbound, Joined, Link, Notifier, PresenceRead, Queue, QueueError,
    QueueState, ReactorGone, Resume, RoutingCounts, Submit, Ticket, TrySend,
};
use crate::history::Epoch;
use crate::message::{self, Envelope, Target};
use ::redis::PubSub;
use crossbeam_channel::Receiver;

/// How often a blocked subscriber looks at its stop flag and at the reactor's
/// interest changes: a connection of a uid new to this node waits about this long
/// for its subscription. It bounds no resource.
const TICK: Duration = Duration::from_millis(10);

/// How long after its join a connection's failed read is asked again before the
/// connection is closed with 1012 (Redis down that long).
pub(super) const JOIN_RETRY_FOR: Duration = Duration::from_secs(30);

/// How often the subscriber fences the history's clock, so that a quiet node's
/// catch-up point stays recent (a catch-up reads the log from there).
const CLOCK_EVERY: Duration = Duration::from_secs(1);

/// While batches wait for room in the reactor's channel, how long one read from
/// Redis may block before the hand-off is tried again.
const HANDOFF: Duration = Duration::from_millis(2);

/// The settings a Redis backend needs, from flags.
#[derive(Clone, Debug)]
pub struct RedisSettings {
    /// `redis://[:PASS@]HOST:PORT[/DB]`.
    pub url: String,
    pub channel: String,
    pub capacity: usize,
    pub timeout: Duration,
    pub backoff: Duration,
    /// Bytes of received batches held while the reactor is behind.
    pub backlog: usize,
    /// What another node's batch must satisfy, as `/send` does.
    pub rules: message::Rules,
    /// `-history-ttl` (seconds), `-history-size`, `-history-log`.
    pub history_ttl: u64,
    pub history_size: usize,
    pub history_log: usize,
    /// Interest changes (first joins, last leaves) waiting for the subscriber.
    pub interest: usize,
    /// `-presence-ttl`: a node's heartbeat lives this long.
    pub presence_ttl: Duration,
}

impl RedisSettings {
    pub fn from_config(url: &str, cfg: &crate::config::Config) -> Self {
        RedisSettings {
            url: url.to_string(),
            channel: cfg.queue_name.clone(),
            capacity: cfg.queue_size,
            timeout: cfg.queue_timeout,
            backoff: cfg.queue_backoff,
            backlog: cfg.queue_backlog,
            rules: message::Rules::new(cfg),
            history_ttl: cfg.history_ttl.as_secs(),
            history_size: cfg.history_size,
            history_log: cfg.history_log,
            interest: cfg.queue_interest,
            presence_ttl: cfg.presence_ttl,
        }
    }

    fn streams(&self) -> Streams {
        Streams::new(
            &self.channel,
            self.history_ttl,
            self.history_size,
            self.history_log,
            self.rules,
        )
    }
}

pub struct RedisQueue {
    publisher: Publisher,
    subscriber: Arc<Link>,
    reconnects: Arc<AtomicU64>,
    /// Bytes the subscriber holds for the reactor, and the bound on them.
    held: Arc<AtomicUsize>,
    backlog: usize,
    dropped: Arc<AtomicU64>,
    refused: u64,
    reader: Reader,
    interests: Interests,
}

impl RedisQueue {
    /// Starts the publisher and subscriber threads; both connect at once and keep
    /// retrying, so a Redis that is down at start is not an error.
    pub fn start(set: RedisSettings, notifier: Notifier) -> Result<Self, BackendError> {
        let endpoint = Endpoint::parse(&set.url)?;
        let reconnects = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let held = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(AtomicU64::new(0));
        let streams = set.streams();
        let node = node_id();
        let fence_channel = format!("{}:n:{node:016x}", set.channel);
        let presence = Presence::start(
            Store::Redis(endpoint.clone()),
            &set.channel,
            node,
            set.presence_ttl,
            set.timeout,
            set.capacity,
            notifier.clone(),
        )?;
        let (results_tx, results) = crossbeam_channel::bounded(set.capacity.max(1));
        let reader = Reader::start(
            endpoint.clone(),
            set.streams(),
            set.timeout,
            set.capacity,
            set.history_size,
            notifier.clone(),
            reader::Fence {
                results: results_tx,
                channel: fence_channel.clone(),
            },
        )?;
        let (interest, interest_rx) = crossbeam_channel::bounded(set.interest.max(1));
        let received = Arc::new(AtomicU64::new(0));
        let channels = Arc::new(AtomicUsize::new(0));
        let subscriber = Subscriber {
            endpoint: endpoint.clone(),
            timeout: set.timeout,
            backlog: Backlog::new(set.backlog, held.clone(), dropped.clone()),
            rules: set.rules,
            all_channel: streams.channel(None),
            fence_channel,
            streams,
            seen: None,
            log_limit: set.history_log,
            was_empty: false,
            interest: interest_rx,
            uids: HashSet::new(),
            joins: Vec::new(),
            changed_at: None,
            reader: reader.clone(),
            fences: Fences {
                next: 0,
                asked: HashMap::new(),
                results,
                answered: HashMap::new(),
                clock_asked: None,
            },
            received: received.clone(),
            channels: channels.clone(),
        };
        let driver = Driver::new(
            "Redis subscriber",
            endpoint.display.clone(),
            stop.clone(),
            notifier.clone(),
            Backoff::new(publisher::FIRST_BACKOFF, set.backoff),
            reconnects.clone(),
        );
        let sub_link = driver.link();
        thread::Builder::new()
            .name("wspush-redis-sub".into())
            .spawn(move || driver.run(subscriber))?;
        let streams = set.streams();
        // The epoch a Redis without one takes: the first node to publish sets it.
        let fresh = Epoch::new();
        let send: SendFn = Box::new(move |con, batch| publish(con, &streams, batch, fresh));
        let publisher = Publisher::start(
            endpoint,
            Settings {
                name: "wspush-redis-pub",
                server: "Redis",
                capacity: set.capacity,
                timeout: set.timeout,
                backoff: set.backoff,
            },
            reconnects.clone(),
            notifier,
            send,
            // The subscriber outlives the publisher, so what this node published
            // last still reaches its own connections before shutdown.
            move || stop.store(true, Ordering::Release),
        )?;
        Ok(RedisQueue {
            publisher,
            subscriber: sub_link,
            reconnects,
            held,
            backlog: set.backlog,
            dropped,
            refused: 0,
            reader,
            interests: Interests::new(interest, received, channels, presence),
        })
    }
}

/// Applies interest changes, in order, to the uids wanted; the joins go to `joins`.
/// Returns the uids to subscribe and to unsubscribe: only the net change of each.
pub(super) fn net_interest(
    uids: &mut HashSet<Arc<str>>,
    joins: &mut Vec<Join>,
    changes: Vec<Interest>,
) -> (Vec<Arc<str>>, Vec<Arc<str>>) {
    let mut before: HashMap<Arc<str>, bool> = HashMap::new();
    for change in changes {
        let uid = match &change {
            Interest::Join(j) => j.uid.clone(),
            Interest::Leave(u) => u.clone(),
        };
        let was = uids.contains(&uid);
        before.entry(uid.clone()).or_insert(was);
        match change {
            Interest::Join(j) => {
                uids.insert(uid);
                joins.push(j);
            }
            Interest::Leave(_) => {
                uids.remove(&uid);
            }
        }
    }
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for (uid, was) in before {
        match (was, uids.contains(&uid)) {
            (false, true) => on.push(uid),
            (true, false) => off.push(uid),
            _ => {}
        }
    }
    on.sort_unstable();
    off.sort_unstable();
    (on, off)
}

/// A number naming this node's fence channel, different on every start.
fn node_id() -> u64 {
    crate::history::random_per_run()
}

/// One batch into the history and to every subscribed node, this one included.
fn publish(
    con: &mut ::redis::Connection,
    streams: &Streams,
    batch: &[Envelope],
    fresh: Epoch,
) -> Result<(), SendError> {
    let appended = streams.append(con, batch, fresh)?;
    // Nobody subscribed (this node's subscriber included) is no loss now: the
    // message is in the history, and a subscriber that comes back catches up on
    // it before anything newer. A 503 here would only make the sender repeat it.
    if appended.receivers == 0 {
        debug!("Redis: published to no subscriber; kept in history");
    }
    Ok(())
}

impl Queue for RedisQueue {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn state(&self) -> QueueState {
        Link::combined(self.publisher.link(), &self.subscriber)
    }

    fn publish(&mut self, ticket: Ticket, batch: Vec<Envelope>) -> Submit {
        // Pub/sub keeps nothing: while this node is not subscribed, its own
        // connections would miss what it publishes.
        if self.subscriber.state() != QueueState::Up {
            return Submit::Done(Err(QueueError::Unavailable(
                "this node's Redis subscription is not live, resubscribing".into(),
            )));
        }
        // Delivery is behind: refuse here, while the backlog still has room for
        // what is already on its way from Redis.
        if self.held.load(Ordering::Acquire) > self.backlog / 2 {
            self.refused += 1;
            return Submit::Done(Err(QueueError::Unavailable(
                "this node is behind on delivering Redis messages".into(),
            )));
        }
        self.publisher.submit(ticket, batch)
    }

    fn close(&mut self) {
        self.publisher.close();
        self.interests.stop();
    }

    fn resume(&mut self, ticket: Ticket, uid: Option<&str>, since: &str) -> Resume {
        self.reader
            .request(ticket, uid, From::Since(since.to_owned()), None)
    }

    fn join(&mut self, ticket: Ticket, uid: &str, since: Option<&str>) -> Joined {
        self.interests.join(ticket, uid, since)
    }

    fn left(&mut self, uid: &str) {
        self.interests.left(uid);
    }

    fn subscribed(&mut self, uid: &str) {
        self.interests.subscribed(uid);
    }

    fn flush(&mut self) {
        self.interests.flush();
    }

    fn presence_changed(&mut self, uid: &str, n: usize) {
        self.interests.presence_changed(uid, n);
    }

    fn presence(&mut self, ticket: Ticket, uids: Vec<String>) -> PresenceRead {
        self.interests.presence(ticket, uids)
    }

    fn routing(&self) -> RoutingCounts {
        self.interests.routing()
    }

    fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    fn backlog(&self) -> BacklogCounts {
        BacklogCounts {
            dropped: self.dropped.load(Ordering::Relaxed),
            refused: self.refused,
        }
    }
}

/// Batches received from Redis that the reactor's channel has no room for yet.
///
/// The subscriber keeps reading Redis while they wait: a subscriber that stops
/// reading makes Redis buffer, and past `client-output-buffer-limit pubsub` Redis
/// cuts the connection and everything in flight is lost unseen. Here the bound is
/// ours, the overflow is counted, and `/send` on this node is refused first.
pub(super) struct Backlog {
    batches: VecDeque<(Inbound, usize)>,
    limit: usize,
    /// Bytes held, read by the reactor to refuse `/send`.
    held: Arc<AtomicUsize>,
    dropped: Arc<AtomicU64>,
}

impl Backlog {
    pub(super) fn new(limit: usize, held: Arc<AtomicUsize>, dropped: Arc<AtomicU64>) -> Self {
        Backlog {
            batches: VecDeque::new(),
            limit,
            held,
            dropped,
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    fn bytes(batch: &[Envelope]) -> usize {
        batch.iter().map(|e| e.frame.len() + e.types.len()).sum()
    }

    /// Hands over a batch, or holds it while the reactor is behind; drops (and
    /// counts) it when the backlog is full.
    pub(super) fn push(
        &mut self,
        batch: Vec<Envelope>,
        notifier: &Notifier,
    ) -> Result<(), ReactorGone> {
        self.push_event(Inbound::Deliver(batch), notifier)
    }

    /// Any event, in order with the batches (a fenced history read).
    pub(super) fn push_event(
        &mut self,
        event: Inbound,
        notifier: &Notifier,
    ) -> Result<(), ReactorGone> {
        if self.batches.is_empty() {
            match notifier.try_deliver(event) {
                Ok(()) => return Ok(()),
                Err(TrySend::Gone) => return Err(ReactorGone),
                Err(TrySend::Full(event)) => {
                    self.hold(event);
                    return Ok(());
                }
            }
        }
        self.hold(event);
        self.flush(notifier)
    }

    fn hold(&mut self, event: Inbound) {
        let n = match &event {
            Inbound::Deliver(batch) => Self::bytes(batch),
            _ => 0,
        };
        let held = self.held.load(Ordering::Acquire);
        if let Inbound::Deliver(batch) = &event
            && held + n > self.limit
        {
            self.dropped
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            warn!(
                "Redis subscriber: delivery is {held} bytes behind (-queue-backlog); {} messages dropped",
                batch.len()
            );
            return;
        }
        self.held.fetch_add(n, Ordering::AcqRel);
        self.batches.push_back((event, n));
    }

    /// Hands over what the channel has room for, oldest first, without blocking.
    pub(super) fn flush(&mut self, notifier: &Notifier) -> Result<(), ReactorGone> {
        while let Some((event, n)) = self.batches.pop_front() {
            match notifier.try_deliver(event) {
                Ok(()) => {
                    self.held.fetch_sub(n, Ordering::AcqRel);
                }
                Err(TrySend::Gone) => return Err(ReactorGone),
                Err(TrySend::Full(event)) => {
                    self.batches.push_front((event, n));
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Hands over everything, waiting for room: nothing is left to read.
    pub(super) fn flush_all(&mut self, notifier: &Notifier) -> Result<(), ReactorGone> {
        while let Some((event, n)) = self.batches.pop_front() {
            notifier.send(event)?;
            self.held.fetch_sub(n, Ordering::AcqRel);
        }
        Ok(())
    }
}

/// A change of this node's interest, from the reactor to the subscriber.
pub enum Interest {
    /// A connection of a uid joined whose channel may not be subscribed yet.
    Join(Join),
    /// The last connection of a uid left.
    Leave(Arc<str>),
}

/// A joining connection: its read is asked for once its uid's channel is subscribed.
#[derive(Clone)]
pub struct Join {
    pub(super) uid: Arc<str>,
    pub(super) ticket: Ticket,
    pub(super) since: Option<String>,
    pub(super) at: Instant,
}

/// The fenced reads in flight, by fence number (see [`reader::Fence`]).
struct Fences {
    next: u64,
    /// What each was asked for, and when.
    asked: HashMap<u64, Asked>,
    results: Receiver<(u64, Answer)>,
    answered: HashMap<u64, Answer>,
    /// When the clock was last asked for; `None`: at once (a new session).
    clock_asked: Option<Instant>,
}

/// A fenced request in flight: a join's read (asked again if it fails) or the clock.
struct Asked {
    at: Instant,
    join: Option<Join>,
}

impl Fences {
    fn collect(&mut self) {
        while let Ok((n, answer)) = self.results.try_recv() {
            self.answered.insert(n, answer);
        }
    }
}

struct Subscriber {
    endpoint: Endpoint,
    timeout: Duration,
    backlog: Backlog,
    rules: message::Rules,
    streams: Streams,
    /// The epoch and sequence number of the newest message delivered: where a
    /// re-subscription picks up, and below which a live message is a repeat.
    seen: Option<(Epoch, u64)>,
    /// The most messages one catch-up reads from the log.
    log_limit: usize,
    /// Before anything was seen: a fenced look found no history in Redis at all.
    was_empty: bool,
    /// Always subscribed: the broadcasts' channel and this node's fence channel.
    all_channel: String,
    fence_channel: String,
    interest: Receiver<Interest>,
    /// The uids whose channels this node wants; subscribed whenever a session is.
    uids: HashSet<Arc<str>>,
    /// Joins whose reads wait for the next SUBSCRIBE to succeed.
    joins: Vec<Join>,
    /// When interest changes last went to Redis.
    changed_at: Option<Instant>,
    reader: Reader,
    fences: Fences,
    received: Arc<AtomicU64>,
    channels: Arc<AtomicUsize>,
}

impl Subscriber {
    /// A published message, `<epoch> <stream id> <wire batch>`, with its delivery
    /// id in its frame; `None` for a repeat of one already delivered. A bare wire
    /// batch (a node without history) is delivered as it is.
    fn decode(&mut self, payload: &[u8]) -> Result<Option<Vec<Envelope>>, String> {
        let mut parts = payload.splitn(3, |&b| b == b' ');
        let (Some(epoch), Some(id), Some(wire)) = (parts.next(), parts.next(), parts.next()) else {
            return message::decode_wire(payload, &self.rules)
                .map(Some)
                .map_err(|e| e.to_string());
        };
        let (epoch, seq) = parse_place(epoch, id)?;
        if self.seen.is_some_and(|(e, last)| e == epoch && seq <= last) {
            return Ok(None);
        }
        let mut batch = message::decode_wire(wire, &self.rules).map_err(|e| e.to_string())?;
        let id = epoch.id(seq);
        for env in &mut batch {
            env.set_id(seq, &id);
        }
        self.seen = Some((epoch, seq));
        Ok(Some(batch))
    }

    /// Every message up to `seq` of `epoch` that this node subscribes to has
    /// arrived (a fence): the catch-up point moves there.
    fn saw(&mut self, epoch: Epoch, seq: u64) {
        match self.seen {
            Some((e, last)) if e == epoch && last >= seq => {}
            _ => self.seen = Some((epoch, seq)),
        }
    }

    /// Whether this node has receivers for a message.
    fn wanted(&self, env: &Envelope) -> bool {
        match &env.target {
            Target::All => true,
            Target::Uids(uids) => uids.iter().any(|u| self.uids.contains(&**u)),
        }
    }

    /// After a re-subscription: what was published while this node was not
    /// listening, from the log, before any live message; of it only what this node
    /// has receivers for. A gap the log cannot fill whole makes the reactor send its
    /// connections off to resume.
    fn catch_up(&mut self, driver: &mut Driver) -> Result<(), Ended> {
        let mut con = self
            .endpoint
            .connect(self.timeout)
            .map_err(|e| Ended::Lost(format!("reading history: {e}")))?;
        let (epoch, after) = match (self.seen, self.was_empty) {
            (Some(seen), _) => seen,
            // Redis had no history when this node last looked: whatever it holds
            // now came after, and nothing at all means nothing was missed.
            (None, true) => match self.streams.clock(&mut con) {
                Ok(Some((epoch, _))) => (epoch, 0),
                Ok(None) => return Ok(()),
                Err(e) => return Err(Ended::Lost(format!("reading history: {e}"))),
            },
            (None, false) => {
                // Where the gap starts is unknown: the connections resume from
                // their own ids.
                warn!("Redis subscriber: no point to catch up from; connections resume");
                return match driver.notifier.send(Inbound::Unfilled) {
                    Ok(()) => Ok(()),
                    Err(ReactorGone) => Err(Ended::ReactorGone),
                };
            }
        };
        let fetched = self.streams.fill(&mut con, epoch, after, self.log_limit, 0);
        let event = match fetched {
            Ok(f) if f.complete => {
                if let Some(last) = f.batch.last() {
                    self.seen = Some((epoch, last.seq));
                }
                self.received
                    .fetch_add(f.batch.len() as u64, Ordering::Relaxed);
                let mut batch = f.batch;
                batch.retain(|e| self.wanted(e));
                info!(
                    "Redis subscriber: {} missed messages read from history",
                    batch.len()
                );
                (!batch.is_empty()).then_some(Inbound::Deliver(batch))
            }
            Ok(_) => {
                warn!("Redis subscriber: the gap is no longer in history; connections resume");
                self.seen = None;
                self.was_empty = false;
                Some(Inbound::Unfilled)
            }
            Err(e) => return Err(Ended::Lost(format!("reading history: {e}"))),
        };
        if let Some(event) = event
            && driver.notifier.send(event).is_err()
        {
            return Err(Ended::ReactorGone);
        }
        Ok(())
    }

    /// Takes the interest changes waiting (at most what the channel holds now) and
    /// returns the uids to subscribe and to unsubscribe: only the net change, so a
    /// uid that left and came back in one turn is never unsubscribed.
    fn take_interest(&mut self) -> (Vec<Arc<str>>, Vec<Arc<str>>) {
        let n = self.interest.len();
        let changes: Vec<Interest> = self.interest.try_iter().take(n).collect();
        net_interest(&mut self.uids, &mut self.joins, changes)
    }

    /// One SUBSCRIBE and one UNSUBSCRIBE for all the changes of a turn, then the
    /// joins' reads: their channels are subscribed once the reply is in. True when
    /// it talked to Redis (with the operation timeout on the socket).
    fn apply_interest(&mut self, sub: &mut PubSub<'_>, notifier: &Notifier) -> Result<bool, Ended> {
        // At most one change per TICK, however often the loop comes round (each
        // subscription's confirmation wakes it): a connect storm is batched by
        // time, as the cluster router's turn does, not by how fast replies come.
        if self.changed_at.is_some_and(|t| t.elapsed() < TICK) {
            return Ok(false);
        }
        let (on, off) = self.take_interest();
        let talked = !on.is_empty() || !off.is_empty();
        if talked {
            self.changed_at = Some(Instant::now());
            let channels = |uids: &[Arc<str>]| -> Vec<String> {
                uids.iter().map(|u| self.streams.channel(Some(u))).collect()
            };
            let done = sub
                .set_read_timeout(Some(self.timeout))
                .and_then(|()| match off.is_empty() {
                    true => Ok(()),
                    false => sub.unsubscribe(channels(&off)),
                })
                .and_then(|()| match on.is_empty() {
                    true => Ok(()),
                    false => sub.subscribe(channels(&on)),
                });
            if let Err(e) = done {
                return Err(Ended::Lost(format!("changing subscriptions: {e}")));
            }
            self.channels.store(self.uids.len(), Ordering::Relaxed);
        }
        self.ask_joins(notifier)?;
        Ok(talked)
    }

    /// Asks the reader for each join's history, fenced.
    fn ask_joins(&mut self, notifier: &Notifier) -> Result<(), Ended> {
        for j in std::mem::take(&mut self.joins) {
            let n = self.fences.next;
            self.fences.next += 1;
            let from = match j.since.clone() {
                Some(since) => From::Since(since),
                None => From::Joined(j.at),
            };
            let asked = Asked {
                at: Instant::now(),
                join: Some(j.clone()),
            };
            match self.reader.request(j.ticket, Some(&j.uid), from, Some(n)) {
                Resume::Pending => {
                    self.fences.asked.insert(n, asked);
                }
                // The reader is full: next turn, within the retry bound.
                _ => {
                    if self
                        .retry_or_fail(j, "too many history reads waiting", notifier)
                        .is_err()
                    {
                        return Err(Ended::ReactorGone);
                    }
                }
            }
        }
        Ok(())
    }

    /// A fence arrived: every message published before its read is delivered, so
    /// its answer goes to the reactor now, behind them.
    fn on_fence(&mut self, n: u64, notifier: &Notifier) -> Result<(), ReactorGone> {
        self.fences.collect();
        let asked = self.fences.asked.remove(&n);
        match self.fences.answered.remove(&n) {
            Some(Answer::History(Inbound::History {
                fetched: Err(e), ..
            })) if asked.as_ref().is_some_and(|a| a.join.is_some()) => {
                let join = asked.and_then(|a| a.join).expect("matched above");
                self.retry_or_fail(join, &e, notifier)
            }
            Some(Answer::History(event)) => {
                // Everything published before the read has arrived: the clock it
                // read is a point to catch up from.
                if let Inbound::History { fetched: Ok(f), .. } = &event
                    && let (Some(epoch), Some(clock)) = (f.epoch, f.clock)
                {
                    self.saw(epoch, clock);
                }
                self.backlog.push_event(event, notifier)
            }
            Some(Answer::Clock(Some((epoch, seq)))) => {
                self.saw(epoch, seq);
                Ok(())
            }
            Some(Answer::Clock(None)) => {
                self.was_empty |= self.seen.is_none();
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// A join whose read failed is asked again (Redis stalled or restarting: its
    /// window still starts at the join) until [`JOIN_RETRY_FOR`] after the join;
    /// then the connection is answered with the failure and closed (1012).
    fn retry_or_fail(
        &mut self,
        join: Join,
        why: &str,
        notifier: &Notifier,
    ) -> Result<(), ReactorGone> {
        if join.at.elapsed() < JOIN_RETRY_FOR {
            self.joins.push(join);
            return Ok(());
        }
        let event = Inbound::History {
            ticket: join.ticket,
            fetched: Err(why.to_string()),
        };
        self.backlog.push_event(event, notifier)
    }

    /// Answers whose fence did not come within the bound (a publish that failed, a
    /// fence lost with a subscription): a join is asked again, the clock dropped;
    /// a request not answered yet is waited for (every read has its timeout). And
    /// the periodic clock fence.
    fn tend_fences(&mut self, notifier: &Notifier) -> Result<(), ReactorGone> {
        let bound = self.timeout * 4;
        let late: Vec<u64> = self
            .fences
            .asked
            .iter()
            .filter(|(_, a)| a.at.elapsed() > bound)
            .map(|(n, _)| *n)
            .collect();
        if !late.is_empty() {
            self.fences.collect();
        }
        for n in late {
            if !self.fences.answered.contains_key(&n) {
                if let Some(a) = self.fences.asked.get_mut(&n) {
                    a.at = Instant::now();
                }
                continue;
            }
            self.fences.answered.remove(&n);
            if let Some(join) = self.fences.asked.remove(&n).and_then(|a| a.join) {
                self.retry_or_fail(join, "history read not confirmed in order", notifier)?;
            }
        }
        if self
            .fences
            .clock_asked
            .is_none_or(|at| at.elapsed() >= CLOCK_EVERY)
        {
            self.fences.clock_asked = Some(Instant::now());
            let n = self.fences.next;
            self.fences.next += 1;
            if self.reader.clock(n) == Resume::Pending {
                let asked = Asked {
                    at: Instant::now(),
                    join: None,
                };
                self.fences.asked.insert(n, asked);
            }
        }
        Ok(())
    }

    /// After a re-subscription and its catch-up, which delivered everything up to
    /// now: the answers still waiting for a fence that may have been lost with the
    /// old subscription go to the reactor, in order behind it.
    fn release_answered(&mut self, notifier: &Notifier) -> Result<(), ReactorGone> {
        self.fences.collect();
        let mut ns: Vec<u64> = self.fences.answered.keys().copied().collect();
        ns.sort_unstable();
        for n in ns {
            self.on_fence(n, notifier)?;
        }
        Ok(())
    }
}

impl Session for Subscriber {
    /// One connection: subscribe, then deliver until it breaks or the node stops.
    fn session(&mut self, driver: &mut Driver) -> Ended {
        let mut con = match self.endpoint.connect(self.timeout) {
            Ok(con) => con,
            Err(e) => return Ended::Lost(e.to_string()),
        };
        let mut sub = con.as_pubsub();
        // Every channel in one command: the broadcasts, fences, and the uids held.
        let _ = self.take_interest();
        let mut channels = vec![self.all_channel.clone(), self.fence_channel.clone()];
        channels.extend(self.uids.iter().map(|u| self.streams.channel(Some(u))));
        if let Err(e) = sub.subscribe(channels) {
            return Ended::Lost(e.to_string());
        }
        self.channels.store(self.uids.len(), Ordering::Relaxed);
        self.fences.clock_asked = None;
        if driver.up() {
            if driver.notifier.send(Inbound::Resubscribed).is_err() {
                return Ended::ReactorGone;
            }
            // Live messages wait unread in the socket meanwhile, in order.
            if let Err(ended) = self.catch_up(driver) {
                return ended;
            }
            if self.release_answered(&driver.notifier).is_err() {
                return Ended::ReactorGone;
            }
        }
        if let Err(ended) = self.ask_joins(&driver.notifier) {
            return ended;
        }
        if let Err(e) = sub.set_read_timeout(Some(TICK)) {
            return Ended::Lost(e.to_string());
        }
        let mut heard = Instant::now();
        let mut stopping: Option<Instant> = None;
        let mut wait = TICK;
        loop {
            if stopping.is_none() && driver.stop_requested() {
                stopping = Some(Instant::now());
            }
            // Stopping ends at the first quiet tick; a never-quiet channel gets `timeout`.
            if stopping.is_some_and(|t| t.elapsed() >= self.timeout) {
                return Ended::Stopped;
            }
            if self.backlog.flush(&driver.notifier).is_err() {
                return Ended::ReactorGone;
            }
            match self.apply_interest(&mut sub, &driver.notifier) {
                // Its replies were read with the operation timeout.
                Ok(true) => wait = self.timeout,
                Ok(false) => {}
                Err(ended) => return ended,
            }
            if self.tend_fences(&driver.notifier).is_err() {
                return Ended::ReactorGone;
            }
            // Batches waiting for the reactor: come back to them soon.
            let want = if self.backlog.is_empty() {
                TICK
            } else {
                HANDOFF
            };
            if want != wait {
                if let Err(e) = sub.set_read_timeout(Some(want)) {
                    return Ended::Lost(e.to_string());
                }
                wait = want;
            }
            match sub.get_message() {
                Ok(msg) => {
                    heard = Instant::now();
                    if msg.get_channel_name() == self.fence_channel {
                        let n = std::str::from_utf8(msg.get_payload_bytes())
                            .ok()
                            .and_then(|n| n.parse().ok());
                        if let Some(n) = n
                            && self.on_fence(n, &driver.notifier).is_err()
                        {
                            return Ended::ReactorGone;
                        }
                        continue;
                    }
                    self.received.fetch_add(1, Ordering::Relaxed);
                    match self.decode(msg.get_payload_bytes()) {
                        Ok(Some(batch)) => {
                            if self.backlog.push(batch, &driver.notifier).is_err() {
                                return Ended::ReactorGone;
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            warn!("Redis channel {:?}: {e}; skipped", msg.get_channel_name())
                        }
                    }
                }
                Err(e) if e.is_timeout() => {
                    if stopping.is_some() && self.backlog.is_empty() {
                        return Ended::Stopped;
                    }
                    // A silent channel may be a dead server (stopped, unplugged):
                    // ask it, bounded by the operation timeout.
                    if heard.elapsed() >= self.timeout {
                        let ping = sub
                            .set_read_timeout(Some(self.timeout))
                            .and_then(|()| sub.ping::<::redis::Value>())
                            .and_then(|_| sub.set_read_timeout(Some(wait)));
                        if let Err(e) = ping {
                            return Ended::Lost(format!("no answer to PING: {e}"));
                        }
                        heard = Instant::now();
                    }
                }
                Err(e) => return Ended::Lost(e.to_string()),
            }
        }
    }

    /// What was received before the end is still delivered.
    fn after(&mut self, notifier: &Notifier) -> Result<(), ReactorGone> {
        self.backlog.flush_all(notifier)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Target;

    fn batch(n: u8) -> Vec<Envelope> {
        vec![Envelope {
            target: Target::All,
            types: "t".into(),
            expires: 0,
            seq: 0,
            lane: Default::default(),
            frame: Arc::from(&[n; 9][..]),
        }]
    }

    fn join(uid: &str) -> Interest {
        Interest::Join(Join {
            uid: Arc::from(uid),
            ticket: Ticket { key: 0, serial: 0 },
            since: None,
            at: Instant::now(),
        })
    }

    fn leave(uid: &str) -> Interest {
        Interest::Leave(Arc::from(uid))
    }

    #[test]
    fn interest_changes_of_a_turn_net_out_per_uid() {
        let mut uids: HashSet<Arc<str>> = ["held", "going"].into_iter().map(Arc::from).collect();
        let mut joins = Vec::new();
        let (on, off) = net_interest(
            &mut uids,
            &mut joins,
            vec![
                join("new"),
                leave("going"),
                // Left and came back in one turn: never unsubscribed, its read
                // is still asked for (the channel stays subscribed throughout).
                leave("held"),
                join("held"),
                // Came and went: nothing to subscribe.
                join("brief"),
                leave("brief"),
            ],
        );
        assert_eq!(on, [Arc::from("new")]);
        assert_eq!(off, [Arc::from("going")]);
        let mut now: Vec<&str> = uids.iter().map(|u| &**u).collect();
        now.sort_unstable();
        assert_eq!(now, ["held", "new"]);
        let asked: Vec<&str> = joins.iter().map(|j| &*j.uid).collect();
        assert_eq!(asked, ["new", "held", "brief"]);
    }

    #[test]
    fn a_slow_reactor_is_waited_for_within_the_bound_and_overflow_is_counted() {
        let poll = mio::Poll::new().unwrap();
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).unwrap());
        let (tx, rx) = crossbeam_channel::bounded(1);
        let notifier = Notifier::new(tx, waker);
        let held = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(AtomicU64::new(0));
        // Room for two batches of 10 bytes besides the one in the channel.
        let mut backlog = Backlog::new(25, held.clone(), dropped.clone());
        for n in 1..=4 {
            backlog.push(batch(n), &notifier).unwrap();
        }
        assert_eq!(held.load(Ordering::Acquire), 20);
        assert_eq!(dropped.load(Ordering::Relaxed), 1, "the fourth batch");
        let mut seen = vec![];
        while seen.len() < 3 {
            if let Ok(Inbound::Deliver(b)) = rx.try_recv() {
                seen.push(b[0].frame[0]);
            }
            backlog.flush(&notifier).unwrap();
        }
        assert_eq!(seen, [1, 2, 3], "in order, nothing held twice");
        assert!(backlog.is_empty());
        assert_eq!(held.load(Ordering::Acquire), 0);
    }
}
