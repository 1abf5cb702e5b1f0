//! The event-stream transport (`GET /sse`, Server-Sent Events) against the real
//! binary, read as curl would: a plain TCP socket, the response head, then events.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use sha2::Sha256;

/// One parsed event-stream block: comment lines, or an event's fields.
#[derive(Debug, Default, PartialEq, Eq)]
struct Block {
    comments: Vec<String>,
    id: Option<String>,
    event: Option<String>,
    /// The data lines joined with `\n`, as EventSource does.
    data: Option<String>,
}

impl Block {
    fn json(&self) -> Value {
        serde_json::from_str(self.data.as_deref().expect("an event with data")).unwrap()
    }
}

/// A raw event-stream client.
struct Sse {
    s: TcpStream,
    buf: Vec<u8>,
    head: Response,
}

impl Sse {
    /// Opens `/sse?query` with extra request header lines; panics unless it is a 200.
    fn open(server: &Server, query: &str, headers: &str) -> Sse {
        match Sse::try_open(server, query, headers) {
            Ok(sse) => sse,
            Err(r) => panic!("/sse refused: {} {}", r.status, r.text()),
        }
    }

    fn try_open(server: &Server, query: &str, headers: &str) -> Result<Sse, Response> {
        Sse::try_open_on(server.tcp(), query, headers)
    }

    fn try_open_on(mut s: TcpStream, query: &str, headers: &str) -> Result<Sse, Response> {
        write!(s, "GET /sse?{query} HTTP/1.1\r\nHost: x\r\n{headers}\r\n").unwrap();
        let head = read_response(&mut s);
        if head.status != 200 {
            return Err(head);
        }
        Ok(Sse {
            s,
            buf: Vec::new(),
            head,
        })
    }

    /// The next block, `None` once the stream has ended.
    fn block(&mut self) -> Option<Block> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let raw: Vec<u8> = self.buf.drain(..end + 2).collect();
                return Some(parse_block(&raw[..end]));
            }
            let mut chunk = [0u8; 4096];
            match self.s.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("read the event stream: {e}"),
            }
        }
    }

    /// The next event, skipping heartbeat comments.
    fn event(&mut self) -> Block {
        loop {
            let b = self.block().expect("the stream ended before an event");
            if b.data.is_some() {
                return b;
            }
        }
    }
}

fn parse_block(raw: &[u8]) -> Block {
    let text = std::str::from_utf8(raw).expect("UTF-8 events");
    let mut b = Block::default();
    for line in text.split('\n') {
        if let Some(c) = line.strip_prefix(':') {
            b.comments.push(c.trim_start().to_string());
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value).to_string();
        match field {
            "id" => b.id = Some(value),
            "event" => b.event = Some(value),
            "data" => {
                b.data = Some(match b.data.take() {
                    Some(d) => format!("{d}\n{value}"),
                    None => value,
                })
            }
            other => panic!("unexpected field {other:?} in {text:?}"),
        }
    }
    b
}

