//! Presence across nodes in Redis: which uids are online and with how many
//! connections. A thread of its own keeps this node's counts in Redis and answers
//! `/presence` reads, so the reactor never waits on Redis.
//!
//! Layout: `<name>:{u:<uid>}:p` is a hash node id → that node's connections of the
//! uid (hash-tagged with the uid's other keys); `<name>:{meta}:alive:<node>` is the
//! node's heartbeat, renewed every third of `-presence-ttl` and expiring after it.
//! A read counts a node's field only while its heartbeat exists, so a node that
//! died drops out within `-presence-ttl`; its stale fields are deleted by the read
//! that finds them. A node writes the counts that changed every turn (at most
//! [`TURN`] apart), and all of them again after a lost connection to Redis.
//!
//! The same layout serves Redis Cluster: a uid's hash lives in its uid's slot and
//! every heartbeat in the `{meta}` slot, so the writes and reads go out as cluster
//! pipelines (split by slot) and the heartbeats' `MGET` stays in one slot.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};

use ::redis::ConnectionLike;
use ::redis::cluster::{ClusterConnection, ClusterPipeline, cluster_pipe};

use super::publisher::Endpoint;
use super::{Inbound, Notifier, Ticket};

/// How long changes gather before they are written: the staleness a live node adds.
pub const TURN: Duration = Duration::from_millis(50);

/// Counts written per pipeline when everything is written again.
const CHUNK: usize = 1000;

/// What the reactor asks of the presence thread.
enum Job {
    /// The uid's connections on this node are now `n`.
    Count(Arc<str>, usize),
    /// A `/presence` read.
    Read { ticket: Ticket, uids: Vec<String> },
    /// The node stops: its heartbeat goes at once.
    Stop,
}

/// The reactor's handle.
pub struct Presence {
    tx: Sender<Job>,
    /// Counts the queue to the thread had no room for, sent by [`Self::retry`].
    /// One per uid, so bounded by the uids this node holds.
    unsent: HashMap<Arc<str>, usize>,
}

/// Where the counts are kept.
pub enum Store {
    Redis(Endpoint),
    /// The seed nodes of a Redis Cluster.
    Cluster(Vec<Endpoint>),
}

/// A connection to the store.
enum Con {
    Redis(::redis::Connection),
    /// Boxed: one per presence thread, and far larger than a plain connection.
    Cluster(Box<ClusterConnection>),
}

impl Con {
    fn any(&mut self) -> &mut dyn ConnectionLike {
        match self {
            Con::Redis(c) => c,
            Con::Cluster(c) => c.as_mut(),
        }
    }

    fn pipe(&self) -> Pipe {
        match self {
            Con::Redis(_) => Pipe::Redis(::redis::pipe()),
            Con::Cluster(_) => Pipe::Cluster(cluster_pipe()),
        }
    }
}

/// A pipeline of the store's kind: a cluster's is sent to each key's primary.
enum Pipe {
    Redis(::redis::Pipeline),
    Cluster(ClusterPipeline),
}

impl Pipe {
    fn hset(&mut self, key: String, field: &str, n: usize) {
        match self {
            Pipe::Redis(p) => {
                p.hset(key, field, n).ignore();
            }
            Pipe::Cluster(p) => {
                p.hset(key, field, n).ignore();
            }
        };
    }

    fn hdel(&mut self, key: String, field: &str) {
        match self {
            Pipe::Redis(p) => {
                p.hdel(key, field).ignore();
            }
            Pipe::Cluster(p) => {
                p.hdel(key, field).ignore();
            }
        };
    }

    fn hgetall(&mut self, key: String) {
        match self {
            Pipe::Redis(p) => {
                p.hgetall(key);
            }
            Pipe::Cluster(p) => {
                p.hgetall(key);
            }
        };
    }

    fn query<T: ::redis::FromRedisValue>(&self, con: &mut Con) -> ::redis::RedisResult<T> {
        match (self, con) {
            (Pipe::Redis(p), Con::Redis(c)) => p.query(c),
            (Pipe::Cluster(p), Con::Cluster(c)) => p.query(c.as_mut()),
            _ => unreachable!("a pipeline is made for its own connection"),
        }
    }
}

