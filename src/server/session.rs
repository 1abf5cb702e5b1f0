//! What a connection's phase decides, and the one place it is carried out.
//!
//! Each phase reacts to what happens to it (input, its timer, the peer's EOF, the
//! shutdown, an eviction or a restart) with an [`Action`]: a value, not a side
//! effect. [`Server::apply`] carries it out and answers with [`Liveness`], so a
//! caller never looks a slot up again to learn whether it is still there.
//! The close vocabulary (`CloseCode`, `Then`) lives here with the actions that
//! carry it.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use super::conn::{Chunk, Conn, Phase, Transport};
use super::routes::Listener;
use super::stats::Limit;
use super::{Liveness, Reason, Server};
use crate::http::response::Response;
use crate::http::sse;
use crate::hub::TypeSet;
use crate::queue::Joined;
use crate::ws::frame::{self, OpCode};

/// The close codes the server sends (RFC 6455 §7.4.1), and the peer's own when
/// it is echoed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseCode {
    /// 1001: the server is shutting down.
    Away,
    /// 1002: the peer broke the protocol.
    Protocol,
    /// 1007: a text message was not UTF-8.
    Invalid,
    /// 1008: the peer broke a policy (here: it does not read its pushes).
    Policy,
    /// 1009: a frame or message over `-max-frame` / `-max-message`.
    TooBig,
    /// 1012: the server restarts the connection's service; reconnect (here: its
    /// node lost messages it could not recover, and a resume tells what is missing).
    Restart,
    /// 1013: try again later (here: too many connections starting at once).
    TryAgain,
    /// Any other code, as the peer sent it.
    Other(u16),
}

impl CloseCode {
    pub fn as_u16(self) -> u16 {
        match self {
            CloseCode::Away => 1001,
            CloseCode::Protocol => 1002,
            CloseCode::Invalid => 1007,
            CloseCode::Policy => 1008,
            CloseCode::TooBig => 1009,
            CloseCode::Restart => 1012,
            CloseCode::TryAgain => 1013,
            CloseCode::Other(code) => code,
        }
    }
}

impl From<u16> for CloseCode {
    fn from(code: u16) -> Self {
        match code {
            1001 => CloseCode::Away,
            1002 => CloseCode::Protocol,
            1007 => CloseCode::Invalid,
            1008 => CloseCode::Policy,
            1009 => CloseCode::TooBig,
            1012 => CloseCode::Restart,
            1013 => CloseCode::TryAgain,
            other => CloseCode::Other(other),
        }
    }
}

/// What follows a close frame the server sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Then {
    /// Wait for the peer's close frame (the server started the handshake).
    AwaitPeer,
    /// Write what is left, then FIN (the peer closed or failed).
    Drain,
}

/// A phase's reaction, for [`Server::apply`].
pub(super) enum Action {
    /// Nothing to do: the phase goes on as it is.
    Stay,
    /// Write the server's own bytes (a pong, a ping, a heartbeat, an echo, a
    /// 100-continue) and go on.
    Send(Chunk),
    /// Answer the request in progress, then close; `limit` is the one it ran into.
    Fail {
        resp: Response,
        limit: Option<Limit>,
    },
    /// End a push connection: a WebSocket sends one close frame (`None`: without
    /// a code, the echo of one) and then `then`; an event stream, which has no
    /// close message, writes what it holds and closes.
    End {
        code: Option<CloseCode>,
        reason: Cow<'static, str>,
        then: Then,
    },
    /// Switch to `phase`, whose timer fires after `timeout`.
    Switch { phase: Phase, timeout: Duration },
    /// Everything is written: shut the sending side down (FIN), then read and
    /// discard until the peer closes too.
    Finish,
    /// Take input again: the backlog that paused it has been written.
    Resume,
    /// Leave the slab now.
    Remove(Reason),
}

impl Action {
    /// Whether the connection stops taking input in its current phase.
    pub(super) fn ends(&self) -> bool {
        !matches!(
            self,
            Action::Stay | Action::Send(_) | Action::Switch { .. } | Action::Resume
        )
    }

    pub(super) fn end(code: CloseCode, reason: impl Into<Cow<'static, str>>, then: Then) -> Self {
        Action::End {
            code: Some(code),
            reason: reason.into(),
            then,
        }
    }
}

/// The timeouts a phase's timer reacts with.
pub(super) struct Timeouts {
    pub idle: Duration,
    pub ping: Duration,
}

