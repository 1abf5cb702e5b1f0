//! What the networked backends (Redis, Disque) share: the server address and the
//! publisher thread that takes `/send` batches off the reactor.
//!
//! The reactor only `try_send`s a [`Job`] into a bounded channel and answers
//! `Submit::Pending`; this thread encodes the batch, sends it with a deadline, and
//! reports `Inbound::Published` through the [`Notifier`]. It keeps its connection
//! alive by itself: it reconnects with backoff and checks an idle connection with
//! `PING`, so `/healthz` turns 503 while publishing would fail and recovers without
//! any traffic.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};

use super::{Backoff, Inbound, Link, Notifier, QueueError, QueueState, Submit, Ticket};
use crate::message::{Envelope, unix_now};

/// The first reconnect wait; it doubles up to `-queue-backoff`.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// A backend that could not be set up from its `-queue=` value.
#[derive(Debug)]
pub enum BackendError {
    /// The address or URL does not parse.
    Address(String),
    /// A thread could not be started.
    Spawn(std::io::Error),
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendError::Address(why) => write!(f, "bad queue address: {why}"),
            BackendError::Spawn(e) => write!(f, "cannot start a queue thread: {e}"),
        }
    }
}

impl std::error::Error for BackendError {}

impl From<std::io::Error> for BackendError {
    fn from(e: std::io::Error) -> Self {
        BackendError::Spawn(e)
    }
}

/// The credentials part of a URL (`user:pass` in `redis://user:pass@host`), if any.
fn userinfo(url: &str) -> Option<&str> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    // The last `@`: a password may hold an unescaped `@`, a host never does.
    rest.rfind('@').map(|at| &rest[..at])
}

/// `url` as it may appear in logs and errors: credentials replaced by `***`.
pub fn redact(url: &str) -> String {
    match userinfo(url) {
        Some(secret) if !secret.is_empty() => url.replacen(secret, "***", 1),
        _ => url.to_string(),
    }
}

/// An error text about `url` with its credentials removed, wherever they appear.
fn scrub(text: &str, url: &str) -> String {
    let mut out = text.replace(url, &redact(url));
    if let Some(secret) = userinfo(url) {
        let pass = secret.split_once(':').map_or(secret, |(_, pass)| pass);
        for part in [secret, pass] {
            if !part.is_empty() {
                out = out.replace(part, "***");
            }
        }
    }
    out
}

/// Where a RESP server (Redis or Disque) is, and how to open a connection to it.
#[derive(Clone)]
pub struct Endpoint {
    client: ::redis::Client,
    /// `HOST:PORT`, for logs and error replies (never the password).
    pub display: String,
}

impl Endpoint {
    /// `url` is `redis://[:PASS@]HOST:PORT[/DB]`; Disque addresses use the same form.
    pub fn parse(url: &str) -> Result<Self, BackendError> {
        use ::redis::IntoConnectionInfo;
        // Never the password, in any error this may produce.
        let bad = |why: &dyn fmt::Display| {
            BackendError::Address(scrub(&format!("{:?}: {why}", redact(url)), url))
        };
        let info = url.into_connection_info().map_err(|e| bad(&e))?;
        let display = match info.addr() {
            ::redis::ConnectionAddr::Tcp(host, port) => format!("{host}:{port}"),
            _ => return Err(bad(&"not a TCP address")),
        };
        // No CLIENT SETINFO on connect: Disque does not know it, and Redis does not need it.
        let redis = info.redis_settings().clone().set_skip_set_lib_name();
        // Requests are small and answered one at a time: Nagle would only add latency.
        let tcp = info.tcp_settings().clone().set_nodelay(true);
        let info = info.set_redis_settings(redis).set_tcp_settings(tcp);
        let client = ::redis::Client::open(info).map_err(|e| bad(&e))?;
        Ok(Endpoint { client, display })
    }

    /// The same settings (credentials, timeouts) at another `HOST:PORT`: a cluster
    /// node named by the slot map.
    pub fn at(&self, host_port: &str) -> Result<Self, BackendError> {
        let (host, port) = host_port
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
            .ok_or_else(|| BackendError::Address(format!("{host_port:?}: not HOST:PORT")))?;
        let info = self
            .client
            .get_connection_info()
            .clone()
            .set_addr(::redis::ConnectionAddr::Tcp(host.to_string(), port));
        let client = ::redis::Client::open(info)
            .map_err(|e| BackendError::Address(format!("{host_port:?}: {e}")))?;
        Ok(Endpoint {
            client,
            display: host_port.to_string(),
        })
    }

    /// The user and password it logs in with, if any.
    pub fn credentials(&self) -> Option<(Option<String>, String)> {
        let info = self.client.get_connection_info();
        let r = info.redis_settings();
        let pass = r.password()?.to_string();
        Some((r.username().map(str::to_string), pass))
    }