impl Store {
    fn connect(&self, timeout: Duration) -> ::redis::RedisResult<Con> {
        Ok(match self {
            Store::Redis(e) => Con::Redis(e.connect(timeout)?),
            Store::Cluster(seeds) => {
                Con::Cluster(Box::new(super::cluster::connect(seeds, timeout)?))
            }
        })
    }
}

/// Why a read could not be asked for now.
#[derive(Debug)]
pub struct Busy;

struct Worker {
    store: Store,
    timeout: Duration,
    name: String,
    node: String,
    ttl: Duration,
    /// This node's counts: what Redis should hold for it.
    counts: HashMap<Arc<str>, usize>,
    /// Uids whose count changed since the last write.
    dirty: HashSet<Arc<str>>,
}

impl Presence {
    /// `waiting` bounds the jobs queued at once.
    pub fn start(
        store: Store,
        name: &str,
        node: u64,
        ttl: Duration,
        timeout: Duration,
        waiting: usize,
        notifier: Notifier,
    ) -> std::io::Result<Presence> {
        let (tx, rx) = crossbeam_channel::bounded(waiting.max(1));
        let worker = Worker {
            store,
            timeout,
            name: name.to_string(),
            node: format!("{node:016x}"),
            ttl: ttl.max(Duration::from_millis(300)),
            counts: HashMap::new(),
            dirty: HashSet::new(),
        };
        thread::Builder::new()
            .name("wspush-redis-presence".into())
            .spawn(move || worker.run(rx, notifier))?;
        Ok(Presence {
            tx,
            unsent: HashMap::new(),
        })
    }

    /// Tells the thread a uid's count on this node. Never blocks: on a full queue
    /// the change is kept and sent by a later [`Self::retry`].
    pub fn count(&mut self, uid: &str, n: usize) {
        self.unsent.remove(uid);
        if self.tx.try_send(Job::Count(Arc::from(uid), n)).is_err() {
            self.unsent.insert(Arc::from(uid), n);
        }
    }

    /// Sends the counts that found the queue full before.
    pub fn retry(&mut self) {
        while let Some((uid, n)) = self.unsent.iter().next().map(|(u, n)| (u.clone(), *n)) {
            if self.tx.try_send(Job::Count(uid.clone(), n)).is_err() {
                return;
            }
            self.unsent.remove(&uid);
        }
    }

    /// The node is shutting down: others stop counting it now, not after the ttl.
    pub fn stop(&self) {
        let _ = self.tx.try_send(Job::Stop);
    }

    pub fn read(&self, ticket: Ticket, uids: Vec<String>) -> Result<(), Busy> {
        match self.tx.try_send(Job::Read { ticket, uids }) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => Err(Busy),
        }
    }
}

impl Worker {
    fn key(&self, uid: &str) -> String {
        format!("{}:{{u:{uid}}}:p", self.name)
    }

    fn alive_key(&self, node: &str) -> String {
        format!("{}:{{meta}}:alive:{node}", self.name)
    }

