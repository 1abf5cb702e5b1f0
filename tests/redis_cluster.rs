//! `-queue=redis-cluster/…` against a real Redis Cluster (three primaries, three
//! replicas, `tests/common/cluster.rs`) and two wspush nodes: unicast reaches the
//! node holding the uid wherever its slot lives, broadcasts reach every node,
//! resumes read both streams on the other node, and a primary failover with
//! `/send` running loses no message answered 200.

mod common;
use common::cluster::RedisCluster;
use common::*;

use std::collections::HashMap;

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
