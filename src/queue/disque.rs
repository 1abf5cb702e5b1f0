//! Disque: `/send` adds a job (`ADDJOB`) to one queue; a consumer thread takes jobs
//! (`GETJOB`), hands them to the reactor and acknowledges them (`ACKJOB`) only after
//! the reactor has delivered them. A node that dies in between leaves its jobs
//! unacknowledged, and Disque queues them again after `-queue-retry`.
//!
//! Each job goes to one consumer, so this backend suits the active/backup layout:
//! a node takes jobs only while it has push connections, so an idle backup behind
//! nginx leaves every job to the active node and starts consuming when clients fail
//! over to it. Jobs published while no node has clients wait in Disque (up to their
//! TTL). Two nodes that both hold clients would split the jobs between them; Redis
//! pub/sub is for active/active.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};

use super::publisher::{self, BackendError, Endpoint, Publisher, SendFn, Settings};
use super::{Backoff, Inbound, Link, Notifier, Queue, QueueState, Submit, Ticket};
use crate::config::Config;
use crate::message::{self, Envelope, unix_now};

/// How long one GETJOB blocks on the server. The consumer looks at its stop flag
/// between calls, so shutdown waits at most this long; it bounds no resource.
const POLL: Duration = Duration::from_millis(200);

pub struct DisqueQueue {
    publisher: Publisher,
    consumer: Arc<Link>,
    /// Job ids the reactor has delivered, on their way to ACKJOB.
    acks: Sender<String>,
    /// Push connections on this node; the consumer takes jobs only while non-zero.
    listeners: Arc<AtomicUsize>,
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
    /// Starts the publisher and consumer threads; `addr` is `HOST:PORT`.
    pub fn start(addr: &str, cfg: &Config, notifier: Notifier) -> Result<Self, BackendError> {
        let endpoint = Endpoint::parse(&format!("redis://{addr}"))?;
        let reconnects = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        // The consumer waits for every job it handed out before it takes more, so
        // at most `prefetch` ids are ever in this channel.
        let (acks, ack_rx) = crossbeam_channel::bounded(cfg.queue_prefetch);
        let listeners = Arc::new(AtomicUsize::new(0));
        let consumer = Consumer {
            listeners: listeners.clone(),
            endpoint: endpoint.clone(),
            queue: cfg.queue_name.clone(),
            prefetch: cfg.queue_prefetch,
            link: Arc::new(Link::default()),
            reconnects: reconnects.clone(),
            notifier: notifier.clone(),
            acks: ack_rx,
            stop: stop.clone(),
            timeout: cfg.queue_timeout,
            backoff: Backoff::new(publisher::FIRST_BACKOFF, cfg.queue_backoff),
            unacked: 0,
        };
        let consumer_link = consumer.link.clone();
        thread::Builder::new()
            .name("wspush-disque-get".into())
            .spawn(move || consumer.run())?;
        let queue = cfg.queue_name.clone();
        let (timeout, default_ttl, retry) = (cfg.queue_timeout, cfg.queue_ttl, cfg.queue_retry);
        let send: SendFn = Box::new(move |con, batch| {
            let ttl = job_ttl(batch, unix_now(), default_ttl);
            addjob_args(&queue, message::encode_wire(batch), timeout, ttl, retry)
                .query::<String>(con)?;
            Ok(())
        });
        let publisher = Publisher::start(
            endpoint,
            Settings {
                name: "wspush-disque-add",
                server: "Disque",
                capacity: cfg.queue_size,
                timeout: cfg.queue_timeout,
                backoff: cfg.queue_backoff,
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
            listeners,
            reconnects,
        })
    }
}

impl Queue for DisqueQueue {
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