impl Conn {
    /// Whether the phase reads input now: not while the backend has the request,
    /// nor while an HTTP client leaves more than `max_backlog` of replies unread.
    pub(super) fn takes_input(&self, max_backlog: usize) -> bool {
        match self.phase {
            Phase::Publishing { .. } | Phase::Asking { .. } => false,
            Phase::Http { .. } => self.out.bytes() <= max_backlog,
            Phase::Ws(_) | Phase::Sse(_) | Phase::Closing | Phase::Draining { .. } => true,
        }
    }

    /// Whether this connection's timer is due: a WebSocket's when it was silent
    /// past a ping or the idle timeout, every other phase's at its deadline.
    pub(super) fn timer_due(&self, now: Instant, t: &Timeouts) -> bool {
        match &self.phase {
            Phase::Ws(ws) => {
                let silent = now.saturating_duration_since(self.last_seen);
                silent >= t.idle || (silent >= t.ping && !ws.ping_sent)
            }
            _ => now >= self.deadline,
        }
    }

    /// The phase's timer fired.
    pub(super) fn on_timeout(&mut self, now: Instant, t: &Timeouts) -> Action {
        match &mut self.phase {
            Phase::Ws(_) if now.saturating_duration_since(self.last_seen) >= t.idle => {
                Action::Remove(Reason::Timeout("idle"))
            }
            Phase::Ws(ws) => {
                ws.ping_sent = true;
                Action::Send(Chunk::Owned(frame::encode(OpCode::Ping, b"")))
            }
            Phase::Http { busy: true, .. } => Action::Fail {
                resp: Response::error(408, "request timeout"),
                limit: Some(Limit::RequestTimeout),
            },
            Phase::Publishing { .. } | Phase::Asking { .. } => Action::Fail {
                resp: Response::error(503, "queue backend did not answer in time"),
                limit: None,
            },
            // No idle timeout: an event-stream client never sends. The heartbeat
            // keeps idle proxies from closing it, and a client that is gone shows
            // up as a failed write.
            Phase::Sse(_) => {
                self.deadline = now + t.ping;
                Action::Send(Chunk::Owned(sse::HEARTBEAT.to_vec()))
            }
            Phase::Http { busy: false, .. } => Action::Remove(Reason::Timeout("keep-alive")),
            Phase::Closing | Phase::Draining { .. } => Action::Remove(Reason::Timeout("close")),
        }
    }

    /// The peer closed its side (EOF).
    pub(super) fn on_peer_closed(&mut self, now: Instant, close_timeout: Duration) -> Action {
        match self.phase {
            // A client that half-closed after its request still gets the reply.
            Phase::Http { .. } if !self.out.is_empty() => {
                self.phase = Phase::Draining { fin_sent: false };
                self.deadline = now + close_timeout;
                Action::Stay
            }
            Phase::Draining { fin_sent: false } if !self.out.is_empty() => Action::Stay,
            _ => Action::Remove(Reason::PeerClosed),
        }
    }

    /// Its queued output was written (`was_over`: the backlog was past
    /// `max_backlog` before): a draining connection sends its FIN once all is out,
    /// and an HTTP client paused for not reading its replies is read again.
    pub(super) fn on_written(&mut self, was_over: bool, max_backlog: usize) -> Action {
        match &mut self.phase {
            Phase::Draining { fin_sent } if self.out.is_empty() && !*fin_sent => {
                *fin_sent = true;
                Action::Finish
            }
            Phase::Draining { .. } => Action::Stay,
            _ if was_over && self.out.bytes() <= max_backlog => Action::Resume,
            _ => Action::Stay,
        }
    }

    /// Shutdown began: an idle HTTP connection leaves at once; every other one
    /// finishes what it does.
    pub(super) fn on_shutdown(&self) -> Action {
        match self.phase {
            Phase::Http { busy: false, .. } if self.rbuf.is_empty() => {
                Action::Remove(Reason::Shutdown)
            }
            _ => Action::Stay,
        }
    }

    /// The queue handed over everything it accepted: push receivers close (1001).
    pub(super) fn on_queue_drained(&self) -> Action {
        match self.phase.transport() {
            Some(_) => Action::end(CloseCode::Away, "server shutting down", Then::AwaitPeer),
            None => Action::Stay,
        }
    }
}

