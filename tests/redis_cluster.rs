//! `-queue=redis-cluster/…` against a real Redis Cluster (three primaries, three
//! replicas, `tests/common/cluster.rs`) and two wspush nodes: unicast reaches the
//! node holding the uid wherever its slot lives, broadcasts reach every node,
//! resumes read both streams on the other node, and a primary failover with
//! `/send` running loses no message answered 200.

mod common;
use common::cluster::RedisCluster;
use common::*;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn two_nodes(cluster: &RedisCluster, name: &str, extra: &[&str]) -> (Server, Server) {
    let flag = cluster.queue_flag();
    let name = format!("-queue-name={name}");
    let mut args = vec![flag.as_str(), name.as_str()];
    args.extend_from_slice(extra);
    let (a, b) = (Server::start(&args), Server::start(&args));
    wait_health(&a, 200);
    wait_health(&b, 200);
    (a, b)
}

/// One uid (`<prefix><n>`) per primary: its stream's slot is that primary's.
fn uid_per_primary(cluster: &RedisCluster, name: &str, prefix: &str) -> Vec<(u16, String)> {
    let primaries = cluster.primaries();
    let mut client = cluster.client();
    let mut out: Vec<(u16, String)> = Vec::new();
    for n in 0.. {
        let uid = format!("{prefix}{n}");
        let key = format!("{name}:{{u:{uid}}}:h");
        let slot: u16 = client
            .cmd(&["CLUSTER", "KEYSLOT", &key])
            .text()
            .parse()
            .unwrap();
        let (port, _) = primaries
            .iter()
            .find(|(_, r)| r.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
            .unwrap();
        if !out.iter().any(|(p, _)| p == port) {
            out.push((*port, uid));
        }
        if out.len() == primaries.len() {
            break;
        }
    }
    out
}

fn received(node: &Server) -> u64 {
    node.stats()["queue"]["received"].as_u64().unwrap()
}

fn unicast(uid: &str, msg: Value) -> String {
    json!({"topic":"uids","topic_ids":[uid],"msg":msg}).to_string()
}

#[test]
fn unicast_in_every_primarys_slots_reaches_only_the_node_holding_the_uid() {
    let Some(cluster) = RedisCluster::start_or_skip("unicast per slot range") else {
        return;
    };
    let name = unique_name("cluster-uni");
    let (a, b) = two_nodes(&cluster, &name, &[]);
    let on_a = uid_per_primary(&cluster, &name, "a-");
    let on_b = uid_per_primary(&cluster, &name, "b-");
    assert_eq!(on_a.len(), 3, "three primaries");
    let mut clients: Vec<(String, Ws)> = Vec::new();
    for (_, uid) in &on_a {
        clients.push((uid.clone(), a.ws(&format!("uid={uid}"))));
    }
    for (_, uid) in &on_b {
        clients.push((uid.clone(), b.ws(&format!("uid={uid}"))));
    }
    wait_stats(&a, "A subscribed its uids", |s| s["queue"]["channels"] == 3);
    wait_stats(&b, "B subscribed its uids", |s| s["queue"]["channels"] == 3);
    let (before_a, before_b) = (received(&a), received(&b));
    // Each uid gets 10 messages, alternately through either node.
    for i in 0..10 {
        for (uid, _) in &clients {
            let via = if i % 2 == 0 { &a } else { &b };
            via.send_ok(&unicast(uid, json!(format!("{uid}:{i}"))));
        }
    }
    for (uid, ws) in &mut clients {
        for i in 0..10 {
            let m = recv_json(ws);
            assert_eq!(m["msg"], format!("{uid}:{i}"), "{uid}");
            let id = m["id"].as_str().unwrap();
            assert!(id.starts_with('u'), "a uid stream's id: {id}");
        }
    }
    // Nothing else came: the next message of each is the marker sent last.
    for (uid, ws) in &mut clients {
        a.send_ok(&unicast(uid, json!("end")));
        assert_eq!(recv_json(ws)["msg"], "end", "{uid}");
    }
    // Each node read from the cluster only its own uids' 11 messages each.
    assert_eq!(received(&a) - before_a, 33, "{}", a.stats());
    assert_eq!(received(&b) - before_b, 33, "{}", b.stats());
}

#[test]
fn a_broadcast_reaches_every_node_in_order() {
    let Some(cluster) = RedisCluster::start_or_skip("broadcast") else {
        return;
    };
    let name = unique_name("cluster-all");
    let (a, b) = two_nodes(&cluster, &name, &[]);
    let mut on_a = a.ws("uid=x");
    let mut on_b = b.ws("");
    for i in 0..20 {
        let via = if i % 2 == 0 { &a } else { &b };
        via.send_ok(&json!({"topic":"all","msg":i}).to_string());
    }
    for ws in [&mut on_a, &mut on_b] {
        for i in 0..20 {
            let m = recv_json(ws);
            assert_eq!(m["msg"], i);
            assert!(m["id"].as_str().unwrap().starts_with('g'), "{m}");
        }
    }
}

/// The ids a client got, per stream: what `wspush.js` sends as `since`.
fn since_of(ids: &HashMap<char, String>) -> String {
    let part = |k: char| ids.get(&k).cloned().unwrap_or_else(|| "0".into());
    format!("{},{}", part('u'), part('g'))
}

/// Reads `n` pushes, remembering the last id of each stream.
fn take(ws: &mut Ws, n: usize, ids: &mut HashMap<char, String>) -> Vec<Value> {
    (0..n)
        .map(|_| {
            let m = recv_json(ws);
            let id = m["id"].as_str().unwrap().to_string();
            ids.insert(id.chars().next().unwrap(), id);
            m["msg"].clone()
        })
        .collect()
}

/// Splits pushes into the uid's (strings) and the broadcasts (numbers), each in order.
fn split(msgs: &[Value]) -> (Vec<Value>, Vec<Value>) {
    msgs.iter().cloned().partition(|m| m.is_string())
}

#[test]
fn a_resume_on_the_other_node_gets_exactly_what_was_missed_from_both_streams() {
    let Some(cluster) = RedisCluster::start_or_skip("resume") else {
        return;
    };
    let name = unique_name("cluster-resume");
    let (a, b) = two_nodes(&cluster, &name, &[]);
    let mut ids = HashMap::new();
    let mut ws = a.ws("uid=r");
    for i in 0..3 {
        a.send_ok(&unicast("r", json!(format!("before {i}"))));
        a.send_ok(&json!({"topic":"all","msg":i}).to_string());
    }
    let got = take(&mut ws, 6, &mut ids);
    assert_eq!(split(&got).0, ["before 0", "before 1", "before 2"]);
    let since = since_of(&ids);
    drop(ws);
    for i in 0..3 {
        b.send_ok(&unicast("r", json!(format!("missed {i}"))));
        a.send_ok(&json!({"topic":"all","msg":10 + i}).to_string());
    }
    let mut ws = b.ws(&format!("uid=r&since={since}"));
    assert_eq!(
        recv_json(&mut ws),
        json!({"op":"resumed","complete":true}),
        "since={since}"
    );
    let got = take(&mut ws, 6, &mut ids);
    let (own, all) = split(&got);
    assert_eq!(own, ["missed 0", "missed 1", "missed 2"]);
    assert_eq!(all, [10, 11, 12]);
    // Then live, nothing replayed twice.
    b.send_ok(&unicast("r", json!("live")));
    assert_eq!(recv_json(&mut ws)["msg"], "live");
    // A plain Redis id names no cluster stream: everything, and not complete.
    let mut plain = a.ws("uid=r&since=1f-42");
    assert_eq!(
        recv_json(&mut plain),
        json!({"op":"resumed","complete":false})
    );
    assert_eq!(take(&mut plain, 13, &mut HashMap::new()).len(), 13);
}

/// Posts message n = 0, 1, … to `uid` through `addr` until `stop`; returns the
/// numbers answered 200, each with when, and how many were answered 503.
fn flood(
    addr: SocketAddr,
    uid: String,
    stop: Arc<AtomicBool>,
) -> JoinHandle<(Vec<(u64, Instant)>, u64)> {
    thread::spawn(move || {
        let (mut ok, mut refused) = (Vec::new(), 0);
        let mut n = 0u64;
        while !stop.load(Ordering::Acquire) {
            let r = send_to(addr, &unicast(&uid, json!(n)));
            match r.status {
                200 => ok.push((n, Instant::now())),
                503 => refused += 1,
                other => panic!("unexpected {other}: {}", r.text()),
            }
            n += 1;
            thread::sleep(Duration::from_millis(3));
        }
        (ok, refused)
    })
}

/// Reads pushes on `ws` into `got` (number, when) until `stop` and a quiet second.
fn collect(
    mut ws: Ws,
    got: Arc<Mutex<Vec<(u64, Instant)>>>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        loop {
            match recv_json_within(&mut ws, Duration::from_secs(1)) {
                Some(m) => {
                    let n = m["msg"].as_u64().expect("a flood number");
                    got.lock().unwrap().push((n, Instant::now()));
                }
                None if stop.load(Ordering::Acquire) => return,
                None => {}
            }
        }
    })
}

