//! The event-stream phase (`GET /sse`, Server-Sent Events): opening the stream and
//! its end; its heartbeat comment is its timer's reaction (`session.rs`). Pushes
//! reach it through fan-out like any push receiver; the client never sends, so
//! input is only read to notice it leaving.

use std::time::Instant;

use super::conn::{Delivery, Phase, Transport};
use super::routes::Listener;
use super::{Liveness, Server};
use crate::http::sse;

impl Server {
    /// Answers `200 text/event-stream` and joins the hub; with a `since` (query
    /// or `Last-Event-ID`), it resumes as on `/ws`: replayed in the same turn, or
    /// held until the backend's history answers.
    pub(super) fn open_sse(&mut self, key: usize, l: Listener) -> Liveness {
        let phase = Phase::Sse(Delivery::default());
        self.start_push(key, l, phase, sse::RESPONSE_HEAD.to_vec())
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