impl Server {
    /// Carries out what a phase decided. Every end of a connection that a phase
    /// chooses goes through here.
    pub(super) fn apply(&mut self, key: usize, action: Action) -> Liveness {
        match action {
            Action::Stay => self.liveness(key),
            Action::Send(chunk) => self.send(key, chunk),
            Action::Fail { resp, limit } => {
                if let Some(limit) = limit {
                    self.counters.limited[limit.index()] += 1;
                }
                self.reply(key, &resp, false, false)
            }
            Action::End { code, reason, then } => {
                match self.conns.get(key).map(|c| c.phase.transport()) {
                    None => Liveness::Closed,
                    Some(Some(Transport::EventStream)) => self.end_sse(key, &reason),
                    Some(_) => self.end_ws(key, code, &reason, then),
                }
            }
            Action::Switch { phase, timeout } => match self.conns.get_mut(key) {
                Some(conn) => {
                    conn.phase = phase;
                    conn.deadline = Instant::now() + timeout;
                    Liveness::Alive
                }
                None => Liveness::Closed,
            },
            Action::Finish => match self.conns.get(key) {
                Some(conn) if conn.sock.shutdown(std::net::Shutdown::Write).is_err() => {
                    self.remove(key, Reason::Done)
                }
                Some(_) => Liveness::Alive,
                None => Liveness::Closed,
            },
            Action::Resume => self.resume(key),
            Action::Remove(reason) => self.remove(key, reason),
        }
    }

    /// Switches a connection whose request passed every check to a push phase
    /// (`Ws` or `Sse`): joined to the hub, `head` (the 101, or the event stream's
    /// 200) written, then live at once, resumed, or held until the backend answers.
    pub(super) fn start_push(
        &mut self,
        key: usize,
        l: Listener,
        phase: Phase,
        head: Vec<u8>,
    ) -> Liveness {
        if let Some(ip) = l.client_ip {
            self.count_ip(key, ip);
        }
        let Some(conn) = self.conns.get_mut(key) else {
            return Liveness::Closed;
        };
        let Some(transport) = phase.transport() else {
            return Liveness::Alive;
        };
        conn.phase = phase;
        let now = Instant::now();
        conn.last_seen = now;
        if transport == Transport::EventStream {
            // Its timer is the next heartbeat; a WebSocket's runs on its silence.
            conn.deadline = now + self.cfg.ping_interval;
        }
        info!(
            "{} open uid={} peer={} ip={}",
            transport.label(),
            l.uid.as_deref().unwrap_or("-"),
            conn.peer,
            conn.client_ip
                .map_or_else(|| "-".to_string(), |ip| ip.to_string())
        );
        self.join_hub(key, l.uid.as_deref(), l.types, transport);
        // Before the head: what the client sends once it has it comes after the
        // join. A uid new to this node starts once its messages reach the node.
        let joined = match l.uid.as_deref() {
            Some(uid) => self.join_queue(key, uid, l.since.as_deref()),
            None => Joined::Live,
        };
        let opened = self.send(key, Chunk::Owned(head));
        if !opened.alive() {
            return opened;
        }
        match (joined, l.since) {
            (Joined::Pending, _) => Liveness::Alive,
            (Joined::Refused, _) => {
                let retry = "too many connections starting, retry";
                self.apply(
                    key,
                    Action::end(CloseCode::TryAgain, retry, Then::AwaitPeer),
                )
            }
            (Joined::Live, Some(since)) => self.resume_from(key, &since),
            (Joined::Live, None) => opened,
        }
    }

    /// A push receiver joins the hub: counted, and its presence told the backend.
    fn join_hub(&mut self, key: usize, uid: Option<&str>, types: TypeSet, transport: Transport) {
        self.hub.join(key, uid, types);
        if let Some(uid) = uid {
            self.queue.presence_changed(uid, self.hub.count(uid));
        }
        self.queue.flush();
        match transport {
            Transport::WebSocket => self.counters.ws_opened += 1,
            Transport::EventStream => self.counters.sse_opened += 1,
        }
    }

    /// Applies the reaction `react` picks for each connection `keep` selects.
    pub(super) fn apply_where(
        &mut self,
        keep: impl Fn(&Conn) -> bool,
        react: impl Fn(&mut Conn) -> Action,
    ) {
        for key in self.keys_where(keep) {
            if let Some(action) = self.conns.get_mut(key).map(&react) {
                let _ = self.apply(key, action);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_round_trip() {
        for code in [1000, 1001, 1002, 1007, 1008, 1009, 1012, 1013, 3000, 4999] {
            assert_eq!(CloseCode::from(code).as_u16(), code);
        }
        assert_eq!(CloseCode::from(1001), CloseCode::Away);
    }
}
