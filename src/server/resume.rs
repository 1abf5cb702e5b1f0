//! Delivery ids and resume. Each message this node sequences gets the next number
//! and its id in the frame, and is retained ([`crate::history`]) before it is fanned
//! out. A connection opened with `?since=` (or, on `/sse`, `Last-Event-ID`) is sent `{"op":"resumed",…}` and the
//! retained messages after `since` in the same reactor turn as it joins the hub, so
//! nothing delivered can fall between the replay and its live pushes, and nothing
//! is in both: delivery and retention happen together, on this thread.

use std::sync::Arc;

use super::conn::{Chunk, Transport};
use super::fanout::sse_event;
use super::{Liveness, Server};
use crate::history::Since;
use crate::http::sse;
use crate::message::{self, Envelope, unix_now};
use crate::ws::frame::{self, OpCode};

impl Server {
    /// Numbers and retains the messages this node is the first to deliver (from
    /// the list or a Disque job); messages from Redis carry their place already.
    pub(super) fn sequence(&mut self, batch: &mut [Envelope]) {
        let now = unix_now();
        for env in batch.iter_mut().filter(|e| e.seq == 0) {
            self.last_seq += 1;
            let seq = self.last_seq;
            env.set_id(seq, &self.history.epoch().id(seq));
            self.history.append(seq, env, now);
        }
    }

    /// Sends a resuming connection its `resumed` notice and what it missed, oldest
    /// first, filtered by its types, in its transport's encoding. Runs right after
    /// it joined the hub.
    ///
    /// The history keeps plain frames. A WebSocket that negotiated permessage-deflate
    /// gets its replay uncompressed: RFC 7692 lets each message choose, and a replay
    /// is one connection's, so there is no compression to share.
    pub(super) fn replay(&mut self, key: usize, since: &str) -> Liveness {
        let Some(transport) = self.conns.get(key).and_then(|c| c.phase.transport()) else {
            return Liveness::Closed;
        };
        let since = self
            .history
            .epoch()
            .parse_since(since)
            .unwrap_or(Since::Foreign);
        let uid = self.hub.uid(key).map(str::to_owned);
        let mut frames: Vec<Arc<[u8]>> = Vec::new();
        let hub = &self.hub;
        let done = self.history.replay(
            uid.as_deref(),
            since,
            unix_now(),
            |types| hub.accepts(key, types),
            |f| frames.push(f.clone()),
        );
        if done.complete {
            self.counters.resumes_complete += 1;
        } else {
            self.counters.resumes_incomplete += 1;
        }
        self.counters.replayed += frames.len() as u64;
        self.counters.messages_out += frames.len() as u64;
        let head = match transport {
            Transport::WebSocket => {
                let op = if done.complete {
                    &br#"{"op":"resumed","complete":true}"#[..]
                } else {
                    &br#"{"op":"resumed","complete":false}"#[..]
                };
                frame::encode(OpCode::Text, op)
            }
            Transport::EventStream => {
                let data = if done.complete {
                    &br#"{"complete":true}"#[..]
                } else {
                    &br#"{"complete":false}"#[..]
                };
                for f in &mut frames {
                    *f = sse_event(message::frame_payload(f));
                }
                sse::event(None, Some("resumed"), data)
            }
        };
        if !self.send(key, Chunk::Owned(head)).alive() {
            return Liveness::Closed;
        }
        let Some(conn) = self.conns.get_mut(key) else {
            return Liveness::Closed;
        };
        for chunk in frames.chunks(64) {
            if let Err(e) = conn.send_shared(chunk.iter()) {
                return self.remove(key, super::Reason::Io(e.0));
            }
        }
        Liveness::Alive
    }
}
