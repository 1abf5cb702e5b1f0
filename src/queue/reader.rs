//! Resumes with `-queue=redis`: a thread of its own reads each resuming
//! connection's history from Redis (`streams.rs`), so the reactor never waits on
//! Redis. Requests queue in a bounded channel; when it is full the reactor answers
//! the resume as incomplete at once rather than wait.

use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};

use super::publisher::Endpoint;
use super::streams::Streams;
use super::{Inbound, Notifier, Resume, Ticket};

/// One resume to read.
struct Request {
    ticket: Ticket,
    uid: Option<String>,
    since: String,
}

pub struct Reader {
    tx: Sender<Request>,
}

impl Reader {
    /// `waiting` bounds the resumes queued at once; `limit` the messages read per stream.
    pub fn start(
        endpoint: Endpoint,
        streams: Streams,
        timeout: Duration,
        waiting: usize,
        limit: usize,
        notifier: Notifier,
    ) -> std::io::Result<Reader> {
        let (tx, rx) = crossbeam_channel::bounded(waiting.max(1));
        thread::Builder::new()
            .name("wspush-redis-read".into())
            .spawn(move || run(rx, endpoint, streams, timeout, limit, notifier))?;
        Ok(Reader { tx })
    }

    pub fn request(&self, ticket: Ticket, uid: Option<&str>, since: &str) -> Resume {
        let req = Request {
            ticket,
            uid: uid.map(str::to_owned),
            since: since.to_owned(),
        };
        match self.tx.try_send(req) {
            Ok(()) => Resume::Pending,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => Resume::Unavailable,
        }
    }
}

fn run(
    rx: Receiver<Request>,
    endpoint: Endpoint,
    streams: Streams,
    timeout: Duration,
    limit: usize,
    notifier: Notifier,
) {
    let mut con: Option<::redis::Connection> = None;
    // Ends when the queue (and with it the sender) is dropped at shutdown.
    while let Ok(req) = rx.recv() {
        let fetched = read_once(&mut con, &endpoint, &streams, timeout, limit, &req);
        if fetched.is_err() {
            // A failed read may have left the connection half-used: start afresh.
            con = None;
        }
        let event = Inbound::History {
            ticket: req.ticket,
            fetched,
        };
        if notifier.send(event).is_err() {
            return;
        }
    }
}

fn read_once(
    con: &mut Option<::redis::Connection>,
    endpoint: &Endpoint,
    streams: &Streams,
    timeout: Duration,
    limit: usize,
    req: &Request,
) -> Result<super::streams::Fetched, String> {
    if con.is_none() {
        *con = Some(endpoint.connect(timeout).map_err(|e| e.to_string())?);
    }
    let c = con.as_mut().expect("connected above");
    streams
        .read(c, req.uid.as_deref(), &req.since, limit, 0)
        .map_err(|e| e.to_string())
}
