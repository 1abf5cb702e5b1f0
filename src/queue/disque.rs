//! Disque: every node consumes its own queue, and `/send` adds each job to the
//! queue of every live node, so each node pushes to its own matching connections,
//! whichever node the message came in on.
//!
//! Nodes find each other through announcements: each node's consumer keeps a
//! short-lived job naming its queue in `NAME:nodes` (added every
//! [`ANNOUNCE_EVERY`], TTL [`ANNOUNCE_TTL`]), which nobody takes; publishers read
//! that queue with QPEEK at most every [`ANNOUNCE_EVERY`] and ADDJOB the batch to
//! every queue named there, in one pipeline. A starting node reports up only once
//! every publisher can have seen its announcement, and a stopping node deletes
//! its announcements. The consumer acknowledges (`ACKJOB`) a job only after the
//! reactor has delivered it; one taken by a node that dies is queued again after
//! `-queue-retry`, for the node that comes back with the same `-queue-node`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};

use super::driver::{Driver, Ended, Session};
use super::publisher::{self, BackendError, Endpoint, Publisher, SendError, SendFn, Settings};
use super::{Backoff, Inbound, Link, Notifier, Queue, QueueState, Submit, Ticket};
use crate::message::{self, Envelope, unix_now};

/// How long one GETJOB blocks on the server. The consumer looks at its stop flag
/// between calls, so shutdown waits at most this long; it bounds no resource.
const POLL: Duration = Duration::from_millis(200);

/// How often a node renews its announcement, and how stale a publisher's list of
/// nodes may be.
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(1);

/// The life of one announcement in whole seconds: a node that stops renewing is
/// out of every list after at most this long plus [`ANNOUNCE_EVERY`].
pub const ANNOUNCE_TTL: u64 = 3;

/// The settings a Disque backend needs, from flags.
#[derive(Clone, Debug)]
pub struct DisqueSettings {
    /// `HOST:PORT`.
    pub addr: String,
    /// The prefix every node shares: node queues are `NAME:node:ID`.
    pub name: String,
    /// This node's id: a fixed one keeps its queue (and jobs it took but never
    /// acknowledged) across a restart; empty picks a fresh one.
    pub node: String,
    /// The most nodes a publisher fans out to.
    pub max_nodes: usize,
    pub capacity: usize,
    pub timeout: Duration,
    pub backoff: Duration,
    pub ttl: Duration,
    pub retry: Duration,
    pub prefetch: usize,
    /// What another node's batch must satisfy, as `/send` does.
    pub rules: message::Rules,
}

impl DisqueSettings {
    pub fn from_config(addr: &str, cfg: &crate::config::Config) -> Self {
        DisqueSettings {
            addr: addr.to_string(),
            name: cfg.queue_name.clone(),
            node: cfg.queue_node.clone(),
            max_nodes: cfg.queue_nodes,
            capacity: cfg.queue_size,
            timeout: cfg.queue_timeout,
            backoff: cfg.queue_backoff,
            ttl: cfg.queue_ttl,
            retry: cfg.queue_retry,
            prefetch: cfg.queue_prefetch,
            rules: message::Rules::new(cfg),
        }
    }

    fn registry(&self) -> String {
        format!("{}:nodes", self.name)
    }
}

/// A fresh node id: 64 random bits.
fn random_id() -> String {
    format!("{:016x}", crate::history::random_per_run())
}

pub struct DisqueQueue {
    publisher: Publisher,
    consumer: Arc<Link>,
    /// Job ids the reactor has delivered, on their way to ACKJOB.
    acks: Sender<String>,
    reconnects: Arc<AtomicU64>,
}

/// The job TTL for a batch, in whole seconds (Disque wants at least 1): until the
/// latest `timeout` in it, or `default_ttl` when any message has none.
pub fn job_ttl(batch: &[Envelope], now_unix: u64, default_ttl: Duration) -> u64 {
    let ttl = if batch.iter().any(|e| e.expires == 0) {
        default_ttl.as_secs()
    } else {
        let latest = batch.iter().map(|e| e.expires).max().unwrap_or(now_unix);
        latest.saturating_sub(now_unix)
    };
    ttl.max(1)
}

/// The `ADDJOB` arguments after the command name: queue, body, the synchronous
/// replication timeout in milliseconds, then TTL and RETRY in seconds.
pub fn addjob_args(
    queue: &str,
    body: Vec<u8>,
    timeout: Duration,
    ttl_secs: u64,
    retry: Duration,
) -> ::redis::Cmd {
    let mut cmd = ::redis::cmd("ADDJOB");
    cmd.arg(queue)
        .arg(body)
        .arg(timeout.as_millis().max(1) as u64)
        .arg("TTL")
        .arg(ttl_secs)
        .arg("RETRY")
        .arg(retry.as_secs().max(1));
    cmd
}