/// The longest pause between two consecutive instants, and where it ended.
fn longest_gap(times: &[Instant]) -> Duration {
    times
        .windows(2)
        .map(|w| w[1].duration_since(w[0]))
        .max()
        .unwrap_or_default()
}

enum Fault {
    /// `CLUSTER FAILOVER` on the replica: a planned hand-over.
    Planned,
    /// SIGKILL of the primary: the replica takes over after the node timeout.
    Killed,
}

/// A primary of the uid's slot fails over while `/send` floods the uid through
/// node A and its client on node B receives: every 200 arrives exactly once.
fn failover_with_send_running(fault: Fault, what: &str) {
    let Some(mut cluster) = RedisCluster::start_or_skip(what) else {
        return;
    };
    let name = unique_name("cluster-failover");
    let (a, b) = two_nodes(
        &cluster,
        &name,
        &["-queue-wait=500ms", "-queue-backoff=500ms"],
    );
    let uid = "f".to_string();
    let primary = cluster.owner(&format!("{name}:{{u:{uid}}}:h"));
    let mut ws = b.ws(&format!("uid={uid}"));
    a.send_ok(&unicast(&uid, json!("hello")));
    assert_eq!(recv_json(&mut ws)["msg"], "hello");
    let got = Arc::new(Mutex::new(Vec::new()));
    let (stop_send, stop_read) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let reader = collect(ws, got.clone(), stop_read.clone());
    let sender = flood(a.addr, uid.clone(), stop_send.clone());
    thread::sleep(Duration::from_millis(500));
    let fault_at = Instant::now();
    let new_primary = match fault {
        Fault::Planned => cluster.failover(primary),
        Fault::Killed => {
            let replica = cluster.replica_of(primary);
            cluster.kill(primary);
            cluster.await_primary(replica, WAIT * 2);
            // With -queue-wait a shard without a replica answers 503: the killed
            // node comes back, as the replica of the new primary.
            cluster.restart(primary);
            replica
        }
    };
    let promoted = fault_at.elapsed();
    // The flood goes on until the new primary took 200 more.
    wait_until("deliveries after the failover", WAIT * 2, || {
        got.lock()
            .unwrap()
            .iter()
            .filter(|(_, t)| *t > fault_at + promoted)
            .count()
            >= 200
    });
    stop_send.store(true, Ordering::Release);
    let (ok, refused) = sender.join().unwrap();
    let accepted: HashSet<u64> = ok.iter().map(|(n, _)| *n).collect();
    wait_until("every 200 delivered", WAIT, || {
        let got = got.lock().unwrap();
        let have: HashSet<u64> = got.iter().map(|(n, _)| *n).collect();
        accepted.is_subset(&have)
    });
    stop_read.store(true, Ordering::Release);
    reader.join().unwrap();
    let got = got.lock().unwrap();
    let mut seen = HashSet::new();
    for (n, _) in got.iter() {
        assert!(seen.insert(*n), "message {n} delivered twice");
    }
    let sends: Vec<Instant> = ok.iter().map(|(_, t)| *t).collect();
    let deliveries: Vec<Instant> = got.iter().map(|(_, t)| *t).collect();
    report(&format!(
        "redis-cluster {what}: primary :{primary} -> :{new_primary} promoted after {:?}; \
         longest pause between two 200s {:?}, between two deliveries {:?}; \
         {} answered 200 (all delivered once), {refused} answered 503",
        promoted,
        longest_gap(&sends),
        longest_gap(&deliveries),
        accepted.len(),
    ));
}

