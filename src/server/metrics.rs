//! `/metrics`: the counters and gauges of a [`Snapshot`] in the Prometheus text format.

use std::fmt::Write;

use super::stats::Snapshot;
use crate::history::Trim;
use crate::queue::QueueState;

/// A Prometheus metric type.
#[derive(Clone, Copy)]
enum Kind {
    Gauge,
    Counter,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
        }
    }
}

/// A plain metric: its value read from the snapshot, `None` where unknown.
struct Metric {
    name: &'static str,
    kind: Kind,
    help: &'static str,
    value: fn(&Snapshot) -> Option<u64>,
}

/// The plain metrics of `/metrics`, in order; the labelled ones follow them.
const METRICS: &[Metric] = &[
    Metric {
        name: "connections",
        kind: Kind::Gauge,
        help: "Open push connections (WebSocket and event stream).",
        value: |s| Some(s.connections as u64),
    },
    Metric {
        name: "http_connections",
        kind: Kind::Gauge,
        help: "Open connections not upgraded to WebSocket.",
        value: |s| Some(s.http_connections as u64),
    },
    Metric {
        name: "users",
        kind: Kind::Gauge,
        help: "Distinct uids online.",
        value: |s| Some(s.users as u64),
    },
    Metric {
        name: "messages_in_total",
        kind: Kind::Counter,
        help: "Messages accepted by /send.",
        value: |s| Some(s.counters.messages_in),
    },
    Metric {
        name: "messages_out_total",
        kind: Kind::Counter,
        help: "Pushes handed to connections.",
        value: |s| Some(s.counters.messages_out),
    },
    Metric {
        name: "messages_routed_total",
        kind: Kind::Counter,
        help: "Messages taken from the queue and fanned out.",
        value: |s| Some(s.counters.messages_routed),
    },
    Metric {
        name: "expired_total",
        kind: Kind::Counter,
        help: "Messages expired before delivery.",
        value: |s| Some(s.counters.expired),
    },
    Metric {
        name: "dropped_total",
        kind: Kind::Counter,
        help: "Pushes discarded unsent.",
        value: |s| Some(s.counters.dropped),
    },
    Metric {
        name: "evicted_slow_total",
        kind: Kind::Counter,
        help: "Connections closed for a backlog over the limit.",
        value: |s| Some(s.counters.evicted_slow),
    },
    Metric {
        name: "http_requests_total",
        kind: Kind::Counter,
        help: "HTTP requests answered.",
        value: |s| Some(s.counters.http_requests),
    },
    Metric {
        name: "ws_opened_total",
        kind: Kind::Counter,
        help: "Push connections opened.",
        value: |s| Some(s.counters.ws_opened),
    },
    Metric {
        name: "ws_closed_total",
        kind: Kind::Counter,
        help: "Push connections closed.",
        value: |s| Some(s.counters.ws_closed),
    },
    Metric {
        name: "sse_opened_total",
        kind: Kind::Counter,
        help: "Event streams (/sse) opened.",
        value: |s| Some(s.counters.sse_opened),
    },
    Metric {
        name: "sse_closed_total",
        kind: Kind::Counter,
        help: "Event streams (/sse) closed.",
        value: |s| Some(s.counters.sse_closed),
    },
    Metric {
        name: "deflated_total",
        kind: Kind::Counter,
        help: "Messages compressed for permessage-deflate receivers (once per message).",
        value: |s| Some(s.counters.deflated),
    },
    Metric {
        name: "deflated_out_total",
        kind: Kind::Counter,
        help: "Pushes sent compressed (one per receiver).",
        value: |s| Some(s.counters.deflated_out),
    },
    Metric {
        name: "resumes_complete_total",
        kind: Kind::Counter,
        help: "Resumes (?since=) with nothing missing after since.",
        value: |s| Some(s.counters.resumes_complete),
    },
    Metric {
        name: "resumes_incomplete_total",
        kind: Kind::Counter,
        help: "Resumes answered complete:false.",
        value: |s| Some(s.counters.resumes_incomplete),
    },
    Metric {
        name: "replayed_total",
        kind: Kind::Counter,
        help: "Messages sent again by resumes.",
        value: |s| Some(s.counters.replayed),
    },
    Metric {
        name: "history_messages",
        kind: Kind::Gauge,
        help: "Messages retained for resumes on this node.",
        value: |s| Some(s.history.messages as u64),
    },
    Metric {
        name: "history_bytes",
        kind: Kind::Gauge,
        help: "Bytes of messages retained for resumes on this node.",
        value: |s| Some(s.history.bytes as u64),
    },
    Metric {
        name: "uptime_seconds",
        kind: Kind::Gauge,
        help: "Seconds since start.",
        value: |s| Some(s.uptime_seconds),
    },
    Metric {
        name: "resident_memory_bytes",
        kind: Kind::Gauge,
        help: "Resident set size.",
        value: |s| s.rss_bytes,
    },
    Metric {
        name: "queue_reconnects_total",
        kind: Kind::Counter,
        help: "Connections to the queue backend re-established after a loss.",
        value: |s| Some(s.queue_reconnects),
    },
    Metric {
        name: "queue_dropped_behind_total",
        kind: Kind::Counter,
        help: "Messages received from the queue backend and dropped because delivery was -queue-backlog behind.",
        value: |s| Some(s.queue_backlog.dropped),
    },
    Metric {
        name: "queue_refused_behind_total",
        kind: Kind::Counter,
        help: "/send batches refused because delivery was behind.",
        value: |s| Some(s.queue_backlog.refused),
    },
    Metric {
        name: "queue_received_total",
        kind: Kind::Counter,
        help: "Messages read from Redis by this node (pub/sub and catch-up, repeats included).",
        value: |s| Some(s.queue_routing.received),
    },
    Metric {
        name: "queue_channels",
        kind: Kind::Gauge,
        help: "Uids whose Redis channel this node is subscribed to.",
        value: |s| Some(s.queue_routing.channels as u64),
    },
    Metric {
        name: "queue_joins_refused_total",
        kind: Kind::Counter,
        help: "Connections closed with 1013 because -queue-interest subscription changes were waiting.",
        value: |s| Some(s.queue_routing.refused),
    },
];

impl Snapshot<'_> {
    pub fn to_prometheus(&self) -> Vec<u8> {
        let c = self.counters;
        let mut s = String::with_capacity(2048);
        for m in METRICS {
            let Some(value) = (m.value)(self) else {
                continue;
            };
            let (name, help, kind) = (m.name, m.help, m.kind.as_str());
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

#[cfg(test)]
mod tests {
    use super::super::stats::{Counters, tests::snap};

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
