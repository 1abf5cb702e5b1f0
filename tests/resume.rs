//! Delivery ids, resume and offline delivery on one node (`-queue=list`), against the
//! real binary: what a client that reconnects with `?since=` gets, and when the
//! server must admit with `complete:false` that something may be missing.

mod common;
use common::*;

use serde_json::{Value, json};

fn send_to_uid(server: &Server, uid: &str, types: &str, msg: Value) {
    server.send_ok(&json!({"topic":"uids","topic_ids":[uid],"types":types,"msg":msg}).to_string());
}

/// The `resumed` frame that opens a resume, then its `complete` flag.
fn resumed(ws: &mut Ws) -> bool {
    let v = recv_json(ws);
    assert_eq!(
        v["op"], "resumed",
        "a resume opens with the resumed frame: {v}"
    );
    v["complete"].as_bool().expect("complete is a boolean")
}

/// Receives pushes until the one whose msg is `until`, returning the msgs before it.
fn msgs_until(ws: &mut Ws, until: &str) -> Vec<Value> {
    let mut got = Vec::new();
    loop {
        let v = recv_json(ws);
        assert!(v["id"].is_string(), "every push carries an id: {v}");
        if v["msg"] == until {
            return got;
        }
        got.push(v["msg"].clone());
    }
}

fn id_of(v: &Value) -> String {
    v["id"].as_str().expect("id").to_string()
}

#[test]
fn a_client_that_comes_back_gets_what_it_missed_in_order_once() {
    let server = Server::start(&[]);
    let mut ws = server.ws("uid=7&since=0");
    assert!(resumed(&mut ws), "nothing retained, nothing missing");
    send_to_uid(&server, "7", "notice", json!("seen"));
    let seen = recv_json(&mut ws);
    let last = id_of(&seen);
    drop(ws);
    let past = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 1;
    send_to_uid(&server, "7", "notice", json!("away 1"));
    server.send_ok(&json!({"topic":"all","msg":"broadcast"}).to_string());
    send_to_uid(&server, "7", "chat", json!("chat while away"));
    server.send_ok(
        &json!({"topic":"uids","topic_ids":["7"],"msg":"expired","timeout":past}).to_string(),
    );
    send_to_uid(&server, "8", "notice", json!("someone else's"));
    send_to_uid(&server, "7", "notice", json!("away 2"));
    // A 200 hands a message to the queue; it is retained once delivered.
    wait_stats(&server, "six retained", |s| s["history"]["messages"] == 6);

    let mut back = server.ws(&format!("uid=7&types=notice&since={last}"));
    assert!(resumed(&mut back));
    send_to_uid(&server, "7", "notice", json!("live"));
    assert_eq!(
        msgs_until(&mut back, "live"),
        [json!("away 1"), json!("broadcast"), json!("away 2")],
        "oldest first, type filter applied, expired and other uids' messages left out"
    );
    let stats = server.stats();
    assert_eq!(stats["resumes"]["complete"], 2);
    assert_eq!(stats["resumes"]["replayed"], 3);
}

#[test]
fn a_uid_never_connected_gets_unexpired_messages_on_first_connect() {
    let server = Server::start(&[]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    server.send_ok(
        &json!({"topic":"uids","topic_ids":[9],"msg":"for later","timeout":now + 3600}).to_string(),
    );
    server.send_ok(
        &json!({"topic":"uids","topic_ids":[9],"msg":"too late","timeout":now - 1}).to_string(),
    );
    let mut ws = server.ws("uid=9&since=0");
    assert!(resumed(&mut ws));
    send_to_uid(&server, "9", "notice", json!("live"));
    assert_eq!(msgs_until(&mut ws, "live"), [json!("for later")]);
}

#[test]
fn without_since_nothing_is_replayed() {
    let server = Server::start(&[]);
    send_to_uid(&server, "3", "notice", json!("before"));
    wait_stats(&server, "delivery", |s| s["messages_routed"] == 1);
    let mut ws = server.ws("uid=3");
    send_to_uid(&server, "3", "notice", json!("live"));
    let v = recv_json(&mut ws);
    assert_eq!(
        v["msg"], "live",
        "no resumed frame and no replay without since: {v}"
    );
}

#[test]
fn a_flood_of_sends_during_resumes_leaves_no_gap_and_no_duplicate() {
    let server = Server::start(&[]);
    let addr = server.addr;
    const N: usize = 600;
    let sender = std::thread::spawn(move || {
        for i in 0..N {
            let body = json!({"topic":"uids","topic_ids":["s"],"msg":i}).to_string();
            assert_eq!(send_to(addr, &body).status, 200);
        }
        send_to(
            addr,
            &json!({"topic":"uids","topic_ids":["s"],"msg":"end"}).to_string(),
        );
    });
    // A client that keeps reconnecting with its last id while the sender runs.
    let mut got: Vec<u64> = Vec::new();
    let mut last = "0".to_string();
    'outer: loop {
        let mut ws = server.ws(&format!("uid=s&since={last}"));
        assert!(
            resumed(&mut ws),
            "nothing was trimmed, so every resume is complete"
        );
        for _ in 0..(7 + got.len() % 13) {
            let v = recv_json(&mut ws);
            last = id_of(&v);
            if v["msg"] == "end" {
                break 'outer;
            }
            got.push(v["msg"].as_u64().unwrap());
        }
    }
    sender.join().unwrap();
    assert_eq!(
        got,
        (0..N as u64).collect::<Vec<_>>(),
        "every message once, in order"
    );
}

