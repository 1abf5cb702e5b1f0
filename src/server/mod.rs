//! The reactor: one thread, one `mio::Poll`, every connection in a slab.
//!
//! Slab keys are the connections' `mio::Token`s; the listener and the waker have
//! reserved tokens at the top of the range. Timers are a periodic scan driven by the
//! poll timeout: each connection keeps one deadline and its `last_seen` time.
//! Phase transitions of a connection happen here and only here.

mod conn;
mod routes;
pub mod stats;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::auth::{self, Refusal};
use crate::config::Config;
use crate::http::chunked::ChunkedDecoder;
use crate::http::request::{BodyKind, Head, HttpError, Limits};
use crate::http::response::{self, Response};
use crate::hub::{self, Hub};
use crate::message::{Clock, Envelope, unix_now};
use crate::queue::{Inbound, Notifier, Queue, QueueError, Submit, Ticket};
use crate::ws::assembler::{Assembler, Message};
use crate::ws::frame::{self, OpCode, ProtocolError};

use conn::{Chunk, Conn, PendingRequest, Phase, WsState};
use stats::{Counters, Limit};

pub const LISTENER: Token = Token(usize::MAX - 1);
pub const WAKER: Token = Token(usize::MAX - 2);

/// Bytes read from a socket at a time; shared by every connection.
const READ_CHUNK: usize = 64 * 1024;
/// Connections beyond `-max-connections` that are kept just long enough to
/// receive their 503; past this many more, new connections are dropped outright.
const REFUSAL_SLOTS: usize = 64;
/// Events taken from one poll.
const EVENTS: usize = 1024;

/// Why a connection ended, for the log.
#[derive(Debug)]
enum Reason {
    PeerClosed,
    Io(io::Error),
    Done,
    Timeout(&'static str),
    Shutdown,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::PeerClosed => write!(f, "peer closed"),
            Reason::Io(e) => write!(f, "{e}"),
            Reason::Done => write!(f, "done"),
            Reason::Timeout(what) => write!(f, "{what} timeout"),
            Reason::Shutdown => write!(f, "shutdown"),
        }
    }
}

/// What `process` should do after one step over the input.
enum Step {
    /// Consumed this many bytes; go on.
    Progress(usize),
    /// Wait for more input.
    NeedMore,
    /// Stop reading: the phase no longer takes input now.
    Stop,
}

/// A handled HTTP request's outcome.
pub(crate) enum Action {
    Respond(Response),
    /// Answer, then close: a refused client gets nothing more on this connection.
    Refuse(Response),
    Upgrade {
        accept: String,
        uid: Option<String>,
        types: hub::TypeSet,
        /// The client behind a trusted proxy, to count against `-max-per-ip`.
        client_ip: Option<IpAddr>,
    },
    Publish(Vec<Envelope>),
}

pub struct Server {
    cfg: Config,
    poll: Poll,
    listener: Option<TcpListener>,
    conns: Slab<Conn>,
    hub: Hub,
    queue: Box<dyn Queue>,
    inbound: Receiver<Inbound>,
    notifier: Notifier,
    counters: Counters,
    clock: Clock,
    /// Shared read buffer: idle connections hold no input buffer of their own.
    scratch: Vec<u8>,
    /// Reused list of fan-out receivers.
    receivers: Vec<usize>,
    /// Per slab key, which messages of the batch slice being delivered it receives.
    masks: Vec<u64>,
    serial: u64,
    started: Instant,
    tick: Duration,
    next_tick: Instant,
    accept_paused: bool,
    /// A descriptor held in reserve (see `refuse_with_spare`).
    spare: Option<std::fs::File>,
    /// Connections kept only to deliver their refusal (at most `REFUSAL_SLOTS`).
    refusing: usize,
    /// Open connections per client address, for `-max-per-ip`.
    per_ip: HashMap<IpAddr, u32>,
    /// Set once SIGINT/SIGTERM arrived: when to give up waiting.
    shutdown: Option<Instant>,
    /// The queue has handed over everything it had when shutdown began.
    queue_drained: bool,
}

/// What the reactor needs from `main`: the listener, poll, and the queue side.
pub struct Parts {
    pub poll: Poll,
    pub listener: TcpListener,
    pub queue: Box<dyn Queue>,
    pub inbound: Receiver<Inbound>,
    pub notifier: Notifier,
}

/// Creates the poll and its waker before the queue threads that need the waker.
pub fn poll_and_waker() -> io::Result<(Poll, Arc<mio::Waker>)> {
    let poll = Poll::new()?;
    let waker = Arc::new(mio::Waker::new(poll.registry(), WAKER)?);
    Ok((poll, waker))
}