/// One job from a GETJOB reply: `[queue, id, body]`.
#[derive(Debug, PartialEq, Eq)]
pub struct Job {
    pub id: String,
    pub body: Vec<u8>,
}

/// Parses a GETJOB reply: nil (timed out) or an array of `[queue, id, body]`.
pub fn parse_getjob(reply: ::redis::Value) -> Result<Vec<Job>, String> {
    use ::redis::Value;
    let items = match reply {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(items) => items,
        other => return Err(format!("unexpected GETJOB reply {other:?}")),
    };
    let mut jobs = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(fields) = item else {
            return Err("a GETJOB entry is not an array".into());
        };
        let mut fields = fields.into_iter();
        let (Some(_queue), Some(Value::BulkString(id)), Some(Value::BulkString(body))) =
            (fields.next(), fields.next(), fields.next())
        else {
            return Err("a GETJOB entry is not [queue, id, body]".into());
        };
        let id = String::from_utf8(id).map_err(|_| "a job id is not text".to_string())?;
        jobs.push(Job { id, body });
    }
    Ok(jobs)
}

impl DisqueQueue {
    /// Starts the publisher and consumer threads.
    pub fn start(set: DisqueSettings, notifier: Notifier) -> Result<Self, BackendError> {
        let endpoint = Endpoint::parse(&format!("redis://{}", set.addr))?;
        let reconnects = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let node = if set.node.is_empty() {
            random_id()
        } else {
            set.node.clone()
        };
        let own = format!("{}:node:{node}", set.name);
        // The consumer takes no job while any it handed out is not acknowledged,
        // so at most `prefetch` ids are ever in this channel: `ack` never drops one.
        let (acks, ack_rx) = crossbeam_channel::bounded(set.prefetch);
        let consumer = Consumer {
            endpoint: endpoint.clone(),
            own: own.clone(),
            registry: set.registry(),
            prefetch: set.prefetch,
            rules: set.rules,
            acks: ack_rx,
            stop: stop.clone(),
            timeout: set.timeout,
            unacked: 0,
            announced: VecDeque::new(),
            next_announce: Instant::now(),
        };
        let driver = Driver::new(
            "Disque consumer",
            endpoint.display.clone(),
            stop.clone(),
            notifier.clone(),
            Backoff::new(publisher::FIRST_BACKOFF, set.backoff),
            reconnects.clone(),
        );
        let consumer_link = driver.link();
        thread::Builder::new()
            .name("wspush-disque-get".into())
            .spawn(move || driver.run(consumer))?;
        let mut fanout = Fanout {
            registry: set.registry(),
            own,
            max_nodes: set.max_nodes,
            nodes: Vec::new(),
            targets: Vec::new(),
            refreshed: None,
        };
        let (timeout, default_ttl, retry) = (set.timeout, set.ttl, set.retry);
        let send: SendFn = Box::new(move |con, batch| {
            let ttl = job_ttl(batch, unix_now(), default_ttl);
            let body = message::encode_wire(batch);
            let mut pipe = ::redis::pipe();
            for queue in fanout.nodes(con)? {
                pipe.add_command(addjob_args(queue, body.clone(), timeout, ttl, retry));
            }
            pipe.query::<Vec<String>>(con)?;
            Ok(())
        });
        let publisher = Publisher::start(
            endpoint,
            Settings {
                name: "wspush-disque-add",
                server: "Disque",
                capacity: set.capacity,
                timeout: set.timeout,
                backoff: set.backoff,
            },
            reconnects.clone(),
            notifier,
            send,
            move || stop.store(true, Ordering::Release),
        )?;
        Ok(DisqueQueue {
            publisher,
            consumer: consumer_link,
            acks,
            reconnects,
        })
    }
}

/// The publisher's view of the live nodes, read from their announcements.
struct Fanout {
    registry: String,
    /// This node's queue: always a target, announced or not yet.
    own: String,
    max_nodes: usize,
    /// Each known node's queue and since when its announcements are missing.
    nodes: Vec<(String, Option<Instant>)>,
    targets: Vec<String>,
    refreshed: Option<Instant>,
}

/// How long a node stays a target after its announcements went missing: as long
/// as one lives, so a Disque restart (which loses them all) does not drop a live
/// node from the lists before it has announced itself again.
const KEEP: Duration = Duration::from_secs(ANNOUNCE_TTL + 1);

