//! Counters and their two renderings: `/stats` (JSON) and `/metrics` (Prometheus).

use std::fmt::Write;

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
    fn refusals(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
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

/// A Prometheus metric: name, kind, help and value.
type Metric = (&'static str, &'static str, &'static str, u64);

impl Snapshot<'_> {
    /// The plain metrics of `/metrics`, in order.
    fn metrics(&self) -> Vec<Metric> {
        let c = self.counters;
        let mut m: Vec<Metric> = vec![
            (
                "connections",
                "gauge",
                "Open push connections (WebSocket and event stream).",
                self.connections as u64,
            ),
            (
                "http_connections",
                "gauge",
                "Open connections not upgraded to WebSocket.",
                self.http_connections as u64,
            ),
            ("users", "gauge", "Distinct uids online.", self.users as u64),
            (
                "messages_in_total",
                "counter",
                "Messages accepted by /send.",
                c.messages_in,
            ),
            (
                "messages_out_total",
                "counter",
                "Pushes handed to connections.",
                c.messages_out,
            ),
            (
                "messages_routed_total",
                "counter",
                "Messages taken from the queue and fanned out.",
                c.messages_routed,
            ),
            (
                "expired_total",
                "counter",
                "Messages expired before delivery.",
                c.expired,
            ),
            (
                "dropped_total",
                "counter",
                "Pushes discarded unsent.",
                c.dropped,
            ),
            (
                "evicted_slow_total",
                "counter",
                "Connections closed for a backlog over the limit.",
                c.evicted_slow,
            ),
            (
                "http_requests_total",
                "counter",
                "HTTP requests answered.",
                c.http_requests,
            ),
            (
                "ws_opened_total",
                "counter",
                "Push connections opened.",
                c.ws_opened,
            ),
            (
                "ws_closed_total",
                "counter",
                "Push connections closed.",
                c.ws_closed,
            ),
            (
                "sse_opened_total",
                "counter",
                "Event streams (/sse) opened.",
                c.sse_opened,
            ),
            (
                "sse_closed_total",
                "counter",
                "Event streams (/sse) closed.",
                c.sse_closed,
            ),
            (
                "deflated_total",
                "counter",
                "Messages compressed for permessage-deflate receivers (once per message).",
                c.deflated,
            ),
            (
                "deflated_out_total",
                "counter",
                "Pushes sent compressed (one per receiver).",
                c.deflated_out,
            ),
            (
                "resumes_complete_total",
                "counter",
                "Resumes (?since=) with nothing missing after since.",
                c.resumes_complete,
            ),
            (
                "resumes_incomplete_total",
                "counter",
                "Resumes answered complete:false.",
                c.resumes_incomplete,
            ),
            (
                "replayed_total",
                "counter",
                "Messages sent again by resumes.",
                c.replayed,
            ),
            (
                "history_messages",
                "gauge",
                "Messages retained for resumes on this node.",
                self.history.messages as u64,
            ),
            (
                "history_bytes",
                "gauge",
                "Bytes of messages retained for resumes on this node.",
                self.history.bytes as u64,
            ),
            (
                "uptime_seconds",
                "gauge",
                "Seconds since start.",
                self.uptime_seconds,
            ),
        ];
        if let Some(rss) = self.rss_bytes {
            m.push(("resident_memory_bytes", "gauge", "Resident set size.", rss));
        }
        m.push((
            "queue_reconnects_total",
            "counter",
            "Connections to the queue backend re-established after a loss.",
            self.queue_reconnects,
        ));
        m.push((
            "queue_dropped_behind_total",
            "counter",
            "Messages received from the queue backend and dropped because delivery was -queue-backlog behind.",
            self.queue_backlog.dropped,
        ));
        m.push((
            "queue_refused_behind_total",
            "counter",
            "/send batches refused because delivery was behind.",
            self.queue_backlog.refused,
        ));
        m.push((
            "queue_received_total",
            "counter",
            "Messages read from Redis by this node (pub/sub and catch-up, repeats included).",
            self.queue_routing.received,
        ));
        m.push((
            "queue_channels",
            "gauge",
            "Uids whose Redis channel this node is subscribed to.",
            self.queue_routing.channels as u64,
        ));
        m.push((
            "queue_joins_refused_total",
            "counter",
            "Connections closed with 1013 because -queue-interest subscription changes were waiting.",
            self.queue_routing.refused,
        ));
        m
    }

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

    pub fn to_prometheus(&self) -> Vec<u8> {
        let c = self.counters;
        let mut s = String::with_capacity(2048);
        for (name, kind, help, value) in self.metrics() {
            let _ = writeln!(
                s,
                "# HELP wspush_{name} {help}\n# TYPE wspush_{name} {kind}\nwspush_{name} {value}"
            );
        }
        let _ = writeln!(
            s,
            "# HELP wspush_refused_total Requests and connections turned away, by reason.\n# TYPE wspush_refused_total counter"
        );
        for (label, n) in c.refusals() {
            let _ = writeln!(s, "wspush_refused_total{{reason=\"{label}\"}} {n}");
        }
        let _ = writeln!(
            s,
            "# HELP wspush_history_trimmed_total Retained messages dropped before their time, by bound.\n# TYPE wspush_history_trimmed_total counter"
        );
        for t in Trim::ALL {
            let _ = writeln!(
                s,
                "wspush_history_trimmed_total{{reason=\"{}\"}} {}",
                t.label(),
                self.history.trimmed(t)
            );
        }
        let up = u64::from(self.queue_state == QueueState::Up);
        let _ = writeln!(
            s,
            "# HELP wspush_queue_up Whether the queue backend takes messages.\n# TYPE wspush_queue_up gauge\nwspush_queue_up{{backend=\"{}\",state=\"{}\"}} {up}",
            self.queue_backend,
            self.queue_state.as_str()
        );
        s.into_bytes()
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
mod tests {
    use super::*;

    fn snap(c: &Counters) -> Snapshot<'_> {
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

    #[test]
    fn prometheus_lines_parse() {
        let c = Counters {
            dropped: 7,
            ..Default::default()
        };
        let text = String::from_utf8(snap(&c).to_prometheus()).unwrap();
        assert!(text.contains("\nwspush_dropped_total 7\n"));
        assert!(text.contains("\nwspush_queue_reconnects_total 2\n"));
        assert!(text.contains("\nwspush_history_messages 4\n"));
        assert!(text.contains("wspush_history_trimmed_total{reason=\"size\"} 3\n"));
        assert!(text.contains("\nwspush_queue_dropped_behind_total 3\n"));
        assert!(text.contains("\nwspush_queue_received_total 5\n"));
        assert!(text.contains("\nwspush_queue_channels 6\n"));
        assert!(text.contains("\nwspush_queue_joins_refused_total 7\n"));
        assert!(text.contains("\nwspush_queue_refused_behind_total 4\n"));
        assert!(text.contains("wspush_queue_up{backend=\"list\",state=\"up\"} 1"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').unwrap();
            value.parse::<f64>().unwrap();
        }
    }
}