impl Server {
    pub fn new(cfg: Config, parts: Parts) -> io::Result<Self> {
        let Parts {
            poll,
            mut listener,
            queue,
            inbound,
            notifier,
        } = parts;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let now = Instant::now();
        let shortest = [
            cfg.ping_interval,
            cfg.request_timeout,
            cfg.close_timeout,
            cfg.keepalive_timeout,
        ]
        .into_iter()
        .min()
        .unwrap_or(Duration::from_secs(1));
        // Timers fire up to one tick late; a quarter of the shortest timeout keeps that small.
        let tick = (shortest / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
        Ok(Server {
            cfg,
            poll,
            listener: Some(listener),
            conns: Slab::new(),
            hub: Hub::default(),
            queue,
            inbound,
            notifier,
            counters: Counters::default(),
            clock: Clock::default(),
            scratch: vec![0; READ_CHUNK],
            receivers: Vec::new(),
            masks: Vec::new(),
            serial: 0,
            started: now,
            tick,
            next_tick: now + tick,
            accept_paused: false,
            spare: reserve_descriptor(),
            refusing: 0,
            per_ip: HashMap::new(),
            shutdown: None,
            queue_drained: false,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match &self.listener {
            Some(l) => l.local_addr(),
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    /// Runs until a graceful shutdown completes.
    pub fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(EVENTS);
        loop {
            let now = Instant::now();
            let timeout = self.next_tick.saturating_duration_since(now);
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => self.drain_inbound(),
                    Token(key) => self.on_event(key, event.is_read_closed()),
                }
            }
            let now = Instant::now();
            if now >= self.next_tick {
                self.next_tick = now + self.tick;
                self.on_tick(now);
            }
            if self.shutdown.is_some() && self.conns.is_empty() && self.queue_drained {
                info!("shutdown complete");
                return Ok(());
            }
        }
    }

    // ---- accepting -------------------------------------------------------------

    fn accept(&mut self) {
        if self.accept_paused || self.shutdown.is_some() {
            return;
        }
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                Ok((sock, peer)) => self.admit(sock, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if out_of_descriptors(&e) && self.spare.is_some() => {
                    if !self.refuse_with_spare() {
                        return;
                    }
                }
                Err(e) => {
                    // Out of descriptors without a spare, and the like: retrying at
                    // once would spin, so pause accepting until the next tick.
                    warn!("accept failed, pausing until the next tick: {e}");
                    self.accept_paused = true;
                    return;
                }
            }
        }
    }

    /// Out of descriptors: gives up the spare one for a moment to accept a waiting
    /// client, tell it 503 and close it, then takes the spare back. So a client is
    /// refused rather than left waiting in the listen queue, and the listener does
    /// not stay readable. Returns whether to go on accepting: false once nobody is
    /// waiting any more, or when the spare could not be taken back (then accepting
    /// pauses until the next tick, which retries the spare).
    fn refuse_with_spare(&mut self) -> bool {
        let Some(listener) = &self.listener else {
            return false;
        };
        drop(self.spare.take());
        let accepted = listener.accept().map(|(sock, peer)| {
            debug!("refused {peer}: out of descriptors");
            refuse_at_once(sock);
        });
        if accepted.is_ok() {
            self.counters.refused[Refusal::Capacity.index()] += 1;
        }
        self.spare = reserve_descriptor();
        match (accepted, &self.spare) {
            (Ok(_), Some(_)) => true,
            (Err(e), Some(_)) if e.kind() == io::ErrorKind::WouldBlock => false,
            (Err(e), Some(_)) if e.kind() == io::ErrorKind::Interrupted => true,
            (result, _) => {
                let e = result
                    .err()
                    .map_or("no spare descriptor".into(), |e| e.to_string());
                warn!("out of descriptors, pausing accept until the next tick: {e}");
                self.accept_paused = true;
                false
            }
        }
    }

    fn admit(&mut self, mut sock: TcpStream, peer: SocketAddr) {
        // A trusted proxy's connections are counted per client once the handshake
        // names the client; every other peer is counted by its own address now.
        let ip = auth::canonical(peer.ip());
        let counted_ip = (self.cfg.max_per_ip > 0
            && !auth::is_trusted(&self.cfg.trusted_proxies, ip))
        .then_some(ip);
        // Connections still being refused do not count against the limit, so a
        // refused client that lingers never keeps a freed slot from a new one.
        let refusal = if self.conns.len() - self.refusing >= self.cfg.max_connections {
            Some(Refusal::Capacity)
        } else if counted_ip.is_some_and(|ip| !self.ip_has_room(ip)) {
            Some(Refusal::PerIp)
        } else {
            None
        };
        if let Some(r) = refusal {
            self.count_refusal(r, peer, "connect");
            if self.refusing >= REFUSAL_SLOTS {
                return; // dropping the socket closes it
            }
        }
        let _ = sock.set_nodelay(true);
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut sock, Token(key), interest)
        {
            warn!("register {peer}: {e}");
            return;
        }
        self.serial += 1;
        let now = Instant::now();
        entry.insert(Conn::new(
            sock,
            peer,
            self.serial,
            now,
            now + self.cfg.keepalive_timeout,
        ));
        if let Some(r) = refusal {
            self.refusing += 1;
            self.conns[key].refused = true;
            // A refused client still gets a readable answer: the reply goes out
            // through the normal draining path rather than a reset.
            self.reply(key, &refusal_response(r), false, false);
        } else if let Some(ip) = counted_ip {
            self.count_ip(key, ip);
        }
        // Data may already be waiting; edge-triggered readiness reports it anyway,
        // but reading now saves a round through the poll.
        self.on_event(key, false);
    }

