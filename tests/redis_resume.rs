//! Resume and catch-up with the history in Redis, against real `redis-server`s and
//! two wspush nodes: a client resumes on the other node, a node's subscription is cut
//! while `/send` runs on both, and Redis itself dies and comes back (with its data on
//! disk). The promise under test: every message answered 200 reaches each client
//! exactly once.

mod common;
use common::*;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn two_nodes(redis: &RedisServer, extra: &[&str]) -> (Server, Server) {
    two_redis_nodes(redis, "resume", extra)
}

#[test]
fn a_client_resumes_on_the_other_node_with_the_same_ids() {
    let redis = RedisServer::start();
    let (a, b) = two_nodes(&redis, &[]);
    let mut on_a = a.ws("uid=7&since=0");
    assert_eq!(
        recv_json(&mut on_a),
        json!({"op":"resumed","complete":true})
    );
    let mut watcher = b.ws("uid=7");
    a.send_ok(&json!({"topic":"uids","topic_ids":["7"],"msg":"seen"}).to_string());
    let seen = recv_json(&mut on_a);
    assert_eq!(
        recv_json(&mut watcher)["id"],
        seen["id"],
        "one id on every node"
    );
    drop(on_a);
    a.send_ok(&json!({"topic":"uids","topic_ids":["7"],"msg":"missed 1"}).to_string());
    b.send_ok(&json!({"topic":"all","msg":"missed 2"}).to_string());
    a.send_ok(&json!({"topic":"uids","topic_ids":["8"],"msg":"not for 7"}).to_string());
    // The watcher on B has them live: B is current.
    assert_eq!(recv_json(&mut watcher)["msg"], "missed 1");
    assert_eq!(recv_json(&mut watcher)["msg"], "missed 2");

    let id = seen["id"].as_str().unwrap();
    let mut on_b = b.ws(&format!("uid=7&since={id}"));
    assert_eq!(
        recv_json(&mut on_b),
        json!({"op":"resumed","complete":true})
    );
    a.send_ok(&json!({"topic":"uids","topic_ids":["7"],"msg":"live"}).to_string());
    let got: Vec<Value> = (0..3)
        .map(|_| recv_json(&mut on_b)["msg"].clone())
        .collect();
    assert_eq!(got, [json!("missed 1"), json!("missed 2"), json!("live")]);
    let stats = b.stats();
    assert_eq!(stats["resumes"]["complete"], 1, "{stats}");
    assert_eq!(stats["resumes"]["replayed"], 2, "{stats}");
}

/// Sends numbered messages to uid `r`, alternating between two nodes, until told to
/// stop; returns the numbers answered 200.
fn flood(nodes: [SocketAddr; 2], stop: Arc<AtomicBool>, accepted: Arc<AtomicU64>) -> Vec<u64> {
    let mut ok = Vec::new();
    let mut i = 0u64;
    while !stop.load(Ordering::Acquire) {
        let body = json!({"topic":"uids","topic_ids":["r"],"msg":i}).to_string();
        if send_to(nodes[(i % 2) as usize], &body).status == 200 {
            ok.push(i);
            accepted.fetch_add(1, Ordering::AcqRel);
        }
        i += 1;
    }
    ok
}

/// The message numbers a client received, in order.
type Received = Arc<Mutex<Vec<u64>>>;

/// A client as `wspush.js` is: it keeps the last id and reconnects with `since`
/// whenever its connection ends, until it has seen the message `"end"`.
fn resuming_client(addr: SocketAddr, got: Received, deadline: Instant) {
    let mut last = "0".to_string();
    loop {
        assert!(Instant::now() < deadline, "the client never saw the end");
        let Ok(mut ws) = ws_to(addr, &format!("uid=r&since={last}")) else {
            std::thread::sleep(Duration::from_millis(50)); // node unreachable: retry
            continue;
        };
        loop {
            let Ok(msg) = ws.read() else { break };
            let tungstenite::Message::Text(text) = msg else {
                continue;
            };
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["op"] == "resumed" {
                continue;
            }
            last = v["id"].as_str().unwrap().to_string();
            match v["msg"].as_u64() {
                Some(n) => got.lock().unwrap().push(n),
                None => return, // "end"
            }
        }
    }
}

/// Runs the flood with a client on each node while `fault` strikes every
/// `every` accepted messages, then checks every 200 arrived once at each client.
fn every_accepted_message_arrives_once(
    redis: &mut RedisServer,
    nodes: (Server, Server),
    every: u64,
    faults: u64,
    mut fault: impl FnMut(&mut RedisServer),
) {
    let (a, b) = nodes;
    let addrs = [a.addr, b.addr];
    let deadline = Instant::now() + Duration::from_secs(60);
    let clients: Vec<(Received, std::thread::JoinHandle<()>)> = addrs
        .iter()
        .map(|&addr| {
            let got = Arc::new(Mutex::new(Vec::new()));
            let g = got.clone();
            (
                got,
                std::thread::spawn(move || resuming_client(addr, g, deadline)),
            )
        })
        .collect();
    // Both clients are subscribed before the first message.
    wait_stats(&a, "the client on A", |s| s["connections"] == 1);
    wait_stats(&b, "the client on B", |s| s["connections"] == 1);
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicU64::new(0));
    let sender = {
        let (stop, accepted) = (stop.clone(), accepted.clone());
        std::thread::spawn(move || flood(addrs, stop, accepted))
    };
    for n in 1..=faults {
        wait_until("accepted messages", Duration::from_secs(30), || {
            accepted.load(Ordering::Acquire) >= n * every
        });
        fault(redis);
    }
    wait_until(
        "more accepted after the last fault",
        Duration::from_secs(30),
        || accepted.load(Ordering::Acquire) >= (faults + 1) * every,
    );
    stop.store(true, Ordering::Release);
    let ok = sender.join().unwrap();
    wait_until("an end marker accepted", Duration::from_secs(20), || {
        send_to(
            a.addr,
            &json!({"topic":"uids","topic_ids":["r"],"msg":"end"}).to_string(),
        )
        .status
            == 200
    });
    for (got, client) in clients {
        client.join().unwrap();
        let got = got.lock().unwrap();
        let mut count: HashMap<u64, usize> = HashMap::new();
        for n in got.iter() {
            *count.entry(*n).or_default() += 1;
        }
        let twice: Vec<_> = count.iter().filter(|(_, c)| **c > 1).collect();
        assert!(twice.is_empty(), "received more than once: {twice:?}");
        let lost: Vec<_> = ok.iter().filter(|n| !count.contains_key(n)).collect();
        report(&format!(
            "measured: {} answered 200, {} received, {} lost",
            ok.len(),
            got.len(),
            lost.len()
        ));
        assert!(lost.is_empty(), "answered 200, never received: {lost:?}");
        assert!(
            got.windows(2).all(|w| w[0] < w[1] || w[0] % 2 != w[1] % 2),
            "order per sender node"
        );
    }
}

#[test]
fn cutting_a_nodes_subscription_loses_nothing_answered_200() {
    let mut redis = RedisServer::start();
    let nodes = two_nodes(&redis, &["-queue-backoff=100ms"]);
    every_accepted_message_arrives_once(&mut redis, nodes, 60, 4, |redis| {
        redis.client().cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    });
}

#[test]
fn redis_killed_and_restarted_with_its_data_loses_nothing_answered_200() {
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let nodes = two_nodes(&redis, &["-queue-backoff=100ms"]);
    every_accepted_message_arrives_once(&mut redis, nodes, 60, 2, |redis| redis.restart());
}
