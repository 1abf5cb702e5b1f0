//! Interest routing with Redis, against a real `redis-server` and two wspush nodes:
//! a node subscribes only to the uids it holds (and `all`), and a connection of a
//! uid that is new to its node misses nothing while that subscription is set up,
//! even with `/send` flooding the uid and the broadcasts at that moment.

mod common;
use common::*;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn two_nodes(redis: &RedisServer, extra: &[&str]) -> (Server, Server) {
    two_redis_nodes(redis, "routing", extra)
}

fn received(node: &Server) -> u64 {
    node.stats()["queue"]["received"].as_u64().unwrap()
}

#[test]
fn a_node_receives_only_its_uids_and_the_broadcasts() {
    let redis = RedisServer::start();
    let (a, b) = two_nodes(&redis, &[]);
    let mut on_a = a.ws("uid=held-a");
    let mut on_b = b.ws("uid=held-b");
    // Both subscriptions are live once each connection got a message through them.
    for (node, ws, uid) in [(&a, &mut on_a, "held-a"), (&b, &mut on_b, "held-b")] {
        node.send_ok(&json!({"topic":"uids","topic_ids":[uid],"msg":"hello"}).to_string());
        assert_eq!(recv_json(ws)["msg"], "hello");
    }
    wait_stats(&a, "A subscribed to its uid", |s| {
        s["queue"]["channels"] == 1
    });
    wait_stats(&b, "B subscribed to its uid", |s| {
        s["queue"]["channels"] == 1
    });
    let (before_a, before_b) = (received(&a), received(&b));
    for i in 0..30 {
        a.send_ok(&json!({"topic":"uids","topic_ids":["held-a"],"msg":i}).to_string());
        a.send_ok(&json!({"topic":"uids","topic_ids":["held-b"],"msg":i}).to_string());
        a.send_ok(&json!({"topic":"uids","topic_ids":["nobody"],"msg":i}).to_string());
    }
    for i in 0..5 {
        b.send_ok(&json!({"topic":"all","msg":i}).to_string());
    }
    for ws in [&mut on_a, &mut on_b] {
        for i in 0..30 {
            assert_eq!(recv_json(ws)["msg"], i);
        }
        for i in 0..5 {
            assert_eq!(recv_json(ws)["msg"], i);
        }
    }
    // 30 for its own uid and 5 broadcasts, nothing of the other node's or nobody's.
    assert_eq!(received(&a) - before_a, 35, "{}", a.stats());
    assert_eq!(received(&b) - before_b, 35, "{}", b.stats());
    let metrics = a.get("/metrics").text();
    assert!(
        metrics.contains("\nwspush_queue_received_total "),
        "{metrics}"
    );

    // The uid's last connection leaves: the node unsubscribes and stops receiving it.
    drop(on_a);
    wait_stats(&a, "A unsubscribed", |s| {
        s["connections"] == 0 && s["queue"]["channels"] == 0
    });
    let before_a = received(&a);
    for i in 0..10 {
        b.send_ok(&json!({"topic":"uids","topic_ids":["held-a"],"msg":i}).to_string());
    }
    b.send_ok(&json!({"topic":"all","msg":"last"}).to_string());
    assert_eq!(recv_json(&mut on_b)["msg"], "last");
    wait_stats(&a, "the broadcast at A", |s| {
        s["queue"]["received"].as_u64() == Some(before_a + 1)
    });

    // A new connection of that uid, with `since`, gets what it missed meanwhile.
    let mut back = a.ws("uid=held-a&since=0");
    assert_eq!(recv_json(&mut back)["op"], "resumed");
    let got: Vec<Value> = std::iter::from_fn(|| recv_json_within(&mut back, WAIT / 10))
        .map(|m| m["msg"].clone())
        .collect();
    let tail: Vec<Value> = (0..10).map(|i| json!(i)).chain([json!("last")]).collect();
    assert!(got.ends_with(&tail), "{got:?}");
}

/// One message sent by the flood: its number, when its `/send` began, and whether
/// it was answered 200.
#[derive(Clone, Copy)]
struct Sent {
    n: u64,
    at: Instant,
    ok: bool,
}

