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

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::driver::{Driver, Ended, Session};
use super::publisher::{self, BackendError, Endpoint, Publisher, SendError, SendFn, Settings};
use super::reader::Reader;
use super::streams::{Streams, seq_of};
use super::{
    BacklogCounts, Backoff, Inbound, Link, Notifier, Queue, QueueError, QueueState, ReactorGone,
    Resume, Submit, Ticket, TrySend,
};
use crate::history::Epoch;
use crate::message::{self, Envelope};

/// How often a blocked subscriber looks at its stop flag. Shutdown waits at most
/// this long for it; it bounds no resource.
const TICK: Duration = Duration::from_millis(100);

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
        let subscriber = Subscriber {
            endpoint: endpoint.clone(),
            channel: set.channel.clone(),
            timeout: set.timeout,
            backlog: Backlog::new(set.backlog, held.clone(), dropped.clone()),
            rules: set.rules,
            streams: set.streams(),
            seen: Seen::Unknown,
            log_limit: set.history_log,
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
        let reader = Reader::start(
            endpoint.clone(),
            set.streams(),
            set.timeout,
            set.capacity,
            set.history_size,
            notifier.clone(),
        )?;
        let channel = set.channel.clone();
        let streams = set.streams();
        // The epoch a Redis without one takes: the first node to publish sets it.
        let fresh = Epoch::new();
        let send: SendFn =
            Box::new(move |con, batch| publish(con, &streams, &channel, batch, fresh));
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
        })
    }
}