#[test]
fn a_planned_failover_with_send_running_loses_no_200() {
    failover_with_send_running(Fault::Planned, "CLUSTER FAILOVER");
}

#[test]
fn a_killed_primary_with_send_running_loses_no_200() {
    failover_with_send_running(Fault::Killed, "killed primary");
}

#[test]
fn a_connect_storm_over_every_slot_range_subscribes_each_uid() {
    let Some(cluster) = RedisCluster::start_or_skip("connect storm") else {
        return;
    };
    let name = unique_name("cluster-storm");
    let (a, b) = two_nodes(&cluster, &name, &[]);
    // 300 uids land in one turn of the subscriber: several per primary, in many
    // slots (a sharded subscription names one slot's channels only).
    let mut clients: Vec<(String, Ws)> = (0..300)
        .map(|i| {
            let uid = format!("s{i}");
            let ws = a.ws(&format!("uid={uid}"));
            (uid, ws)
        })
        .collect();
    for (uid, _) in &clients {
        b.send_ok(&unicast(uid, json!(uid)));
    }
    for (uid, ws) in &mut clients {
        assert_eq!(recv_json(ws)["msg"], json!(uid));
    }
    // Now live through the subscriptions (the joins' reads are done).
    for (uid, _) in &clients {
        b.send_ok(&unicast(uid, json!("live")));
    }
    for (uid, ws) in &mut clients {
        assert_eq!(recv_json(ws)["msg"], "live", "{uid}");
    }
    wait_stats(&a, "A subscribed every uid", |s| {
        s["queue"]["channels"] == 300
    });
}

