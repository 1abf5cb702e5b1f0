//! Delivery ids and resume. Each message this node sequences gets the next number
//! and its id in the frame, and is retained ([`crate::history`]) before it is fanned
//! out. A connection opened with `?since=` is sent `{"op":"resumed",…}` and the
//! retained messages after `since` in the same reactor turn as it joins the hub, so
//! nothing delivered can fall between the replay and its live pushes, and nothing
//! is in both: delivery and retention happen together, on this thread.

use std::sync::Arc;

use super::conn::Chunk;
use super::{Liveness, Server};
use crate::history::Since;
use crate::message::{Envelope, unix_now};
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

    /// Sends a resuming connection its `resumed` frame and what it missed, oldest
    /// first, filtered by its types. Runs right after it joined the hub.
    pub(super) fn replay(&mut self, key: usize, since: &str) -> Liveness {
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
        let head = if done.complete {
            &br#"{"op":"resumed","complete":true}"#[..]
        } else {
            &br#"{"op":"resumed","complete":false}"#[..]
        };
        if !self
            .send(key, Chunk::Owned(frame::encode(OpCode::Text, head)))
            .alive()
        {
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