/// Sends batches to `nodes` in turn until stopped, each of four numbered messages:
/// to `uid`, to all, to `uid` and another uid, to all. One sender, one batch at a
/// time: the numbers (from `first`) are the order Redis took them in.
fn flood(
    nodes: [SocketAddr; 2],
    uid: String,
    stop: Arc<AtomicBool>,
    batches: Arc<AtomicU64>,
    first: u64,
) -> Vec<Sent> {
    let mut sent = Vec::new();
    let mut n = first;
    let mut turn = 0;
    while !stop.load(Ordering::Acquire) {
        let body = json!([
            {"topic":"uids","topic_ids":[uid],"msg":n},
            {"topic":"all","msg":n + 1},
            {"topic":"uids","topic_ids":[uid, "someone-else"],"msg":n + 2},
            {"topic":"all","msg":n + 3},
        ])
        .to_string();
        let at = Instant::now();
        let ok = send_to(nodes[turn % 2], &body).status == 200;
        sent.extend((n..n + 4).map(|n| Sent { n, at, ok }));
        n += 4;
        turn += 1;
        batches.fetch_add(1, Ordering::AcqRel);
    }
    sent
}

/// The storm counts how many SUBSCRIBEs its joins took, which depends on how many
/// subscriber turns they spread over: it must not share the machine with the flood.
static STORM_OR_FLOOD: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn a_uid_new_to_its_node_misses_nothing_while_its_subscription_starts() {
    let _alone = STORM_OR_FLOOD.lock().unwrap_or_else(|e| e.into_inner());
    let redis = RedisServer::start();
    // Room in each uid's history for everything sent while a join is read.
    let (a, b) = two_nodes(&redis, &["-history-size=5000"]);
    let mut checked = 0;
    for round in 0..20 {
        let uid = format!("new-{round}");
        let stop = Arc::new(AtomicBool::new(false));
        let batches = Arc::new(AtomicU64::new(0));
        let sender = {
            let (uid, stop, batches) = (uid.clone(), stop.clone(), batches.clone());
            // Numbers grow across rounds: a resume replays earlier rounds' broadcasts.
            let first = round * 1_000_000;
            std::thread::spawn(move || flood([a.addr, b.addr], uid, stop, batches, first))
        };
        wait_until("the flood to run", WAIT, || {
            batches.load(Ordering::Acquire) >= 10
        });
        // Every other round resumes from nothing, through the same path.
        let since = round % 2 == 1;
        let query = if since {
            format!("uid={uid}&since=0")
        } else {
            format!("uid={uid}")
        };
        let mut ws = b.ws(&query);
        let joined = Instant::now();
        let got = Arc::new(Mutex::new(Vec::<Value>::new()));
        let reader = {
            let got = got.clone();
            std::thread::spawn(move || {
                loop {
                    let m = recv_json(&mut ws);
                    let end = m["msg"] == "end";
                    got.lock().unwrap().push(m);
                    if end {
                        return;
                    }
                }
            })
        };
        let at_join = batches.load(Ordering::Acquire);
        wait_until("the flood to go on", WAIT, || {
            batches.load(Ordering::Acquire) >= at_join + 60
        });
        stop.store(true, Ordering::Release);
        let sent = sender.join().unwrap();
        a.send_ok(&json!({"topic":"uids","topic_ids":[uid],"msg":"end"}).to_string());
        reader.join().unwrap();
        let got = got.lock().unwrap();
        let mut frames = got.iter().peekable();
        if since {
            let head = frames.next().unwrap();
            assert_eq!(head["op"], "resumed", "round {round}: {head}");
        }
        let numbers: Vec<u64> = frames.filter_map(|m| m["msg"].as_u64()).collect();
        assert!(
            numbers.windows(2).all(|w| w[0] < w[1]),
            "round {round}: out of order or twice: {numbers:?}"
        );
        let have: HashSet<u64> = numbers.iter().copied().collect();
        let owed: Vec<u64> = sent
            .iter()
            .filter(|s| s.ok && s.at >= joined)
            .map(|s| s.n)
            .collect();
        let missing: Vec<u64> = owed.iter().copied().filter(|n| !have.contains(n)).collect();
        assert!(
            missing.is_empty(),
            "round {round}: answered 200 after the handshake, never received: {missing:?}"
        );
        assert!(owed.len() >= 200, "round {round}: only {} sent", owed.len());
        checked += owed.len();
    }
    report(&format!(
        "measured: 20 joins of new uids under a flood: {checked} messages owed, all received in order"
    ));
}

