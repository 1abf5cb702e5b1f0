//! Redis pub/sub: `/send` on any node PUBLISHes to one channel, every node
//! SUBSCRIBEs to it and pushes what arrives to its own connections (active/active).
//!
//! Two threads, two connections: the shared publisher thread (`publisher.rs`) and
//! a subscriber that decodes batches and builds their frames before the reactor
//! sees them. Both reconnect with backoff by themselves. Pub/sub keeps nothing: a
//! node whose subscription is down misses what is published meanwhile, which is
//! why `/healthz` is 503 then and a load balancer routes clients elsewhere, and
//! why `/send` on that node answers 503 too (its own connections would miss the
//! message), as it does when PUBLISH reaches no subscriber at all. Another node
//! that is still re-subscribing is not seen from here: that gap needs history.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::publisher::{self, BackendError, Endpoint, Publisher, SendError, SendFn, Settings};
use super::{Backoff, Inbound, Link, Notifier, Queue, QueueError, QueueState, Submit, Ticket};
use crate::config::Config;
use crate::message::{self, Envelope};

/// How often a blocked subscriber looks at its stop flag. Shutdown waits at most
/// this long for it; it bounds no resource.
const TICK: Duration = Duration::from_millis(100);

pub struct RedisQueue {
    publisher: Publisher,
    subscriber: Arc<Link>,
    reconnects: Arc<AtomicU64>,
}

impl RedisQueue {
    /// Starts the publisher and subscriber threads; both connect at once and keep
    /// retrying, so a Redis that is down at start is not an error.
    pub fn start(url: &str, cfg: &Config, notifier: Notifier) -> Result<Self, BackendError> {
        let endpoint = Endpoint::parse(url)?;
        let reconnects = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let subscriber = Subscriber {
            endpoint: endpoint.clone(),
            channel: cfg.queue_name.clone(),
            link: Arc::new(Link::default()),
            reconnects: reconnects.clone(),
            notifier: notifier.clone(),
            stop: stop.clone(),
            timeout: cfg.queue_timeout,
            backoff: Backoff::new(publisher::FIRST_BACKOFF, cfg.queue_backoff),
        };
        let sub_link = subscriber.link.clone();
        thread::Builder::new()
            .name("wspush-redis-sub".into())
            .spawn(move || subscriber.run())?;
        let channel = cfg.queue_name.clone();
        let send: SendFn = Box::new(move |con, batch| publish(con, &channel, batch));
        let publisher = Publisher::start(
            endpoint,
            Settings {
                name: "wspush-redis-pub",
                server: "Redis",
                capacity: cfg.queue_size,
                timeout: cfg.queue_timeout,
                backoff: cfg.queue_backoff,
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
        })
    }
}

/// One batch to every subscribed node, this one included.
fn publish(
    con: &mut ::redis::Connection,
    channel: &str,
    batch: &[Envelope],
) -> Result<(), SendError> {
    let receivers: i64 = ::redis::cmd("PUBLISH")
        .arg(channel)
        .arg(message::encode_wire(batch))
        .query(con)?;
    // A live node counts its own subscriber, so nobody at all means this node's
    // subscription is gone too and its connections would miss the batch.
    if receivers == 0 {
        return Err(SendError::Refused(
            "no subscriber received the message, this node's is down".into(),
        ));
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
        self.publisher.submit(ticket, batch)
    }

    fn close(&mut self) {
        self.publisher.close();
    }

    fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }
}

/// How one subscription ended.
enum Ended {
    /// Asked to stop, and what had arrived is delivered.
    Stopped,
    /// The reactor is gone; nobody is left to tell.
    ReactorGone,
    /// Connection lost or refused: try again after a backoff.
    Lost(String),
}

struct Subscriber {
    endpoint: Endpoint,
    channel: String,
    link: Arc<Link>,
    reconnects: Arc<AtomicU64>,
    notifier: Notifier,
    stop: Arc<AtomicBool>,
    timeout: Duration,
    backoff: Backoff,
}

impl Subscriber {
    fn run(mut self) {
        let mut subscribed_before = false;
        while !self.stop.load(Ordering::Acquire) {
            match self.session(&mut subscribed_before) {
                Ended::Stopped => break,
                Ended::ReactorGone => return,
                Ended::Lost(why) => {
                    if self.link.state() != QueueState::Down {
                        warn!(
                            "Redis subscriber: {} unreachable: {why}",
                            self.endpoint.display
                        );
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
        while !self.stop.load(Ordering::Acquire) {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            thread::sleep(left.min(TICK));
        }
    }

    /// One connection: subscribe, then deliver until it breaks or the node stops.
    fn session(&mut self, subscribed_before: &mut bool) -> Ended {
        let mut con = match self.endpoint.connect(self.timeout) {
            Ok(con) => con,
            Err(e) => return Ended::Lost(e.to_string()),
        };
        let mut sub = con.as_pubsub();
        if let Err(e) = sub.subscribe(&self.channel) {
            return Ended::Lost(e.to_string());
        }
        if *subscribed_before {
            self.reconnects.fetch_add(1, Ordering::Relaxed);
            info!(
                "Redis subscriber: subscribed again to {:?} at {}",
                self.channel, self.endpoint.display
            );
        }
        let again = *subscribed_before;
        *subscribed_before = true;
        self.link.set_up(true);
        self.backoff.reset();
        if again && self.notifier.send(Inbound::Resubscribed).is_err() {
            return Ended::ReactorGone;
        }
        if let Err(e) = sub.set_read_timeout(Some(TICK)) {
            return Ended::Lost(e.to_string());
        }
        let mut heard = Instant::now();
        let mut stopping: Option<Instant> = None;
        loop {
            if stopping.is_none() && self.stop.load(Ordering::Acquire) {
                stopping = Some(Instant::now());
            }
            // Stopping ends at the first quiet tick; a never-quiet channel gets `timeout`.
            if stopping.is_some_and(|t| t.elapsed() >= self.timeout) {
                return Ended::Stopped;
            }
            match sub.get_message() {
                Ok(msg) => {
                    heard = Instant::now();
                    match message::decode_wire(msg.get_payload_bytes()) {
                        Ok(batch) => {
                            if self.notifier.send(Inbound::Deliver(batch)).is_err() {
                                return Ended::ReactorGone;
                            }
                        }
                        Err(e) => warn!("Redis channel {:?}: {e}; skipped", self.channel),
                    }
                }
                Err(e) if e.is_timeout() => {
                    if stopping.is_some() {
                        return Ended::Stopped;
                    }
                    // A silent channel may be a dead server (stopped, unplugged):
                    // ask it, bounded by the operation timeout.
                    if heard.elapsed() >= self.timeout {
                        let ping = sub
                            .set_read_timeout(Some(self.timeout))
                            .and_then(|()| sub.ping::<::redis::Value>())
                            .and_then(|_| sub.set_read_timeout(Some(TICK)));
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
}