impl Fanout {
    fn nodes(&mut self, con: &mut ::redis::Connection) -> Result<&[String], SendError> {
        if self.refreshed.is_none_or(|t| t.elapsed() >= ANNOUNCE_EVERY) {
            // Newest first; each node has at most ANNOUNCE_TTL + 1 announcements alive.
            let peek = self.max_nodes * (ANNOUNCE_TTL as usize + 1);
            let reply = ::redis::cmd("QPEEK")
                .arg(&self.registry)
                .arg(-(peek as i64))
                .query::<::redis::Value>(con)?;
            let jobs = parse_getjob(reply).map_err(SendError::Refused)?;
            let now = Instant::now();
            let announced = live_nodes(&self.own, jobs, self.max_nodes);
            remember(&mut self.nodes, &announced, now, self.max_nodes);
            self.targets.clear();
            self.targets
                .extend(self.nodes.iter().map(|(q, _)| q.clone()));
            self.refreshed = Some(now);
        }
        Ok(&self.targets)
    }
}

/// Merges the nodes just `announced` into `known`, each with the time it was
/// first found missing (None: announced now). A node missing for [`KEEP`] of
/// looks is forgotten: counted from the first look without it, so time with
/// Disque unreachable does not count. At most `max`, announced ones first.
pub fn remember(
    known: &mut Vec<(String, Option<Instant>)>,
    announced: &[String],
    now: Instant,
    max: usize,
) {
    for (name, missing) in known.iter_mut() {
        if announced.contains(name) {
            *missing = None;
        } else if missing.is_none() {
            *missing = Some(now);
        }
    }
    for name in announced {
        if !known.iter().any(|(q, _)| q == name) {
            known.push((name.clone(), None));
        }
    }
    known.retain(|(_, missing)| missing.is_none_or(|t| now.duration_since(t) < KEEP));
    known.sort_by_key(|&(_, missing)| missing.map(std::cmp::Reverse));
    known.truncate(max);
}

/// The queues named by announcements, this node's first, each once, at most `max`.
pub fn live_nodes(own: &str, announcements: Vec<Job>, max: usize) -> Vec<String> {
    let mut nodes = vec![own.to_string()];
    for job in announcements {
        if nodes.len() >= max {
            if !nodes.iter().any(|n| n.as_bytes() == job.body) {
                warn!("Disque: more than {max} nodes announced; the rest get no messages");
            }
            break;
        }
        if let Ok(name) = String::from_utf8(job.body)
            && !nodes.contains(&name)
        {
            nodes.push(name);
        }
    }
    nodes
}

impl Queue for DisqueQueue {
    fn presence(&mut self, _ticket: Ticket, _uids: Vec<String>) -> super::PresenceRead {
        super::PresenceRead::Unsupported
    }

    fn name(&self) -> &'static str {
        "disque"
    }

    fn state(&self) -> QueueState {
        Link::combined(self.publisher.link(), &self.consumer)
    }

    fn publish(&mut self, ticket: Ticket, batch: Vec<Envelope>) -> Submit {
        self.publisher.submit(ticket, batch)
    }

    fn close(&mut self) {
        self.publisher.close();
    }

    fn ack(&mut self, job: String) {
        // Never blocks the reactor. The channel has room for every job handed out,
        // so this fails only when the consumer is gone; Disque then redelivers.
        if let Err(TrySendError::Full(id) | TrySendError::Disconnected(id)) =
            self.acks.try_send(job)
        {
            debug!("Disque job {id} left unacknowledged: consumer gone");
        }
    }

    fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }
}

struct Consumer {
    endpoint: Endpoint,
    /// This node's queue.
    own: String,
    /// Where nodes announce their queues.
    registry: String,
    prefetch: usize,
    rules: message::Rules,
    acks: Receiver<String>,
    stop: Arc<AtomicBool>,
    timeout: Duration,
    /// Jobs handed to the reactor whose ids have not come back yet. Kept across a
    /// reconnect: the ids still come back and are acknowledged on the new link.
    unacked: usize,
    /// Ids of this node's live announcements, deleted when it stops.
    announced: VecDeque<(String, Instant)>,
    next_announce: Instant,
}