/// Sends until one is answered 200 (a node may be resubscribing meanwhile).
fn send_until_ok(node: &Server, body: &str) {
    wait_until("a 200 for /send", WAIT, || node.send(body).status == 200);
}

#[test]
fn a_gap_one_shard_cannot_fill_sends_off_only_that_uids_connections() {
    let Some(cluster) = RedisCluster::start_or_skip("unfillable gap") else {
        return;
    };
    let name = unique_name("cluster-gap");
    let (a, b) = two_nodes(&cluster, &name, &["-history-size=3"]);
    let uids = uid_per_primary(&cluster, &name, "g-");
    let ((lost_port, lost), (_, kept)) = (uids[0].clone(), uids[1].clone());
    let mut on_lost = a.ws(&format!("uid={lost}"));
    let mut on_kept = a.ws(&format!("uid={kept}"));
    for (uid, ws) in [(&lost, &mut on_lost), (&kept, &mut on_kept)] {
        b.send_ok(&unicast(uid, json!("first")));
        assert_eq!(recv_json(ws)["msg"], "first");
    }
    // Node A is frozen while its subscriptions on one primary are cut and more
    // than -history-size messages go to a uid of that primary: its stream no
    // longer reaches back to what node A delivered last.
    signal(a.pid(), "STOP");
    let mut primary = common::RespClient::connect(lost_port).unwrap();
    primary.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    for i in 0..10 {
        send_until_ok(&b, &unicast(&lost, json!(i)));
    }
    signal(a.pid(), "CONT");
    match on_lost.read() {
        Ok(tungstenite::Message::Close(Some(c))) => assert_eq!(u16::from(c.code), 1012),
        other => panic!("expected close 1012, got {other:?}"),
    }
    // The other uid's connection stays, and goes on receiving.
    send_until_ok(&b, &unicast(&kept, json!("after")));
    assert_eq!(recv_json(&mut on_kept)["msg"], "after");
    // The one sent off learns from its resume that something is missing.
    let mut again = a.ws(&format!("uid={lost}&since=0"));
    assert_eq!(
        recv_json(&mut again),
        json!({"op":"resumed","complete":false})
    );
    for _ in 0..3 {
        recv_json(&mut again); // what the stream still holds
    }
    // Its uid left and came back on the same primary: subscribed again live,
    // without taking its own SUNSUBSCRIBE's answer for a moved slot.
    b.send_ok(&unicast(&lost, json!("live")));
    assert_eq!(recv_json(&mut again)["msg"], "live");
    assert_eq!(a.stats()["queue"]["reconnects"], 1, "{}", a.stats());
}