    fn run(mut self, rx: Receiver<Job>, notifier: Notifier) {
        let mut con: Option<Con> = None;
        // The first turn beats at once.
        let start = Instant::now();
        let mut beat = start.checked_sub(self.ttl).unwrap_or(start);
        let mut first = true;
        let mut stop = false;
        while !stop {
            let mut reads = Vec::new();
            match rx.recv_timeout(TURN) {
                Ok(job) => stop |= self.take(job, &mut reads),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            let n = rx.len();
            for job in rx.try_iter().take(n) {
                stop |= self.take(job, &mut reads);
            }
            if con.is_none() {
                match self.store.connect(self.timeout) {
                    Ok(c) => {
                        con = Some(c);
                        // Redis may have lost what it had, or missed changes meanwhile.
                        self.dirty.extend(self.counts.keys().cloned());
                        first = true;
                    }
                    Err(e) => debug!("presence: Redis unreachable: {e}"),
                }
            }
            if let Some(c) = con.as_mut() {
                let due = first || beat.elapsed() >= self.ttl / 3;
                let written =
                    (if due { self.beat(c) } else { Ok(()) }).and_then(|()| self.write(c));
                match written {
                    Ok(()) if due => {
                        beat = Instant::now();
                        first = false;
                    }
                    Ok(()) => {}
                    Err(e) => {
                        warn!("presence: writing to Redis: {e}");
                        con = None;
                    }
                }
            }
            for (ticket, uids) in reads {
                let result = match con.as_mut() {
                    Some(c) => self.answer(c, &uids).map_err(|e| e.to_string()),
                    None => Err("Redis unreachable".to_string()),
                };
                if result.is_err() {
                    con = None;
                }
                if notifier.send(Inbound::Presence { ticket, result }).is_err() {
                    return;
                }
            }
        }
        // A node that stops leaves no entries to be counted until its heartbeat expires.
        if let Some(c) = con.as_mut() {
            let _: ::redis::RedisResult<()> = ::redis::cmd("DEL")
                .arg(self.alive_key(&self.node))
                .query(c.any());
        }
    }

    /// Takes a job; true for [`Job::Stop`].
    fn take(&mut self, job: Job, reads: &mut Vec<(Ticket, Vec<String>)>) -> bool {
        match job {
            Job::Count(uid, n) => {
                if n == 0 {
                    self.counts.remove(&uid);
                } else {
                    self.counts.insert(uid.clone(), n);
                }
                self.dirty.insert(uid);
            }
            Job::Read { ticket, uids } => reads.push((ticket, uids)),
            Job::Stop => return true,
        }
        false
    }

    /// Renews the heartbeat. One that had expired (Redis stalled, or restarted) may
    /// have let another node's read delete this node's fields: all are written again.
    fn beat(&mut self, con: &mut Con) -> ::redis::RedisResult<()> {
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        let before: Option<String> = ::redis::cmd("SET")
            .arg(self.alive_key(&self.node))
            .arg(1)
            .arg("PX")
            .arg(ttl_ms)
            .arg("GET")
            .query(con.any())?;
        if before.is_none() {
            self.dirty.extend(self.counts.keys().cloned());
        }
        Ok(())
    }

    /// Writes the changed counts, a pipeline per [`CHUNK`].
    fn write(&mut self, con: &mut Con) -> ::redis::RedisResult<()> {
        while !self.dirty.is_empty() {
            let batch: Vec<Arc<str>> = self.dirty.iter().take(CHUNK).cloned().collect();
            let mut pipe = con.pipe();
            for uid in &batch {
                let key = self.key(uid);
                match self.counts.get(uid) {
                    Some(n) => pipe.hset(key, &self.node, *n),
                    None => pipe.hdel(key, &self.node),
                }
            }
            pipe.query::<()>(con)?;
            for uid in &batch {
                self.dirty.remove(uid);
            }
        }
        Ok(())
    }

    /// Each uid's connections on the nodes whose heartbeat is alive: one pipeline of
    /// `HGETALL`s, one `MGET` of the heartbeats they name.
    fn answer(&self, con: &mut Con, uids: &[String]) -> ::redis::RedisResult<Vec<(String, u64)>> {
        let mut pipe = con.pipe();
        for uid in uids {
            pipe.hgetall(self.key(uid));
        }
        let hashes: Vec<HashMap<String, u64>> = pipe.query(con)?;
        let mut nodes: Vec<&str> = hashes
            .iter()
            .flat_map(|h| h.keys().map(String::as_str))
            .collect();
        nodes.sort_unstable();
        nodes.dedup();
        let alive: HashSet<&str> = if nodes.is_empty() {
            HashSet::new()
        } else {
            let keys: Vec<String> = nodes.iter().map(|n| self.alive_key(n)).collect();
            let beats: Vec<Option<String>> = ::redis::cmd("MGET").arg(&keys).query(con.any())?;
            nodes
                .iter()
                .zip(beats)
                .filter(|(_, b)| b.is_some())
                .map(|(n, _)| *n)
                .collect()
        };
        // Fields of dead nodes go, so hashes do not grow with every restart.
        let mut gone = con.pipe();
        let mut any_gone = false;
        let mut out = Vec::with_capacity(uids.len());
        for (uid, hash) in uids.iter().zip(&hashes) {
            let mut n = 0;
            for (node, count) in hash {
                if alive.contains(node.as_str()) {
                    n += count;
                } else {
                    gone.hdel(self.key(uid), node);
                    any_gone = true;
                }
            }
            out.push((uid.clone(), n));
        }
        if any_gone {
            gone.query::<()>(con)?;
        }
        Ok(out)
    }
}