fn push_to(uid: &str, msg: &str) -> String {
    format!(r#"{{"topic":"uids","topic_ids":["{uid}"],"types":"notice","msg":{msg}}}"#)
}

#[test]
fn a_stream_carries_each_push_as_an_event_named_by_its_id() {
    let server = Server::start(&[]);
    let mut sse = Sse::open(&server, "uid=7", "");
    let h = |n| sse.head.header(n).unwrap_or_default().to_string();
    assert!(h("content-type").starts_with("text/event-stream"));
    assert_eq!(h("cache-control"), "no-cache");
    assert_eq!(h("x-accel-buffering"), "no");
    let mut ws = server.ws("uid=7");
    // msg with line breaks of its own: the event's data lines join back to it.
    server.send_ok(&push_to("7", "{\"a\":\n[1,\r\n2]}"));
    let e = sse.event();
    let frame = recv_text(&mut ws);
    assert_eq!(
        e.data.as_deref(),
        Some(frame.as_str()).map(|f| f.replace('\r', "")).as_deref()
    );
    let push = e.json();
    assert_eq!(push["msg"], serde_json::json!({"a": [1, 2]}));
    assert_eq!(e.id.as_deref(), push["id"].as_str());
    assert_eq!(e.event, None);
    let stats = wait_stats(&server, "the stream counted", |s| s["sse_opened"] == 1);
    assert_eq!(stats["connections"], 2, "{stats}");
    drop(sse);
    let stats = wait_stats(&server, "the stream's end", |s| s["sse_closed"] == 1);
    assert_eq!(stats["connections"], 1, "{stats}");
    let metrics = server.get("/metrics").text();
    assert!(metrics.contains("wspush_sse_opened_total 1"), "{metrics}");
    assert!(metrics.contains("wspush_sse_closed_total 1"), "{metrics}");
}

#[test]
fn a_type_filter_and_broadcasts_apply_as_on_ws() {
    let server = Server::start(&[]);
    let mut sse = Sse::open(&server, "uid=1&types=chat", "");
    server.send_ok(r#"{"topic":"uids","topic_ids":["1"],"types":"notice","msg":"no"}"#);
    server.send_ok(r#"{"topic":"all","types":"chat","msg":"yes"}"#);
    assert_eq!(sse.event().json()["msg"], "yes");
}

#[test]
fn a_reconnect_with_last_event_id_resumes_after_it() {
    let server = Server::start(&[]);
    let mut sse = Sse::open(&server, "uid=r", "");
    server.send_ok(&push_to("r", "1"));
    let first = sse.event();
    assert_eq!(first.json()["msg"], 1);
    drop(sse);
    wait_stats(&server, "the stream's end", |s| s["sse_closed"] == 1);
    server.send_ok(&push_to("r", "2"));
    server.send_ok(&push_to("r", "3"));
    // What a browser's EventSource sends when it reconnects by itself.
    let id = first.id.expect("an id");
    let mut sse = Sse::open(&server, "uid=r", &format!("Last-Event-ID: {id}\r\n"));
    let resumed = sse.event();
    assert_eq!(resumed.event.as_deref(), Some("resumed"));
    assert_eq!(resumed.json(), serde_json::json!({"complete": true}));
    let missed: Vec<Value> = (0..2).map(|_| sse.event().json()["msg"].clone()).collect();
    assert_eq!(missed, [2, 3]);
    server.send_ok(&push_to("r", "4"));
    assert_eq!(
        sse.event().json()["msg"],
        4,
        "live pushes follow the replay"
    );
}

#[test]
fn since_in_the_query_resumes_too() {
    let server = Server::start(&[]);
    server.send_ok(&push_to("q", "\"offline\""));
    let mut sse = Sse::open(&server, "uid=q&since=0", "");
    assert_eq!(sse.event().event.as_deref(), Some("resumed"));
    let e = sse.event();
    assert_eq!(e.json()["msg"], "offline");
    assert!(e.id.is_some());
}

#[test]
fn a_bad_last_event_id_is_400() {
    let server = Server::start(&[]);
    let r = Sse::try_open(&server, "uid=1", "Last-Event-ID: yesterday\r\n")
        .err()
        .expect("refused");
    assert_eq!(r.status, 400);
    assert!(r.error().contains("Last-Event-ID"), "{}", r.text());
}

#[test]
fn heartbeats_keep_a_silent_stream_open_past_the_idle_timeout() {
    let server = Server::start(&["-ping-interval=100ms", "-idle-timeout=300ms"]);
    let mut sse = Sse::open(&server, "uid=h", "");
    let start = Instant::now();
    let mut pings = 0;
    while start.elapsed() < Duration::from_millis(700) {
        let b = sse.block().expect("the stream stays open");
        assert_eq!(b.comments, ["ping"], "{b:?}");
        pings += 1;
    }
    assert!(pings >= 4, "{pings} heartbeats");
    server.send_ok(&push_to("h", "\"still here\""));
    assert_eq!(sse.event().json()["msg"], "still here");
}

#[test]
fn a_stream_that_does_not_read_is_evicted_and_others_go_on() {
    let server = Server::start(&["-max-backlog=65536", "-max-body=65280"]);
    let slow = raw_ws::tcp_small_rcvbuf(server.addr, 4096);
    let _slow = Sse::try_open_on(slow, "uid=s", "").expect("opened");
    let mut fast = Sse::open(&server, "uid=f", "");
    let text = "x".repeat(30_000);
    let push = format!(r#"{{"topic":"uids","topic_ids":["s","f"],"msg":"{text}"}}"#);
    let deadline = Instant::now() + WAIT;
    let mut sent = 0;
    while server.stats()["evicted_slow"] == 0 {
        assert!(Instant::now() < deadline, "never evicted");
        server.send_ok(&push);
        sent += 1;
        assert_eq!(
            fast.event().json()["msg"].as_str().map(str::len),
            Some(30_000)
        );
    }
    let stats = wait_stats(&server, "the slow stream closed", |s| s["sse_closed"] == 1);
    assert_eq!(stats["connections"], 1, "{stats}");
    assert!(sent > 2);
    server.send_ok(&push_to("f", "\"after\""));
    assert_eq!(fast.event().json()["msg"], "after");
}

fn token(secret: &str, uid: &str, expires: u64) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{uid}:{expires}").as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn the_same_checks_as_ws_refuse_a_stream() {
    let server = Server::start(&["-secret=k", "-origins=https://ok.example"]);
    let r = Sse::try_open(&server, "uid=1", "").err().expect("no token");
    assert_eq!(r.status, 401);
    let exp = unix_now() + 60;
    let q = format!("uid=1&expires={exp}&token={}", token("k", "1", exp));
    let r = Sse::try_open(&server, &format!("uid=1&expires={exp}&token=00"), "")
        .err()
        .expect("wrong token");
    assert_eq!(r.status, 401);
    let r = Sse::try_open(&server, &q, "Origin: https://evil.example\r\n")
        .err()
        .expect("wrong origin");
    assert_eq!(r.status, 403);
    let mut sse = Sse::open(&server, &q, "Origin: https://ok.example\r\n");
    server.send_ok(&push_to("1", "\"signed\""));
    assert_eq!(sse.event().json()["msg"], "signed");
    let stats = server.stats();
    assert_eq!(stats["refused"]["token"], 2, "{stats}");
    assert_eq!(stats["refused"]["origin"], 1, "{stats}");
}

#[test]
fn the_per_address_cap_counts_streams() {
    let server = Server::start(&["-max-per-ip=1", "-trusted-proxies="]);
    let _sse = Sse::open(&server, "uid=1", "");
    let r = Sse::try_open(&server, "uid=2", "")
        .err()
        .expect("over the cap");
    assert_eq!(r.status, 429);
}

#[test]
fn a_post_to_sse_is_405() {
    let server = Server::start(&[]);
    let r = server.raw(b"POST /sse HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(r.status, 405);
}

#[test]
fn a_shutdown_delivers_what_was_accepted_then_ends_the_stream() {
    let mut server = Server::start(&[]);
    let mut sse = Sse::open(&server, "uid=z", "");
    server.send_ok(&push_to("z", "\"last\""));
    server.request_shutdown();
    assert_eq!(sse.event().json()["msg"], "last");
    // The stream ends (no close message exists); heartbeats aside, nothing follows.
    while let Some(b) = sse.block() {
        assert!(b.data.is_none(), "unexpected event after shutdown: {b:?}");
    }
    drop(sse);
    assert!(server.wait_exit().success());
}

/// With the history in Redis a resume is read on a backend thread while live pushes
/// wait: an event stream resumes so too, on a node that never saw it, and gets the
/// replay as events with their ids, then the live pushes, each once.
#[test]
fn a_stream_resumes_from_redis_history_on_the_other_node() {
    let redis = RedisServer::start();
    let channel = format!("-queue-name={}", unique_name("sse-resume"));
    let flag = redis.queue_flag();
    let args = [flag.as_str(), channel.as_str()];
    let (a, b) = (Server::start(&args), Server::start(&args));
    wait_health(&a, 200);
    wait_health(&b, 200);
    let mut on_a = Sse::open(&a, "uid=7", "");
    let mut watcher = b.ws("uid=7");
    a.send_ok(&push_to("7", "\"seen\""));
    let seen = on_a.event();
    assert_eq!(seen.json()["msg"], "seen");
    assert_eq!(recv_json(&mut watcher)["msg"], "seen");
    drop(on_a);
    a.send_ok(&push_to("7", "\"missed 1\""));
    b.send_ok(&push_to("7", "\"missed 2\""));
    // B has them live, so they are in its past when the stream comes back.
    let ids: Vec<Value> = (0..2)
        .map(|_| recv_json(&mut watcher)["id"].clone())
        .collect();

    let id = seen.id.expect("an id");
    let mut on_b = Sse::open(&b, "uid=7", &format!("Last-Event-ID: {id}\r\n"));
    let resumed = on_b.event();
    assert_eq!(resumed.event.as_deref(), Some("resumed"));
    assert_eq!(resumed.json(), serde_json::json!({"complete": true}));
    let missed: Vec<Block> = (0..2).map(|_| on_b.event()).collect();
    let msgs: Vec<Value> = missed.iter().map(|e| e.json()["msg"].clone()).collect();
    assert_eq!(msgs, ["missed 1", "missed 2"]);
    let event_ids: Vec<Value> = missed.iter().map(|e| Value::from(e.id.clone())).collect();
    assert_eq!(event_ids, ids, "the replay is named by the same ids");
    a.send_ok(&push_to("7", "\"live\""));
    assert_eq!(on_b.event().json()["msg"], "live");
    let stats = b.stats();
    assert_eq!(stats["resumes"]["complete"], 1, "{stats}");
    assert_eq!(stats["resumes"]["replayed"], 2, "{stats}");
}