impl Session for Consumer {
    fn session(&mut self, driver: &mut Driver) -> Ended {
        let mut con = match self.endpoint.connect(self.timeout) {
            Ok(con) => con,
            Err(e) => return Ended::Lost(e.to_string()),
        };
        // A blocked GETJOB answers after POLL, timed by the server's own clock (10 Hz
        // by default, so up to a tick late); the socket waits twice that plus the timeout.
        if let Err(e) = con.set_read_timeout(Some(POLL * 2 + self.timeout)) {
            return Ended::Lost(e.to_string());
        }
        // Announcements on a lost server are gone with it; announce at once.
        self.announced.clear();
        self.next_announce = Instant::now();
        if let Err(e) = self.announce(&mut con) {
            return Ended::Lost(e);
        }
        // Up (and counted as a reconnect) once every publisher's list can hold
        // this node, so that nothing accepted meanwhile misses its connections.
        let ready_at = Instant::now() + ANNOUNCE_EVERY;
        let mut ready = false;
        loop {
            if let Err(e) = self.acknowledge(&mut con) {
                return Ended::Lost(e);
            }
            if let Err(e) = self.announce(&mut con) {
                return Ended::Lost(e);
            }
            if self.stop.load(Ordering::Acquire) {
                self.withdraw(&mut con);
                return Ended::Stopped;
            }
            if !ready && Instant::now() >= ready_at {
                ready = true;
                driver.up();
            }
            let reply = ::redis::cmd("GETJOB")
                .arg("TIMEOUT")
                .arg(POLL.as_millis() as u64)
                .arg("COUNT")
                .arg(self.prefetch)
                .arg("FROM")
                .arg(&self.own)
                .query::<::redis::Value>(&mut con);
            let jobs = match reply.map_err(|e| e.to_string()).and_then(parse_getjob) {
                Ok(jobs) => jobs,
                Err(e) => return Ended::Lost(e),
            };
            let mut malformed = Vec::new();
            for job in jobs {
                match message::decode_wire(&job.body, &self.rules) {
                    Ok(batch) => {
                        let event = Inbound::DeliverJob { batch, job: job.id };
                        if driver.notifier.send(event).is_err() {
                            return Ended::ReactorGone;
                        }
                        self.unacked += 1;
                    }
                    Err(e) => {
                        // Acknowledged anyway: redelivering it would only fail again.
                        warn!("Disque job {} in {:?}: {e}; skipped", job.id, self.own);
                        malformed.push(job.id);
                    }
                }
            }
            if !malformed.is_empty()
                && let Err(e) = ::redis::cmd("ACKJOB").arg(&malformed).exec(&mut con)
            {
                return Ended::Lost(e.to_string());
            }
        }
    }
}

impl Consumer {
    /// Renews this node's announcement when due.
    fn announce(&mut self, con: &mut ::redis::Connection) -> Result<(), String> {
        let now = Instant::now();
        if now < self.next_announce {
            return Ok(());
        }
        let life = Duration::from_secs(ANNOUNCE_TTL);
        self.announced
            .retain(|(_, at)| now.duration_since(*at) < life);
        let id = ::redis::cmd("ADDJOB")
            .arg(&self.registry)
            .arg(&self.own)
            .arg(self.timeout.as_millis().max(1) as u64)
            .arg("TTL")
            .arg(ANNOUNCE_TTL)
            .arg("RETRY")
            .arg(0)
            .query::<String>(con)
            .map_err(|e| e.to_string())?;
        self.announced.push_back((id, now));
        self.next_announce = now + ANNOUNCE_EVERY;
        Ok(())
    }

    /// Stopping: publishers leave this node out from their next look on.
    fn withdraw(&mut self, con: &mut ::redis::Connection) {
        let ids: Vec<&str> = self.announced.iter().map(|(id, _)| id.as_str()).collect();
        if !ids.is_empty()
            && let Err(e) = ::redis::cmd("DELJOB").arg(&ids).exec(con)
        {
            debug!("Disque: announcements left to expire: {e}");
        }
        self.announced.clear();
    }

