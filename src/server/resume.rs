//! Delivery ids and resume. Each message this node sequences gets the next number
//! and its id in the frame, and is retained ([`crate::history`]) before it is fanned
//! out. A connection opened with `?since=` (or, on `/sse`, `Last-Event-ID`) is sent
//! its `resumed` notice and the retained messages after `since` in the same reactor
//! turn as it joins the hub, so nothing delivered can fall between the replay and
//! its live pushes, and nothing is in both: delivery and retention happen together,
//! on this thread.
//!
//! With Redis the history is read on a backend thread: the connection joins the hub
//! at once and its live pushes are held (`Delivery::resuming`, in the encoding of
//! its transport) until the read comes back; then the replay and what was held go
//! out merged by sequence number, so a message in both is sent once. A connection of
//! a uid new to the node starts the same way while the node subscribes
//! (`Server::join_queue`). Both transports resume alike; only the encoding differs
//! (WebSocket frames, or event-stream events with `id:`).

use std::sync::Arc;

use super::conn::{Chunk, Held, Transport};
use super::fanout::{is_compressed, sse_event};
use super::session::{Action, CloseCode, Then};
use super::{Liveness, Server};
use crate::history::Since;
use crate::http::sse;
use crate::message::{self, Envelope, Lane, unix_now};
use crate::queue::streams::Fetched;
use crate::queue::{Joined, Resume, Ticket};
use crate::ws::frame::{self, OpCode};

