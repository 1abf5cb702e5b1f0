//! The WebSocket phase of a connection: the upgrade, frames in, control frames,
//! `{"op":"subscribe"}`, and the close handshake. [`Server::end_ws`] is the one way a
//! WebSocket ends with a close frame, and it sends at most one per connection.

use std::time::Instant;

use super::conn::{Chunk, Phase, Transport, WsDeflate, WsState};
use super::routes::{self, Upgrade};
use super::session::{Action, CloseCode, Then};
use super::stats::Limit;
use super::stream::Step;
use super::{Liveness, Reason, Server};
use crate::ws::assembler::{Assembler, Message};
use crate::ws::deflate::Inflater;
use crate::ws::frame::{self, OpCode, ProtocolError};
use crate::ws::handshake;

impl Server {
    /// `GET /ws` passed every check: the 101, and the WebSocket phase.
    pub(super) fn upgrade(&mut self, key: usize, up: Upgrade) -> Liveness {
        let Upgrade {
            accept,
            deflate,
            listener,
        } = up;
        let ws_deflate = deflate.map(|params| {
            Box::new(WsDeflate {
                params,
                inflater: Inflater::new(&params),
            })
        });
        let phase = Phase::Ws(WsState::new(
            Assembler::new(self.cfg.max_message),
            ws_deflate,
        ));
        let response = match &deflate {
            Some(p) => handshake::response_with_extensions(&accept, &p.response_header()),
            None => handshake::response(&accept),
        };
        self.start_push(key, listener, phase, response)
    }

    pub(super) fn ws_step(&mut self, key: usize, buf: &mut [u8]) -> Step {
        // A closing connection may still see compressed frames in flight before the
        // peer's close; only that close matters, so RSV1 is no error there.
        let deflate = match self.conns.get(key).map(|c| &c.phase) {
            Some(Phase::Ws(ws)) => ws.deflate.is_some(),
            _ => true,
        };
        let (frame, used) = match frame::decode_with(buf, self.cfg.max_frame, deflate) {
            Err(e) => return Step::then(0, self.ws_fail(key, e)),
            Ok(None) => {
                // Text still arriving fails at its first invalid byte (RFC 6455 §8.1).
                if let Some(Phase::Ws(ws)) = self.conns.get_mut(key).map(|c| &mut c.phase)
                    && let Err(e) = ws.assembler.check_incomplete(buf)
                {
                    return Step::then(0, self.ws_fail(key, e));
                }
                return Step::NeedMore;
            }
            Ok(Some(f)) => f,
        };
        let Some(phase) = self.conns.get_mut(key).map(|c| &mut c.phase) else {
            return Step::Stop;
        };
        let Phase::Ws(ws) = phase else {
            // Closing: only the peer's close frame matters now.
            if frame.opcode == OpCode::Close {
                return Step::then(used, Action::Remove(Reason::Done));
            }
            return Step::Progress(used);
        };
        let inflater = ws.deflate.as_deref_mut().map(|d| &mut d.inflater);
        let pushed = ws.assembler.push_with(frame, inflater);
        if let Ok(Some(_)) = pushed {
            ws.ping_sent = false;
        }
        match pushed {
            Err(e) => Step::then(0, self.ws_fail(key, e)),
            Ok(None) => Step::Progress(used),
            Ok(Some(msg)) => Step::then(used, self.on_message(key, msg)),
        }
    }

    /// A whole message from the client, and the WebSocket's reaction to it.
    fn on_message(&mut self, key: usize, msg: Message) -> Action {
        let echo = self.cfg.echo;
        match msg {
            Message::Text(text) if echo => self.echo(key, OpCode::Text, text.as_bytes()),
            Message::Text(text) => {
                match routes::subscribe_op(&text, &crate::hub::FilterLimits::new(&self.cfg)) {
                    Some(Ok(types)) => self.hub.subscribe(key, types),
                    Some(Err(e)) => return self.refuse_filter(key, e),
                    None => {}
                }
                Action::Stay
            }
            Message::Binary(data) if echo => self.echo(key, OpCode::Binary, &data),
            Message::Binary(_) | Message::Pong(_) => Action::Stay,
            Message::Ping(data) => Action::Send(Chunk::Owned(frame::encode(OpCode::Pong, &data))),
            // Echo the peer's code, as RFC 6455 §5.5.1 asks, then close the TCP side.
            Message::Close(close) => Action::End {
                code: close.map(|c| CloseCode::from(c.code)),
                reason: "".into(),
                then: Then::Drain,
            },
        }
    }