/// `calls` of one command in Redis's `INFO commandstats`.
fn command_calls(redis: &RedisServer, command: &str) -> u64 {
    let info = redis.client().cmd(&["INFO", "commandstats"]).text();
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

#[test]
fn a_connect_storm_subscribes_in_batches_and_every_connection_gets_its_messages() {
    let _alone = STORM_OR_FLOOD.lock().unwrap_or_else(|e| e.into_inner());
    use std::io::Write;
    let redis = RedisServer::start();
    let (a, _b) = two_nodes(&redis, &[]);
    let before = command_calls(&redis, "subscribe");
    const N: usize = 300;
    // Every handshake is on the wire before the first answer is read: a storm.
    let mut socks: Vec<std::net::TcpStream> = (0..N).map(|_| a.tcp()).collect();
    for (i, s) in socks.iter_mut().enumerate() {
        let req = raw_ws::upgrade_request(&format!("uid=storm-{i}"), "Upgrade");
        s.write_all(req.as_bytes()).unwrap();
    }
    for s in &mut socks {
        assert_eq!(read_response(s).status, 101);
    }
    wait_stats(&a, "every uid subscribed", |s| s["queue"]["channels"] == N);
    let subscribes = command_calls(&redis, "subscribe") - before;
    report(&format!(
        "measured: {N} handshakes of new uids at once: {subscribes} SUBSCRIBE commands"
    ));
    assert!(
        subscribes <= (N / 10) as u64,
        "{subscribes} SUBSCRIBEs for {N} joins"
    );
    let body: Vec<Value> = (0..N)
        .map(|i| json!({"topic":"uids","topic_ids":[format!("storm-{i}")],"msg":i}))
        .collect();
    for chunk in body.chunks(100) {
        a.send_ok(&Value::from(chunk.to_vec()).to_string());
    }
    for (i, s) in socks.iter_mut().enumerate() {
        let f = raw_ws::next_frame(s);
        let m: Value = serde_json::from_slice(&f.payload).unwrap();
        assert_eq!(m["msg"], i, "{m}");
    }
    // All of them leave: the node unsubscribes them.
    let unsubscribes = command_calls(&redis, "unsubscribe");
    drop(socks);
    wait_stats(&a, "every uid unsubscribed", |s| {
        s["queue"]["channels"] == 0
    });
    let unsubscribes = command_calls(&redis, "unsubscribe") - unsubscribes;
    assert!(
        unsubscribes <= (N / 10) as u64,
        "{unsubscribes} UNSUBSCRIBEs"
    );
}

#[test]
fn joins_beyond_the_interest_queue_are_told_to_retry_and_the_others_start_later() {
    let redis = RedisServer::start();
    let (a, _b) = two_nodes(&redis, &["-queue-interest=1", "-queue-timeout=1s"]);
    // A stopped Redis holds the subscriber in its SUBSCRIBE: joins queue up behind it.
    signal(redis.pid(), "STOP");
    let mut open = Vec::new();
    let mut retried = 0;
    for i in 0..4 {
        let mut ws = a.ws(&format!("uid=waiting-{i}"));
        // The refused ones are closed with 1013 right after their handshake.
        ws.get_ref()
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        match ws.read() {
            Ok(tungstenite::Message::Close(Some(c))) => {
                assert_eq!(u16::from(c.code), 1013);
                retried += 1;
            }
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                ws.get_ref().set_read_timeout(Some(WAIT)).unwrap();
                open.push((i, ws));
            }
            other => panic!("{other:?}"),
        }
    }
    signal(redis.pid(), "CONT");
    assert!(retried >= 1, "none refused");
    assert!(!open.is_empty(), "none kept");
    wait_health(&a, 200);
    wait_stats(&a, "refusals counted", |s| {
        s["queue"]["joins_refused"].as_u64() == Some(retried)
    });
    for (i, ws) in &mut open {
        let uid = format!("waiting-{i}");
        a.send_ok(&json!({"topic":"uids","topic_ids":[uid],"msg":"late"}).to_string());
        assert_eq!(recv_json(ws)["msg"], "late");
    }
}

#[test]
fn a_join_whose_read_fails_is_read_again_once_redis_answers() {
    let redis = RedisServer::start();
    let (a, _b) = two_nodes(&redis, &["-queue-timeout=1s"]);
    // Writes (scripts and PUBLISH) wait, SUBSCRIBE goes through: the join's
    // subscription is made, its read times out and its fence cannot be published.
    redis.client().cmd(&["CLIENT", "PAUSE", "2500", "WRITE"]);
    let mut ws = a.ws("uid=frozen");
    // A write returns once the pause is over.
    redis.client().cmd(&["SET", "thaw", "1"]);
    a.send_ok(r#"{"topic":"uids","topic_ids":["frozen"],"msg":"thawed"}"#);
    assert_eq!(recv_json(&mut ws)["msg"], "thawed");
}
