//! Redis Cluster (`-queue=redis-cluster/HOST:PORT[,…]`): the Redis backend's
//! interest routing and history, spread over the cluster's primaries by slot.
//!
//! `/send` appends each message once per target stream, one script call per stream
//! in that stream's slot (`shards.rs`), pipelined per primary by `nodes.rs`, which
//! keeps the slot map and follows `MOVED`/`ASK`. The script `SPUBLISH`es on the
//! stream's shard channel. A node takes sharded
//! subscriptions only for the uids it holds and `all`, on one plain connection per
//! primary (`shard.rs`): a shard channel must be subscribed on the primary owning
//! its slot. A lost or moved shard
//! subscription is taken again on the slot's new owner and each of its streams is
//! read after this node's last position in it, so a failover loses nothing the
//! history holds.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use ::redis::Value;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};

use super::interests::Interests;
use super::nodes::Nodes;
use super::presence::{Presence, Store};
use super::publisher::{BackendError, Endpoint, FIRST_BACKOFF, Job};
use super::redis::{JOIN_RETRY_FOR, RedisSettings};
use super::shard::{self, Shards};
use super::shards::{Chan, Layout, StreamRead, parse_appended};
use super::streams::{Fetched, first_seq_at};
use super::{
    BacklogCounts, Backoff, Inbound, Joined, Link, Notifier, PresenceRead, Queue, QueueError,
    QueueState, Resume, RoutingCounts, Submit, Ticket,
};
use crate::history::{ClusterSince, Epoch, StreamSince};
use crate::message::{Envelope, Target, encode_wire, unix_now};

/// The settings of a cluster backend: those of Redis, the seeds and `-queue-wait`.
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    pub redis: RedisSettings,
    pub seeds: Vec<String>,
    pub wait: Duration,
}

impl ClusterSettings {
    pub fn from_config(seeds: &[String], cfg: &crate::config::Config) -> Self {
        ClusterSettings {
            redis: RedisSettings::from_config(&seeds[0], cfg),
            seeds: seeds.to_vec(),
            wait: cfg.queue_wait,
        }
    }

    fn layout(&self) -> Layout {
        let r = &self.redis;
        Layout::new(&r.channel, r.history_ttl, r.history_size, r.rules)
    }
}

pub struct ClusterQueue {
    tx: Option<Sender<Job>>,
    /// `-queue-timeout`: a job not sent within it is answered 503.
    timeout: Duration,
    publisher: Arc<Link>,
    subscriber: Arc<Link>,
    reconnects: Arc<AtomicU64>,
    held: Arc<AtomicUsize>,
    backlog: usize,
    dropped: Arc<AtomicU64>,
    refused: u64,
    reads: Sender<Read>,
    interests: Interests,
}

impl ClusterQueue {
    pub fn start(set: ClusterSettings, notifier: Notifier) -> Result<Self, BackendError> {
        let seeds = set
            .seeds
            .iter()
            .map(|s| Endpoint::parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        let r = &set.redis;
        let stop = Arc::new(AtomicBool::new(false));
        let held = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(AtomicU64::new(0));
        let received = Arc::new(AtomicU64::new(0));
        let channels = Arc::new(AtomicUsize::new(0));
        let reconnects = Arc::new(AtomicU64::new(0));
        let reads = ReaderThread {
            seeds: seeds.clone(),
            backoff: r.backoff,
            layout: set.layout(),
            timeout: r.timeout,
            limit: r.history_size,
            notifier: notifier.clone(),
        }
        .spawn(r.capacity)?;
        let (interest, interest_rx) = crossbeam_channel::bounded(r.interest.max(1));
        let subscriber = Arc::new(Link::default());
        let shards = Shards::new(shard::Setup {
            seeds: seeds.clone(),
            layout: Arc::new(set.layout()),
            timeout: r.timeout,
            backoff: r.backoff,
            backlog: (r.backlog, held.clone(), dropped.clone()),
            catch_up: r.history_size,
            reads: reads.clone(),
            received: received.clone(),
            channels: channels.clone(),
            link: subscriber.clone(),
            reconnects: reconnects.clone(),
            notifier: notifier.clone(),
        });
        let sub_stop = stop.clone();
        thread::Builder::new()
            .name("wspush-cluster-sub".into())
            .spawn(move || shards.run(interest_rx, sub_stop))?;
        let presence = Presence::start(
            Store::Cluster(seeds.clone()),
            &r.channel,
            crate::history::random_per_run(),
            r.presence_ttl,
            r.timeout,
            r.capacity,
            notifier.clone(),
        )?;
        let publisher = Arc::new(Link::default());
        let tx = PublisherThread {
            nodes: Nodes::new(seeds, r.timeout, r.backoff),
            mapped: false,
            layout: set.layout(),
            timeout: r.timeout,
            wait: set.wait,
            backoff: Backoff::new(FIRST_BACKOFF, r.backoff),
            link: publisher.clone(),
            notifier,
            fresh: Epoch::new(),
            retry_at: Instant::now(),
        }
        .spawn(r.capacity, stop)?;
        Ok(ClusterQueue {
            tx: Some(tx),
            timeout: r.timeout,
            publisher,
            subscriber,
            reconnects,
            held,
            backlog: r.backlog,
            dropped,
            refused: 0,
            reads,
            interests: Interests::new(interest, received, channels, presence),
        })
    }
}

impl Queue for ClusterQueue {
    fn name(&self) -> &'static str {
        "redis-cluster"
    }

