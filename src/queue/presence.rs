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
//! every heartbeat in the `{meta}` slot, so the writes and reads go out as one
//! pipeline per primary (`nodes.rs`) and the heartbeats' `MGET` stays in one slot.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};

use ::redis::{RedisResult, Value};

use super::nodes::Nodes;
use super::publisher::{Endpoint, FIRST_BACKOFF};
use super::shards::slot;
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
    /// The cluster's primaries: each command goes to its key's.
    Cluster(Box<Nodes>),
}

/// Commands with the key each touches, sent as one pipeline (one per primary on a
/// cluster).
type Cmds = Vec<(String, ::redis::Cmd)>;

impl Con {
    /// The answers to `cmds`, in order; the first error fails them all.
    fn run(&mut self, cmds: Cmds) -> RedisResult<Vec<Value>> {
        match self {
            Con::Redis(c) => {
                let mut pipe = ::redis::pipe();
                for (_, cmd) in cmds {
                    pipe.add_command(cmd);
                }
                pipe.query(c)
            }
            Con::Cluster(nodes) => {
                let cmds: Vec<_> = cmds.into_iter().map(|(k, c)| (slot(&k), c)).collect();
                nodes
                    .run(&cmds, None)
                    .into_iter()
                    .map(|r| r.map(|d| d.reply))
                    .collect()
            }
        }
    }

    /// One command's answer as `T`.
    fn one<T: ::redis::FromRedisValue>(
        &mut self,
        key: String,
        cmd: ::redis::Cmd,
    ) -> RedisResult<T> {
        let v = self.run(vec![(key, cmd)])?.pop().unwrap_or(Value::Nil);
        Ok(::redis::from_redis_value(v)?)
    }
}

/// `HSET key field n` or, for none, `HDEL key field`.
fn count_cmd(key: &str, field: &str, n: Option<usize>) -> ::redis::Cmd {
    let mut cmd = ::redis::cmd(if n.is_some() { "HSET" } else { "HDEL" });
    cmd.arg(key).arg(field);
    if let Some(n) = n {
        cmd.arg(n);
    }
    cmd
}

impl Store {
    fn connect(&self, timeout: Duration) -> RedisResult<Con> {
        Ok(match self {
            Store::Redis(e) => Con::Redis(e.connect(timeout)?),
            Store::Cluster(seeds) => {
                let mut nodes = Nodes::new(seeds.clone(), timeout, timeout.max(FIRST_BACKOFF));
                nodes.refresh()?;
                Con::Cluster(Box::new(nodes))
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
        let mut healthy = true;
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
                        healthy = true;
                    }
                    Ok(()) => healthy = true,
                    // Once per outage: a failover answers every turn with an error.
                    Err(e) if healthy => {
                        warn!("presence: writing to Redis: {e}");
                        healthy = false;
                        con = None;
                    }
                    Err(e) => {
                        debug!("presence: writing to Redis: {e}");
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
            let key = self.alive_key(&self.node);
            let mut del = ::redis::cmd("DEL");
            del.arg(&key);
            let _ = c.run(vec![(key, del)]);
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
    fn beat(&mut self, con: &mut Con) -> RedisResult<()> {
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        let key = self.alive_key(&self.node);
        let mut set = ::redis::cmd("SET");
        set.arg(&key).arg(1).arg("PX").arg(ttl_ms).arg("GET");
        let before: Option<String> = con.one(key, set)?;
        if before.is_none() {
            self.dirty.extend(self.counts.keys().cloned());
        }
        Ok(())
    }

    /// Writes the changed counts, a pipeline per [`CHUNK`].
    fn write(&mut self, con: &mut Con) -> RedisResult<()> {
        while !self.dirty.is_empty() {
            let batch: Vec<Arc<str>> = self.dirty.iter().take(CHUNK).cloned().collect();
            let cmds: Cmds = batch
                .iter()
                .map(|uid| {
                    let key = self.key(uid);
                    let cmd = count_cmd(&key, &self.node, self.counts.get(uid).copied());
                    (key, cmd)
                })
                .collect();
            con.run(cmds)?;
            for uid in &batch {
                self.dirty.remove(uid);
            }
        }
        Ok(())
    }

    /// Each uid's connections on the nodes whose heartbeat is alive: one pipeline of
    /// `HGETALL`s, one `MGET` of the heartbeats they name.
    fn answer(&self, con: &mut Con, uids: &[String]) -> RedisResult<Vec<(String, u64)>> {
        let reads: Cmds = uids
            .iter()
            .map(|uid| {
                let key = self.key(uid);
                let mut cmd = ::redis::cmd("HGETALL");
                cmd.arg(&key);
                (key, cmd)
            })
            .collect();
        let hashes: Vec<HashMap<String, u64>> = con
            .run(reads)?
            .into_iter()
            .map(::redis::from_redis_value)
            .collect::<Result<_, _>>()?;
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
            let mut mget = ::redis::cmd("MGET");
            mget.arg(&keys);
            // Every heartbeat is in the `{meta}` slot.
            let beats: Vec<Option<String>> = con.one(keys[0].clone(), mget)?;
            nodes
                .iter()
                .zip(beats)
                .filter(|(_, b)| b.is_some())
                .map(|(n, _)| *n)
                .collect()
        };
        // Fields of dead nodes go, so hashes do not grow with every restart.
        let mut gone: Cmds = Vec::new();
        let mut out = Vec::with_capacity(uids.len());
        for (uid, hash) in uids.iter().zip(&hashes) {
            let mut n = 0;
            for (node, count) in hash {
                if alive.contains(node.as_str()) {
                    n += count;
                } else {
                    let key = self.key(uid);
                    gone.push((key.clone(), count_cmd(&key, node, None)));
                }
            }
            out.push((uid.clone(), n));
        }
        if !gone.is_empty() {
            con.run(gone)?;
        }
        Ok(out)
    }
}