/// One batch into the history and to every subscribed node, this one included.
fn publish(
    con: &mut ::redis::Connection,
    streams: &Streams,
    channel: &str,
    batch: &[Envelope],
    fresh: Epoch,
) -> Result<(), SendError> {
    let appended = streams.append(con, channel, batch, fresh)?;
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
    }

    fn resume(&mut self, ticket: Ticket, uid: Option<&str>, since: &str) -> Resume {
        self.reader.request(ticket, uid, since)
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
struct Backlog {
    batches: VecDeque<(Vec<Envelope>, usize)>,
    limit: usize,
    /// Bytes held, read by the reactor to refuse `/send`.
    held: Arc<AtomicUsize>,
    dropped: Arc<AtomicU64>,
}

impl Backlog {
    fn new(limit: usize, held: Arc<AtomicUsize>, dropped: Arc<AtomicU64>) -> Self {
        Backlog {
            batches: VecDeque::new(),
            limit,
            held,
            dropped,
        }
    }

    fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    fn bytes(batch: &[Envelope]) -> usize {
        batch.iter().map(|e| e.frame.len() + e.types.len()).sum()
    }

    /// Hands over a batch, or holds it while the reactor is behind; drops (and
    /// counts) it when the backlog is full.
    fn push(&mut self, batch: Vec<Envelope>, notifier: &Notifier) -> Result<(), ReactorGone> {
        if self.batches.is_empty() {
            match notifier.try_deliver(batch) {
                Ok(()) => return Ok(()),
                Err(TrySend::Gone) => return Err(ReactorGone),
                Err(TrySend::Full(batch)) => {
                    self.hold(batch);
                    return Ok(());
                }
            }
        }
        self.hold(batch);
        self.flush(notifier)
    }

    fn hold(&mut self, batch: Vec<Envelope>) {
        let n = Self::bytes(&batch);
        let held = self.held.load(Ordering::Acquire);
        if held + n > self.limit {
            self.dropped
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            warn!(
                "Redis subscriber: delivery is {held} bytes behind (-queue-backlog); {} messages dropped",
                batch.len()
            );
            return;
        }
        self.held.fetch_add(n, Ordering::AcqRel);
        self.batches.push_back((batch, n));
    }

    /// Hands over what the channel has room for, oldest first, without blocking.
    fn flush(&mut self, notifier: &Notifier) -> Result<(), ReactorGone> {
        while let Some((batch, n)) = self.batches.pop_front() {
            match notifier.try_deliver(batch) {
                Ok(()) => {
                    self.held.fetch_sub(n, Ordering::AcqRel);
                }
                Err(TrySend::Gone) => return Err(ReactorGone),
                Err(TrySend::Full(batch)) => {
                    self.batches.push_front((batch, n));
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Hands over everything, waiting for room: nothing is left to read.
    fn flush_all(&mut self, notifier: &Notifier) -> Result<(), ReactorGone> {
        while let Some((batch, n)) = self.batches.pop_front() {
            notifier.send(Inbound::Deliver(batch))?;
            self.held.fetch_sub(n, Ordering::AcqRel);
        }
        Ok(())
    }
}

struct Subscriber {
    endpoint: Endpoint,
    channel: String,
    timeout: Duration,
    backlog: Backlog,
    rules: message::Rules,
    streams: Streams,
    /// The epoch and sequence number of the newest message delivered: where a
    /// re-subscription picks up, and below which a live message is a repeat.
    seen: Seen,
    /// The most messages one catch-up reads from the log.
    log_limit: usize,
}

/// How far this node has the history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seen {
    /// Not subscribed yet.
    Unknown,
    /// Subscribed while Redis held no history: all of it is new to this node.
    Empty,
    /// Up to and including this message.
    At(Epoch, u64),
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
        let epoch = std::str::from_utf8(epoch)
            .ok()
            .filter(|e| !e.is_empty() && e.len() <= 8)
            .and_then(|e| u32::from_str_radix(e, 16).ok())
            .map(Epoch)
            .ok_or("bad epoch")?;
        let seq = std::str::from_utf8(id)
            .ok()
            .and_then(seq_of)
            .ok_or("bad id")?;
        if matches!(self.seen, Seen::At(e, last) if e == epoch && seq <= last) {
            return Ok(None);
        }
        let mut batch = message::decode_wire(wire, &self.rules).map_err(|e| e.to_string())?;
        let id = epoch.id(seq);
        for env in &mut batch {
            env.set_id(seq, &id);
        }
        self.seen = Seen::At(epoch, seq);
        Ok(Some(batch))
    }

    /// Takes the history's head as this node's position (after SUBSCRIBE, so what
    /// comes after the head arrives live).
    fn locate(&mut self) -> ::redis::RedisResult<()> {
        let mut con = self.endpoint.connect(self.timeout)?;
        self.seen = match self.streams.head(&mut con)? {
            Some((epoch, seq)) => Seen::At(epoch, seq),
            None => Seen::Empty,
        };
        Ok(())
    }

    /// After a re-subscription: what was published while this node was not
    /// listening, from the log, before any live message. A gap the log cannot
    /// fill whole makes the reactor send its connections off to resume.
    fn catch_up(&mut self, driver: &mut Driver) -> Result<(), Ended> {
        let from = match self.seen {
            Seen::At(epoch, after) => Some((epoch, after)),
            Seen::Empty | Seen::Unknown => None,
        };
        let fetched = self
            .endpoint
            .connect(self.timeout)
            .and_then(|mut con| self.streams.fill(&mut con, from, self.log_limit, 0));
        let event = match fetched {
            Ok(f) if f.complete => {
                if let (Some(last), Some(epoch)) = (f.batch.last(), f.epoch) {
                    self.seen = Seen::At(epoch, last.seq);
                }
                info!(
                    "Redis subscriber: {} missed messages read from history",
                    f.batch.len()
                );
                (!f.batch.is_empty()).then_some(Inbound::Deliver(f.batch))
            }
            Ok(_) => {
                warn!("Redis subscriber: the gap is no longer in history; connections resume");
                self.seen = Seen::Unknown;
                self.locate()
                    .map_err(|e| Ended::Lost(format!("reading history: {e}")))?;
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
}

impl Session for Subscriber {
    /// One connection: subscribe, then deliver until it breaks or the node stops.
    fn session(&mut self, driver: &mut Driver) -> Ended {
        let mut con = match self.endpoint.connect(self.timeout) {
            Ok(con) => con,
            Err(e) => return Ended::Lost(e.to_string()),
        };
        let mut sub = con.as_pubsub();
        if let Err(e) = sub.subscribe(&self.channel) {
            return Ended::Lost(e.to_string());
        }
        // The first subscription learns where the history stands, so that a gap
        // after it can be filled even if no message arrived before it.
        if self.seen == Seen::Unknown
            && let Err(e) = self.locate()
        {
            return Ended::Lost(format!("reading history: {e}"));
        }
        if driver.up() {
            if driver.notifier.send(Inbound::Resubscribed).is_err() {
                return Ended::ReactorGone;
            }
            // Live messages wait unread in the socket meanwhile, in order.
            if let Err(ended) = self.catch_up(driver) {
                return ended;
            }
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
                    match self.decode(msg.get_payload_bytes()) {
                        Ok(Some(batch)) => {
                            if self.backlog.push(batch, &driver.notifier).is_err() {
                                return Ended::ReactorGone;
                            }
                        }
                        Ok(None) => {}
                        Err(e) => warn!("Redis channel {:?}: {e}; skipped", self.channel),
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
            frame: Arc::from(&[n; 9][..]),
        }]
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