    /// Connects (and authenticates / selects the db) within `timeout`; the returned
    /// connection's reads and writes are bounded by `timeout` as well.
    pub fn connect(&self, timeout: Duration) -> ::redis::RedisResult<::redis::Connection> {
        let con = self.client.get_connection_with_timeout(timeout)?;
        con.set_read_timeout(Some(timeout))?;
        con.set_write_timeout(Some(timeout))?;
        Ok(con)
    }
}

/// Whether an error leaves the connection unusable (as opposed to a refusal the
/// server answered cleanly, such as a full Disque queue).
pub fn is_broken(e: &::redis::RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_unrecoverable_error()
}

/// One `/send` batch on its way to the server.
pub struct Job {
    pub ticket: Ticket,
    pub batch: Vec<Envelope>,
    /// After this the reactor has been told 503, so the batch is not sent at all.
    pub deadline: Instant,
}

/// Why a batch was not taken.
#[derive(Debug)]
pub enum SendError {
    /// The command failed; [`is_broken`] tells whether the connection is lost.
    Redis(::redis::RedisError),
    /// The server ran the command but its answer says the batch will not arrive.
    Refused(String),
}

impl From<::redis::RedisError> for SendError {
    fn from(e: ::redis::RedisError) -> Self {
        SendError::Redis(e)
    }
}

/// How a backend turns a batch into commands on its connection.
pub type SendFn =
    Box<dyn FnMut(&mut ::redis::Connection, &[Envelope]) -> Result<(), SendError> + Send>;

/// Settings of the publisher thread, all from flags.
pub struct Settings {
    /// Thread name.
    pub name: &'static str,
    /// "Redis", "Disque": for log lines and error replies.
    pub server: &'static str,
    pub capacity: usize,
    pub timeout: Duration,
    pub backoff: Duration,
}

/// The reactor's handle on the publisher thread.
pub struct Publisher {
    /// `None` once closed: dropping the sender ends the thread after its last job.
    tx: Option<Sender<Job>>,
    link: Arc<Link>,
    timeout: Duration,
    server: &'static str,
    display: String,
}

impl Publisher {
    /// Starts the thread; it connects at once. `on_exit` runs when it ends.
    pub fn start(
        endpoint: Endpoint,
        settings: Settings,
        reconnects: Arc<AtomicU64>,
        notifier: Notifier,
        send: SendFn,
        on_exit: impl FnOnce() + Send + 'static,
    ) -> Result<Self, BackendError> {
        let (tx, rx) = crossbeam_channel::bounded(settings.capacity);
        let link = Arc::new(Link::default());
        let publisher = Publisher {
            tx: Some(tx),
            link: link.clone(),
            timeout: settings.timeout,
            server: settings.server,
            display: endpoint.display.clone(),
        };
        let worker = Worker {
            endpoint,
            server: settings.server,
            timeout: settings.timeout,
            backoff: Backoff::new(FIRST_BACKOFF, settings.backoff),
            link,
            reconnects,
            notifier,
            send,
            con: None,
            retry_at: Instant::now(),
            last_used: Instant::now(),
            connected_before: false,
            last_error: String::new(),
        };
        thread::Builder::new()
            .name(settings.name.into())
            .spawn(move || {
                worker.run(rx);
                on_exit();
            })?;
        Ok(publisher)
    }

    pub fn state(&self) -> QueueState {
        self.link.state()
    }

    pub fn link(&self) -> &Link {
        &self.link
    }

    /// Runs on the reactor thread: never blocks.
    pub fn submit(&mut self, ticket: Ticket, batch: Vec<Envelope>) -> Submit {
        let Some(tx) = &self.tx else {
            return Submit::Done(Err(QueueError::Closed));
        };
        // Known down: answer now instead of making the client wait for a timeout.
        if self.link.state() == QueueState::Down {
            return Submit::Done(Err(QueueError::Unavailable(format!(
                "{} at {} is unreachable, reconnecting",
                self.server, self.display
            ))));
        }
        let job = Job {
            ticket,
            batch,
            deadline: Instant::now() + self.timeout,
        };
        match tx.try_send(job) {
            Ok(()) => Submit::Pending,
            Err(TrySendError::Full(_)) => Submit::Done(Err(QueueError::Full)),
            Err(TrySendError::Disconnected(_)) => Submit::Done(Err(QueueError::Closed)),
        }
    }

    pub fn close(&mut self) {
        self.tx = None;
    }
}

struct Worker {
    endpoint: Endpoint,
    server: &'static str,
    timeout: Duration,
    backoff: Backoff,
    link: Arc<Link>,
    reconnects: Arc<AtomicU64>,
    notifier: Notifier,
    send: SendFn,
    con: Option<::redis::Connection>,
    /// While disconnected: when to try again.
    retry_at: Instant,
    /// The last time the connection was known to work; idle past `timeout` → PING.
    last_used: Instant,
    connected_before: bool,
    last_error: String,
}

