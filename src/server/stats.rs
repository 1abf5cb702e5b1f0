//! Counters, the `Snapshot` of gauges beside them, and `/stats` (JSON); `/metrics`
//! renders the same snapshot (`metrics.rs`).

use crate::auth::Refusal;
use crate::history::{HistoryStats, Trim};
use crate::queue::QueueState;

/// Limits a request or connection ran into, counted beside the [`Refusal`]s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// `-request-timeout`: 408.
    RequestTimeout,
    /// `-max-header`: 431.
    HeaderSize,
    /// `-max-body`: 413.
    BodySize,
    /// `-max-frame` / `-max-message`: close 1009.
    FrameSize,
    /// `-max-backlog`: close 1008.
    Backlog,
}

impl Limit {
    pub const LABELS: [&'static str; 5] = [
        "request_timeout",
        "header_size",
        "body_size",
        "frame_size",
        "backlog",
    ];

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Monotonic counters kept by the reactor thread.
#[derive(Default, Debug, Clone)]
pub struct Counters {
    /// Messages accepted by `/send`.
    pub messages_in: u64,
    /// Pushes handed to connections (one per receiver).
    pub messages_out: u64,
    /// Messages taken from the queue and fanned out to this node's connections.
    pub messages_routed: u64,
    /// Messages that reached their `timeout` before delivery.
    pub expired: u64,
    /// Pushes discarded unsent: the receiver was evicted or went away with a backlog.
    pub dropped: u64,
    /// Connections closed because their backlog passed `-max-backlog`.
    pub evicted_slow: u64,
    /// Requests and connections turned away, by [`Refusal::index`].
    pub refused: [u64; Refusal::LABELS.len()],
    /// Requests and connections cut off at a limit, by [`Limit::index`].
    pub limited: [u64; Limit::LABELS.len()],
    /// Resumes (`?since=`) that had everything after `since`, and ones that did not.
    pub resumes_complete: u64,
    pub resumes_incomplete: u64,
    /// Messages sent again by resumes.
    pub replayed: u64,
    pub http_requests: u64,
    pub ws_opened: u64,
    pub ws_closed: u64,
    /// Event streams (`/sse`) opened and closed.
    pub sse_opened: u64,
    pub sse_closed: u64,
    /// Messages compressed for permessage-deflate receivers, once per message.
    pub deflated: u64,
    /// Pushes sent compressed (one per receiver).
    pub deflated_out: u64,
}

impl Counters {
    /// Every refusal and limit with its label, for both renderings.
    pub(super) fn refusals(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        let refused = Refusal::LABELS.iter().copied().zip(self.refused);
        refused.chain(Limit::LABELS.iter().copied().zip(self.limited))
    }
}

/// Gauges read at the moment of the request.
pub struct Snapshot<'a> {
    pub counters: &'a Counters,
    pub connections: usize,
    pub http_connections: usize,
    pub users: usize,
    pub queue_backend: &'a str,
    pub queue_state: QueueState,
    /// Connections to the queue backend re-established after a loss.
    pub queue_reconnects: u64,
    /// Messages dropped and `/send` batches refused because delivery was behind.
    pub queue_backlog: crate::queue::BacklogCounts,
    /// What interest routing received (Redis).
    pub queue_routing: crate::queue::RoutingCounts,
    pub uptime_seconds: u64,
    pub rss_bytes: Option<u64>,
    /// What this node retains for resumes.
    pub history: HistoryStats,
}

impl Snapshot<'_> {
    pub fn to_json(&self) -> Vec<u8> {
        let c = self.counters;
        let v = serde_json::json!({
            "connections": self.connections,
            "http_connections": self.http_connections,
            "users": self.users,
            "messages_in": c.messages_in,
            "messages_out": c.messages_out,
            "messages_routed": c.messages_routed,
            "expired": c.expired,
            "dropped": c.dropped,
            "evicted_slow": c.evicted_slow,
            "refused": c.refusals().map(|(l, n)| (l.to_string(), n.into())).collect::<serde_json::Map<String, serde_json::Value>>(),
            "http_requests": c.http_requests,
            "ws_opened": c.ws_opened,
            "ws_closed": c.ws_closed,
            "sse_opened": c.sse_opened,
            "sse_closed": c.sse_closed,
            "deflate": {
                "messages": c.deflated,
                "pushes": c.deflated_out,
            },
            "resumes": {
                "complete": c.resumes_complete,
                "incomplete": c.resumes_incomplete,
                "replayed": c.replayed,
            },
            "history": {
                "messages": self.history.messages,
                "bytes": self.history.bytes,
                "trimmed": Trim::ALL.iter().map(|t| (t.label().to_string(), self.history.trimmed(*t).into())).collect::<serde_json::Map<String, serde_json::Value>>(),
            },
            "uptime_seconds": self.uptime_seconds,
            "rss_bytes": self.rss_bytes,
            "queue": {
                "backend": self.queue_backend,
                "state": self.queue_state.as_str(),
                "reconnects": self.queue_reconnects,
                "dropped_behind": self.queue_backlog.dropped,
                "refused_behind": self.queue_backlog.refused,
                "received": self.queue_routing.received,
                "channels": self.queue_routing.channels,
                "joins_refused": self.queue_routing.refused,
            },
        });
        v.to_string().into_bytes()
    }
}

/// The process's resident memory, where the OS tells it cheaply.
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::server) fn snap(c: &Counters) -> Snapshot<'_> {
        Snapshot {
            counters: c,
            connections: 3,
            http_connections: 1,
            users: 2,
            queue_backend: "list",
            queue_state: QueueState::Up,
            queue_reconnects: 2,
            queue_backlog: crate::queue::BacklogCounts {
                dropped: 3,
                refused: 4,
            },
            queue_routing: crate::queue::RoutingCounts {
                received: 5,
                channels: 6,
                refused: 7,
            },
            uptime_seconds: 9,
            rss_bytes: Some(4096),
            history: HistoryStats {
                messages: 4,
                trimmed_size: 3,
                ..Default::default()
            },
        }
    }

    #[test]
    fn json_has_the_protocol_fields() {
        let c = Counters {
            messages_in: 5,
            expired: 1,
            ..Default::default()
        };
        let v: serde_json::Value = serde_json::from_slice(&snap(&c).to_json()).unwrap();
        for k in [
            "connections",
            "users",
            "messages_in",
            "messages_out",
            "expired",
            "dropped",
        ] {
            assert!(v[k].is_u64(), "{k}");
        }
        assert_eq!(
            (v["messages_in"].as_u64(), v["users"].as_u64()),
            (Some(5), Some(2))
        );
        assert_eq!(v["queue"]["backend"], "list");
        assert_eq!(v["queue"]["state"], "up");
        assert_eq!(v["queue"]["reconnects"], 2);
        assert_eq!(v["history"]["messages"], 4);
        assert_eq!(v["history"]["trimmed"]["size"], 3);
        assert_eq!(v["resumes"]["incomplete"], 0);
        assert_eq!(v["queue"]["dropped_behind"], 3);
        assert_eq!(v["queue"]["received"], 5);
        assert_eq!(v["queue"]["channels"], 6);
        assert_eq!(v["queue"]["joins_refused"], 7);
        assert_eq!(v["queue"]["refused_behind"], 4);
    }
}