    // ---- socket events ---------------------------------------------------------

    fn on_event(&mut self, key: usize, read_closed: bool) {
        if !self.flush(key) {
            return;
        }
        self.read(key, read_closed);
    }

    /// Writes what is queued. Returns false when the connection was closed.
    fn flush(&mut self, key: usize) -> bool {
        let Some(conn) = self.conns.get_mut(key) else {
            return false;
        };
        let was_over = conn.out.bytes() > self.cfg.max_backlog;
        if let Err(e) = conn.flush() {
            self.close(key, Reason::Io(e.0));
            return false;
        }
        if let Phase::Draining { fin_sent } = &mut conn.phase {
            if conn.out.is_empty() && !*fin_sent {
                *fin_sent = true;
                if conn.sock.shutdown(std::net::Shutdown::Write).is_err() {
                    self.close(key, Reason::Done);
                    return false;
                }
            }
            return true;
        }
        // An HTTP client that stopped reading its pipelined replies was paused; resume it.
        if was_over && conn.out.bytes() <= self.cfg.max_backlog {
            self.resume(key);
        }
        self.conns.contains(key)
    }

    /// Reads, handing each chunk to the phase's parser, until `WouldBlock` or, unless
    /// `drain`, a read that did not fill the buffer: that one emptied the socket, and
    /// edge-triggered readiness reports any later data, so the `WouldBlock` read
    /// would only cost a syscall. `drain` reads on to `WouldBlock` (and so to EOF)
    /// when the peer has closed or input was paused, as no new edge may come then;
    /// so does a connection that is closing, to free its slot as soon as it can.
    fn read(&mut self, key: usize, drain: bool) {
        let mut scratch = std::mem::take(&mut self.scratch);
        loop {
            if !self.takes_input(key) {
                break;
            }
            match self.conns[key].sock.read(&mut scratch) {
                Ok(0) => {
                    self.peer_closed(key);
                    break;
                }
                Ok(n) => {
                    self.conns[key].last_seen = Instant::now();
                    self.ingest(key, &mut scratch[..n]);
                    // A closing connection reads on: its peer's EOF may be there already.
                    let closing = matches!(
                        self.conns.get(key).map(|c| &c.phase),
                        Some(Phase::Draining { .. } | Phase::Closing)
                    );
                    if n < scratch.len() && !drain && !closing {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.close(key, Reason::Io(e));
                    break;
                }
            }
        }
        self.scratch = scratch;
    }

    /// Whether the connection's phase reads input now. A paused connection's bytes
    /// stay in the kernel, which pushes back on the client through TCP.
    fn takes_input(&self, key: usize) -> bool {
        let Some(conn) = self.conns.get(key) else {
            return false;
        };
        match conn.phase {
            Phase::Publishing { .. } => false,
            Phase::Http { .. } => conn.out.bytes() <= self.cfg.max_backlog,
            Phase::Ws(_) | Phase::Closing | Phase::Draining { .. } => true,
        }
    }

    /// Continues a paused connection: first what it already buffered, then the socket.
    fn resume(&mut self, key: usize) {
        if self.takes_input(key) {
            self.ingest(key, &mut []);
            self.read(key, true);
        }
    }

    fn peer_closed(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        // A client that half-closed after its request still gets the reply.
        if !conn.out.is_empty() && matches!(conn.phase, Phase::Http { .. }) {
            conn.phase = Phase::Draining { fin_sent: false };
            conn.deadline = Instant::now() + self.cfg.close_timeout;
            return;
        }
        if !conn.out.is_empty() && matches!(conn.phase, Phase::Draining { fin_sent: false }) {
            return;
        }
        self.close(key, Reason::PeerClosed);
    }

    /// Appends new bytes to what the connection had buffered and consumes what it can.
    fn ingest(&mut self, key: usize, input: &mut [u8]) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.rbuf.is_empty() {
            // The common case parses straight from the shared buffer, without a copy.
            let used = self.process(key, input);
            if let Some(conn) = self.conns.get_mut(key) {
                conn.rbuf.extend_from_slice(&input[used..]);
            }
        } else {
            let mut buf = std::mem::take(&mut conn.rbuf);
            buf.extend_from_slice(input);
            let used = self.process(key, &mut buf);
            if let Some(conn) = self.conns.get_mut(key) {
                buf.drain(..used);
                if !buf.is_empty() {
                    conn.rbuf = buf;
                }
            }
        }
    }

