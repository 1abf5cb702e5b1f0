//! The HTTP side of wspush, end to end against the real binary: the one-port routing
//! table, `POST /send` (schema, batches, expiry, errors), HTTP/1.x framing (keep-alive,
//! HTTP/1.0, pipelining, chunked bodies, 100-continue), limits and timeouts, and the
//! status endpoints. See PROTOCOL.md "One port", "Publishing" and "Security and limits".

mod common;
use common::*;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

// ---- helpers ---------------------------------------------------------------------

/// A keep-alive `POST /send` request with `body`.
fn send_request(body: &str) -> String {
    format!(
        "POST /send HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Sends a message for uid "1" whose msg is `marker` and asserts that it is the very
/// next push `ws` receives: whatever was sent before it was never pushed.
fn assert_next_push_is_marker(server: &Server, ws: &mut Ws, marker: &str) {
    server.send_ok(&json!({"topic":"uids","topic_ids":["1"],"msg":marker}).to_string());
    let first = recv_json(ws);
    assert_eq!(
        first["msg"], marker,
        "a push arrived that should never have been sent: {first}"
    );
}

/// Same, for a connection without uid: the marker goes to `topic: "all"`.
fn assert_next_broadcast_is_marker(server: &Server, ws: &mut Ws, marker: &str) {
    server.send_ok(&json!({"topic":"all","msg":marker}).to_string());
    let first = recv_json(ws);
    assert_eq!(
        first["msg"], marker,
        "a push arrived that should never have been sent: {first}"
    );
}

/// An error response: the status, a JSON content type, and `{"ok":false,"error":"…"}`.
fn assert_json_error(r: &Response, status: u16) -> String {
    assert_eq!(r.status, status, "body: {}", r.text());
    let ct = r.header("content-type").unwrap_or_default();
    assert!(ct.contains("json"), "error Content-Type {ct:?}");
    let e = r.error();
    assert!(!e.is_empty(), "empty error text");
    e
}

/// Whether `field` occurs in `text` as a whole word (so "topic" is not found inside
/// "topic_ids", nor "time" inside "timeout").
fn names_field(text: &str, field: &str) -> bool {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    text.match_indices(field).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + field.len()..].chars().next();
        !before.is_some_and(word) && !after.is_some_and(word)
    })
}

/// Every body is refused with 400 and an error naming `field`; then nothing of them
/// reaches a connected client of uid "1".
fn assert_rejected(bodies: &[&str], field: &str) {
    let server = Server::start(&[]);
    let mut ws = server.ws("uid=1");
    for body in bodies {
        let r = server.send(body);
        let e = assert_json_error(&r, 400);
        assert!(
            names_field(&e, field),
            "error for {body} does not name {field:?}: {e:?}"
        );
    }
    assert_next_push_is_marker(&server, &mut ws, "after the rejected ones");
}

/// The peer closed the connection cleanly: the next read is end of stream.
fn assert_closed(s: &mut TcpStream) {
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => {}
        Ok(n) => panic!(
            "expected the connection closed, got more bytes: {:?}",
            String::from_utf8_lossy(&b[..n])
        ),
        Err(e) => panic!("expected the connection closed cleanly, got {e}"),
    }
}

/// Reads a response head only (for HEAD requests, whose Content-Length has no body).
fn read_head(s: &mut TcpStream) -> (u16, Vec<(String, String)>) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).expect("read head");
        assert_eq!(n, 1, "closed inside the head: {head:?}");
        head.push(byte[0]);
    }
    let text = String::from_utf8(head).unwrap();
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_string(), v.trim().to_string())
        })
        .collect();
    (status, headers)
}

/// Closes a push connection with the close handshake and waits for the server's side.
fn close_ws(mut ws: Ws) {
    ws.close(None).expect("send close");
    loop {
        match ws.read() {
            Ok(_) => continue,
            Err(_) => return,
        }
    }
}

/// A valid `/send` body for uid "1" of exactly `len` bytes.
fn body_of_len(len: usize) -> String {
    let empty = r#"{"topic":"uids","topic_ids":["1"],"msg":""}"#;
    assert!(len >= empty.len());
    let pad = "x".repeat(len - empty.len());
    let body = format!(r#"{{"topic":"uids","topic_ids":["1"],"msg":"{pad}"}}"#);
    assert_eq!(body.len(), len);
    body
}

/// Prometheus text: every sample line is `name{labels} number`. Returns the samples.
fn parse_prometheus(text: &str) -> Vec<(String, String, f64)> {
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("value is not a number in {line:?}"));
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let labels = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels in {line:?}"));
                for pair in labels.split(',').filter(|p| !p.is_empty()) {
                    let (k, v) = pair
                        .split_once('=')
                        .unwrap_or_else(|| panic!("bad label {pair:?} in {line:?}"));
                    assert!(
                        !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                        "bad label name in {line:?}"
                    );
                    assert!(
                        v.len() >= 2 && v.starts_with('"') && v.ends_with('"'),
                        "unquoted label value in {line:?}"
                    );
                }
                (name, labels)
            }
            None => (series, ""),
        };
        assert!(
            !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        samples.push((name.to_string(), labels.to_string(), value));
    }
    samples
}

