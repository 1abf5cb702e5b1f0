//! The reactor: one thread, one `mio::Poll`, every connection in a slab.
//!
//! Slab keys are the connections' `mio::Token`s; the listener and the waker have
//! reserved tokens at the top of the range. This file keeps the loop and the
//! wiring; each job has its room:
//!
//! - `admission.rs`: accepting, refusals, the spare descriptor, per-address counts,
//!   a push client's origin, token and address checks
//! - `stream.rs`: a connection's socket: reads within a budget, writes, input to its phase
//! - `session.rs`: what each phase decides (timer, EOF, shutdown, input gating) as an
//!   `Action`, and the one `Server::apply` that carries every action out
//! - `http_conn.rs`: the HTTP phases: requests, bodies, 100-continue, replies, `/send`
//! - `routes.rs`: the URL table (`Route`) and what each URL answers (`Answer`)
//! - `ws_conn.rs`: the WebSocket phase: frames, control frames, subscribe, the close
//! - `sse_conn.rs`: the event-stream phase (`/sse`): opening and the end
//! - `fanout.rs`: the queue's events and delivery to push receivers, back-pressure
//! - `resume.rs`: delivery ids and retention of what is delivered, replay on `?since=`
//! - `timers.rs`: the periodic scan and the `Shutdown`
//! - `conn.rs`: one connection's state and its writes; `out.rs`: its output queue
//! - `stats.rs`: counters and `/stats`; `metrics.rs`: `/metrics`
//!
//! A phase answers what happens to it with an `Action` (stay, send, fail with a
//! response, end with a `CloseCode` and reason, switch phase, remove with a
//! `Reason`); `Server::apply` carries it out and returns [`Liveness`], so no caller
//! goes on with a slot that is gone. A connection leaves the slab in one place,
//! [`Server::remove`]; a WebSocket ends in one place, `Server::end_ws`.

mod admission;
mod conn;
mod fanout;
mod http_conn;
mod metrics;
mod out;
mod resume;
mod routes;
mod session;
mod sse_conn;
pub mod stats;
mod stream;
mod timers;
mod ws_conn;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::config::Config;
use crate::history::{Epoch, History};
use crate::hub::Hub;
use crate::message::Clock;
use crate::queue::{Inbound, Notifier, Queue};
use crate::ws::deflate::Compressor;

use admission::Admission;
use conn::Conn;
use fanout::FanOut;
use stats::Counters;
use timers::Shutdown;

pub use session::CloseCode;

pub const LISTENER: Token = Token(usize::MAX - 1);
pub const WAKER: Token = Token(usize::MAX - 2);

/// Whether a connection is still in the slab after an operation that may end it.
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    Closed,
}

impl Liveness {
    fn alive(self) -> bool {
        self == Liveness::Alive
    }
}

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
    admission: Admission,
    fanout: FanOut,
    /// What this node delivered, kept for resumes (list and Disque backends).
    history: History,
    /// The last sequence number this node gave a message.
    last_seq: u64,
    /// The one permessage-deflate compressor: a push is compressed once for all
    /// the receivers that negotiated it.
    compressor: Compressor,
    /// Connections whose read budget ran out with input perhaps left: edge-triggered
    /// readiness will not report it again, so they are read once more before the
    /// next wait. Serials tell a slot reused meanwhile.
    unread: Vec<(usize, u64)>,
    /// The inbound channel still held events when its budget ran out.
    inbound_left: bool,
    started: Instant,
    tick: Duration,
    next_tick: Instant,
    shutdown: Shutdown,
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
        let tick = timers::tick_for(&cfg);
        let scratch = vec![0; cfg.read_buffer];
        let history = History::new(cfg.history_limits(), Epoch::new());
        let compressor = Compressor::new(cfg.deflate_min);
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
            scratch,
            admission: Admission::new(),
            fanout: FanOut::default(),
            history,
            last_seq: 0,
            compressor,
            unread: Vec::new(),
            inbound_left: false,
            started: now,
            tick,
            next_tick: now + tick,
            shutdown: Shutdown::default(),
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
        let mut events = Events::with_capacity(self.cfg.poll_events);
        loop {
            // Before waiting, so nothing accepted sits in the queue across a poll.
            self.queue.end_round();
            let now = Instant::now();
            // Work left over from a budget is done before waiting again.
            let timeout = if self.unread.is_empty() && !self.inbound_left {
                self.next_tick.saturating_duration_since(now)
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            // Deliveries do not wait for the waker's place in the round: the
            // messages were accepted a round ago, and a long round would hold them
            // that long again. Looking costs two atomic loads. Once a round at most,
            // so a backend that keeps the channel full still leaves the sockets
            // their share (-inbound-budget events a drain, as on the waker).
            let mut early = true;
            for event in events.iter() {
                if early && !self.inbound.is_empty() {
                    early = false;
                    self.drain_inbound();
                }
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => self.drain_inbound(),
                    Token(key) => self.on_event(key, event.is_read_closed()),
                }
            }
            if self.inbound_left {
                self.drain_inbound();
            }
            self.read_unread();
            let now = Instant::now();
            if now >= self.next_tick {
                self.next_tick = now + self.tick;
                self.on_tick(now);
            }
            if self.shutdown.complete(self.conns.is_empty()) {
                info!("shutdown complete");
                return Ok(());
            }
        }
    }

    /// Removes a connection from the slab: out of the hub if it was a push
    /// receiver, uncounted, deregistered. Every connection ends here.
    fn remove(&mut self, key: usize, reason: Reason) -> Liveness {
        let Some(conn) = self.conns.get(key) else {
            return Liveness::Closed;
        };
        if let Some(transport) = conn.phase.transport() {
            self.leave_hub(key, transport, &reason.to_string());
        }
        let mut conn = self.conns.remove(key);
        if conn.refused {
            self.admission.refusing -= 1;
        }
        if let Some(ip) = conn.client_ip {
            self.admission.uncount_ip(ip);
        }
        self.counters.dropped += conn.out.unsent_pushes();
        let _ = self.poll.registry().deregister(&mut conn.sock);
        debug!(
            "{}: closed after {:?}: {reason}",
            conn.peer,
            conn.opened.elapsed()
        );
        Liveness::Closed
    }

    /// The keys of the connections `keep` selects, to act on one by one.
    fn keys_where(&self, keep: impl Fn(&Conn) -> bool) -> Vec<usize> {
        self.conns
            .iter()
            .filter(|(_, c)| keep(c))
            .map(|(k, _)| k)
            .collect()
    }
}
