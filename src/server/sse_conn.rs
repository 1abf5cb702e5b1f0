//! The event-stream phase (`GET /sse`, Server-Sent Events): opening the stream,
//! heartbeat comments, and its end. Pushes reach it through fan-out like any push
//! receiver; the client never sends, so input is only read to notice it leaving.

use std::time::Instant;

use super::conn::{Chunk, Delivery, Phase, Transport};
use super::routes::Listener;
use super::{Liveness, Server};
use crate::http::sse;
use crate::queue::Joined;

impl Server {
    /// Answers `200 text/event-stream` and joins the hub; with a `since` (query
    /// or `Last-Event-ID`), it resumes as on `/ws`: replayed in the same turn, or
    /// held until the backend's history answers.
    pub(super) fn open_sse(&mut self, key: usize, l: Listener) -> Liveness {
        if let Some(ip) = l.client_ip {
            self.count_ip(key, ip);
        }
        let Some(conn) = self.conns.get_mut(key) else {
            return Liveness::Closed;
        };
        conn.phase = Phase::Sse(Delivery::default());
        let now = Instant::now();
        conn.last_seen = now;
        conn.deadline = now + self.cfg.ping_interval;
        info!(
            "sse open uid={} peer={} ip={}",
            l.uid.as_deref().unwrap_or("-"),
            conn.peer,
            conn.client_ip
                .map_or_else(|| "-".to_string(), |ip| ip.to_string())
        );
        self.hub.join(key, l.uid.as_deref(), l.types);
        if let Some(uid) = l.uid.as_deref() {
            self.queue.presence_changed(uid, self.hub.count(uid));
        }
        self.queue.flush();
        self.counters.sse_opened += 1;
        // As on /ws: a uid new to this node starts once its messages reach the node.
        let joined = match l.uid.as_deref() {
            Some(uid) => self.join_queue(key, uid, l.since.as_deref()),
            None => Joined::Live,
        };
        let opened = self.send(key, Chunk::Owned(sse::RESPONSE_HEAD.to_vec()));
        if !opened.alive() {
            return opened;
        }
        match (joined, l.since) {
            (Joined::Pending, _) => Liveness::Alive,
            (Joined::Refused, _) => self.end_sse(key, "too many connections starting, retry"),
            (Joined::Live, Some(since)) => self.resume_from(key, &since),
            (Joined::Live, None) => opened,
        }
    }

    /// Ends an event stream: out of the hub, then what is queued is written and the
    /// connection closed. There is no close message in the protocol; the
    /// client's EventSource reconnects by itself, with `Last-Event-ID`.
    pub(super) fn end_sse(&mut self, key: usize, why: &str) -> Liveness {
        let Some(conn) = self.conns.get_mut(key) else {
            return Liveness::Closed;
        };
        let was_receiver = conn.phase.receives_pushes();
        conn.phase = Phase::Draining { fin_sent: false };
        conn.deadline = Instant::now() + self.cfg.close_timeout;
        if was_receiver {
            self.leave_hub(key, Transport::EventStream, why);
        }
        self.flush(key)
    }
}