// ---- POST /send: what gets pushed -------------------------------------------------

#[test]
fn send_single_object_answers_accepted_1_and_the_push_arrives() {
    let server = Server::start(&[]);
    let mut ws = server.ws("uid=1");
    let r = server.send(r#"{"topic":"uids","topic_ids":["1"],"types":"chat","msg":"hello"}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"ok":true,"accepted":1}));
    let m = recv_json(&mut ws);
    assert_eq!((&m["types"], &m["msg"]), (&json!("chat"), &json!("hello")));
}

#[test]
fn send_batch_answers_accepted_n_and_every_element_is_pushed_to_its_targets() {
    let server = Server::start(&[]);
    let mut one = server.ws("uid=1");
    let mut two = server.ws("uid=2");
    let mut anon = server.ws("");
    let r = server.send(
        r#"[{"topic":"uids","topic_ids":["1"],"msg":"to one"},
            {"topic":"uids","topic_ids":["2"],"msg":"to two"},
            {"topic":"all","msg":"to all"}]"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"ok":true,"accepted":3}));

    let mut got_one = vec![
        recv_json(&mut one)["msg"].clone(),
        recv_json(&mut one)["msg"].clone(),
    ];
    got_one.sort_by_key(|v| v.to_string());
    assert_eq!(got_one, [json!("to all"), json!("to one")]);
    let mut got_two = vec![
        recv_json(&mut two)["msg"].clone(),
        recv_json(&mut two)["msg"].clone(),
    ];
    got_two.sort_by_key(|v| v.to_string());
    assert_eq!(got_two, [json!("to all"), json!("to two")]);
    assert_eq!(recv_json(&mut anon)["msg"], "to all");
    // uid 1 got nothing of uid 2's.
    assert_next_push_is_marker(&server, &mut one, "one marker");
    // Nothing addressed to a uid reached the connection without one.
    assert_next_broadcast_is_marker(&server, &mut anon, "anon marker");
}

#[test]
fn topic_ids_may_mix_strings_and_integers() {
    let server = Server::start(&[]);
    let mut one = server.ws("uid=1");
    let mut two = server.ws("uid=2");
    let mut three = server.ws("uid=3");
    server.send_ok(r#"{"topic":"uids","topic_ids":["1",2],"msg":"mixed"}"#);
    assert_eq!(recv_json(&mut one)["msg"], "mixed");
    assert_eq!(recv_json(&mut two)["msg"], "mixed");
    // uid 3 was not named: the first thing it gets is a later message of its own.
    server.send_ok(r#"{"topic":"uids","topic_ids":[3],"msg":"for three"}"#);
    assert_eq!(recv_json(&mut three)["msg"], "for three");
}

#[test]
fn types_defaults_to_notice_and_a_given_types_is_kept() {
    let server = Server::start(&[]);
    let mut ws = server.ws("uid=1");
    server.send_ok(r#"{"topic":"uids","topic_ids":["1"],"msg":"a"}"#);
    let m = recv_json(&mut ws);
    assert_eq!((&m["types"], &m["msg"]), (&json!("notice"), &json!("a")));
    server.send_ok(r#"{"topic":"uids","topic_ids":["1"],"types":"order.paid","msg":"b"}"#);
    let m = recv_json(&mut ws);
    assert_eq!(
        (&m["types"], &m["msg"]),
        (&json!("order.paid"), &json!("b"))
    );
}

#[test]
fn msg_is_passed_through_byte_for_byte() {
    let server = Server::start(&[]);
    let mut ws = server.ws("uid=1");
    let msgs = [
        r#"{"a": 1.50, "b" : [ ]}"#,
        r#""caf\u00e9 \"quoted\" \/ slash""#,
        r#"[1e3, -0.0, 12345678901234567890, true, null]"#,
        "null",
    ];
    for msg in msgs {
        server.send_ok(&format!(
            r#"{{"topic":"uids","topic_ids":["1"],"msg":{msg}}}"#
        ));
        let text = recv_text(&mut ws);
        assert!(
            text.contains(msg),
            "msg {msg} not found verbatim in the frame {text}"
        );
        let frame: Value = serde_json::from_str(&text).expect("the frame is JSON");
        let sent: Value = serde_json::from_str(msg).unwrap();
        assert_eq!(frame["msg"], sent, "{text}");
        assert!(frame.as_object().unwrap().contains_key("msg"), "{text}");
    }
}

#[test]
fn default_time_is_the_current_local_time_as_yyyy_mm_dd_hh_mm_ss() {
    let server = Server::start(&[]);
    let mut ws = server.ws("uid=1");
    let before = chrono::Local::now().naive_local();
    server.send_ok(r#"{"topic":"uids","topic_ids":["1"],"msg":1}"#);
    let after = chrono::Local::now().naive_local();
    let m = recv_json(&mut ws);
    let time = m["time"].as_str().expect("time is a string");
    let shape_ok = time.len() == 19
        && time.char_indices().all(|(i, c)| match i {
            4 | 7 => c == '-',
            10 => c == ' ',
            13 | 16 => c == ':',
            _ => c.is_ascii_digit(),
        });
    assert!(shape_ok, "time {time:?} is not YYYY-MM-DD HH:MM:SS");
    let t = chrono::NaiveDateTime::parse_from_str(time, "%Y-%m-%d %H:%M:%S")
        .unwrap_or_else(|e| panic!("{time:?}: {e}"));
    let slack = chrono::Duration::seconds(2);
    assert!(
        t >= before - slack && t <= after + slack,
        "time {time} is not the local time now ({before} .. {after})"
    );
}

#[test]
fn a_given_time_is_kept() {
    let server = Server::start(&[]);
    let mut ws = server.ws("uid=1");
    server.send_ok(r#"{"topic":"uids","topic_ids":["1"],"msg":1,"time":"2001-02-03 04:05:06"}"#);
    assert_eq!(recv_json(&mut ws)["time"], "2001-02-03 04:05:06");
    server.send_ok(r#"{"topic":"uids","topic_ids":["1"],"msg":2,"time":"yesterday"}"#);
    assert_eq!(recv_json(&mut ws)["time"], "yesterday");
}

// ---- POST /send: expiry -----------------------------------------------------------

#[test]
fn an_already_expired_message_is_accepted_counted_as_expired_and_never_pushed() {
    let server = Server::start(&[]);
    let mut ws = server.ws("uid=1");
    let expired_before = server.stats()["expired"].as_u64().unwrap();
    let past = unix_now() - 60;
    let r = server.send(&format!(
        r#"{{"topic":"uids","topic_ids":["1"],"msg":"stale","timeout":{past}}}"#
    ));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"ok":true,"accepted":1}));
    // In a batch too: the expired element still counts as accepted.
    let r = server.send(&format!(
        r#"[{{"topic":"uids","topic_ids":["1"],"msg":"stale 2","timeout":1}},
            {{"topic":"all","msg":"stale 3","timeout":{past}}}]"#
    ));
    assert_eq!(r.json(), json!({"ok":true,"accepted":2}));
    wait_stats(&server, "3 expired", |s| {
        s["expired"].as_u64() == Some(expired_before + 3)
    });
    assert_next_push_is_marker(&server, &mut ws, "fresh");
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn timeout_zero_and_a_future_timeout_are_delivered() {
    let server = Server::start(&[]);
    let mut ws = server.ws("uid=1");
    server.send_ok(r#"{"topic":"uids","topic_ids":["1"],"msg":"zero","timeout":0}"#);
    assert_eq!(recv_json(&mut ws)["msg"], "zero");
    let future = unix_now() + 3600;
    server.send_ok(&format!(
        r#"{{"topic":"uids","topic_ids":["1"],"msg":"future","timeout":{future}}}"#
    ));
    assert_eq!(recv_json(&mut ws)["msg"], "future");
    assert_eq!(server.stats()["expired"], 0);
}

// ---- POST /send: 400s -------------------------------------------------------------

#[test]
fn invalid_json_is_400_saying_json() {
    let server = Server::start(&[]);
    let mut ws = server.ws("uid=1");
    for body in [
        "not json",
        r#"{"topic":"uids","topic_ids":["1"],"msg":"x""#,
        r#"{"topic":"uids","topic_ids":["1"],"msg":"x"} trailing"#,
        "",
    ] {
        let e = assert_json_error(&server.send(body), 400);
        assert!(
            e.to_ascii_lowercase().contains("json"),
            "error for {body:?} does not say JSON: {e:?}"
        );
    }
    assert_next_push_is_marker(&server, &mut ws, "after bad json");
}

#[test]
fn missing_topic_is_400_naming_topic() {
    assert_rejected(
        &[
            r#"{"topic_ids":["1"],"msg":"x"}"#,
            r#"{"topic":null,"topic_ids":["1"],"msg":"x"}"#,
        ],
        "topic",
    );
}

#[test]
fn unknown_topic_is_400_naming_topic() {
    assert_rejected(
        &[
            r#"{"topic":"uid","topic_ids":["1"],"msg":"x"}"#,
            r#"{"topic":"ALL","msg":"x"}"#,
            r#"{"topic":7,"topic_ids":["1"],"msg":"x"}"#,
        ],
        "topic",
    );
}

#[test]
fn missing_empty_or_wrong_topic_ids_is_400_naming_topic_ids() {
    assert_rejected(
        &[
            r#"{"topic":"uids","msg":"x"}"#,
            r#"{"topic":"uids","topic_ids":[],"msg":"x"}"#,
            r#"{"topic":"uids","topic_ids":"1","msg":"x"}"#,
            r#"{"topic":"uids","topic_ids":1,"msg":"x"}"#,
            r#"{"topic":"uids","topic_ids":["1",1.5],"msg":"x"}"#,
            r#"{"topic":"uids","topic_ids":["1",true],"msg":"x"}"#,
            r#"{"topic":"uids","topic_ids":["1",{"id":2}],"msg":"x"}"#,
            r#"{"topic":"uids","topic_ids":["1",""],"msg":"x"}"#,
        ],
        "topic_ids",
    );
}

#[test]
fn bad_types_is_400_naming_types() {
    assert_rejected(
        &[
            r#"{"topic":"uids","topic_ids":["1"],"types":"","msg":"x"}"#,
            r#"{"topic":"uids","topic_ids":["1"],"types":"a,b","msg":"x"}"#,
            r#"{"topic":"uids","topic_ids":["1"],"types":3,"msg":"x"}"#,
            r#"{"topic":"uids","topic_ids":["1"],"types":["a"],"msg":"x"}"#,
        ],
        "types",
    );
}

#[test]
fn missing_msg_is_400_naming_msg() {
    assert_rejected(
        &[
            r#"{"topic":"uids","topic_ids":["1"]}"#,
            r#"{"topic":"all","types":"chat"}"#,
        ],
        "msg",
    );
}

#[test]
fn bad_timeout_is_400_naming_timeout() {
    assert_rejected(
        &[
            r#"{"topic":"uids","topic_ids":["1"],"msg":"x","timeout":-1}"#,
            r#"{"topic":"uids","topic_ids":["1"],"msg":"x","timeout":"soon"}"#,
            r#"{"topic":"uids","topic_ids":["1"],"msg":"x","timeout":1.5}"#,
            r#"{"topic":"uids","topic_ids":["1"],"msg":"x","timeout":[1]}"#,
        ],
        "timeout",
    );
}

#[test]
fn bad_time_is_400_naming_time() {
    assert_rejected(
        &[
            r#"{"topic":"uids","topic_ids":["1"],"msg":"x","time":5}"#,
            r#"{"topic":"uids","topic_ids":["1"],"msg":"x","time":{"at":"now"}}"#,
        ],
        "time",
    );
}

#[test]
fn a_batch_with_one_bad_element_is_400_and_nothing_of_it_is_pushed() {
    let server = Server::start(&[]);
    let mut ws = server.ws("uid=1");
    let mut anon = server.ws("");
    let in_before = server.stats()["messages_in"].as_u64().unwrap();
    let r = server.send(
        r#"[{"topic":"uids","topic_ids":["1"],"msg":"good 0"},
            {"topic":"all","msg":"good 1"},
            {"topic":"uids","topic_ids":["1"],"types":"a,b","msg":"bad 2"},
            {"topic":"uids","topic_ids":["1"],"msg":"good 3"}]"#,
    );
    let e = assert_json_error(&r, 400);
    assert!(names_field(&e, "types"), "error does not name types: {e:?}");
    // Same for an element that is not an object at all.
    let r = server.send(r#"[{"topic":"all","msg":"good"}, 42]"#);
    assert_json_error(&r, 400);
    assert_eq!(server.stats()["messages_in"].as_u64(), Some(in_before));
    assert_next_push_is_marker(&server, &mut ws, "after the bad batch");
    assert_next_broadcast_is_marker(&server, &mut anon, "after the bad batch, all");
}

// ---- limits -----------------------------------------------------------------------

#[test]
fn a_body_over_max_body_with_content_length_is_413_and_the_limit_itself_is_fine() {
    let server = Server::start(&["-max-body=1000"]);
    let mut ws = server.ws("uid=1");
    let at_limit = body_of_len(1000);
    server.send_ok(&at_limit);
    let sent: Value = serde_json::from_str(&at_limit).unwrap();
    assert_eq!(recv_json(&mut ws)["msg"], sent["msg"]);

    let over = body_of_len(1001);
    let mut s = server.tcp();
    s.write_all(send_request(&over).as_bytes()).unwrap();
    assert_json_error(&read_response(&mut s), 413);
    // A client that sends its whole large body anyway still reads the 413.
    let huge = body_of_len(300_000);
    let mut s = server.tcp();
    s.write_all(send_request(&huge).as_bytes()).unwrap();
    assert_json_error(&read_response(&mut s), 413);
    // One that asks first is refused at once, without a 100 Continue.
    let mut s = server.tcp();
    s.write_all(
        b"POST /send HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n",
    )
    .unwrap();
    assert_json_error(&read_response(&mut s), 413);
    // The too-large messages were not published.
    assert_next_push_is_marker(&server, &mut ws, "after 413");
}

#[test]
fn a_chunked_body_over_max_body_is_413() {
    let server = Server::start(&["-max-body=1000"]);
    let mut ws = server.ws("uid=1");
    // 1200 bytes of valid JSON in three chunks, each under the limit on its own.
    let body = body_of_len(1200);
    let mut req =
        b"POST /send HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    for part in body.as_bytes().chunks(400) {
        req.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        req.extend_from_slice(part);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let mut s = server.tcp();
    s.write_all(&req).unwrap();
    assert_json_error(&read_response(&mut s), 413);
    assert_next_push_is_marker(&server, &mut ws, "after chunked 413");
}

#[test]
fn request_headers_over_8_kib_are_431_and_smaller_ones_are_fine() {
    let server = Server::start(&[]);
    let request = |pad: usize| {
        format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
            "p".repeat(pad)
        )
    };
    let fine = request(7 * 1024 + 512);
    assert!(fine.len() < 8 * 1024);
    let r = server.raw(fine.as_bytes());
    assert_eq!((r.status, r.text()), (200, "ok".to_string()));

    let big = request(9 * 1024);
    let r = server.raw(big.as_bytes());
    assert_json_error(&r, 431);
    // Also when the headers are many small ones.
    let many: String = (0..300)
        .map(|i| format!("X-H{i}: {}\r\n", "v".repeat(30)))
        .collect();
    let r = server.raw(format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes());
    assert_json_error(&r, 431);
}

#[test]
fn unknown_paths_are_404_with_a_json_body() {
    let server = Server::start(&[]);
    for req in [
        "GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "GET /send/extra HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    ] {
        assert_json_error(&server.raw(req.as_bytes()), 404);
    }
}

#[test]
fn a_wrong_method_on_a_known_path_is_405_with_an_allow_header() {
    let server = Server::start(&[]);
    for (method, path, allowed) in [
        ("GET", "/send", "POST"),
        ("PUT", "/send", "POST"),
        ("DELETE", "/send", "POST"),
        ("POST", "/ws", "GET"),
        ("POST", "/stats", "GET"),
        ("DELETE", "/stats", "GET"),
        ("POST", "/healthz", "GET"),
        ("POST", "/metrics", "GET"),
    ] {
        let r = server.raw(
            format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        );
        assert_json_error(&r, 405);
        let allow = r
            .header("allow")
            .unwrap_or_else(|| panic!("{method} {path}: 405 without Allow"));
        let methods: Vec<&str> = allow.split(',').map(str::trim).collect();
        assert!(
            methods.contains(&allowed),
            "{method} {path}: Allow {allow:?} lacks {allowed}"
        );
        assert!(
            !methods.contains(&method),
            "{method} {path}: Allow {allow:?} lists the refused method"
        );
    }
}

// ---- HTTP/1.0 (ApacheBench) -------------------------------------------------------

const AB_BODY: &str = r#"{"topic":"all","types":"notice","msg":"hello from ab"}"#;

fn ab_request(server: &Server, keep_alive: bool) -> String {
    format!(
        "POST /send HTTP/1.0\r\n{}Content-length: {}\r\nContent-type: application/json\r\nHost: {}\r\nUser-Agent: ApacheBench/2.3\r\nAccept: */*\r\n\r\n{AB_BODY}",
        if keep_alive {
            "Connection: Keep-Alive\r\n"
        } else {
            ""
        },
        AB_BODY.len(),
        server.addr
    )
}

#[test]
fn apachebench_http10_post_is_answered_then_the_connection_is_closed() {
    let server = Server::start(&[]);
    let mut ws = server.ws("");
    let mut s = server.tcp();
    s.write_all(ab_request(&server, false).as_bytes()).unwrap();
    let r = read_response(&mut s);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"ok":true,"accepted":1}));
    assert_closed(&mut s);
    assert_eq!(recv_json(&mut ws)["msg"], "hello from ab");
}

#[test]
fn http10_with_keep_alive_stays_open_for_another_request() {
    let server = Server::start(&[]);
    let mut ws = server.ws("");
    let mut s = server.tcp();
    for _ in 0..3 {
        s.write_all(ab_request(&server, true).as_bytes()).unwrap();
        let r = read_response(&mut s);
        assert_eq!(r.status, 200, "{}", r.text());
        // An HTTP/1.0 client only reuses the connection if the response says so.
        let conn = r.header("connection").unwrap_or_default();
        assert!(
            conn.eq_ignore_ascii_case("keep-alive"),
            "Connection: {conn:?}"
        );
        assert_eq!(recv_json(&mut ws)["msg"], "hello from ab");
    }
}

// ---- HTTP/1.1 framing -------------------------------------------------------------

#[test]
fn http11_keep_alive_serves_several_requests_on_one_connection() {
    let server = Server::start(&[]);
    let mut ws = server.ws("uid=1");
    let mut s = server.tcp();
    for i in 0..3 {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let r = read_response(&mut s);
        assert_eq!((r.status, r.text()), (200, "ok".to_string()));
        let body = format!(r#"{{"topic":"uids","topic_ids":["1"],"msg":{i}}}"#);
        s.write_all(send_request(&body).as_bytes()).unwrap();
        let r = read_response(&mut s);
        assert_eq!(r.json(), json!({"ok":true,"accepted":1}));
        assert_eq!(recv_json(&mut ws)["msg"], i);
        s.write_all(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let r = read_response(&mut s);
        assert_eq!(r.json()["messages_in"], i + 1);
    }
}

#[test]
fn pipelined_requests_get_their_responses_in_order() {
    let server = Server::start(&[]);
    let mut ws = server.ws("uid=1");
    let batch = |n: usize, from: usize| {
        let items: Vec<String> = (from..from + n)
            .map(|i| format!(r#"{{"topic":"uids","topic_ids":["1"],"msg":{i}}}"#))
            .collect();
        format!("[{}]", items.join(","))
    };
    let all = [batch(1, 0), batch(3, 1), batch(2, 4)]
        .map(|b| send_request(&b))
        .concat();
    let mut s = server.tcp();
    s.write_all(all.as_bytes()).unwrap();
    for n in [1, 3, 2] {
        let r = read_response(&mut s);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json(), json!({"ok":true,"accepted":n}));
    }
    let mut got: Vec<u64> = (0..6)
        .map(|_| recv_json(&mut ws)["msg"].as_u64().unwrap())
        .collect();
    got.sort_unstable();
    assert_eq!(got, [0, 1, 2, 3, 4, 5]);

    // Different kinds of request pipelined: each answer matches its request.
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\n\r\nGET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let r = read_response(&mut s);
    assert_eq!((r.status, r.text()), (200, "ok".to_string()));
    assert_json_error(&read_response(&mut s), 404);
    let r = read_response(&mut s);
    assert_eq!(r.json()["messages_in"], 6);
    assert_closed(&mut s);
}

#[test]
fn a_request_written_one_byte_at_a_time_is_served() {
    let server = Server::start(&[]);
    let mut ws = server.ws("uid=1");
    let mut s = server.tcp();
    s.set_nodelay(true).unwrap();
    let req = send_request(r#"{"topic":"uids","topic_ids":["1"],"msg":"trickle"}"#);
    for b in req.as_bytes() {
        s.write_all(std::slice::from_ref(b)).unwrap();
        s.flush().unwrap();
    }
    let r = read_response(&mut s);
    assert_eq!(r.json(), json!({"ok":true,"accepted":1}));
    assert_eq!(recv_json(&mut ws)["msg"], "trickle");
}

#[test]
fn a_chunked_request_body_is_decoded_and_published() {
    let server = Server::start(&[]);
    let mut ws = server.ws("uid=1");
    let body = r#"{"topic":"uids","topic_ids":["1"],"msg":{"chunked": "yes, 1.50"}}"#;
    let (a, rest) = body.split_at(10);
    let (b, c) = rest.split_at(30);
    let req = format!(
        "POST /send HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{:X}\r\n{a}\r\n{:x};ext=1\r\n{b}\r\n{:x}\r\n{c}\r\n0\r\n\r\n",
        a.len(),
        b.len(),
        c.len()
    );
    let mut s = server.tcp();
    s.write_all(req.as_bytes()).unwrap();
    let r = read_response(&mut s);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"ok":true,"accepted":1}));
    assert!(recv_text(&mut ws).contains(r#"{"chunked": "yes, 1.50"}"#));
    // The connection stays usable after a chunked request.
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut s).status, 200);
}

#[test]
fn expect_100_continue_gets_100_before_the_body_then_200() {
    let server = Server::start(&[]);
    let mut ws = server.ws("uid=1");
    let body = r#"{"topic":"uids","topic_ids":["1"],"msg":"continued"}"#;
    let mut s = server.tcp();
    s.write_all(
        format!(
            "POST /send HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    // No body sent yet: this read returns only if the server sends the interim response.
    let interim = read_response(&mut s);
    assert_eq!(interim.status, 100);
    assert!(interim.body.is_empty());
    s.write_all(body.as_bytes()).unwrap();
    let r = read_response(&mut s);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"ok":true,"accepted":1}));
    assert_eq!(recv_json(&mut ws)["msg"], "continued");
}

#[test]
fn connection_close_closes_the_connection_after_the_response() {
    let server = Server::start(&[]);
    let mut s = server.tcp();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let r = read_response(&mut s);
    assert_eq!((r.status, r.text()), (200, "ok".to_string()));
    assert_closed(&mut s);

    let mut s = server.tcp();
    s.write_all(
        send_request(r#"{"topic":"all","msg":1}"#)
            .replace("Host: x\r\n", "Host: x\r\nConnection: close\r\n")
            .as_bytes(),
    )
    .unwrap();
    assert_eq!(read_response(&mut s).status, 200);
    assert_closed(&mut s);
}

// ---- request timeout --------------------------------------------------------------

#[test]
fn a_request_head_stalled_past_the_request_timeout_gets_408_and_is_closed() {
    let server = Server::start(&["-request-timeout=1s"]);
    let mut s = server.tcp();
    let start = Instant::now();
    s.write_all(b"POST /send HTTP/1.1\r\nHost: x\r\nContent-Le")
        .unwrap();
    // Blocks until the server gives up on the request.
    let r = read_response(&mut s);
    assert_json_error(&r, 408);
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "408 after only {:?}",
        start.elapsed()
    );
    assert_closed(&mut s);
}

#[test]
fn a_request_body_stalled_past_the_request_timeout_gets_408_and_is_closed() {
    let server = Server::start(&["-request-timeout=1s"]);
    let mut ws = server.ws("uid=1");
    let body = r#"{"topic":"uids","topic_ids":["1"],"msg":"never finished"}"#;
    let req = send_request(body);
    let mut s = server.tcp();
    let start = Instant::now();
    s.write_all(&req.as_bytes()[..req.len() - 10]).unwrap();
    let r = read_response(&mut s);
    assert_json_error(&r, 408);
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "408 after only {:?}",
        start.elapsed()
    );
    assert_closed(&mut s);
    assert_next_push_is_marker(&server, &mut ws, "after the stalled body");
}

// ---- max connections --------------------------------------------------------------

#[test]
fn over_max_connections_a_connection_gets_503_until_one_closes() {
    let server = Server::start(&["-max-connections=3"]);
    let a = server.ws("uid=1");
    let mut b = server.ws("uid=2");
    let _c = server.ws("uid=3");

    // The fourth connection is refused with a JSON 503, before it sends anything...
    let mut s = server.tcp();
    assert_json_error(&read_response(&mut s), 503);
    assert_closed(&mut s);
    // The refused client lingers: it must not keep a freed slot from the next client.
    let _lingering = s;

    // ...and when it sends a request straight away.
    assert_json_error(&server.get("/healthz"), 503);

    close_ws(a);
    let deadline = Instant::now() + WAIT;
    loop {
        match try_get_status(&server, "/healthz") {
            Some(200) => break,
            other => assert!(
                Instant::now() < deadline,
                "still refused after a connection closed: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Served again, fully: a /send reaches a remaining push connection. The
    // /healthz connection above may hold its slot until its FIN is read, so the
    // /send may be refused meanwhile; a refused one published nothing.
    let body = r#"{"topic":"uids","topic_ids":["2"],"msg":"room again"}"#;
    loop {
        let r = server.send(body);
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(Instant::now() < deadline, "/send still refused");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(recv_json(&mut b)["msg"], "room again");
}

// ---- status endpoints -------------------------------------------------------------

#[test]
fn healthz_is_200_ok() {
    let server = Server::start(&[]);
    let r = server.get("/healthz");
    assert_eq!((r.status, r.text()), (200, "ok".to_string()));
}

#[test]
fn stats_reports_connections_distinct_users_counters_and_the_queue() {
    let server = Server::start(&[]);
    let s = server.stats();
    for k in [
        "connections",
        "users",
        "messages_in",
        "messages_out",
        "expired",
        "dropped",
    ] {
        assert!(s[k].is_u64(), "/stats lacks a number {k}: {s}");
    }
    assert_eq!(s["queue"]["backend"], "list", "{s}");
    assert_eq!(s["queue"]["state"], "up", "{s}");
    assert_eq!(
        (s["connections"].as_u64(), s["users"].as_u64()),
        (Some(0), Some(0))
    );

    let mut one_a = server.ws("uid=1");
    let mut one_b = server.ws("uid=1");
    let mut two = server.ws("uid=2");
    let s = server.stats();
    assert_eq!(
        (s["connections"].as_u64(), s["users"].as_u64()),
        (Some(3), Some(2)),
        "{s}"
    );

    server.send_ok(r#"[{"topic":"uids","topic_ids":["1"],"msg":"x"},{"topic":"all","msg":"y"}]"#);
    for ws in [&mut one_a, &mut one_b] {
        let mut got = vec![recv_json(ws)["msg"].clone(), recv_json(ws)["msg"].clone()];
        got.sort_by_key(|v| v.to_string());
        assert_eq!(got, [json!("x"), json!("y")]);
    }
    assert_eq!(recv_json(&mut two)["msg"], "y");
    server.send_ok(r#"{"topic":"all","msg":"late","timeout":1}"#);
    let s = wait_stats(&server, "one expired", |s| s["expired"] == 1);
    assert_eq!(s["messages_in"], 3, "{s}");
    assert_eq!(s["messages_out"], 5, "five pushes were received: {s}");
    assert_eq!(s["dropped"], 0, "{s}");

    close_ws(one_a);
    let s = wait_stats(&server, "one connection fewer", |s| s["connections"] == 2);
    assert_eq!(s["users"], 2, "uid 1 still has a connection: {s}");
    close_ws(two);
    wait_stats(&server, "uid 2 gone", |s| {
        s["connections"] == 1 && s["users"] == 1
    });
    sync(&mut one_b);
}

#[test]
fn metrics_are_prometheus_text_with_the_same_figures_as_stats() {
    let server = Server::start(&[]);
    let _one_a = server.ws("uid=1");
    let mut one_b = server.ws("uid=1");
    let _two = server.ws("uid=2");
    server.send_ok(r#"{"topic":"uids","topic_ids":["1"],"msg":"m"}"#);
    server.send_ok(r#"{"topic":"all","msg":"gone","timeout":1}"#);
    assert_eq!(recv_json(&mut one_b)["msg"], "m");
    let stats = wait_stats(&server, "pushes counted", |s| {
        s["messages_out"] == 2 && s["expired"] == 1
    });

    let r = server.get("/metrics");
    assert_eq!(r.status, 200);
    let ct = r.header("content-type").unwrap_or_default();
    assert!(ct.starts_with("text/plain"), "Content-Type {ct:?}");
    let samples = parse_prometheus(&r.text());
    let value = |key: &str| {
        samples
            .iter()
            .find(|(name, _, _)| {
                name.strip_prefix("wspush_")
                    .is_some_and(|n| n == key || n.strip_suffix("_total") == Some(key))
            })
            .map(|(_, _, v)| *v)
            .unwrap_or_else(|| panic!("no metric for {key} in\n{}", r.text()))
    };
    for key in [
        "connections",
        "users",
        "messages_in",
        "messages_out",
        "expired",
        "dropped",
    ] {
        assert_eq!(
            Some(value(key)),
            stats[key].as_f64(),
            "{key}: /metrics and /stats differ"
        );
    }
    assert_eq!((value("connections"), value("users")), (3.0, 2.0));
}

#[test]
fn the_demo_page_and_the_client_script_are_served() {
    let server = Server::start(&[]);
    let r = server.get("/");
    assert_eq!(r.status, 200);
    let ct = r.header("content-type").unwrap_or_default();
    assert!(ct.starts_with("text/html"), "Content-Type {ct:?}");
    assert!(r.text().contains(r#"id="send-form""#), "not the demo page");

    let r = server.get("/wspush.js");
    assert_eq!(r.status, 200);
    let ct = r.header("content-type").unwrap_or_default();
    assert!(ct.contains("javascript"), "Content-Type {ct:?}");
    assert!(r.text().contains("WsPush"), "not the client script");
}

#[test]
fn head_gets_the_headers_with_content_length_but_no_body() {
    let server = Server::start(&[]);
    let page = server.get("/");
    let mut s = server.tcp();
    s.write_all(b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let (status, headers) = read_head(&mut s);
    assert_eq!(status, 200);
    let len = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.clone())
        .expect("HEAD response without Content-Length");
    assert_eq!(len, page.body.len().to_string());
    // No body follows: the connection ends right after the head.
    assert_closed(&mut s);

    // On a keep-alive connection the next response follows the head directly.
    let mut s = server.tcp();
    s.write_all(
        b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .unwrap();
    assert_eq!(read_head(&mut s).0, 200);
    let r = read_response(&mut s);
    assert_eq!((r.status, r.text()), (200, "ok".to_string()));
}

#[test]
fn a_garbage_request_line_is_400_and_the_server_keeps_serving() {
    let server = Server::start(&[]);
    let mut keep = server.tcp();
    keep.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut keep).status, 200);

    // The start of a TLS ClientHello, as a client speaking https to an http port sends.
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03,
    ];
    hello.extend((0u8..32).map(|i| i.wrapping_mul(37)));
    let mut s = server.tcp();
    s.write_all(&hello).unwrap();
    assert_json_error(&read_response(&mut s), 400);
    assert_closed(&mut s);

    let r = server.raw(b"HELLO\r\n\r\n");
    assert_json_error(&r, 400);

    keep.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut keep).status, 200);
    assert_eq!(server.get("/healthz").status, 200);
}

#[test]
fn a_batch_reaches_every_receiver_whole_and_in_order() {
    let server = Server::start(&[]);
    let mut one = server.ws("uid=1");
    let mut anon = server.ws("");
    let items: Vec<String> = (0..200)
        .map(|i| match i % 3 {
            0 => format!(r#"{{"topic":"uids","topic_ids":["1"],"msg":{i}}}"#),
            _ => format!(r#"{{"topic":"all","msg":{i}}}"#),
        })
        .collect();
    server.send_ok(&format!("[{}]", items.join(",")));
    for i in 0..200u64 {
        assert_eq!(recv_json(&mut one)["msg"], i);
        if i % 3 != 0 {
            assert_eq!(recv_json(&mut anon)["msg"], i);
        }
    }
    assert_next_broadcast_is_marker(&server, &mut anon, "after the batch");
}

#[test]
fn a_batch_larger_than_the_socket_buffers_arrives_whole_and_in_order() {
    // Several MiB to receivers that are not reading yet: the vectored writes come
    // back partial, the rest is queued and flushed as the receivers read.
    let server = Server::start(&["-max-body=16777216", "-max-backlog=33554432"]);
    let mut one = server.ws("uid=1");
    let mut two = server.ws("uid=2");
    let pad = "x".repeat(60_000);
    let items: Vec<String> = (0..100)
        .map(|i| format!(r#"{{"topic":"all","msg":"{i} {pad}"}}"#))
        .collect();
    server.send_ok(&format!("[{}]", items.join(",")));
    for ws in [&mut one, &mut two] {
        for i in 0..100 {
            let m = recv_json(ws);
            assert_eq!(m["msg"], format!("{i} {pad}"), "message {i}");
        }
    }
    assert_next_broadcast_is_marker(&server, &mut two, "after the big batch");
}

// ---- Host (RFC 9112 §3.2) -----------------------------------------------------------

#[test]
fn http11_without_host_or_with_two_host_lines_is_400_and_http10_without_host_is_served() {
    let server = Server::start(&[]);
    let r = server.raw(b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n");
    let e = assert_json_error(&r, 400);
    assert!(e.contains("Host"), "{e}");
    let r = server.raw(b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n");
    let e = assert_json_error(&r, 400);
    assert!(e.contains("Host"), "{e}");
    let r = server.raw(b"GET /healthz HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n");
    assert_json_error(&r, 400);
    // A /send without Host publishes nothing.
    let mut ws = server.ws("uid=1");
    let body = r#"{"topic":"uids","topic_ids":["1"],"msg":"no host"}"#;
    let r = server.raw(
        format!(
            "POST /send HTTP/1.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    assert_json_error(&r, 400);
    assert_next_push_is_marker(&server, &mut ws, "after the hostless send");
    // HTTP/1.0 predates Host.
    let r = server.raw(b"GET /healthz HTTP/1.0\r\n\r\n");
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn a_type_with_surrounding_spaces_is_400_naming_types() {
    assert_rejected(
        &[
            r#"{"topic":"uids","topic_ids":["1"],"types":" chat","msg":"x"}"#,
            r#"{"topic":"uids","topic_ids":["1"],"types":"chat ","msg":"x"}"#,
            r#"{"topic":"uids","topic_ids":["1"],"types":"\tchat","msg":"x"}"#,
            r#"{"topic":"uids","topic_ids":["1"],"types":"   ","msg":"x"}"#,
        ],
        "types",
    );
}
