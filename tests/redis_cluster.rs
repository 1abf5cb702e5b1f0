//! `-queue=redis-cluster/…` against a real Redis Cluster (three primaries, three
//! replicas, `tests/common/cluster.rs`) and two wspush nodes: unicast reaches the
//! node holding the uid wherever its slot lives, broadcasts reach every node,
//! resumes read both streams on the other node, and a primary failover with
//! `/send` running loses no message answered 200.

mod common;
use common::cluster::{self, RedisCluster};
use common::flood::{Flood, longest_gap};
use common::*;

use std::collections::HashMap;
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
    cluster::uid_per_primary(&mut cluster.client(), &cluster.primaries(), name, prefix)
}

/// A flood of `uid` posted to `a`, read by a client on `b`, once it is under way
/// (its first hundred messages delivered), so a fault meets it running.
fn flood_through(a: &Server, b: &Server, uid: &str) -> Flood {
    let mut ws = b.ws(&format!("uid={uid}"));
    a.send_ok(&unicast(uid, json!("hello")));
    assert_eq!(recv_json(&mut ws)["msg"], "hello");
    let addr = a.addr;
    let started = Instant::now();
    let flood = Flood::start(move |body| send_to(addr, body), uid, ws);
    flood.await_delivered(100, started, WAIT);
    flood
}

fn received(node: &Server) -> u64 {
    node.stats()["queue"]["received"].as_u64().unwrap()
}

fn unicast(uid: &str, msg: Value) -> String {
    json!({"topic":"uids","topic_ids":[uid],"msg":msg}).to_string()
}