impl Worker {
    fn run(mut self, rx: Receiver<Job>) {
        loop {
            let now = Instant::now();
            if self.con.is_none() && now >= self.retry_at {
                self.connect(self.timeout);
            }
            let wake = if self.con.is_some() {
                self.last_used + self.timeout
            } else {
                self.retry_at
            };
            match rx.recv_timeout(wake.saturating_duration_since(Instant::now())) {
                Ok(job) => {
                    let ticket = job.ticket;
                    let result = self.publish(job);
                    if self
                        .notifier
                        .send(Inbound::Published { ticket, result })
                        .is_err()
                    {
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => self.check_idle(),
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    fn connect(&mut self, timeout: Duration) {
        match self.endpoint.connect(timeout) {
            Ok(con) => {
                if self.connected_before {
                    self.reconnects.fetch_add(1, Ordering::Relaxed);
                    info!(
                        "{} publisher reconnected to {}",
                        self.server, self.endpoint.display
                    );
                }
                self.connected_before = true;
                self.con = Some(con);
                self.link.set_up(true);
                self.backoff.reset();
                self.last_used = Instant::now();
            }
            Err(e) => self.failed(e),
        }
    }

    /// The connection is lost or could not be made: mark down, schedule a retry.
    fn failed(&mut self, e: ::redis::RedisError) {
        let why = e.to_string();
        if self.link.state() != QueueState::Down || why != self.last_error {
            warn!(
                "{} publisher: {} unreachable: {why}",
                self.server, self.endpoint.display
            );
        }
        self.last_error = why;
        self.con = None;
        self.link.set_up(false);
        self.retry_at = Instant::now() + self.backoff.next_delay();
    }

    fn check_idle(&mut self) {
        let Some(con) = &mut self.con else {
            return;
        };
        if self.last_used.elapsed() < self.timeout {
            return;
        }
        // A publish may have shortened the socket timeouts to its own deadline.
        let reset = con
            .set_read_timeout(Some(self.timeout))
            .and_then(|()| con.set_write_timeout(Some(self.timeout)));
        match reset.and_then(|()| ::redis::cmd("PING").query::<::redis::Value>(con)) {
            Ok(_) => self.last_used = Instant::now(),
            Err(e) => self.failed(e),
        }
    }

    fn publish(&mut self, mut job: Job) -> Result<(), QueueError> {
        let unavailable = |why: String| Err(QueueError::Unavailable(why));
        if Instant::now() >= job.deadline {
            return unavailable(format!("{} did not take the message in time", self.server));
        }
        // A message that expired while waiting here is dropped, never sent on.
        let now = unix_now();
        job.batch.retain(|e| !e.is_expired(now));
        if job.batch.is_empty() {
            return Ok(());
        }
        if self.con.is_none() {
            if Instant::now() < self.retry_at {
                return unavailable(format!(
                    "{} at {}: {}",
                    self.server, self.endpoint.display, self.last_error
                ));
            }
            self.connect(job.deadline.saturating_duration_since(Instant::now()));
        }
        let Some(con) = &mut self.con else {
            return unavailable(format!(
                "{} at {}: {}",
                self.server, self.endpoint.display, self.last_error
            ));
        };
        let left = job.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return unavailable(format!("{} did not take the message in time", self.server));
        }
        // Bound this one command by what is left of the job's time.
        let bounded = con
            .set_read_timeout(Some(left))
            .and_then(|()| con.set_write_timeout(Some(left)));
        let result = match bounded {
            Ok(()) => (self.send)(con, &job.batch),
            Err(e) => Err(SendError::Redis(e)),
        };
        match result {
            Ok(()) => {
                self.last_used = Instant::now();
                Ok(())
            }
            Err(SendError::Redis(e)) if is_broken(&e) => {
                let why = e.to_string();
                self.failed(e);
                unavailable(format!("{}: {why}", self.server))
            }
            // The server answered with an error: the connection itself is fine.
            Err(SendError::Redis(e)) => {
                self.last_used = Instant::now();
                unavailable(format!("{} refused the message: {e}", self.server))
            }
            Err(SendError::Refused(why)) => {
                self.last_used = Instant::now();
                unavailable(format!("{}: {why}", self.server))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_show() {
        assert_eq!(redact("redis://:pw@h:1/2"), "redis://***@h:1/2");
        assert_eq!(redact("redis://u:p@w@h:1"), "redis://***@h:1");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
        assert_eq!(redact("u:pw@h"), "***@h");
        let msg = scrub("bad \"redis://u:pw@h\": pw rejected", "redis://u:pw@h");
        assert!(!msg.contains("pw"), "{msg}");
    }
}
