//! permessage-deflate (RFC 7692) against the real binary, with the hand-made client
//! of `tests/common/raw_ws.rs` (tungstenite does not implement the extension) and
//! miniz_oxide on the client side.

mod common;

use std::net::TcpStream;

use common::raw_ws::{self, BINARY, TEXT};
use common::{Server, wait_stats};
use serde_json::Value;

const OFFER: &str = "permessage-deflate; client_max_window_bits";

/// A push whose JSON is well over the default `-deflate-min` (256 bytes).
fn big_push(target: &str, n: usize) -> String {
    let text = "the quick brown fox jumps over the lazy dog ".repeat(n);
    format!(r#"{{{target},"types":"notice","msg":{{"text":"{text}"}}}}"#)
}

fn deflate_client(server: &Server, query: &str) -> (TcpStream, String) {
    let mut s = server.tcp();
    let agreed = raw_ws::upgrade_offering(&mut s, query, OFFER).expect("deflate negotiated");
    (s, agreed)
}

/// The next push on a raw connection: its JSON, and whether it came compressed.
fn next_push(s: &mut TcpStream) -> (Value, bool, Vec<u8>) {
    let f = raw_ws::next_frame(s);
    assert_eq!(f.opcode, TEXT, "{f:?}");
    assert!(f.fin);
    let json = if f.rsv1 {
        raw_ws::inflate(&f.payload)
    } else {
        f.payload.clone()
    };
    (serde_json::from_slice(&json).unwrap(), f.rsv1, f.payload)
}

#[test]
fn negotiated_with_server_no_context_takeover() {
    let server = Server::start(&["-deflate=on"]);
    let (_s, agreed) = deflate_client(&server, "uid=1");
    assert!(agreed.starts_with("permessage-deflate"), "{agreed}");
    assert!(agreed.contains("server_no_context_takeover"), "{agreed}");
    assert!(agreed.contains("client_max_window_bits="), "{agreed}");
}

#[test]
fn a_compressed_push_decodes_to_the_push() {
    let server = Server::start(&["-deflate=on"]);
    let (mut s, _) = deflate_client(&server, "uid=7");
    server.send_ok(&big_push(r#""topic":"uids","topic_ids":["7"]"#, 20));
    let (push, compressed, wire) = next_push(&mut s);
    assert!(compressed, "a 900-byte push is sent compressed");
    assert!(wire.len() < 300, "compressed to {} bytes", wire.len());
    assert_eq!(push["types"], "notice");
    assert!(
        push["msg"]["text"]
            .as_str()
            .unwrap()
            .starts_with("the quick")
    );
    assert!(push["id"].is_string());
}

#[test]
fn a_broadcast_is_compressed_once_and_the_same_bytes_reach_every_receiver() {
    let server = Server::start(&["-deflate=on"]);
    let (mut a, _) = deflate_client(&server, "uid=a");
    let (mut b, _) = deflate_client(&server, "uid=b");
    let mut plain = server.ws("uid=c");
    server.send_ok(&big_push(r#""topic":"all""#, 20));
    let (pa, ca, wa) = next_push(&mut a);
    let (pb, cb, wb) = next_push(&mut b);
    assert!(ca && cb);
    assert_eq!(wa, wb, "one compressed frame for both receivers");
    assert_eq!(pa, pb);
    // A client that did not negotiate gets the same push uncompressed.
    let pc: Value = serde_json::from_str(&common::recv_text(&mut plain)).unwrap();
    assert_eq!(pc, pa);
    let stats = wait_stats(&server, "deflate counters", |s| s["deflate"]["pushes"] == 2);
    assert_eq!(stats["deflate"]["messages"], 1, "{stats}");
}

#[test]
fn a_batch_reaches_deflate_and_plain_receivers_in_order() {
    let server = Server::start(&["-deflate=on"]);
    let (mut d, _) = deflate_client(&server, "uid=u");
    let mut p = raw_ws::connect(&server, "uid=u");
    let small = r#"{"topic":"uids","topic_ids":["u"],"msg":"small"}"#;
    let big = big_push(r#""topic":"uids","topic_ids":["u"]"#, 20);
    server.send_ok(&format!("[{big},{small},{big}]"));
    let kinds: Vec<bool> = (0..3).map(|_| next_push(&mut d).1).collect();
    assert_eq!(kinds, [true, false, true], "below -deflate-min stays plain");
    for expect_small in [false, true, false] {
        let (push, compressed, _) = next_push(&mut p);
        assert!(!compressed);
        assert_eq!(push["msg"] == "small", expect_small);
    }
}

#[test]
fn a_compressed_client_message_is_understood() {
    let server = Server::start(&["-deflate=on"]);
    let (mut s, _) = deflate_client(&server, "uid=9");
    let op = br#"{"op":"subscribe","types":["chat"]}"#;
    s.write_all_frames(&raw_ws::compressed_frame(TEXT, &raw_ws::deflate(op)));
    // The filter now drops notices and lets chat through; a ping orders the check.
    s.write_all_frames(&raw_ws::frame(true, raw_ws::PING, b"x"));
    assert_eq!(raw_ws::next_frame(&mut s).opcode, raw_ws::PONG);
    server.send_ok(r#"{"topic":"uids","topic_ids":["9"],"types":"notice","msg":1}"#);
    server.send_ok(r#"{"topic":"uids","topic_ids":["9"],"types":"chat","msg":2}"#);
    let (push, _, _) = next_push(&mut s);
    assert_eq!(push["msg"], 2);
}

#[test]
fn a_deflate_bomb_closes_1009() {
    let server = Server::start(&["-deflate=on"]);
    let (mut s, _) = deflate_client(&server, "uid=1");
    // 16 MiB of spaces compress to about 16 KiB; -max-message is 64 KiB.
    let bomb = raw_ws::deflate(&vec![b' '; 16 << 20]);
    assert!(bomb.len() < 64 << 10);
    s.write_all_frames(&raw_ws::compressed_frame(BINARY, &bomb));
    raw_ws::expect_close(&mut s, 1009);
    // Everyone else is still served.
    let mut other = server.ws("uid=2");
    server.send_ok(r#"{"topic":"uids","topic_ids":["2"],"msg":"still here"}"#);
    assert!(common::recv_text(&mut other).contains("still here"));
}

#[test]
fn undecodable_compressed_data_closes_1007() {
    let server = Server::start(&["-deflate=on"]);
    let (mut s, _) = deflate_client(&server, "uid=1");
    s.write_all_frames(&raw_ws::compressed_frame(TEXT, &[0xff; 12]));
    raw_ws::expect_close(&mut s, 1007);
}

#[test]
fn compressed_invalid_utf8_closes_1007() {
    let server = Server::start(&["-deflate=on"]);
    let (mut s, _) = deflate_client(&server, "uid=1");
    s.write_all_frames(&raw_ws::compressed_frame(
        TEXT,
        &raw_ws::deflate(b"ok \xff\xfe"),
    ));
    raw_ws::expect_close(&mut s, 1007);
}

#[test]
fn not_negotiated_when_off() {
    let server = Server::start(&["-deflate=off"]);
    let mut s = server.tcp();
    assert_eq!(raw_ws::upgrade_offering(&mut s, "uid=1", OFFER), None);
    server.send_ok(&big_push(r#""topic":"uids","topic_ids":["1"]"#, 20));
    let (_, compressed, _) = next_push(&mut s);
    assert!(!compressed);
    // Without the extension a frame with RSV1 is a protocol error.
    s.write_all_frames(&raw_ws::compressed_frame(TEXT, &raw_ws::deflate(b"hi")));
    raw_ws::expect_close(&mut s, 1002);
}

/// Writes bytes to a raw connection.
trait WriteFrames {
    fn write_all_frames(&mut self, bytes: &[u8]);
}

impl WriteFrames for TcpStream {
    fn write_all_frames(&mut self, bytes: &[u8]) {
        std::io::Write::write_all(self, bytes).expect("write frames");
    }
}

#[test]
fn a_client_that_narrows_the_window_gets_its_own_shared_frame() {
    let server = Server::start(&["-deflate=on"]);
    let (mut full, _) = deflate_client(&server, "uid=a");
    let narrow_offer = "permessage-deflate; server_max_window_bits=8";
    let mut n1 = server.tcp();
    let agreed = raw_ws::upgrade_offering(&mut n1, "uid=b", narrow_offer).unwrap();
    assert!(agreed.contains("server_max_window_bits=8"), "{agreed}");
    let mut n2 = server.tcp();
    raw_ws::upgrade_offering(&mut n2, "uid=c", narrow_offer).unwrap();
    server.send_ok(&big_push(r#""topic":"all""#, 20));
    let (pf, cf, wf) = next_push(&mut full);
    let (p1, c1, w1) = next_push(&mut n1);
    let (p2, c2, w2) = next_push(&mut n2);
    assert!(cf && c1 && c2, "every receiver gets a compressed frame");
    assert_eq!(w1, w2, "one frame for the narrow-window receivers");
    assert_ne!(wf, w1);
    assert!(pf == p1 && p1 == p2);
    let stats = wait_stats(&server, "deflate counters", |s| s["deflate"]["pushes"] == 3);
    assert_eq!(
        stats["deflate"]["messages"], 2,
        "compressed once per window: {stats}"
    );
}

/// A compressed connection that resumes from Redis history on another node gets the
/// replay as plain frames and the live pushes compressed, each once.
#[test]
fn a_compressed_connection_resumes_from_redis_history() {
    let redis = common::RedisServer::start();
    let channel = format!("-queue-name={}", common::unique_name("deflate-resume"));
    let flag = redis.queue_flag();
    let args = [flag.as_str(), channel.as_str(), "-deflate=on"];
    let (a, b) = (Server::start(&args), Server::start(&args));
    common::wait_health(&a, 200);
    common::wait_health(&b, 200);
    let mut watcher = b.ws("uid=7");
    let to_7 = r#""topic":"uids","topic_ids":["7"]"#;
    a.send_ok(&big_push(to_7, 20));
    a.send_ok(&big_push(to_7, 21));
    let first = common::recv_json(&mut watcher);
    assert!(common::recv_json(&mut watcher)["id"].is_string());
    let since = first["id"].as_str().unwrap();

    let (mut s, _) = deflate_client(&b, &format!("uid=7&since={since}"));
    let (resumed, _, _) = next_push(&mut s);
    assert_eq!(resumed, serde_json::json!({"op":"resumed","complete":true}));
    let (missed, compressed, _) = next_push(&mut s);
    assert!(!compressed, "a replay is one connection's: sent plain");
    assert_eq!(
        missed["msg"]["text"].as_str().unwrap().len(),
        21 * 44,
        "the one after `since`"
    );
    a.send_ok(&big_push(to_7, 22));
    let (live, compressed, _) = next_push(&mut s);
    assert!(compressed, "live pushes are compressed");
    assert_eq!(live["msg"]["text"].as_str().unwrap().len(), 22 * 44);
}