/// The replay and the pushes held meanwhile overlap and interleave (a held
/// broadcast may be older than a replayed message): merged by id, each once, and
/// the newest seq of each lane. Two lanes (Redis Cluster) merge by their time part,
/// `seq = ms*1024+n`.
fn merge(
    mut merged: Vec<(Lane, u64, Arc<[u8]>)>,
    live: Vec<(Lane, u64, Arc<[u8]>)>,
) -> (Vec<Arc<[u8]>>, u64, u64) {
    merged.extend(live);
    merged.sort_by_key(|(lane, seq, _)| (*seq, *lane));
    merged.dedup_by_key(|(lane, seq, _)| (*seq, *lane));
    let up_to = |want: Lane| {
        let mut lane = merged.iter().filter(|(l, _, _)| *l == want);
        lane.next_back().map_or(0, |(_, seq, _)| *seq)
    };
    let (main, all) = (up_to(Lane::Main), up_to(Lane::Broadcast));
    (merged.into_iter().map(|(_, _, f)| f).collect(), main, all)
}

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

    /// Tells the backend a connection of `uid` joined. While its uid's messages
    /// do not reach this node yet (`Pending`), the connection is started like a
    /// resume: live pushes held until the backend's read of what it missed.
    pub(super) fn join_queue(&mut self, key: usize, uid: &str, since: Option<&str>) -> Joined {
        let Some(serial) = self.conns.get(key).map(|c| c.serial) else {
            return Joined::Refused;
        };
        let joined = self.queue.join(Ticket { key, serial }, uid, since);
        if joined == Joined::Pending
            && let Some(d) = self.conns.get_mut(key).and_then(|c| c.phase.delivery_mut())
        {
            d.resuming = Some(Box::new(Held {
                quiet: since.is_none(),
                ..Held::default()
            }));
        }
        joined
    }

    /// A connection opened with `?since=` (or `Last-Event-ID`): replayed from this
    /// node's retention now, or from the backend's history when it answers.
    pub(super) fn resume_from(&mut self, key: usize, since: &str) -> Liveness {
        let Some(serial) = self.conns.get(key).map(|c| c.serial) else {
            return Liveness::Closed;
        };
        let uid = self.hub.uid(key).map(str::to_owned);
        match self
            .queue
            .resume(Ticket { key, serial }, uid.as_deref(), since)
        {
            Resume::Local => self.replay(key, since),
            Resume::Pending => {
                if let Some(d) = self.conns.get_mut(key).and_then(|c| c.phase.delivery_mut()) {
                    d.resuming = Some(Box::default());
                }
                Liveness::Alive
            }
            Resume::Unavailable => {
                self.counters.resumes_incomplete += 1;
                self.send_resumed(key, false)
            }
        }
    }

    /// The backend's answer to a resume: the replay, then what was held meanwhile
    /// and is newer. A read that failed is answered `complete:false`.
    pub(super) fn on_history(&mut self, ticket: Ticket, fetched: Result<Fetched, String>) {
        let (held, transport) = match self.conns.get_mut(ticket.key) {
            Some(conn) if conn.serial == ticket.serial => {
                let transport = conn.phase.transport();
                (
                    conn.phase.delivery_mut().and_then(|d| d.resuming.take()),
                    transport,
                )
            }
            _ => (None, None),
        };
        let (Some(held), Some(transport)) = (held, transport) else {
            return; // gone, or closing, meanwhile
        };
        let key = ticket.key;
        // The read came after the uid's channel was subscribed: from now on its
        // messages reach this node, and its next connections start at once.
        if let Some(uid) = self.hub.uid(key) {
            self.queue.subscribed(uid);
        }
        let (complete, batch) = match fetched {
            Ok(f) => (f.complete, f.batch),
            Err(e) if held.quiet => {
                // Without a replay this connection may have missed what was sent
                // between its join and the subscription: it reconnects instead.
                warn!("join: history unreadable: {e}");
                let _ = self.restart(key, "missed messages, reconnect");
                return;
            }
            Err(e) => {
                warn!("resume: history unreadable: {e}");
                (false, Vec::new())
            }
        };
        let frames = self.replay_frames(key, batch, transport);
        if !held.quiet {
            self.count_resume(complete, frames.len());
            if !self.send_resumed(key, complete).alive() {
                return;
            }
        }
        let Held { frames: live, .. } = *held;
        let (all, up_to_main, up_to_all) = merge(frames, live);
        self.count_out(&all, transport);
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if let Some(d) = conn.phase.delivery_mut() {
            d.last_seq = d.last_seq.max(up_to_main);
            d.last_all = d.last_all.max(up_to_all);
        }
        for chunk in all.chunks(64) {
            if let Err(e) = conn.send_shared(chunk.iter()) {
                let _ = self.remove(key, super::Reason::Io(e.0));
                return;
            }
        }
        let _ = self.check_backlog(key);
    }

    /// Counts the pushes a resume sends.
    fn count_out(&mut self, frames: &[Arc<[u8]>], transport: Transport) {
        self.counters.messages_out += frames.len() as u64;
        if transport == Transport::WebSocket {
            // Held pushes were taken in the connection's encoding, compressed or not.
            self.counters.deflated_out += frames.iter().filter(|f| is_compressed(f)).count() as u64;
        }
    }

    /// What a history read found for a connection: live, of its types, each in
    /// its transport's encoding, with its lane and sequence number.
    fn replay_frames(
        &self,
        key: usize,
        batch: Vec<Envelope>,
        transport: Transport,
    ) -> Vec<(Lane, u64, Arc<[u8]>)> {
        let now = unix_now();
        batch
            .into_iter()
            .filter(|e| !e.is_expired(now) && self.hub.accepts(key, &e.types))
            .map(|e| {
                let bytes = match transport {
                    Transport::WebSocket => e.frame,
                    Transport::EventStream => sse_event(e.push_json()),
                };
                (e.lane, e.seq, bytes)
            })
            .collect()
    }

    /// Messages were lost to this node beyond what history can refill: its push
    /// connections are closed (WebSocket: 1012; an event stream just ends), and each
    /// resumes from its own last id (which then says honestly whether something is
    /// missing).
    pub(super) fn restart_push_connections(&mut self) {
        for key in self.keys_where(|c| c.phase.receives_pushes()) {
            let _ = self.restart(key, "missed messages, resume");
        }
    }

    /// Like [`Self::restart_push_connections`], for the connections of `uids`.
    pub(super) fn restart_uids(&mut self, uids: &[String]) {
        let hub = &self.hub;
        let held = |key: usize| hub.uid(key).is_some_and(|u| uids.iter().any(|x| x == u));
        let keys: Vec<usize> = self
            .keys_where(|c| c.phase.receives_pushes())
            .into_iter()
            .filter(|k| held(*k))
            .collect();
        for key in keys {
            let _ = self.restart(key, "missed messages, resume");
        }
    }

    /// Sends a push connection off to reconnect and resume: 1012 for a WebSocket;
    /// an event stream ends, and the browser comes back with `Last-Event-ID`.
    fn restart(&mut self, key: usize, why: &'static str) -> Liveness {
        self.apply(key, Action::end(CloseCode::Restart, why, Then::AwaitPeer))
    }

    fn count_resume(&mut self, complete: bool, replayed: usize) {
        if complete {
            self.counters.resumes_complete += 1;
        } else {
            self.counters.resumes_incomplete += 1;
        }
        self.counters.replayed += replayed as u64;
    }

    /// The `resumed` notice in the connection's transport: a `{"op":"resumed",…}`
    /// text frame, or a `resumed` event.
    fn send_resumed(&mut self, key: usize, complete: bool) -> Liveness {
        let Some(transport) = self.conns.get(key).and_then(|c| c.phase.transport()) else {
            return Liveness::Closed;
        };
        let head = match transport {
            Transport::WebSocket => {
                let op = if complete {
                    &br#"{"op":"resumed","complete":true}"#[..]
                } else {
                    &br#"{"op":"resumed","complete":false}"#[..]
                };
                frame::encode(OpCode::Text, op)
            }
            Transport::EventStream => {
                let data = if complete {
                    &br#"{"complete":true}"#[..]
                } else {
                    &br#"{"complete":false}"#[..]
                };
                sse::event(None, Some("resumed"), data)
            }
        };
        self.send(key, Chunk::Owned(head))
    }

    /// Sends a resuming connection its `resumed` notice and what it missed, oldest
    /// first, filtered by its types, in its transport's encoding. Runs right after
    /// it joined the hub.
    ///
    /// The history keeps plain frames. A WebSocket that negotiated permessage-deflate
    /// gets its replay uncompressed: RFC 7692 lets each message choose, and a replay
    /// is one connection's, so there is no compression to share.
    fn replay(&mut self, key: usize, since: &str) -> Liveness {
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
        self.count_resume(done.complete, frames.len());
        self.counters.messages_out += frames.len() as u64;
        if transport == Transport::EventStream {
            for f in &mut frames {
                *f = sse_event(message::frame_payload(f));
            }
        }
        if !self.send_resumed(key, done.complete).alive() {
            return Liveness::Closed;
        }
        let Some(conn) = self.conns.get_mut(key) else {
            return Liveness::Closed;
        };
        if let Some(d) = conn.phase.delivery_mut() {
            d.last_seq = d.last_seq.max(done.last_seq);
        }
        for chunk in frames.chunks(64) {
            if let Err(e) = conn.send_shared(chunk.iter()) {
                return self.remove(key, super::Reason::Io(e.0));
            }
        }
        Liveness::Alive
    }
}