#[test]
fn unicast_in_every_primarys_slots_reaches_only_the_node_holding_the_uid() {
    let cluster = RedisCluster::start();
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
    let cluster = RedisCluster::start();
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
    let cluster = RedisCluster::start();
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

enum Fault {
    /// `CLUSTER FAILOVER` on the replica: a planned hand-over.
    Planned,
    /// SIGKILL of the primary: the replica takes over after the node timeout.
    Killed,
}

/// A primary of the uid's slot fails over while `/send` floods the uid through
/// node A and its client on node B receives: every 200 arrives exactly once.
fn failover_with_send_running(fault: Fault, what: &str) {
    let mut cluster = RedisCluster::start();
    let name = unique_name("cluster-failover");
    let (a, b) = two_nodes(
        &cluster,
        &name,
        // -history-size: the stream keeps every message of the outage, so the
        // subscriber on B fills its gap however long the promotion takes.
        &[
            "-queue-wait=500ms",
            "-queue-backoff=500ms",
            "-history-size=5000",
        ],
    );
    let uid = "f".to_string();
    let primary = cluster.owner(&format!("{name}:{{u:{uid}}}:h"));
    let flood = flood_through(&a, &b, &uid);
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
    flood.await_delivered(200, fault_at + promoted, WAIT * 2);
    let out = flood.finish();
    report(&format!(
        "redis-cluster {what}: primary :{primary} -> :{new_primary} promoted after {:?}; \
         longest pause between two 200s {:?}, between two deliveries {:?}; \
         {} answered 200 (all delivered once), {} answered 503",
        promoted,
        longest_gap(&out.ok).0,
        longest_gap(&out.got).0,
        out.ok.len(),
        out.refused,
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
    let cluster = RedisCluster::start();
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
    let cluster = RedisCluster::start();
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
    let cluster = RedisCluster::start();
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
    let cluster = RedisCluster::start();
    let name = unique_name("cluster-reshard");
    let (a, b) = two_nodes(
        &cluster,
        &name,
        &["-queue-backoff=500ms", "-history-size=5000"],
    );
    let uid = "m".to_string();
    let key = format!("{name}:{{u:{uid}}}:h");
    let (slot, from) = (cluster.slot(&key), cluster.owner(&key));
    let to = cluster
        .primaries()
        .into_iter()
        .map(|(p, _)| p)
        .find(|p| *p != from)
        .unwrap();
    let flood = flood_through(&a, &b, &uid);
    cluster.move_slot(slot, from, to);
    assert_eq!(cluster.owner(&key), to);
    let moved = Instant::now();
    flood.await_delivered(100, moved, WAIT * 2);
    let out = flood.finish();
    report(&format!(
        "redis-cluster slot {slot} moved :{from} -> :{to}: longest pause between two 200s {:?}; \
         {} answered 200 (all delivered once), {} answered 503",
        longest_gap(&out.ok).0,
        out.ok.len(),
        out.refused,
    ));
}

/// `GET /presence` on a cluster: each uid's counts live in its own slot, so uids
/// on every primary are counted across both nodes; a killed node drops out within
/// `-presence-ttl`.
#[test]
fn presence_counts_uids_in_every_slot_range_across_nodes() {
    let cluster = RedisCluster::start();
    let name = unique_name("cluster-presence");
    let (a, mut b) = two_nodes(&cluster, &name, &["-presence-ttl=1s"]);
    let uids: Vec<String> = uid_per_primary(&cluster, &name, "p-")
        .into_iter()
        .map(|(_, uid)| uid)
        .collect();
    let mut on_a: Vec<Ws> = uids.iter().map(|u| a.ws(&format!("uid={u}"))).collect();
    on_a.push(a.ws(&format!("uid={}", uids[0])));
    let on_b: Vec<Ws> = uids[1..]
        .iter()
        .map(|u| b.ws(&format!("uid={u}")))
        .collect();
    let asked = format!("{},nobody", uids.join(","));
    let presence = |node: &Server| {
        let r = node.get(&format!("/presence?uid={asked}"));
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["presence"].clone()
    };
    let mut both = serde_json::Map::new();
    both.insert(uids[0].clone(), json!(2));
    for uid in &uids[1..] {
        both.insert(uid.clone(), json!(2));
    }
    both.insert("nobody".into(), json!(0));
    let both = Value::Object(both);
    for node in [&a, &b] {
        wait_until("presence across both nodes", WAIT, || {
            presence(node) == both
        });
    }
    b.kill();
    let mut a_only = both.clone();
    for uid in &uids[1..] {
        a_only[uid] = json!(1);
    }
    let start = Instant::now();
    wait_until("the killed node drops out", Duration::from_secs(5), || {
        presence(&a) == a_only
    });
    report(&format!(
        "measured: a killed node's uids left /presence on a cluster after {:?} with -presence-ttl=1s",
        start.elapsed()
    ));
    drop((on_a, on_b));
}

/// A cluster behind `requirepass`: the credentials given before the seeds reach
/// every node the slot map names (publisher, reader, presence and the sharded
/// subscribers), and a node with the wrong password answers 503 with a JSON error
/// and never writes the password to its log.
#[test]
fn a_password_protected_cluster_serves_every_primary() {
    let cluster = RedisCluster::start();
    let name = unique_name("cluster-auth");
    let uids: Vec<String> = uid_per_primary(&cluster, &name, "k-")
        .into_iter()
        .map(|(_, uid)| uid)
        .collect();
    for n in &cluster.nodes {
        let mut c = RespClient::connect(n.port).expect("a cluster node");
        // masterauth first: replicas must still sync once their primary asks.
        assert_eq!(
            c.cmd(&["CONFIG", "SET", "masterauth", "s3cret"]).text(),
            "OK"
        );
        assert_eq!(
            c.cmd(&["CONFIG", "SET", "requirepass", "s3cret"]).text(),
            "OK"
        );
    }
    let seeds = |pass: &str| {
        format!(
            "-queue=redis-cluster/:{pass}@127.0.0.1:{},127.0.0.1:{}",
            cluster.nodes[0].port, cluster.nodes[1].port
        )
    };
    let (flag, queue_name) = (seeds("s3cret"), format!("-queue-name={name}"));
    let args = [flag.as_str(), queue_name.as_str(), "-presence-ttl=1s"];
    let (a, b) = (Server::start(&args), Server::start(&args));
    wait_health(&a, 200);
    wait_health(&b, 200);
    let mut clients: Vec<Ws> = uids.iter().map(|u| b.ws(&format!("uid={u}"))).collect();
    wait_until("b subscribed on every primary", WAIT, || {
        b.stats()["queue"]["channels"] == uids.len()
    });
    for (uid, ws) in uids.iter().zip(&mut clients) {
        a.send_ok(&unicast(uid, json!(format!("to {uid}"))));
        assert_eq!(recv_json(ws)["msg"], format!("to {uid}"));
    }
    wait_until("presence read through every primary", WAIT, || {
        let r = a.get(&format!("/presence?uid={}", uids.join(",")));
        r.status == 200 && uids.iter().all(|u| r.json()["presence"][u] == 1)
    });

    let dir = TempDir::new("cluster-auth-log");
    let log = dir.0.join("wrong.log");
    let wrong = seeds("wrong-secret");
    let c = Server::start_with(&[wrong.as_str(), queue_name.as_str()], &[], Some(&log));
    wait_health(&c, 503);
    let r = c.send(&unicast(&uids[0], json!("never")));
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(!r.error().is_empty(), "{}", r.text());
    drop(c);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains("wrong-secret"),
        "the password in the log: {text}"
    );
}
