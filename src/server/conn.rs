//! One TCP connection: its phase, its pending input and its unsent output.
//!
//! Writes go straight to the socket and only the unsent rest is queued (in its
//! [`OutQueue`], `out.rs`).

use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use mio::net::TcpStream;

use crate::http::chunked::ChunkedDecoder;
use crate::http::request::Head;
use crate::message::Lane;
use crate::ws::assembler::Assembler;
use crate::ws::deflate::{DeflateParams, Inflater};

pub use super::out::{Broken, Chunk, OutQueue};
use super::out::{IOV_MAX, write_some};

/// Where a connection is in its life. Each phase decides its reactions (its
/// input in `http_conn.rs`, `ws_conn.rs`; its timer, EOF and the shutdown in
/// `session.rs`) as an `Action`, which `Server::apply` carries out.
pub enum Phase {
    /// Reading HTTP requests. `busy` is true from a request's first byte until it is
    /// answered; `pending` holds a parsed head while its body arrives.
    Http {
        busy: bool,
        pending: Option<Box<PendingRequest>>,
    },
    /// A `/send` batch is with the queue backend; input waits until it answers.
    Publishing { accepted: usize, keep_alive: bool },
    /// A `/presence` read is with the queue backend; input waits until it answers.
    Asking { keep_alive: bool },
    /// An upgraded push connection.
    Ws(WsState),
    /// A push connection on `/sse`: an event stream. The client never sends; its
    /// `deadline` is when the next heartbeat comment is due.
    Sse(Delivery),
    /// The server sent a close frame and waits for the peer's.
    Closing,
    /// The last bytes are being written. Then our side is shut down (FIN) and input
    /// is read and discarded until the peer closes too, so that unread input never
    /// turns the close into a reset that destroys the reply in flight.
    Draining { fin_sent: bool },
}

impl Phase {
    pub fn has_pending_request(&self) -> bool {
        matches!(
            self,
            Phase::Http {
                pending: Some(_),
                ..
            }
        )
    }

    /// A push receiver: the hub holds it and fan-out writes to it.
    pub fn receives_pushes(&self) -> bool {
        self.wants().is_some()
    }

    /// How a push receiver takes its pushes; `None` for every other phase.
    pub fn wants(&self) -> Option<Wants> {
        match self {
            Phase::Ws(WsState { deflate: None, .. }) => Some(Wants::Plain),
            Phase::Ws(WsState {
                deflate: Some(d), ..
            }) => Some(Wants::Deflate(d.params)),
            Phase::Sse(_) => Some(Wants::Sse),
            _ => None,
        }
    }

    /// A push receiver's delivery state; `None` for every other phase.
    pub fn delivery_mut(&mut self) -> Option<&mut Delivery> {
        match self {
            Phase::Ws(ws) => Some(&mut ws.delivery),
            Phase::Sse(d) => Some(d),
            _ => None,
        }
    }

    /// The transport of a push receiver.
    pub fn transport(&self) -> Option<Transport> {
        match self {
            Phase::Ws(_) => Some(Transport::WebSocket),
            Phase::Sse(_) => Some(Transport::EventStream),
            _ => None,
        }
    }
}

/// The two kinds of push connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// `/ws`: RFC 6455.
    WebSocket,
    /// `/sse`: Server-Sent Events.
    EventStream,
}

impl Transport {
    /// The transport's name in the log.
    pub fn label(self) -> &'static str {
        match self {
            Transport::WebSocket => "ws",
            Transport::EventStream => "sse",
        }
    }
}

/// The encoding of a push a receiver needs: fan-out builds each one at most once
/// per message and shares it between the receivers that need it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wants {
    /// The plain WebSocket text frame every message carries.
    Plain,
    /// A compressed frame where these parameters allow it, else the plain one.
    Deflate(DeflateParams),
    /// An event `id: <delivery id>`, `data: <push JSON>`.
    Sse,
}

pub struct PendingRequest {
    pub head: Head,
    pub chunked: Option<ChunkedDecoder>,
    pub continue_sent: bool,
}

pub struct WsState {
    pub assembler: Assembler,
    pub ping_sent: bool,
    /// Which pushes this connection has and which wait (resume).
    pub delivery: Delivery,
    /// permessage-deflate, when negotiated. Boxed so that a connection without it
    /// pays one pointer; the inflater holds no memory until the client keeps a
    /// compression context and sends a compressed message.
    pub deflate: Option<Box<WsDeflate>>,
}

/// What a connection that negotiated permessage-deflate keeps.
pub struct WsDeflate {
    pub params: DeflateParams,
    pub inflater: Inflater,
}

/// A push receiver's delivery state, the same on every transport: a resume
/// replays, and fan-out skips or holds, by sequence number in each [`Lane`].
#[derive(Default)]
pub struct Delivery {
    /// The newest message this connection has (by sequence number): a message
    /// that reaches it again (a catch-up overlapping a resume) is skipped.
    pub last_seq: u64,
    /// The same for [`Lane::Broadcast`] (Redis Cluster numbers `all` apart).
    pub last_all: u64,
    /// While its history is being read elsewhere (Redis), live pushes wait here.
    pub resuming: Option<Box<Held>>,
}