    fn state(&self) -> QueueState {
        Link::combined(&self.publisher, &self.subscriber)
    }

    fn publish(&mut self, ticket: Ticket, batch: Vec<Envelope>) -> Submit {
        let Some(tx) = &self.tx else {
            return Submit::Done(Err(QueueError::Closed));
        };
        if self.subscriber.state() != QueueState::Up {
            return Submit::Done(Err(QueueError::Unavailable(
                "this node's Redis Cluster subscriptions are not live, resubscribing".into(),
            )));
        }
        if self.publisher.state() == QueueState::Down {
            return Submit::Done(Err(QueueError::Unavailable(
                "Redis Cluster is unreachable, reconnecting".into(),
            )));
        }
        if self.held.load(Ordering::Acquire) > self.backlog / 2 {
            self.refused += 1;
            return Submit::Done(Err(QueueError::Unavailable(
                "this node is behind on delivering Redis messages".into(),
            )));
        }
        let deadline = Instant::now() + self.timeout;
        match tx.try_send(Job {
            ticket,
            batch,
            deadline,
        }) {
            Ok(()) => Submit::Pending,
            Err(TrySendError::Full(_)) => Submit::Done(Err(QueueError::Full)),
            Err(TrySendError::Disconnected(_)) => Submit::Done(Err(QueueError::Closed)),
        }
    }

    fn close(&mut self) {
        self.tx = None;
        self.interests.stop();
    }