    /// Feeds `buf` to the connection's current phase until it needs more or stops.
    fn process(&mut self, key: usize, buf: &mut [u8]) -> usize {
        let mut pos = 0;
        loop {
            let Some(conn) = self.conns.get_mut(key) else {
                return buf.len();
            };
            let step = match conn.phase {
                Phase::Http { .. } => self.http_step(key, &mut buf[pos..]),
                Phase::Ws(_) | Phase::Closing => self.ws_step(key, &mut buf[pos..]),
                Phase::Publishing { .. } => Step::Stop,
                // Nothing more is answered; input is read only to notice the peer leaving.
                Phase::Draining { .. } => Step::Progress(buf.len() - pos),
            };
            match step {
                Step::Progress(n) => {
                    pos += n;
                    // Pipelined requests whose replies are not being read wait here,
                    // unparsed: one read must not queue a reply for each of them.
                    if !self.takes_input(key) {
                        return pos;
                    }
                    if pos == buf.len()
                        && !self
                            .conns
                            .get(key)
                            .is_some_and(|c| c.phase.has_pending_request())
                    {
                        return pos;
                    }
                }
                Step::NeedMore | Step::Stop => return pos,
            }
        }
    }

    // ---- HTTP ------------------------------------------------------------------

    fn http_step(&mut self, key: usize, buf: &mut [u8]) -> Step {
        let limits = Limits {
            max_head: self.cfg.max_header,
            max_body: self.cfg.max_body,
        };
        let now = Instant::now();
        let request_timeout = self.cfg.request_timeout;
        let conn = &mut self.conns[key];
        let Phase::Http { busy, pending } = &mut conn.phase else {
            return Step::Stop;
        };
        let Some(req) = pending else {
            if buf.is_empty() {
                return Step::NeedMore;
            }
            if !*busy {
                *busy = true;
                conn.deadline = now + request_timeout;
            }
            return match crate::http::request::parse_head(buf, &limits) {
                Err(e) => {
                    self.count_http_limit(&e);
                    self.http_fail(key, e.response());
                    Step::Stop
                }
                Ok(None) => Step::NeedMore,
                Ok(Some((head, n))) => {
                    // Refused before the body is read: an unauthorized client never
                    // gets to make the server buffer a megabyte.
                    if let Some(r) = self.precheck(&head) {
                        let peer = self.conns[key].peer;
                        self.count_refusal(r, peer, &head.path);
                        self.http_fail(key, refusal_response(r));
                        return Step::Stop;
                    }
                    let Phase::Http { pending, .. } = &mut self.conns[key].phase else {
                        return Step::Stop;
                    };
                    let chunked = (head.body == BodyKind::Chunked)
                        .then(|| ChunkedDecoder::new(limits.max_body));
                    *pending = Some(Box::new(PendingRequest {
                        head,
                        chunked,
                        continue_sent: false,
                    }));
                    Step::Progress(n)
                }
            };
        };
        match (req.head.body, &mut req.chunked) {
            (BodyKind::None, _) => {
                let req = pending.take().expect("pending request");
                self.answer(key, req.head, Vec::new());
                Step::Progress(0)
            }
            (BodyKind::Length(len), _) if buf.len() >= len => {
                let req = pending.take().expect("pending request");
                self.answer(key, req.head, buf[..len].to_vec());
                Step::Progress(len)
            }
            (BodyKind::Length(_), _) => {
                self.continue_once(key);
                Step::NeedMore
            }
            (BodyKind::Chunked, Some(decoder)) => match decoder.feed(buf) {
                Err(e) => {
                    self.count_http_limit(&e);
                    self.http_fail(key, e.response());
                    Step::Stop
                }
                Ok((n, true)) => {
                    let req = pending.take().expect("pending request");
                    let body = req
                        .chunked
                        .map(ChunkedDecoder::into_body)
                        .unwrap_or_default();
                    self.answer(key, req.head, body);
                    Step::Progress(n)
                }
                Ok((n, false)) => {
                    self.continue_once(key);
                    if n == 0 {
                        Step::NeedMore
                    } else {
                        Step::Progress(n)
                    }
                }
            },
            (BodyKind::Chunked, None) => Step::Stop,
        }
    }

    /// `Expect: 100-continue`: invites the body once, when it has not all arrived.
    fn continue_once(&mut self, key: usize) {
        let Phase::Http {
            pending: Some(req), ..
        } = &mut self.conns[key].phase
        else {
            return;
        };
        if req.head.expect_continue && !req.continue_sent {
            req.continue_sent = true;
            self.send(key, Chunk::Owned(response::CONTINUE.to_vec()));
        }
    }

    /// Answers a malformed request and closes: after a framing error the byte
    /// stream cannot be trusted for another request.
    fn http_fail(&mut self, key: usize, resp: Response) {
        debug!(
            "{}: HTTP {} {}",
            self.conns[key].peer,
            resp.status,
            String::from_utf8_lossy(&resp.body)
        );
        self.counters.http_requests += 1;
        self.reply(key, &resp, false, false);
    }

    fn answer(&mut self, key: usize, head: Head, body: Vec<u8>) {
        self.counters.http_requests += 1;
        let keep_alive = head.keep_alive && self.shutdown.is_none();
        let head_only = head.method == crate::http::request::Method::Head;
        match self.route(key, &head, &body) {
            Action::Respond(resp) => self.reply(key, &resp, keep_alive, head_only),
            Action::Refuse(resp) => self.reply(key, &resp, false, head_only),
            Action::Upgrade {
                accept,
                uid,
                types,
                client_ip,
            } => {
                if let Some(ip) = client_ip {
                    self.count_ip(key, ip);
                }
                self.upgrade(key, &accept, uid, types)
            }
            Action::Publish(batch) => self.publish(key, batch, keep_alive),
        }
    }