#[test]
fn a_bad_since_is_400_and_an_id_of_another_run_is_incomplete() {
    let server = Server::start(&[]);
    let r = server.raw(
        b"GET /ws?uid=1&since=yesterday HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    );
    assert_eq!(r.status, 400);
    assert!(r.error().contains("since"), "{}", r.error());

    let mut ws = server.ws("uid=1&since=0");
    assert!(resumed(&mut ws));
    send_to_uid(&server, "1", "notice", json!("m"));
    let id = id_of(&recv_json(&mut ws));
    drop(ws);
    // Another run of the server does not know this id's epoch.
    let other = Server::start(&[]);
    send_to_uid(&other, "1", "notice", json!("after the restart"));
    let mut ws = other.ws(&format!("uid=1&since={id}"));
    assert!(!resumed(&mut ws), "an id of another run cannot be trusted");
    assert_eq!(recv_json(&mut ws)["msg"], "after the restart");
    assert_eq!(other.stats()["resumes"]["incomplete"], 1);
}

#[test]
fn history_size_trims_oldest_and_a_resume_across_it_is_incomplete() {
    let server = Server::start(&["-history-size=3"]);
    let mut ws = server.ws("uid=1&since=0");
    assert!(resumed(&mut ws));
    send_to_uid(&server, "1", "notice", json!(0));
    let first = id_of(&recv_json(&mut ws));
    drop(ws);
    for i in 1..=5 {
        send_to_uid(&server, "1", "notice", json!(i));
    }
    wait_stats(&server, "the size trims", |s| {
        s["history"]["trimmed"]["size"] == 3
    });
    let mut ws = server.ws(&format!("uid=1&since={first}"));
    assert!(!resumed(&mut ws), "messages 1 and 2 were trimmed");
    send_to_uid(&server, "1", "notice", json!("live"));
    assert_eq!(msgs_until(&mut ws, "live"), [json!(3), json!(4), json!(5)]);
    let stats = server.stats();
    assert_eq!(stats["history"]["messages"], 3);
}

#[test]
fn history_bytes_bound_the_whole_node() {
    // Each message costs its frame plus a fixed overhead; 2,000 bytes hold a few.
    let server = Server::start(&["-history-bytes=2000"]);
    let mut ws = server.ws("uid=a&since=0");
    assert!(resumed(&mut ws));
    send_to_uid(&server, "a", "notice", json!("first"));
    let first = id_of(&recv_json(&mut ws));
    drop(ws);
    let pad = "x".repeat(300);
    for i in 0..10 {
        send_to_uid(&server, &format!("u{i}"), "notice", json!(pad));
    }
    wait_stats(&server, "all eleven retained or trimmed", |s| {
        s["history"]["messages"].as_u64().unwrap()
            + s["history"]["trimmed"]["bytes"].as_u64().unwrap()
            == 11
    });
    let stats = server.stats();
    assert!(
        stats["history"]["bytes"].as_u64().unwrap() <= 2000,
        "{stats}"
    );
    assert!(
        stats["history"]["trimmed"]["bytes"].as_u64().unwrap() > 0,
        "{stats}"
    );
    // "first" itself was seen and dropped later: nothing after it is missing.
    let mut ws = server.ws(&format!("uid=a&since={first}"));
    assert!(resumed(&mut ws));
    // A first visit would miss it, though, while it would still be retained.
    let mut fresh = server.ws("uid=a&since=0");
    assert!(!resumed(&mut fresh));
    let mut young = server.ws("uid=u9&since=0");
    assert!(resumed(&mut young), "the newest message is still there");
    send_to_uid(&server, "u9", "notice", json!("live"));
    assert_eq!(msgs_until(&mut young, "live"), [json!(pad)]);
}

#[test]
fn history_ttl_ends_retention_and_resumes_from_before_are_incomplete() {
    let server = Server::start(&["-history-ttl=1s"]);
    let mut ws = server.ws("uid=1&since=0");
    assert!(resumed(&mut ws));
    send_to_uid(&server, "1", "notice", json!("seen"));
    let seen = id_of(&recv_json(&mut ws));
    drop(ws);
    send_to_uid(&server, "1", "notice", json!("missed"));
    wait_stats(&server, "the ttl trim", |s| {
        s["history"]["trimmed"]["ttl"].as_u64() >= Some(2)
    });
    let mut ws = server.ws(&format!("uid=1&since={seen}"));
    assert!(
        !resumed(&mut ws),
        "'missed' left retention before the client came back"
    );
    send_to_uid(&server, "1", "notice", json!("live"));
    assert_eq!(msgs_until(&mut ws, "live"), Vec::<Value>::new());
}

#[test]
fn retention_off_still_numbers_messages_and_answers_incomplete() {
    let server = Server::start(&["-history-ttl=0"]);
    send_to_uid(&server, "1", "notice", json!("gone"));
    wait_stats(&server, "delivery", |s| s["messages_routed"] == 1);
    let mut ws = server.ws("uid=1&since=0");
    assert!(
        resumed(&mut ws),
        "nothing is kept, so since=0 misses nothing retained"
    );
    send_to_uid(&server, "1", "notice", json!("live"));
    let v = recv_json(&mut ws);
    assert_eq!(v["msg"], "live");
    assert!(v["id"].is_string());
    assert_eq!(server.stats()["history"]["messages"], 0);
}