    fn resume(&mut self, ticket: Ticket, uid: Option<&str>, since: &str) -> Resume {
        let read = Read {
            ticket,
            uid: uid.map(Arc::from),
            from: ReadFrom::Since(since.to_owned()),
        };
        match self.reads.try_send(read) {
            Ok(()) => Resume::Pending,
            Err(_) => Resume::Unavailable,
        }
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

/// The publisher thread: the cluster's primaries (`nodes.rs`), a batch as one
/// pipeline per primary of script calls (one per target stream), closed by
/// `WAIT` on the same connection where `-queue-wait` asks for it.
struct PublisherThread {
    layout: Layout,
    timeout: Duration,
    wait: Duration,
    backoff: Backoff,
    link: Arc<Link>,
    notifier: Notifier,
    /// The epoch a stream without one takes.
    fresh: Epoch,
    nodes: Nodes,
    /// Whether the slot map has been read since the cluster was last unreachable.
    mapped: bool,
    retry_at: Instant,
}

impl PublisherThread {
    /// Starts the thread; when it ends (the queue closed) it sets `stop`, so the
    /// subscriber outlives it and what this node published last still reaches its
    /// own connections.
    fn spawn(self, capacity: usize, stop: Arc<AtomicBool>) -> std::io::Result<Sender<Job>> {
        let (tx, rx) = crossbeam_channel::bounded(capacity.max(1));
        thread::Builder::new()
            .name("wspush-cluster-pub".into())
            .spawn(move || {
                self.run(rx);
                stop.store(true, Ordering::Release);
            })?;
        Ok(tx)
    }

    fn run(mut self, rx: Receiver<Job>) {
        loop {
            if !self.mapped && Instant::now() >= self.retry_at {
                self.connect();
            }
            // Unreachable: wake for the next attempt, since no job comes while
            // the queue answers 503 for a link known down.
            let wait = if self.mapped {
                self.timeout
            } else {
                self.retry_at.saturating_duration_since(Instant::now())
            };
            match rx.recv_timeout(wait) {
                Ok(job) => {
                    let ticket = job.ticket;
                    let result = self.publish(job);
                    let event = Inbound::Published { ticket, result };
                    if self.notifier.send(event).is_err() {
                        return;
                    }
                }
                // Idle: read the map again, which also tells whether any node answers.
                Err(RecvTimeoutError::Timeout) => self.connect(),
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// Reads the slot map; the link is up while some node gives it.
    fn connect(&mut self) {
        match self.nodes.refresh() {
            Ok(()) => {
                self.mapped = true;
                self.link.set_up(true);
                self.backoff.reset();
            }
            Err(e) => {
                if self.link.state() != QueueState::Down {
                    warn!("Redis Cluster publisher: {e}");
                }
                self.mapped = false;
                self.link.set_up(false);
                self.retry_at = Instant::now() + self.backoff.next_delay();
            }
        }
    }

    fn publish(&mut self, mut job: Job) -> Result<(), QueueError> {
        let unavailable = |why: String| Err(QueueError::Unavailable(why));
        let now = unix_now();
        job.batch.retain(|e| !e.is_expired(now));
        if job.batch.is_empty() {
            return Ok(());
        }
        if !self.mapped {
            self.connect();
        }
        if Instant::now() >= job.deadline {
            return unavailable("Redis Cluster did not take the message in time".into());
        }
        if !self.mapped {
            return unavailable("Redis Cluster is unreachable".into());
        }
        let cmds: Vec<(u16, ::redis::Cmd)> = by_stream(&job.batch)
            .iter()
            .map(|(chan, payloads)| {
                let cmd = self.layout.append_cmd(chan, self.fresh, payloads);
                (self.layout.slot(chan), cmd)
            })
            .collect();
        let wait = (!self.wait.is_zero()).then(|| wait_cmd(self.wait));
        // A stream whose primary failed may still have the batch: a retry of the
        // 503 may deliver it twice there.
        for done in self.nodes.run(&cmds, wait.as_ref()) {
            let done = match done {
                Ok(d) => d,
                Err(e) => return unavailable(format!("Redis Cluster: {e}")),
            };
            parse_appended(&done.reply).map_err(|e| QueueError::Unavailable(e.to_string()))?;
            if wait.is_some() && !matches!(done.tail, Some(Value::Int(n)) if n >= 1) {
                return unavailable(format!(
                    "Redis Cluster: no replica confirmed the batch within -queue-wait ({:?})",
                    done.tail
                ));
            }
        }
        Ok(())
    }
}

/// The batch's messages per target stream, each as its own wire batch.
fn by_stream(batch: &[Envelope]) -> HashMap<Chan, Vec<Vec<u8>>> {
    let mut out: HashMap<Chan, Vec<Vec<u8>>> = HashMap::new();
    for env in batch {
        let wire = encode_wire(std::slice::from_ref(env));
        match &env.target {
            Target::All => out.entry(Chan::All).or_default().push(wire),
            Target::Uids(uids) => {
                for u in uids {
                    let chan = Chan::Uid(Arc::from(&**u));
                    out.entry(chan).or_default().push(wire.clone());
                }
            }
        }
    }
    out
}

/// `WAIT 1 <ms>`: sent after a primary's writes on the connection that made them,
/// so a `200` comes only once a replica has them and a failover does not lose them.
fn wait_cmd(wait: Duration) -> ::redis::Cmd {
    let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
    let mut cmd = ::redis::cmd("WAIT");
    cmd.arg(1).arg(ms);
    cmd
}

/// A history read for a connection: a resume, or a join of a uid new to the node.
pub struct Read {
    pub ticket: Ticket,
    pub uid: Option<Arc<str>>,
    pub from: ReadFrom,
}

pub enum ReadFrom {
    /// `?since=` (a cluster position, or `0`).
    Since(String),
    /// What the uid got since this moment (its connection joined).
    Joined(Instant),
}

/// Why a history read gave nothing.
enum ReadError {
    /// Redis Cluster failed or could not be reached: worth another try.
    Redis(String),
    /// The answer cannot be right, however often it is read.
    Final(&'static str),
}

impl From<::redis::RedisError> for ReadError {
    fn from(e: ::redis::RedisError) -> Self {
        ReadError::Redis(e.to_string())
    }
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Redis(why) => write!(f, "Redis Cluster: {why}"),
            ReadError::Final(why) => f.write_str(why),
        }
    }
}

/// How long a join's read may take to reach Redis before its window might start
/// after the join (then it is read again with `-queue-timeout` as the margin).
const MARGIN: Duration = Duration::from_millis(50);

/// The reader thread: resumes and joins, answered to the reactor.
struct ReaderThread {
    seeds: Vec<Endpoint>,
    backoff: Duration,
    layout: Layout,
    timeout: Duration,
    limit: usize,
    notifier: Notifier,
}

impl ReaderThread {
    fn spawn(self, capacity: usize) -> std::io::Result<Sender<Read>> {
        let (tx, rx) = crossbeam_channel::bounded(capacity.max(1));
        thread::Builder::new()
            .name("wspush-cluster-read".into())
            .spawn(move || self.run(rx))?;
        Ok(tx)
    }

    fn run(self, rx: Receiver<Read>) {
        let mut nodes = Nodes::new(self.seeds.clone(), self.timeout, self.backoff);
        while let Ok(read) = rx.recv() {
            let fetched = self.read_retrying(&mut nodes, &read);
            let event = Inbound::History {
                ticket: read.ticket,
                fetched,
            };
            if self.notifier.send(event).is_err() {
                return;
            }
        }
    }

    /// One read; a join's read that fails (a primary failing over, the cluster
    /// unreachable) is tried again, its window still starting at the join, until
    /// [`JOIN_RETRY_FOR`] after the join: then its connection is sent off (1012).
    fn read_retrying(&self, nodes: &mut Nodes, read: &Read) -> Result<Fetched, String> {
        loop {
            let fetched = self.read(nodes, read.uid.as_deref(), &read.from);
            match (fetched, &read.from) {
                (Err(ReadError::Redis(_)), ReadFrom::Joined(at))
                    if at.elapsed() < JOIN_RETRY_FOR =>
                {
                    thread::sleep(FIRST_BACKOFF);
                }
                (fetched, _) => return fetched.map_err(|e| e.to_string()),
            }
        }
    }

    fn read(
        &self,
        nodes: &mut Nodes,
        uid: Option<&str>,
        from: &ReadFrom,
    ) -> Result<Fetched, ReadError> {
        match from {
            ReadFrom::Since(since) => {
                let since = ClusterSince::parse(since)
                    .map_err(|_| ReadError::Final("since is no cluster position"))?;
                Ok(self.since(nodes, uid, since)?)
            }
            ReadFrom::Joined(at) => match uid {
                Some(uid) => self.joined(nodes, &Chan::Uid(Arc::from(uid)), *at),
                None => Ok(fetched(true, Vec::new(), 0)),
            },
        }
    }

    /// The uid's stream after its position and `all` after its own, merged by
    /// their time part.
    fn since(
        &self,
        nodes: &mut Nodes,
        uid: Option<&str>,
        since: ClusterSince,
    ) -> ::redis::RedisResult<Fetched> {
        let mut wanted = vec![(Chan::All, since.all)];
        wanted.extend(uid.map(|u| (Chan::Uid(Arc::from(u)), since.uid)));
        let cmds: Vec<_> = wanted
            .iter()
            .map(|(chan, at)| {
                let cmd = self.layout.read_cmd(chan, *at, self.limit, None);
                (self.layout.slot(chan), cmd)
            })
            .collect();
        let replies = nodes.run(&cmds, None);
        let mut complete = true;
        let mut batch = Vec::new();
        let mut redis_ms = 0;
        for ((chan, at), reply) in wanted.iter().zip(replies) {
            let r = self
                .layout
                .parse_read(chan, *at, reply?.reply, self.limit)?;
            complete &= r.complete;
            redis_ms = redis_ms.max(r.redis_ms);
            batch.extend(r.batch);
        }
        batch.sort_by_key(|e| (e.seq, e.lane));
        Ok(fetched(complete, batch, redis_ms))
    }

    /// What a uid got since its connection joined, by Redis's clock less the
    /// join's age here.
    fn joined(&self, nodes: &mut Nodes, chan: &Chan, at: Instant) -> Result<Fetched, ReadError> {
        for margin in [MARGIN, self.timeout] {
            let sent = at.elapsed();
            let ago = u64::try_from((sent + margin).as_millis()).unwrap_or(u64::MAX) + 1;
            let cmd = self
                .layout
                .read_cmd(chan, StreamSince::Start, self.limit, Some(ago));
            let slot = self.layout.slot(chan);
            let reply = nodes
                .run(&[(slot, cmd)], None)
                .pop()
                .expect("one answer per command")?;
            let reply = reply.reply;
            let r: StreamRead =
                self.layout
                    .parse_read(chan, StreamSince::Start, reply, self.limit)?;
            let back = at.elapsed();
            if back - sent > margin {
                continue;
            }
            let back_ms = u64::try_from(back.as_millis()).unwrap_or(u64::MAX);
            let floor = first_seq_at(r.redis_ms.saturating_sub(back_ms + 1));
            if r.cut || r.trimmed >= floor {
                return Err(ReadError::Final(
                    "more was sent to the uid since the join than it keeps",
                ));
            }
            let mut batch = r.batch;
            batch.retain(|e| e.seq >= floor);
            return Ok(fetched(true, batch, r.redis_ms));
        }
        Err(ReadError::Redis(
            "history read too slow to place the join".into(),
        ))
    }
}

fn fetched(complete: bool, batch: Vec<Envelope>, redis_ms: u64) -> Fetched {
    Fetched {
        complete,
        batch,
        redis_ms,
        cut: false,
        trimmed: 0,
        epoch: None,
        clock: None,
    }
}
