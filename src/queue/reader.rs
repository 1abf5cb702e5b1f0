//! Reads from Redis history for connections that start: a resume (`?since=`), or a
//! connection of a uid this node was not subscribed to, which must get what was
//! sent to it between its join and the subscription. A thread of its own does it,
//! so the reactor never waits on Redis. Requests queue in a bounded channel; when it
//! is full the caller answers at once rather than wait.

use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use super::publisher::Endpoint;
use super::streams::{Fetched, Streams, first_seq_at};
use super::{Inbound, Notifier, Resume, Ticket};
use crate::history::Epoch;

/// How long a joining connection's read may take to reach Redis before its window
/// (measured when it was sent) might start after the join; a slower round trip is
/// read again with the whole operation timeout as the margin.
const MARGIN: Duration = Duration::from_millis(50);

/// Where a read starts.
#[derive(Debug)]
pub enum From {
    /// After a delivery id (`?since=`).
    Since(String),
    /// At the moment a connection joined, by this host's monotonic clock.
    Joined(Instant),
}

/// One request.
struct Request {
    what: What,
    /// Set by the subscriber: the answer goes back to it, followed by this number
    /// published on the node's channel (see [`Fence`]).
    fence: Option<u64>,
}

enum What {
    /// A connection's history.
    Read {
        ticket: Ticket,
        uid: Option<String>,
        from: From,
    },
    /// The newest id Redis issued: once its fence arrives, the subscriber has
    /// every message up to it, which keeps a quiet node's catch-up point recent.
    Clock,
}

/// What the reader hands the subscriber before publishing the fence.
pub enum Answer {
    History(Inbound),
    Clock(Option<(Epoch, u64)>),
}

/// Where fenced answers go: the subscriber's channel of results, and the node's own
/// pub/sub channel the fence number is published on after each.
///
/// A read of a joining connection's uid is only right if the reactor sees it after
/// every message with a smaller id that reaches this node: those arrive through the
/// subscriber, possibly still on their way when the read is done. Published after
/// the read, the fence reaches the subscriber behind all of them; the subscriber
/// hands the answer on there, in order with its deliveries.
pub struct Fence {
    pub results: Sender<(u64, Answer)>,
    pub channel: String,
}

#[derive(Clone)]
pub struct Reader {
    tx: Sender<Request>,
}

impl Reader {
    /// `waiting` bounds the reads queued at once; `limit` the messages read per stream.
    pub fn start(
        endpoint: Endpoint,
        streams: Streams,
        timeout: Duration,
        waiting: usize,
        limit: usize,
        notifier: Notifier,
        fence: Fence,
    ) -> std::io::Result<Reader> {
        let (tx, rx) = crossbeam_channel::bounded(waiting.max(1));
        let at = Target {
            endpoint,
            streams,
            timeout,
            limit,
        };
        thread::Builder::new()
            .name("wspush-redis-read".into())
            .spawn(move || run(rx, at, notifier, fence))?;
        Ok(Reader { tx })
    }

    /// A read answered to the reactor (`fence` None) or to the subscriber.
    pub fn request(
        &self,
        ticket: Ticket,
        uid: Option<&str>,
        from: From,
        fence: Option<u64>,
    ) -> Resume {
        let what = What::Read {
            ticket,
            uid: uid.map(str::to_owned),
            from,
        };
        self.send(Request { what, fence })
    }

    /// Asks for the clock, answered to the subscriber under `fence`.
    pub fn clock(&self, fence: u64) -> Resume {
        self.send(Request {
            what: What::Clock,
            fence: Some(fence),
        })
    }

    fn send(&self, req: Request) -> Resume {
        match self.tx.try_send(req) {
            Ok(()) => Resume::Pending,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => Resume::Unavailable,
        }
    }
}

/// What the reader reads from.
struct Target {
    endpoint: Endpoint,
    streams: Streams,
    timeout: Duration,
    limit: usize,
}

fn run(rx: Receiver<Request>, at: Target, notifier: Notifier, fence: Fence) {
    let mut con: Option<::redis::Connection> = None;
    // Ends when every sender (the queue's and the subscriber's) is dropped.
    while let Ok(req) = rx.recv() {
        let answer = match req.what {
            What::Read { ticket, uid, from } => {
                let fetched = read_once(&mut con, &at, uid.as_deref(), &from);
                if fetched.is_err() {
                    // A failed read may have left the connection half-used: start afresh.
                    con = None;
                }
                Answer::History(Inbound::History { ticket, fetched })
            }
            What::Clock => {
                let clock = connection(&mut con, &at)
                    .and_then(|c| at.streams.clock(c).map_err(|e| e.to_string()));
                if clock.is_err() {
                    con = None;
                }
                Answer::Clock(clock.ok().flatten())
            }
        };
        let Some(n) = req.fence else {
            if let Answer::History(event) = answer
                && notifier.send(event).is_err()
            {
                return;
            }
            continue;
        };
        if fence.results.send((n, answer)).is_err() {
            return;
        }
        // Without its fence the subscriber hands the answer on after a timeout, as a
        // failure; one more try on a fresh connection makes that rarer.
        for _ in 0..2 {
            if publish_fence(&mut con, &at, &fence.channel, n).is_ok() {
                break;
            }
            con = None;
        }
    }
}

fn connection<'a>(
    con: &'a mut Option<::redis::Connection>,
    at: &Target,
) -> Result<&'a mut ::redis::Connection, String> {
    if con.is_none() {
        *con = Some(at.endpoint.connect(at.timeout).map_err(|e| e.to_string())?);
    }
    Ok(con.as_mut().expect("connected above"))
}

fn publish_fence(
    con: &mut Option<::redis::Connection>,
    at: &Target,
    channel: &str,
    n: u64,
) -> Result<(), String> {
    let c = connection(con, at)?;
    ::redis::cmd("PUBLISH")
        .arg(channel)
        .arg(n)
        .query::<i64>(c)
        .map(drop)
        .map_err(|e| e.to_string())
}

fn read_once(
    con: &mut Option<::redis::Connection>,
    at: &Target,
    uid: Option<&str>,
    from: &From,
) -> Result<Fetched, String> {
    let (streams, limit, timeout) = (&at.streams, at.limit, at.timeout);
    let c = connection(con, at)?;
    match (from, uid) {
        (From::Since(since), uid) => streams
            .read(c, uid, since, limit, 0)
            .map_err(|e| e.to_string()),
        // Without a uid there is nothing to read: `all` reaches every node.
        (From::Joined(_), None) => Ok(Fetched {
            complete: true,
            batch: Vec::new(),
            redis_ms: 0,
            cut: false,
            trimmed: 0,
            epoch: None,
            clock: None,
        }),
        (From::Joined(at), Some(uid)) => {
            for margin in [MARGIN, timeout] {
                let sent = at.elapsed();
                let mut f = streams
                    .read_recent(c, uid, sent + margin, limit)
                    .map_err(|e| e.to_string())?;
                let back = at.elapsed();
                if back - sent > margin {
                    continue; // the window may have started after the join
                }
                // Redis's clock at the read, less the time since the join (and a
                // millisecond for rounding), is no later than the join: every
                // message accepted after the join has a larger id.
                let back_ms = u64::try_from(back.as_millis()).unwrap_or(u64::MAX);
                let floor = first_seq_at(f.redis_ms.saturating_sub(back_ms + 1));
                if f.cut || f.trimmed >= floor {
                    return Err("more was sent to the uid since the join than it keeps".into());
                }
                f.batch.retain(|e| e.seq >= floor);
                f.complete = true;
                return Ok(f);
            }
            Err("history read too slow to place the join".into())
        }
    }
}