    /// Writes a response and moves the connection to its next phase.
    fn reply(&mut self, key: usize, resp: &Response, keep_alive: bool, head_only: bool) {
        let mut out = Vec::with_capacity(128 + resp.body.len());
        resp.encode(keep_alive, head_only, &mut out);
        let now = Instant::now();
        let conn = &mut self.conns[key];
        if keep_alive {
            conn.phase = Phase::Http {
                busy: false,
                pending: None,
            };
            conn.deadline = now + self.cfg.keepalive_timeout;
        } else {
            conn.phase = Phase::Draining { fin_sent: false };
            conn.deadline = now + self.cfg.close_timeout;
        }
        self.send(key, Chunk::Owned(out));
        if !keep_alive {
            self.flush(key);
        }
    }

    fn publish(&mut self, key: usize, batch: Vec<Envelope>, keep_alive: bool) {
        let accepted = batch.len();
        self.counters.messages_in += accepted as u64;
        let now = unix_now();
        let live: Vec<Envelope> = batch.into_iter().filter(|e| !e.is_expired(now)).collect();
        self.counters.expired += (accepted - live.len()) as u64;
        if live.is_empty() {
            return self.published(key, accepted, keep_alive, Ok(()));
        }
        let ticket = Ticket {
            key,
            serial: self.conns[key].serial,
        };
        match self.queue.publish(ticket, live) {
            Submit::Done(result) => self.published(key, accepted, keep_alive, result),
            Submit::Pending => {
                let conn = &mut self.conns[key];
                conn.phase = Phase::Publishing {
                    accepted,
                    keep_alive,
                };
                // The backend has its own timeout; this one only bounds a lost answer.
                conn.deadline = Instant::now() + self.cfg.request_timeout;
            }
        }
    }