#[test]
fn a_node_shutting_down_delivers_what_it_accepted_then_closes_with_1001() {
    let Some(cluster) = RedisCluster::start_or_skip("shutdown") else {
        return;
    };
    let name = unique_name("cluster-stop");
    let (mut a, _b) = two_nodes(&cluster, &name, &[]);
    let mut ws = a.ws("uid=z");
    a.send_ok(&unicast("z", json!("first")));
    assert_eq!(recv_json(&mut ws)["msg"], "first");
    for i in 0..50 {
        a.send_ok(&unicast("z", json!(i)));
    }
    a.request_shutdown();
    for i in 0..50 {
        assert_eq!(recv_json(&mut ws)["msg"], i);
    }
    match ws.read() {
        Ok(tungstenite::Message::Close(Some(c))) => assert_eq!(u16::from(c.code), 1001),
        other => panic!("expected close 1001, got {other:?}"),
    }
    let _ = ws.flush(); // the close answered, so the node need not wait for it
    let status = a.wait_exit();
    assert!(status.success(), "{status}");
}

#[test]
fn a_slot_moved_to_another_primary_with_send_running_loses_no_200() {
    let Some(cluster) = RedisCluster::start_or_skip("slot migration") else {
        return;
    };
    let name = unique_name("cluster-reshard");
    let (a, b) = two_nodes(&cluster, &name, &["-queue-backoff=500ms"]);
    let uid = "m".to_string();
    let key = format!("{name}:{{u:{uid}}}:h");
    let (slot, from) = (cluster.slot(&key), cluster.owner(&key));
    let to = cluster
        .primaries()
        .into_iter()
        .map(|(p, _)| p)
        .find(|p| *p != from)
        .unwrap();
    let mut ws = b.ws(&format!("uid={uid}"));
    a.send_ok(&unicast(&uid, json!("hello")));
    assert_eq!(recv_json(&mut ws)["msg"], "hello");
    let got = Arc::new(Mutex::new(Vec::new()));
    let (stop_send, stop_read) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let reader = collect(ws, got.clone(), stop_read.clone());
    let sender = flood(a.addr, uid.clone(), stop_send.clone());
    thread::sleep(Duration::from_millis(300));
    cluster.move_slot(slot, from, to);
    assert_eq!(cluster.owner(&key), to);
    let moved = Instant::now();
    wait_until("deliveries after the move", WAIT * 2, || {
        got.lock()
            .unwrap()
            .iter()
            .filter(|(_, t)| *t > moved)
            .count()
            >= 100
    });
    stop_send.store(true, Ordering::Release);
    let (ok, refused) = sender.join().unwrap();
    let accepted: HashSet<u64> = ok.iter().map(|(n, _)| *n).collect();
    wait_until("every 200 delivered", WAIT, || {
        let have: HashSet<u64> = got.lock().unwrap().iter().map(|(n, _)| *n).collect();
        accepted.is_subset(&have)
    });
    stop_read.store(true, Ordering::Release);
    reader.join().unwrap();
    let got = got.lock().unwrap();
    let mut seen = HashSet::new();
    for (n, _) in got.iter() {
        assert!(seen.insert(*n), "message {n} delivered twice");
    }
    let sends: Vec<Instant> = ok.iter().map(|(_, t)| *t).collect();
    report(&format!(
        "redis-cluster slot {slot} moved :{from} -> :{to}: longest pause between two 200s {:?}; \
         {} answered 200 (all delivered once), {refused} answered 503",
        longest_gap(&sends),
        accepted.len()
    ));
}