    /// Waits for the reactor to take every job handed out, then acknowledges them
    /// in one ACKJOB. A slow reactor makes this wait longer, never skip: taking
    /// more jobs first would overflow the ack channel. The announcement is kept
    /// alive meanwhile, and a stop gives up after the timeout (Disque redelivers).
    fn acknowledge(&mut self, con: &mut ::redis::Connection) -> Result<(), String> {
        if self.unacked == 0 {
            return Ok(());
        }
        let mut ids = Vec::with_capacity(self.unacked);
        let started = Instant::now();
        let mut warned = false;
        while self.unacked > 0 {
            match self.acks.recv_timeout(POLL) {
                Ok(id) => {
                    ids.push(id);
                    self.unacked -= 1;
                }
                Err(RecvTimeoutError::Timeout) => {
                    let waited = started.elapsed();
                    if waited >= self.timeout && !warned {
                        warned = true;
                        warn!(
                            "Disque: {} jobs not yet delivered after {waited:?}",
                            self.unacked
                        );
                    }
                    if waited >= self.timeout && self.stop.load(Ordering::Acquire) {
                        self.unacked = 0;
                        break;
                    }
                    self.announce(con)?;
                }
                Err(RecvTimeoutError::Disconnected) => return Err("reactor gone".into()),
            }
        }
        if ids.is_empty() {
            return Ok(());
        }
        ::redis::cmd("ACKJOB")
            .arg(&ids)
            .exec(con)
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Target;

    #[test]
    fn the_node_list_starts_with_this_node_and_is_bounded() {
        let job = |b: &str| Job {
            id: "D-x".into(),
            body: b.as_bytes().to_vec(),
        };
        let got = live_nodes(
            "q:node:a",
            vec![job("q:node:b"), job("q:node:a"), job("q:node:b")],
            8,
        );
        assert_eq!(got, ["q:node:a", "q:node:b"]);
        let got = live_nodes("q:node:a", vec![job("q:node:b"), job("q:node:c")], 2);
        assert_eq!(got, ["q:node:a", "q:node:b"]);
    }

    #[test]
    fn a_node_missing_from_one_look_stays_a_target_for_a_while() {
        let t0 = Instant::now();
        let names =
            |k: &[(String, Option<Instant>)]| k.iter().map(|(q, _)| q.clone()).collect::<Vec<_>>();
        let mut known = Vec::new();
        remember(&mut known, &["a".into(), "b".into()], t0, 8);
        assert_eq!(names(&known), ["a", "b"]);
        // A Disque restart, after an outage of any length: only this node has
        // announced itself again so far.
        let back = t0 + Duration::from_secs(60);
        remember(&mut known, &["a".into()], back, 8);
        assert_eq!(names(&known), ["a", "b"]);
        remember(&mut known, &["a".into()], back + ANNOUNCE_EVERY, 8);
        assert_eq!(names(&known), ["a", "b"]);
        remember(&mut known, &["a".into()], back + KEEP, 8);
        assert_eq!(names(&known), ["a"], "gone for good");
        // Over the bound, the announced ones stay.
        remember(&mut known, &["b".into()], back + KEEP, 8);
        remember(&mut known, &["c".into(), "d".into()], back + KEEP, 2);
        assert_eq!(names(&known), ["c", "d"]);
    }

    #[test]
    fn node_ids_differ() {
        assert_ne!(random_id(), random_id());
    }

    fn env(expires: u64) -> Envelope {
        Envelope {
            target: Target::All,
            types: "notice".into(),
            expires,
            seq: 0,
            lane: Default::default(),
            frame: Arc::from(&b"\x81\x02{}"[..]),
        }
    }

    #[test]
    fn ttl_follows_the_latest_timeout_or_the_default() {
        let day = Duration::from_secs(86_400);
        assert_eq!(job_ttl(&[env(1_000), env(1_060)], 1_000, day), 60);
        assert_eq!(job_ttl(&[env(1_060), env(0)], 1_000, day), 86_400);
        // Disque refuses TTL 0: a message about to expire still gets one second.
        assert_eq!(job_ttl(&[env(1_000)], 1_000, day), 1);
    }

    #[test]
    fn addjob_encodes_the_documented_arguments() {
        let cmd = addjob_args(
            "wspush",
            b"[1]".to_vec(),
            Duration::from_secs(2),
            60,
            Duration::from_secs(10),
        );
        let packed = String::from_utf8(cmd.get_packed_command()).unwrap();
        let parts: Vec<&str> = packed.split("\r\n").collect();
        // *8 args: ADDJOB queue body ms-timeout TTL 60 RETRY 10
        assert_eq!(parts[0], "*8");
        let args: Vec<&str> = parts[1..].iter().skip(1).step_by(2).copied().collect();
        assert_eq!(
            args,
            [
                "ADDJOB", "wspush", "[1]", "2000", "TTL", "60", "RETRY", "10"
            ]
        );
    }

    #[test]
    fn getjob_replies() {
        use ::redis::Value;
        let b = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        assert_eq!(parse_getjob(Value::Nil).unwrap(), vec![]);
        let jobs = parse_getjob(Value::Array(vec![Value::Array(vec![
            b("wspush"),
            b("D-1"),
            b("body"),
        ])]))
        .unwrap();
        assert_eq!(
            jobs,
            vec![Job {
                id: "D-1".into(),
                body: b"body".to_vec()
            }]
        );
        assert!(parse_getjob(Value::Array(vec![b("x")])).is_err());
        assert!(parse_getjob(Value::Array(vec![Value::Array(vec![b("q")])])).is_err());
        assert!(parse_getjob(Value::Int(1)).is_err());
    }
}