    fn published(
        &mut self,
        key: usize,
        accepted: usize,
        keep_alive: bool,
        result: Result<(), QueueError>,
    ) {
        let resp = match result {
            Ok(()) => Response::json(
                200,
                format!(r#"{{"ok":true,"accepted":{accepted}}}"#).into_bytes(),
            ),
            Err(e) => {
                // Nothing was published, so these were not accepted after all.
                self.counters.messages_in -= accepted as u64;
                warn!("/send refused: {e}");
                Response::error(e.status(), &e.to_string())
            }
        };
        self.reply(key, &resp, keep_alive, false);
    }

    // ---- WebSocket -------------------------------------------------------------

    fn upgrade(&mut self, key: usize, accept: &str, uid: Option<String>, types: hub::TypeSet) {
        let conn = &mut self.conns[key];
        conn.phase = Phase::Ws(WsState {
            assembler: Assembler::new(self.cfg.max_message),
            ping_sent: false,
        });
        conn.last_seen = Instant::now();
        info!(
            "ws open uid={} peer={} ip={}",
            uid.as_deref().unwrap_or("-"),
            conn.peer,
            conn.client_ip
                .map_or_else(|| "-".to_string(), |ip| ip.to_string())
        );
        self.hub.join(key, uid.as_deref(), types);
        self.queue.set_listeners(self.hub.connections());
        self.counters.ws_opened += 1;
        self.send(key, Chunk::Owned(crate::ws::handshake::response(accept)));
    }

    fn ws_step(&mut self, key: usize, buf: &mut [u8]) -> Step {
        let (frame, used) = match frame::decode(buf, self.cfg.max_frame) {
            Err(e) => {
                self.ws_fail(key, e);
                return Step::Stop;
            }
            Ok(None) => {
                // Text still arriving fails at its first invalid byte (RFC 6455 §8.1).
                if let Phase::Ws(ws) = &mut self.conns[key].phase
                    && let Err(e) = ws.assembler.check_incomplete(buf)
                {
                    self.ws_fail(key, e);
                    return Step::Stop;
                }
                return Step::NeedMore;
            }
            Ok(Some(f)) => f,
        };
        let Phase::Ws(ws) = &mut self.conns[key].phase else {
            // Closing: only the peer's close frame matters now.
            if frame.opcode == OpCode::Close {
                self.close(key, Reason::Done);
                return Step::Stop;
            }
            return Step::Progress(used);
        };
        match ws.assembler.push(frame) {
            Err(e) => {
                self.ws_fail(key, e);
                Step::Stop
            }
            Ok(None) => Step::Progress(used),
            Ok(Some(msg)) => {
                self.on_message(key, msg);
                if self
                    .conns
                    .get(key)
                    .is_some_and(|c| matches!(c.phase, Phase::Ws(_)))
                {
                    Step::Progress(used)
                } else {
                    Step::Stop
                }
            }
        }
    }

    fn on_message(&mut self, key: usize, msg: Message) {
        if let Phase::Ws(ws) = &mut self.conns[key].phase {
            ws.ping_sent = false;
        }
        match msg {
            Message::Text(text) => {
                if self.cfg.echo {
                    self.send(
                        key,
                        Chunk::Owned(frame::encode(OpCode::Text, text.as_bytes())),
                    );
                } else if let Some(types) = routes::subscribe_op(&text) {
                    self.hub.subscribe(key, types);
                }
            }
            Message::Binary(data) => {
                if self.cfg.echo {
                    self.send(key, Chunk::Owned(frame::encode(OpCode::Binary, &data)));
                }
            }
            Message::Ping(data) => self.send(key, Chunk::Owned(frame::encode(OpCode::Pong, &data))),
            Message::Pong(_) => {}
            Message::Close(close) => {
                // Echo the peer's code, as RFC 6455 §5.5.1 asks, then close the TCP side.
                let reply = match close {
                    Some(c) => frame::close_frame(c.code, ""),
                    None => frame::encode(OpCode::Close, &[]),
                };
                self.leave_ws(key, Phase::Draining { fin_sent: false }, "client closed");
                self.send(key, Chunk::Owned(reply));
                self.flush(key);
            }
        }
    }

    /// Fails the connection with the error's close code.
    fn ws_fail(&mut self, key: usize, e: ProtocolError) {
        if matches!(e, ProtocolError::FrameTooBig | ProtocolError::MessageTooBig) {
            self.counters.limited[Limit::FrameSize.index()] += 1;
        }
        debug!("{}: {e}", self.conns[key].peer);
        let code = e.close_code();
        self.leave_ws(key, Phase::Draining { fin_sent: false }, &e.to_string());
        self.send(key, Chunk::Owned(frame::close_frame(code, &e.to_string())));
        self.flush(key);
    }

    /// Starts a server-initiated close handshake.
    fn ws_close(&mut self, key: usize, code: u16, reason: &str) {
        self.leave_ws(key, Phase::Closing, reason);
        self.send(key, Chunk::Owned(frame::close_frame(code, reason)));
    }

    /// Leaves the push phase: no more pushes reach this connection.
    fn leave_ws(&mut self, key: usize, next: Phase, why: &str) {
        if matches!(self.conns[key].phase, Phase::Ws(_)) {
            self.ws_closed(key, why);
        }
        let conn = &mut self.conns[key];
        conn.phase = next;
        conn.deadline = Instant::now() + self.cfg.close_timeout;
    }

    // ---- output ----------------------------------------------------------------

    /// Queues or writes bytes; a broken socket closes the connection, and a push
    /// connection whose backlog passes the limit is evicted.
    fn send(&mut self, key: usize, chunk: Chunk) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if let Err(e) = conn.send(chunk) {
            return self.close(key, Reason::Io(e.0));
        }
        if conn.out.bytes() > self.cfg.max_backlog && matches!(conn.phase, Phase::Ws(_)) {
            self.evict(key);
        }
    }

    /// Hands a push frame to a receiver.
    fn push(&mut self, key: usize, frame: &Arc<[u8]>) {
        self.counters.messages_out += 1;
        self.send(key, Chunk::Shared(frame.clone()));
    }

    /// A receiver that does not keep up is cut off so it never holds back the others.
    fn evict(&mut self, key: usize) {
        self.counters.evicted_slow += 1;
        self.counters.limited[Limit::Backlog.index()] += 1;
        let conn = &mut self.conns[key];
        self.counters.dropped += conn.out.discard_unstarted();
        info!(
            "{}: evicted, backlog over {} bytes",
            conn.peer, self.cfg.max_backlog
        );
        self.leave_ws(key, Phase::Draining { fin_sent: false }, "too slow");
        self.send(key, Chunk::Owned(frame::close_frame(1008, "too slow")));
        self.flush(key);
    }

    fn close(&mut self, key: usize, reason: Reason) {
        let Some(conn) = self.conns.get(key) else {
            return;
        };
        if matches!(conn.phase, Phase::Ws(_)) {
            self.ws_closed(key, &reason.to_string());
        }
        let mut conn = self.conns.remove(key);
        if conn.refused {
            self.refusing -= 1;
        }
        if let Some(ip) = conn.client_ip {
            self.uncount_ip(ip);
        }
        self.counters.dropped += conn.out.unsent_pushes();
        let _ = self.poll.registry().deregister(&mut conn.sock);
        debug!(
            "{}: closed after {:?}: {reason}",
            conn.peer,
            conn.opened.elapsed()
        );
    }

    /// The end of a push connection: out of the hub, counted, one log line.
    fn ws_closed(&mut self, key: usize, why: &str) {
        let conn = &self.conns[key];
        info!(
            "ws close uid={} peer={} reason={why} duration={:.1}s",
            self.hub.uid(key).unwrap_or("-"),
            conn.peer,
            conn.opened.elapsed().as_secs_f64()
        );
        self.hub.leave(key);
        self.counters.ws_closed += 1;
    }

    // ---- who may connect -------------------------------------------------------

