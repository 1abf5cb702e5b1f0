//! The HTTP phases of a connection: reading a request's head and body (length or
//! chunked), `Expect: 100-continue`, pipelining, replies and keep-alive, and a
//! `/send` waiting for the queue backend.

use std::time::Instant;

use super::conn::{Chunk, PendingRequest, Phase};
use super::routes::Answer;
use super::session::Action;
use super::stats::Limit;
use super::stream::Step;
use super::{Liveness, Server, admission};
use crate::http::chunked::ChunkedDecoder;
use crate::http::request::{self, BodyKind, Head, HttpError, Limits, Method};
use crate::http::response::{self, Response};
use crate::message::{Envelope, unix_now};
use crate::queue::{PresenceRead, QueueError, Submit, Ticket};

impl Server {
    pub(super) fn http_step(&mut self, key: usize, buf: &mut [u8]) -> Step {
        let Some(conn) = self.conns.get_mut(key) else {
            return Step::Stop;
        };
        let Phase::Http { busy, pending } = &mut conn.phase else {
            return Step::Stop;
        };
        if pending.is_some() {
            return self.body_step(key, buf);
        }
        if buf.is_empty() {
            return Step::NeedMore;
        }
        if !*busy {
            *busy = true;
            conn.deadline = Instant::now() + self.cfg.request_timeout;
        }
        self.head_step(key, buf)
    }

    fn limits(&self) -> Limits {
        Limits {
            max_head: self.cfg.max_header,
            max_body: self.cfg.max_body,
        }
    }

    /// Parses a request head; the body, if any, comes through `body_step`.
    fn head_step(&mut self, key: usize, buf: &[u8]) -> Step {
        let limits = self.limits();
        let (head, n) = match request::parse_head(buf, &limits) {
            Err(e) => return Step::then(0, self.http_fail(key, &e)),
            Ok(None) => return Step::NeedMore,
            Ok(Some(parsed)) => parsed,
        };
        // Refused before the body is read: an unauthorized client never gets to
        // make the server buffer a megabyte.
        if let Some(r) = self.precheck(&head) {
            if let Some(peer) = self.conns.get(key).map(|c| c.peer) {
                self.count_refusal(r, peer, &head.path);
            }
            self.counters.http_requests += 1;
            let resp = admission::refusal_response(r);
            return Step::then(0, Action::Fail { resp, limit: None });
        }
        let Some(Phase::Http { pending, .. }) = self.conns.get_mut(key).map(|c| &mut c.phase)
        else {
            return Step::Stop;
        };
        let chunked =
            (head.body == BodyKind::Chunked).then(|| ChunkedDecoder::new(limits.max_body));
        *pending = Some(Box::new(PendingRequest {
            head,
            chunked,
            continue_sent: false,
        }));
        Step::Progress(n)
    }

    /// Collects a parsed request's body; answers once it is whole.
    fn body_step(&mut self, key: usize, buf: &mut [u8]) -> Step {
        let Some(Phase::Http {
            pending: Some(req), ..
        }) = self.conns.get_mut(key).map(|c| &mut c.phase)
        else {
            return Step::Stop;
        };
        let (used, done) = match (req.head.body, &mut req.chunked) {
            (BodyKind::None, _) => (0, true),
            (BodyKind::Length(len), _) if buf.len() >= len => (len, true),
            (BodyKind::Length(_), _) => (0, false),
            (BodyKind::Chunked, Some(decoder)) => match decoder.feed(buf) {
                Err(e) => return Step::then(0, self.http_fail(key, &e)),
                Ok((n, done)) => (n, done),
            },
            (BodyKind::Chunked, None) => return Step::Stop,
        };
        if !done {
            // `Expect: 100-continue`: the body is invited once, when it has not all arrived.
            if req.head.expect_continue && !req.continue_sent {
                req.continue_sent = true;
                let invite = Chunk::Owned(response::CONTINUE.to_vec());
                return Step::then(used, Action::Send(invite));
            }
            return if used == 0 {
                Step::NeedMore
            } else {
                Step::Progress(used)
            };
        }
        let Some(Phase::Http { pending, .. }) = self.conns.get_mut(key).map(|c| &mut c.phase)
        else {
            return Step::Stop;
        };
        let Some(req) = pending.take() else {
            return Step::Stop;
        };
        let body = match req.chunked {
            Some(decoder) => decoder.into_body(),
            None => buf[..used].to_vec(),
        };
        self.answer(key, req.head, body);
        Step::Progress(used)
    }

    /// Answers a malformed request and closes: after a framing error the byte
    /// stream cannot be trusted for another request.
    fn http_fail(&mut self, key: usize, e: &HttpError) -> Action {
        let limit = match e {
            HttpError::HeadTooLarge => Some(Limit::HeaderSize),
            HttpError::BodyTooLarge => Some(Limit::BodySize),
            _ => None,
        };
        let resp = e.response();
        if let Some(conn) = self.conns.get(key) {
            debug!(
                "{}: HTTP {} {}",
                conn.peer,
                resp.status,
                String::from_utf8_lossy(&resp.body)
            );
        }
        self.counters.http_requests += 1;
        Action::Fail { resp, limit }
    }