    /// `-echo`: the message back, compressed whenever the connection negotiated
    /// permessage-deflate (whatever `-deflate-min` says: a conformance suite checks
    /// the compressed path on every message, and some clients expect each echo in it).
    fn echo(&mut self, key: usize, opcode: OpCode, data: &[u8]) -> Action {
        let window = match self.conns.get(key).map(|c| &c.phase) {
            Some(Phase::Ws(WsState {
                deflate: Some(d), ..
            })) => Some(d.params.window()),
            _ => None,
        };
        let compressed =
            window.and_then(|window| self.compressor.frame_always(window, opcode, data));
        let bytes = compressed.unwrap_or_else(|| frame::encode(opcode, data));
        Action::Send(Chunk::Owned(bytes))
    }

    /// A subscribe op over the filter limits: counted, closed 1008 (policy).
    fn refuse_filter(&mut self, key: usize, e: crate::hub::FilterError) -> Action {
        if let Some(peer) = self.conns.get(key).map(|c| c.peer) {
            self.count_refusal(crate::auth::Refusal::Types(e), peer, "subscribe");
        }
        Action::end(CloseCode::Policy, e.to_string(), Then::Drain)
    }

    /// Fails the connection with the error's close code.
    fn ws_fail(&mut self, key: usize, e: ProtocolError) -> Action {
        if matches!(e, ProtocolError::FrameTooBig | ProtocolError::MessageTooBig) {
            self.counters.limited[Limit::FrameSize.index()] += 1;
        }
        if let Some(conn) = self.conns.get(key) {
            debug!("{}: {e}", conn.peer);
        }
        Action::end(CloseCode::from(e.close_code()), e.to_string(), Then::Drain)
    }

    /// Ends a WebSocket: out of the hub, one close frame (`None`: a close frame
    /// without a code, the echo of one), then `then`. A connection that already
    /// sent its close frame sends none again (RFC 6455 §5.5.1). An empty `reason`
    /// is the echo of the peer's close.
    pub(super) fn end_ws(
        &mut self,
        key: usize,
        code: Option<CloseCode>,
        reason: &str,
        then: Then,
    ) -> Liveness {
        let Some(conn) = self.conns.get_mut(key) else {
            return Liveness::Closed;
        };
        let was_receiver = conn.phase.receives_pushes();
        conn.phase = match then {
            Then::AwaitPeer => Phase::Closing,
            Then::Drain => Phase::Draining { fin_sent: false },
        };
        conn.deadline = Instant::now() + self.cfg.close_timeout;
        let first_close = !std::mem::replace(&mut conn.close_sent, true);
        if was_receiver {
            let why = if reason.is_empty() {
                "client closed"
            } else {
                reason
            };
            self.leave_hub(key, Transport::WebSocket, why);
        }
        if first_close {
            let bytes = match code {
                Some(code) => frame::close_frame(code.as_u16(), reason),
                None => frame::encode(OpCode::Close, &[]),
            };
            if !self.send(key, Chunk::Owned(bytes)).alive() {
                return Liveness::Closed;
            }
        }
        match then {
            Then::Drain => self.flush(key),
            Then::AwaitPeer => Liveness::Alive,
        }
    }

    /// The end of a push receiver: out of the hub, counted, one log line.
    pub(super) fn leave_hub(&mut self, key: usize, transport: Transport, why: &str) {
        let Some(conn) = self.conns.get(key) else {
            return;
        };
        info!(
            "{} close uid={} peer={} reason={why} duration={:.1}s",
            transport.label(),
            self.hub.uid(key).unwrap_or("-"),
            conn.peer,
            conn.opened.elapsed().as_secs_f64()
        );
        let uid = self.hub.uid(key).map(str::to_owned);
        let last = self.hub.leave(key);
        if let Some(uid) = uid {
            self.queue.presence_changed(&uid, self.hub.count(&uid));
        }
        if let Some(uid) = last {
            self.queue.left(&uid);
        }
        match transport {
            Transport::WebSocket => self.counters.ws_closed += 1,
            Transport::EventStream => self.counters.sse_closed += 1,
        }
    }
}