    fn set_listeners(&mut self, n: usize) {
        self.listeners.store(n, Ordering::Release);
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

enum Ended {
    Stopped,
    ReactorGone,
    Lost(String),
}

struct Consumer {
    endpoint: Endpoint,
    queue: String,
    prefetch: usize,
    link: Arc<Link>,
    reconnects: Arc<AtomicU64>,
    notifier: Notifier,
    acks: Receiver<String>,
    stop: Arc<AtomicBool>,
    listeners: Arc<AtomicUsize>,
    timeout: Duration,
    backoff: Backoff,
    /// Jobs handed to the reactor whose ids have not come back yet.
    unacked: usize,
}

impl Consumer {
    fn run(mut self) {
        let mut connected_before = false;
        while !self.stop.load(Ordering::Acquire) {
            match self.session(&mut connected_before) {
                Ended::Stopped => break,
                Ended::ReactorGone => return,
                Ended::Lost(why) => {
                    if self.link.state() != QueueState::Down {
                        warn!(
                            "Disque consumer: {} unreachable: {why}",
                            self.endpoint.display
                        );
                    }
                    self.link.set_up(false);
                    let until = Instant::now() + self.backoff.next_delay();
                    while !self.stop.load(Ordering::Acquire) && Instant::now() < until {
                        thread::sleep(POLL.min(until.saturating_duration_since(Instant::now())));
                    }
                }
            }
        }
        let _ = self.notifier.send(Inbound::Drained);
    }

    fn session(&mut self, connected_before: &mut bool) -> Ended {
        let mut con = match self.endpoint.connect(self.timeout) {
            Ok(con) => con,
            Err(e) => return Ended::Lost(e.to_string()),
        };
        // Jobs taken on a lost connection stay unacknowledged; Disque redelivers
        // them, so their ids are of no use any more.
        self.unacked = 0;
        while self.acks.try_recv().is_ok() {}
        if *connected_before {
            self.reconnects.fetch_add(1, Ordering::Relaxed);
            info!("Disque consumer reconnected to {}", self.endpoint.display);
        }
        *connected_before = true;
        self.link.set_up(true);
        self.backoff.reset();
        // A blocked GETJOB answers after POLL; the socket waits that plus the timeout.
        if let Err(e) = con.set_read_timeout(Some(POLL + self.timeout)) {
            return Ended::Lost(e.to_string());
        }
        loop {
            if let Err(e) = self.acknowledge(&mut con) {
                return Ended::Lost(e);
            }
            if self.stop.load(Ordering::Acquire) {
                return Ended::Stopped;
            }
            if self.listeners.load(Ordering::Acquire) == 0 {
                // Nobody here to push to: leave the jobs to a node with clients.
                // The connection stays open, so consuming resumes within POLL.
                thread::sleep(POLL);
                continue;
            }
            let reply = ::redis::cmd("GETJOB")
                .arg("TIMEOUT")
                .arg(POLL.as_millis() as u64)
                .arg("COUNT")
                .arg(self.prefetch)
                .arg("FROM")
                .arg(&self.queue)
                .query::<::redis::Value>(&mut con);
            let jobs = match reply.map_err(|e| e.to_string()).and_then(parse_getjob) {
                Ok(jobs) => jobs,
                Err(e) => return Ended::Lost(e),
            };
            let mut malformed = Vec::new();
            for job in jobs {
                match message::decode_wire(&job.body) {
                    Ok(batch) => {
                        let event = Inbound::DeliverJob { batch, job: job.id };
                        if self.notifier.send(event).is_err() {
                            return Ended::ReactorGone;
                        }
                        self.unacked += 1;
                    }
                    Err(e) => {
                        // Acknowledged anyway: redelivering it would only fail again.
                        warn!("Disque job {} in {:?}: {e}; skipped", job.id, self.queue);
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

    /// Waits (bounded by the timeout) for the reactor to take every job handed out,
    /// then acknowledges them in one ACKJOB.
    fn acknowledge(&mut self, con: &mut ::redis::Connection) -> Result<(), String> {
        if self.unacked == 0 {
            return Ok(());
        }
        let mut ids = Vec::with_capacity(self.unacked);
        let deadline = Instant::now() + self.timeout;
        while self.unacked > 0 {
            match self
                .acks
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(id) => {
                    ids.push(id);
                    self.unacked -= 1;
                }
                Err(RecvTimeoutError::Timeout) => {
                    // Late ids are acknowledged next round; Disque redelivers any
                    // that never come back.
                    warn!(
                        "Disque: {} jobs not yet delivered after {:?}",
                        self.unacked, self.timeout
                    );
                    break;
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

    fn env(expires: u64) -> Envelope {
        Envelope {
            target: Target::All,
            types: "notice".into(),
            expires,
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