    fn answer(&mut self, key: usize, head: Head, body: Vec<u8>) {
        self.counters.http_requests += 1;
        let keep_alive = head.keep_alive && self.shutdown.running();
        let head_only = head.method == Method::Head;
        let _ = match self.route(key, &head, &body) {
            Answer::Respond(resp) => self.reply(key, &resp, keep_alive, head_only),
            Answer::Refuse(resp) => self.reply(key, &resp, false, head_only),
            Answer::Upgrade(upgrade) => self.upgrade(key, upgrade),
            Answer::EventStream(listener) => self.open_sse(key, listener),
            Answer::Publish(batch) => self.publish(key, batch, keep_alive),
            Answer::Ask(uids) => self.ask_presence(key, uids, keep_alive),
        };
    }

    /// Writes a response and moves the connection to its next phase: ready for
    /// the next request, or draining towards the close.
    pub(super) fn reply(
        &mut self,
        key: usize,
        resp: &Response,
        keep_alive: bool,
        head_only: bool,
    ) -> Liveness {
        let mut out = Vec::with_capacity(128 + resp.body.len());
        resp.encode(keep_alive, head_only, &mut out);
        let now = Instant::now();
        let Some(conn) = self.conns.get_mut(key) else {
            return Liveness::Closed;
        };
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
        match self.send(key, Chunk::Owned(out)) {
            Liveness::Alive if !keep_alive => self.flush(key),
            live => live,
        }
    }

    fn publish(&mut self, key: usize, batch: Vec<Envelope>, keep_alive: bool) -> Liveness {
        let accepted = batch.len();
        self.counters.messages_in += accepted as u64;
        let now = unix_now();
        let live: Vec<Envelope> = batch.into_iter().filter(|e| !e.is_expired(now)).collect();
        self.counters.expired += (accepted - live.len()) as u64;
        let Some(serial) = self.conns.get(key).map(|c| c.serial) else {
            return Liveness::Closed;
        };
        if live.is_empty() {
            return self.published(key, accepted, keep_alive, Ok(()));
        }
        match self.queue.publish(Ticket { key, serial }, live) {
            Submit::Done(result) => self.published(key, accepted, keep_alive, result),
            // The backend has its own timeout; this one only bounds a lost answer.
            Submit::Pending => self.apply(
                key,
                Action::Switch {
                    phase: Phase::Publishing {
                        accepted,
                        keep_alive,
                    },
                    timeout: self.cfg.request_timeout,
                },
            ),
        }
    }

    fn published(
        &mut self,
        key: usize,
        accepted: usize,
        keep_alive: bool,
        result: Result<(), QueueError>,
    ) -> Liveness {
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
        self.reply(key, &resp, keep_alive, false)
    }

    /// `/presence`: from this node's hub, or from the backend later.
    fn ask_presence(&mut self, key: usize, uids: Vec<String>, keep_alive: bool) -> Liveness {
        let Some(serial) = self.conns.get(key).map(|c| c.serial) else {
            return Liveness::Closed;
        };
        match self.queue.presence(Ticket { key, serial }, uids.clone()) {
            PresenceRead::Local => {
                let counts = uids
                    .into_iter()
                    .map(|u| {
                        let n = self.hub.count(&u) as u64;
                        (u, n)
                    })
                    .collect();
                self.reply(key, &presence_response(counts), keep_alive, false)
            }
            PresenceRead::Pending => self.apply(
                key,
                Action::Switch {
                    phase: Phase::Asking { keep_alive },
                    timeout: self.cfg.request_timeout,
                },
            ),
            PresenceRead::Unavailable => {
                let resp = Response::error(503, "too many presence reads waiting");
                self.reply(key, &resp, keep_alive, false)
            }
            PresenceRead::Unsupported => {
                let resp = Response::error(501, "presence across nodes needs -queue=list or redis");
                self.reply(key, &resp, keep_alive, false)
            }
        }
    }

    /// The backend's answer to a `/presence` that was waiting for it.
    pub(super) fn on_presence(
        &mut self,
        ticket: Ticket,
        result: Result<Vec<(String, u64)>, String>,
    ) {
        let Some(conn) = self.conns.get(ticket.key) else {
            return;
        };
        let Phase::Asking { keep_alive } = conn.phase else {
            return;
        };
        if conn.serial != ticket.serial {
            return;
        }
        let resp = match result {
            Ok(counts) => presence_response(counts),
            Err(e) => {
                warn!("/presence: {e}");
                Response::error(503, &format!("presence unavailable: {e}"))
            }
        };
        if self.reply(ticket.key, &resp, keep_alive, false).alive() {
            let _ = self.resume(ticket.key);
        }
    }

    /// The backend's answer to a `/send` that was waiting for it.
    pub(super) fn on_published(&mut self, ticket: Ticket, result: Result<(), QueueError>) {
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
        if self
            .published(ticket.key, accepted, keep_alive, result)
            .alive()
        {
            let _ = self.resume(ticket.key);
        }
    }
}

/// `{"ok":true,"presence":{"U":connections,…}}`: 0 is offline.
fn presence_response(counts: Vec<(String, u64)>) -> Response {
    let map: serde_json::Map<String, serde_json::Value> =
        counts.into_iter().map(|(u, n)| (u, n.into())).collect();
    let body = serde_json::json!({"ok": true, "presence": map});
    Response::json(200, body.to_string().into_bytes())
}