    fn ip_has_room(&self, ip: IpAddr) -> bool {
        self.per_ip
            .get(&ip)
            .is_none_or(|n| (*n as usize) < self.cfg.max_per_ip)
    }

    fn count_ip(&mut self, key: usize, ip: IpAddr) {
        *self.per_ip.entry(ip).or_default() += 1;
        self.conns[key].client_ip = Some(ip);
    }

    fn uncount_ip(&mut self, ip: IpAddr) {
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
    }

    fn count_http_limit(&mut self, e: &HttpError) {
        let limit = match e {
            HttpError::HeadTooLarge => Limit::HeaderSize,
            HttpError::BodyTooLarge => Limit::BodySize,
            _ => return,
        };
        self.counters.limited[limit.index()] += 1;
    }

    fn count_refusal(&mut self, r: Refusal, peer: SocketAddr, what: &str) {
        self.counters.refused[r.index()] += 1;
        info!("refused {peer} {what}: {r}");
    }

    // ---- the queue side --------------------------------------------------------

    fn drain_inbound(&mut self) {
        self.notifier.clear();
        // Before the queued events: from now on /send is refused, while what was
        // accepted (these events included) is still delivered.
        if self.notifier.shutdown_requested() && self.shutdown.is_none() {
            self.begin_shutdown();
        }
        // Batches waiting one behind the other are delivered as one, so that each
        // receiver gets all of them in as few writes as possible.
        let mut merged: Vec<Envelope> = Vec::new();
        while let Ok(event) = self.inbound.try_recv() {
            match event {
                Inbound::Deliver(batch) if merged.is_empty() => merged = batch,
                Inbound::Deliver(batch) => merged.extend(batch),
                other => {
                    // Whatever else arrived comes after the merged batches, in order.
                    if !merged.is_empty() {
                        self.deliver(std::mem::take(&mut merged));
                    }
                    self.on_inbound(other);
                }
            }
        }
        if !merged.is_empty() {
            self.deliver(merged);
        }
        if self.shutdown.is_some() && self.queue_drained {
            self.close_push_connections();
        }
    }

    fn on_inbound(&mut self, event: Inbound) {
        match event {
            Inbound::Deliver(batch) => self.deliver(batch),
            Inbound::DeliverJob { batch, job } => {
                // Acknowledged only once every frame sits in its receivers' queues.
                self.deliver(batch);
                self.queue.ack(job);
            }
            Inbound::Published { ticket, result } => self.on_published(ticket, result),
            Inbound::Drained => self.queue_drained = true,
        }
    }

    /// Pushes a batch. A lone message is written to each receiver at once. Several
    /// are taken in slices of up to 64: each receiver gets its frames of a slice in
    /// one vectored write, so the syscalls are per receiver and slice rather than
    /// per message, and nothing is allocated per receiver.
    fn deliver(&mut self, batch: Vec<Envelope>) {
        let now = unix_now();
        let live: Vec<&Envelope> = batch.iter().filter(|e| !e.is_expired(now)).collect();
        self.counters.expired += (batch.len() - live.len()) as u64;
        let mut receivers = std::mem::take(&mut self.receivers);
        if let [env] = live[..] {
            receivers.clear();
            self.hub.for_each_receiver(env, |k| receivers.push(k));
            for &key in &receivers {
                self.push(key, &env.frame);
            }
        } else {
            let mut masks = std::mem::take(&mut self.masks);
            for slice in live.chunks(u64::BITS as usize) {
                receivers.clear();
                for (i, env) in slice.iter().enumerate() {
                    self.hub.for_each_receiver(env, |k| {
                        if k >= masks.len() {
                            masks.resize(k + 1, 0);
                        }
                        if masks[k] == 0 {
                            receivers.push(k);
                        }
                        masks[k] |= 1 << i;
                    });
                }
                for &key in &receivers {
                    let mask = std::mem::replace(&mut masks[key], 0);
                    self.push_many(key, slice, mask);
                }
            }
            self.masks = masks;
        }
        receivers.clear();
        self.receivers = receivers;
    }

    /// Hands a receiver the frames of `slice` whose bits are set in `mask`, in order.
    fn push_many(&mut self, key: usize, slice: &[&Envelope], mask: u64) {
        self.counters.messages_out += u64::from(mask.count_ones());
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let frames = slice
            .iter()
            .enumerate()
            .filter(move |&(i, _)| mask >> i & 1 == 1)
            .map(|(_, e)| &e.frame);
        if let Err(e) = conn.send_shared(frames) {
            return self.close(key, Reason::Io(e.0));
        }
        if conn.out.bytes() > self.cfg.max_backlog && matches!(conn.phase, Phase::Ws(_)) {
            self.evict(key);
        }
    }

    fn on_published(&mut self, ticket: Ticket, result: Result<(), QueueError>) {
        let Some(conn) = self.conns.get(ticket.key) else {
            return;
        };
        let Phase::Publishing {
            accepted,
            keep_alive,
        } = conn.phase
        else {
            return;
        };
        if conn.serial != ticket.serial {
            return;
        }
        self.published(ticket.key, accepted, keep_alive, result);
        self.resume(ticket.key);
    }