/// Pushes held for a connection until its replay has been sent, each already in
/// the encoding of the connection's transport, with its lane and sequence number.
#[derive(Default)]
pub struct Held {
    pub frames: Vec<(Lane, u64, Arc<[u8]>)>,
    pub bytes: usize,
    /// A connection without `since` whose uid was new to the node: its replay is
    /// what was sent between its join and the subscription, without a `resumed`.
    pub quiet: bool,
}

impl WsState {
    pub fn new(assembler: Assembler, deflate: Option<Box<WsDeflate>>) -> Self {
        WsState {
            assembler,
            ping_sent: false,
            delivery: Delivery::default(),
            deflate,
        }
    }
}

impl Delivery {
    /// The position kept for `lane`.
    pub fn last_mut(&mut self, lane: Lane) -> &mut u64 {
        match lane {
            Lane::Main => &mut self.last_seq,
            Lane::Broadcast => &mut self.last_all,
        }
    }

    /// Takes the pushes of `frames` (sequence number, encoded push) this connection
    /// should write now, in order: none while it is resuming (they are held, up to
    /// `max_held` bytes; false when that overflows), and none it already has.
    pub fn admit<'a>(
        &mut self,
        frames: impl Iterator<Item = (Lane, u64, &'a Arc<[u8]>)>,
        max_held: usize,
        mut take: impl FnMut(&'a Arc<[u8]>),
    ) -> bool {
        for (lane, seq, frame) in frames {
            let last = self.last_mut(lane);
            if seq != 0 && seq <= *last {
                continue;
            }
            *last = (*last).max(seq);
            match &mut self.resuming {
                Some(held) => {
                    held.bytes += frame.len();
                    held.frames.push((lane, seq, frame.clone()));
                    if held.bytes > max_held {
                        return false;
                    }
                }
                None => take(frame),
            }
        }
        true
    }
}

pub struct Conn {
    pub sock: TcpStream,
    pub peer: SocketAddr,
    /// Distinguishes this connection from later ones that reuse its slab slot.
    pub serial: u64,
    pub phase: Phase,
    /// Input received but not yet consumed (a partial request or frame).
    pub rbuf: Vec<u8>,
    pub out: OutQueue,
    /// When the current phase's timer fires (request, keep-alive, close timeouts).
    pub deadline: Instant,
    /// Last time the peer sent anything; drives pings and the idle timeout.
    pub last_seen: Instant,
    pub opened: Instant,
    /// Accepted over a limit only to be told so.
    pub refused: bool,
    /// The client address this connection counts against for `-max-per-ip`.
    pub client_ip: Option<std::net::IpAddr>,
    /// A close frame went out: RFC 6455 allows one per connection.
    pub close_sent: bool,
    /// The delivery turn this connection last received pushes in, and its backlog
    /// when that turn began (see `fanout.rs`).
    pub turn: u64,
    pub turn_base: usize,
}

impl Conn {
    pub fn new(
        sock: TcpStream,
        peer: SocketAddr,
        serial: u64,
        now: Instant,
        deadline: Instant,
    ) -> Self {
        Conn {
            sock,
            peer,
            serial,
            phase: Phase::Http {
                busy: false,
                pending: None,
            },
            rbuf: Vec::new(),
            out: OutQueue::default(),
            deadline,
            last_seen: now,
            opened: now,
            refused: false,
            client_ip: None,
            close_sent: false,
            turn: 0,
            turn_base: 0,
        }
    }

    /// Writes `chunk` now if nothing is queued, queueing what the socket did not take.
    pub fn send(&mut self, chunk: Chunk) -> Result<(), Broken> {
        if !self.out.is_empty() {
            self.out.push(chunk, 0);
            return Ok(());
        }
        let written = write_some(&mut self.sock, &[IoSlice::new(chunk.bytes())]).map_err(Broken)?;
        if written < chunk.bytes().len() {
            self.out.push(chunk, written);
        }
        Ok(())
    }

    /// Writes several shared frames with one vectored write if nothing is queued
    /// (at most `IOV_MAX`), queueing what the socket did not take.
    pub fn send_shared<'a, I>(&mut self, frames: I) -> Result<(), Broken>
    where
        I: Iterator<Item = &'a Arc<[u8]>> + Clone,
    {
        let mut written = 0;
        if self.out.is_empty() {
            let mut slices = [IoSlice::new(&[]); IOV_MAX];
            let mut n = 0;
            for (slot, f) in slices.iter_mut().zip(frames.clone()) {
                *slot = IoSlice::new(f);
                n += 1;
            }
            written = write_some(&mut self.sock, &slices[..n]).map_err(Broken)?;
        }
        for f in frames {
            if written >= f.len() {
                written -= f.len();
            } else {
                self.out.push(Chunk::Shared(f.clone()), written);
                written = 0;
            }
        }
        Ok(())
    }

    /// Writes queued output until done or the socket would block.
    pub fn flush(&mut self) -> Result<(), Broken> {
        self.out.flush(&mut self.sock).map_err(Broken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every connection pays for the largest phase; an idle one holds nothing else
    /// (permessage-deflate state is one pointer until it is negotiated; delivery
    /// state is a sequence number per lane and one pointer, for pushes held during a
    /// resume).
    #[test]
    fn idle_connections_stay_small() {
        assert!(
            std::mem::size_of::<Phase>() <= 80,
            "{}",
            std::mem::size_of::<Phase>()
        );
        assert!(
            std::mem::size_of::<Conn>() <= 296,
            "{}",
            std::mem::size_of::<Conn>()
        );
    }
}