    // ---- timers and shutdown -------------------------------------------------

    fn on_tick(&mut self, now: Instant) {
        self.queue.set_listeners(self.hub.connections());
        if self.spare.is_none() {
            self.spare = reserve_descriptor();
        }
        if self.accept_paused {
            self.accept_paused = false;
            self.accept();
        }
        let mut due = Vec::new();
        for (key, conn) in self.conns.iter() {
            let late = match &conn.phase {
                Phase::Ws(ws) => {
                    let silent = now.saturating_duration_since(conn.last_seen);
                    silent >= self.cfg.idle_timeout
                        || (silent >= self.cfg.ping_interval && !ws.ping_sent)
                }
                _ => now >= conn.deadline,
            };
            if late {
                due.push(key);
            }
        }
        for key in due {
            self.on_timer(key, now);
        }
        if let Some(deadline) = self.shutdown
            && now >= deadline
        {
            warn!("shutdown timeout: closing {} connections", self.conns.len());
            let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
            for key in keys {
                self.close(key, Reason::Shutdown);
            }
            self.queue_drained = true;
        }
    }

    fn on_timer(&mut self, key: usize, now: Instant) {
        let conn = &mut self.conns[key];
        match &mut conn.phase {
            Phase::Ws(ws) => {
                if now.saturating_duration_since(conn.last_seen) >= self.cfg.idle_timeout {
                    self.close(key, Reason::Timeout("idle"));
                } else {
                    ws.ping_sent = true;
                    self.send(key, Chunk::Owned(frame::encode(OpCode::Ping, b"")));
                }
            }
            Phase::Http { busy: true, .. } => {
                self.counters.limited[Limit::RequestTimeout.index()] += 1;
                self.reply(key, &Response::error(408, "request timeout"), false, false)
            }
            Phase::Publishing { .. } => {
                let resp = Response::error(503, "queue backend did not answer in time");
                self.reply(key, &resp, false, false);
            }
            Phase::Http { busy: false, .. } => self.close(key, Reason::Timeout("keep-alive")),
            Phase::Closing | Phase::Draining { .. } => self.close(key, Reason::Timeout("close")),
        }
    }

    fn begin_shutdown(&mut self) {
        if self.shutdown.is_some() {
            return;
        }
        info!("shutting down: {} connections", self.conns.len());
        self.shutdown = Some(Instant::now() + self.cfg.shutdown_timeout);
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        // Stop taking messages; what the queue already accepted is still delivered.
        self.queue.close();
        let idle: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                matches!(c.phase, Phase::Http { busy: false, .. }) && c.rbuf.is_empty()
            })
            .map(|(k, _)| k)
            .collect();
        for key in idle {
            self.close(key, Reason::Shutdown);
        }
    }

    fn close_push_connections(&mut self) {
        let ws: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.phase, Phase::Ws(_)))
            .map(|(k, _)| k)
            .collect();
        for key in ws {
            self.ws_close(key, 1001, "server shutting down");
        }
    }
}

/// The one answer every refusal gets: its status and a JSON error.
pub(crate) fn refusal_response(r: Refusal) -> Response {
    let resp = Response::error(r.status(), &r.to_string());
    match r {
        Refusal::ApiKey => resp.with_header("WWW-Authenticate", "Bearer"),
        _ => resp,
    }
}

/// Opens the descriptor kept in reserve for `refuse_with_spare`.
#[cfg(unix)]
fn reserve_descriptor() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}

/// Elsewhere running out of sockets does not show as a per-process descriptor
/// limit, so there is nothing to reserve.
#[cfg(not(unix))]
fn reserve_descriptor() -> Option<std::fs::File> {
    None
}

/// EMFILE or ENFILE: the process or the system has no descriptor left.
#[cfg(unix)]
fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

#[cfg(not(unix))]
fn out_of_descriptors(_e: &io::Error) -> bool {
    false
}

/// Answers a client accepted on the spare descriptor with a 503 and closes it:
/// there is no descriptor to keep it open with. What the client already sent is
/// read first, since closing with unread input would reset the connection and
/// could destroy the reply before the client reads it.
fn refuse_at_once(mut sock: TcpStream) {
    /// Reads taken at most: a fresh connection has sent one request, if any.
    const DRAIN_READS: usize = 4;
    let mut sink = [0u8; 1024];
    for _ in 0..DRAIN_READS {
        match sock.read(&mut sink) {
            Ok(n) if n > 0 => continue,
            _ => break,
        }
    }
    let mut out = Vec::with_capacity(160);
    Response::error(503, "server out of descriptors").encode(false, false, &mut out);
    // A fresh socket's send buffer takes this much at once.
    let _ = sock.write(&out);
    let _ = sock.shutdown(std::net::Shutdown::Write);
}

impl Phase {
    fn has_pending_request(&self) -> bool {
        matches!(
            self,
            Phase::Http {
                pending: Some(_),
                ..
            }
        )
    }
}
