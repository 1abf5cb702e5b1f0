//! The Disque backend against a real `disque-server` (from `DISQUE_SERVER` or
//! PATH). No package registry ships Disque, so every test here is ignored unless
//! asked for (`-- --include-ignored`, which `make unit` adds when a server is
//! there); nothing is faked, and an asked-for test without a server fails.

mod common;
use common::*;

use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A fresh Disque server; the test fails when there is none.
fn disque() -> DisqueServer {
    DisqueServer::start_or_skip("disque").expect("needs disque-server (DISQUE_SERVER or on PATH)")
}

fn node(disque: &DisqueServer, queue: &str, extra: &[&str]) -> Server {
    let flag = disque.queue_flag();
    let name = format!("-queue-name={queue}");
    let mut args = vec![flag.as_str(), name.as_str()];
    args.extend_from_slice(extra);
    let s = Server::start(&args);
    wait_health(&s, 200);
    s
}

/// The jobs waiting in `queue`, oldest first, without taking them.
fn peek(c: &mut RespClient, queue: &str, n: usize) -> Vec<(String, Vec<u8>)> {
    match c.cmd(&["QPEEK", queue, &n.to_string()]) {
        Resp::Array(jobs) => jobs
            .iter()
            .map(|j| match j.array() {
                [_, Resp::Bulk(id), Resp::Bulk(body), ..] => {
                    (String::from_utf8(id.clone()).unwrap(), body.clone())
                }
                other => panic!("QPEEK entry {other:?}"),
            })
            .collect(),
        other => panic!("QPEEK {other:?}"),
    }
}

fn int(r: Option<&Resp>) -> i64 {
    match r {
        Some(Resp::Int(i)) => *i,
        other => panic!("not an integer: {other:?}"),
    }
}

/// Waits until Disque has no live job `id` any more (acknowledged or expired).
fn wait_gone(c: &mut RespClient, id: &str, within: Duration) {
    wait_until(&format!("job {id} to be gone"), within, || {
        match c.cmd(&["SHOW", id]) {
            Resp::Nil => true,
            show => show.field("state").map(Resp::text).as_deref() == Some("acked"),
        }
    });
}

#[test]
#[ignore = "needs disque-server (DISQUE_SERVER or on PATH)"]
fn addjob_arguments_and_ack_after_delivery() {
    let disque = disque();
    let queue = unique_name("flow");
    let a = node(
        &disque,
        &queue,
        &["-queue-retry=3s", "-queue-ttl=600s", "-queue-node=a"],
    );
    let mut ws = a.ws("uid=1");
    let mut c = disque.client();
    // Each node consumes its own queue; the shared name is their prefix.
    let queue = format!("{queue}:node:a");
    // Hold the consumer back so the jobs can be inspected on the server.
    assert_eq!(c.cmd(&["PAUSE", &queue, "out"]), Resp::Simple("out".into()));

    let expires = unix_now() + 120;
    a.send_ok(&format!(
        r#"{{"topic":"uids","topic_ids":[1],"msg":{{"x": 1}},"timeout":{expires},"time":"t"}}"#
    ));
    a.send_ok(r#"[{"topic":"all","types":"chat","msg":"a"},{"topic":"all","msg":"b"}]"#);
    let jobs = peek(&mut c, &queue, 10);
    assert_eq!(jobs.len(), 2, "one job per /send batch");

    let (id1, body1) = &jobs[0];
    let wire: Value = serde_json::from_slice(body1).unwrap();
    assert_eq!(
        wire,
        json!([{"target":["1"],"types":"notice","expires":expires,
                "push":{"types":"notice","msg":{"x":1},"time":"t"}}])
    );
    let show = c.cmd(&["SHOW", id1]);
    assert_eq!(show.field("queue").unwrap().text(), queue);
    assert_eq!(show.field("state").unwrap().text(), "queued");
    assert_eq!(int(show.field("retry")), 3, "RETRY from -queue-retry");
    let ttl = int(show.field("ttl"));
    assert!((115..=120).contains(&ttl), "TTL from the timeout: {ttl}");
    let show2 = c.cmd(&["SHOW", &jobs[1].0]);
    let ttl2 = int(show2.field("ttl"));
    assert!((595..=600).contains(&ttl2), "TTL from -queue-ttl: {ttl2}");
    assert_eq!(
        serde_json::from_slice::<Value>(&jobs[1].1).unwrap()[1]["target"],
        "all"
    );
    assert_eq!(recv_json_within(&mut ws, Duration::from_millis(300)), None);

    // Let the consumer run: both jobs are delivered in order, then acknowledged.
    c.cmd(&["PAUSE", &queue, "none"]);
    let mut first = recv_json(&mut ws);
    let id = first.as_object_mut().unwrap().remove("id");
    assert!(
        id.is_some_and(|id| id.is_string()),
        "the delivering node gives it an id"
    );
    assert_eq!(first, json!({"types":"notice","msg":{"x":1},"time":"t"}));
    assert_eq!(recv_json(&mut ws)["msg"], "a");
    assert_eq!(recv_json(&mut ws)["msg"], "b");
    for (id, _) in &jobs {
        wait_gone(&mut c, id, WAIT);
    }
    assert_eq!(c.cmd(&["QLEN", &queue]), Resp::Int(0));
    let s = a.stats();
    assert_eq!(s["queue"]["backend"], "disque");
    assert_eq!(s["queue"]["state"], "up");
    assert_eq!(s["messages_in"], 3);
}

#[test]
#[ignore = "needs disque-server (DISQUE_SERVER or on PATH)"]
fn a_job_taken_by_a_node_that_dies_is_redelivered() {
    let disque = disque();
    let queue = unique_name("redeliver");
    // The node that comes back with the same id consumes the same queue.
    let mut first = node(&disque, &queue, &["-queue-node=n1"]);
    let own = format!("{queue}:node:n1");
    let mut c = disque.client();
    wait_until("the node's consumer to block in GETJOB", WAIT, || {
        c.cmd(&["CLIENT", "LIST"]).text().contains("cmd=getjob")
    });
    // Freeze the first node while its GETJOB is blocked: Disque hands it the job,
    // but it can never deliver or acknowledge it.
    signal(first.pid(), "STOP");
    let body = r#"[{"target":["7"],"types":"notice","expires":0,"push":{"types":"notice","msg":"again","time":"t"}}]"#;
    let id = c
        .cmd(&["ADDJOB", &own, body, "1000", "RETRY", "1", "TTL", "60"])
        .text();
    wait_until("the frozen node to take the job", WAIT, || {
        c.cmd(&["SHOW", &id])
            .field("state")
            .map(Resp::text)
            .as_deref()
            == Some("active")
    });
    first.kill();
    let died = Instant::now();

    // Held until uid 7 is connected: a node takes jobs whether or not it has clients.
    c.cmd(&["PAUSE", &own, "out"]);
    let second = node(&disque, &queue, &["-queue-node=n1"]);
    let mut ws = second.ws("uid=7");
    c.cmd(&["PAUSE", &own, "none"]);
    assert_eq!(recv_json(&mut ws)["msg"], "again");
    report(&format!(
        "measured: Disque job taken by a killed node redelivered to its restarted successor after {:?} (RETRY 1 s)",
        died.elapsed()
    ));
    wait_gone(&mut c, &id, WAIT);
}

#[test]
#[ignore = "needs disque-server (DISQUE_SERVER or on PATH)"]
fn a_message_that_expires_in_disque_is_dropped() {
    let disque = disque();
    let queue = unique_name("expiry");
    let a = node(&disque, &queue, &["-queue-node=e"]);
    let queue = format!("{queue}:node:e");
    let mut ws = a.ws("uid=3");
    let mut c = disque.client();
    c.cmd(&["PAUSE", &queue, "out"]);
    a.send_ok(&format!(
        r#"{{"topic":"uids","topic_ids":[3],"msg":"stale","timeout":{}}}"#,
        unix_now() + 2
    ));
    let jobs = peek(&mut c, &queue, 1);
    assert_eq!(jobs.len(), 1);
    wait_gone(&mut c, &jobs[0].0, WAIT);
    c.cmd(&["PAUSE", &queue, "none"]);
    a.send_ok(r#"{"topic":"uids","topic_ids":[3],"msg":"fresh"}"#);
    assert_eq!(recv_json(&mut ws)["msg"], "fresh");
    assert_eq!(recv_json_within(&mut ws, Duration::from_millis(300)), None);
}

#[test]
#[ignore = "needs disque-server (DISQUE_SERVER or on PATH)"]
fn disque_restart_recovers_without_node_restart() {
    let mut disque = disque();
    let queue = unique_name("restart");
    let mut a = node(&disque, &queue, &["-queue-timeout=1s", "-queue-backoff=1s"]);
    let mut ws = a.ws("");
    disque.kill();
    wait_health(&a, 503);
    let r = a.send(r#"{"topic":"all","msg":"down"}"#);
    assert_eq!(r.status, 503, "{}", r.text());
    disque.restart();
    wait_health(&a, 200);
    a.send_ok(r#"{"topic":"all","msg":"back"}"#);
    assert_eq!(recv_json(&mut ws)["msg"], "back");
    assert!(a.stats()["queue"]["reconnects"].as_u64().unwrap() >= 1);
    let status = a.terminate();
    assert!(status.success(), "{status}");
}

#[test]
#[ignore = "needs disque-server (DISQUE_SERVER or on PATH)"]
fn a_backup_takes_over_when_the_clients_fail_over() {
    let disque = disque();
    let queue = unique_name("backup");
    let active = node(&disque, &queue, &[]);
    let backup = node(&disque, &queue, &[]);
    let mut ws = active.ws("uid=1");
    // Published on either node, every message reaches the active node's client.
    for i in 0..20 {
        let via = if i % 2 == 0 { &active } else { &backup };
        via.send_ok(&format!(r#"{{"topic":"uids","topic_ids":[1],"msg":{i}}}"#));
    }
    let got: Vec<i64> = (0..20)
        .map(|_| recv_json(&mut ws)["msg"].as_i64().unwrap())
        .collect();
    let mut sorted = got.clone();
    sorted.sort();
    assert_eq!(sorted, (0..20).collect::<Vec<_>>(), "{got:?}");
    assert_eq!(backup.stats()["messages_out"], 0);

    // Failover: the active node goes away and its client reconnects to the
    // backup, which pushes what is sent from then on, through either node.
    drop(ws);
    drop(active);
    let mut ws = backup.ws("uid=1");
    backup.send_ok(r#"{"topic":"uids","topic_ids":[1],"msg":"after failover"}"#);
    assert_eq!(recv_json(&mut ws)["msg"], "after failover");
}

#[test]
#[ignore = "needs disque-server (DISQUE_SERVER or on PATH)"]
fn two_nodes_with_clients_deliver_every_message_to_its_clients() {
    let disque = disque();
    let queue = unique_name("both");
    let a = node(&disque, &queue, &[]);
    let b = node(&disque, &queue, &[]);
    // What nginx `backup` leaves after the primary comes back: clients on both.
    let mut a1 = a.ws("uid=1");
    let mut b2 = b.ws("uid=2");
    let rounds = 10;
    for i in 0..rounds {
        let via = if i % 2 == 0 { &a } else { &b };
        via.send_ok(&format!(
            r#"{{"topic":"uids","topic_ids":[1],"msg":"1-{i}"}}"#
        ));
        via.send_ok(&format!(
            r#"{{"topic":"uids","topic_ids":[2],"msg":"2-{i}"}}"#
        ));
        via.send_ok(&format!(
            r#"{{"topic":"uids","topic_ids":[1,2],"msg":"12-{i}"}}"#
        ));
        via.send_ok(&format!(r#"{{"topic":"all","msg":"all-{i}"}}"#));
    }
    let mut lost = 0;
    let mut wrong = Vec::new();
    for (ws, uid) in [(&mut a1, 1), (&mut b2, 2)] {
        let mut want: Vec<String> = (0..rounds)
            .flat_map(|i| [format!("{uid}-{i}"), format!("12-{i}"), format!("all-{i}")])
            .collect();
        want.sort();
        let mut got = Vec::new();
        while let Some(m) = recv_json_within(ws, Duration::from_secs(3)) {
            got.push(m["msg"].as_str().unwrap().to_string());
            if got.len() == want.len() {
                break;
            }
        }
        got.sort();
        lost += want.iter().filter(|w| !got.contains(w)).count();
        if got != want {
            wrong.push(format!("uid {uid}: got {got:?}"));
        }
        assert_eq!(recv_json_within(ws, Duration::from_millis(300)), None);
    }
    report(&format!(
        "measured: Disque, uid 1 on node A and uid 2 on node B: {lost} of {} deliveries lost",
        2 * 3 * rounds
    ));
    assert!(wrong.is_empty(), "{wrong:?}");
}

#[test]
#[ignore = "needs disque-server (DISQUE_SERVER or on PATH)"]
fn a_backup_without_clients_reports_a_dead_disque() {
    let mut disque = disque();
    let queue = unique_name("idle");
    let backup = node(&disque, &queue, &["-queue-timeout=1s"]);
    disque.kill();
    wait_health(&backup, 503);
    disque.restart();
    wait_health(&backup, 200);
}

#[test]
#[ignore = "needs disque-server (DISQUE_SERVER or on PATH)"]
fn a_slow_acknowledgement_is_waited_for_not_dropped() {
    let disque = disque();
    let queue = unique_name("acks");
    // A 20 ms timeout makes every acknowledgement late compared with it; with one
    // job per GETJOB the ack channel holds a single id.
    let a = node(
        &disque,
        &queue,
        &["-queue-node=s", "-queue-timeout=20ms", "-queue-prefetch=1"],
    );
    let own = format!("{queue}:node:s");
    let mut ws = a.ws("uid=1");
    let mut c = disque.client();
    let n = 200;
    for i in 0..n {
        let body = format!(
            r#"[{{"target":["1"],"types":"notice","expires":0,"push":{{"types":"notice","msg":{i},"time":"t"}}}}]"#
        );
        // RETRY 1 s: a job whose ack was lost comes back within the wait below.
        c.cmd(&["ADDJOB", &own, &body, "1000", "RETRY", "1", "TTL", "60"]);
    }
    let mut got = Vec::new();
    while let Some(m) = recv_json_within(&mut ws, Duration::from_secs(3)) {
        got.push(m["msg"].as_u64().unwrap());
    }
    let mut sorted = got.clone();
    sorted.sort();
    sorted.dedup();
    report(&format!(
        "measured: {n} jobs with -queue-timeout=20ms: {} pushes, {} distinct",
        got.len(),
        sorted.len()
    ));
    assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "every job once");
    assert_eq!(
        got.len(),
        n as usize,
        "a job pushed twice: its ack was lost"
    );
    assert_eq!(c.cmd(&["QLEN", &own]), Resp::Int(0));
}

#[test]
#[ignore = "needs disque-server (DISQUE_SERVER or on PATH)"]
fn no_200_is_lost_across_a_disque_restart_between_two_nodes() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut disque = disque();
    let queue = unique_name("restart2");
    let flags = ["-queue-timeout=1s", "-queue-backoff=1s"];
    let a = node(&disque, &queue, &flags);
    let b = node(&disque, &queue, &flags);
    let mut ws = b.ws("uid=1");
    let stop = Arc::new(AtomicBool::new(false));
    let (addr, flag) = (a.addr, stop.clone());
    // /send to node A every 5 ms; the numbers answered 200.
    let sender = std::thread::spawn(move || {
        let mut accepted = Vec::new();
        let mut n = 0u64;
        while !flag.load(Ordering::Acquire) {
            let r = send_to(
                addr,
                &format!(r#"{{"topic":"uids","topic_ids":[1],"msg":{n}}}"#),
            );
            if r.status == 200 {
                accepted.push(n);
            }
            n += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        accepted
    });
    let mut got = std::collections::HashSet::new();
    let mut read_for = |ws: &mut Ws, d: Duration| {
        let until = Instant::now() + d;
        while Instant::now() < until {
            if let Some(m) = recv_json_within(ws, Duration::from_millis(100)) {
                got.insert(m["msg"].as_u64().unwrap());
            }
        }
    };
    read_for(&mut ws, Duration::from_millis(500));
    disque.kill();
    wait_health(&a, 503);
    disque.restart();
    wait_health(&a, 200);
    wait_health(&b, 200);
    read_for(&mut ws, Duration::from_secs(1));
    stop.store(true, Ordering::Release);
    let accepted = sender.join().unwrap();
    read_for(&mut ws, Duration::from_secs(1));
    let lost = accepted.iter().filter(|n| !got.contains(n)).count();
    report(&format!(
        "measured: Disque restart, two nodes: {} answered 200, {lost} of them never delivered",
        accepted.len()
    ));
    assert!(accepted.len() > 50, "too few accepted: {}", accepted.len());
    assert_eq!(lost, 0);
}

#[test]
#[ignore = "needs disque-server (DISQUE_SERVER or on PATH)"]
fn a_client_resumes_on_the_node_that_delivered() {
    let d = disque();
    let a = node(&d, &unique_name("resume"), &[]);
    let mut ws = a.ws("uid=4&since=0");
    assert_eq!(recv_json(&mut ws), json!({"op":"resumed","complete":true}));
    a.send_ok(r#"{"topic":"uids","topic_ids":[4],"msg":"seen"}"#);
    let seen = recv_json(&mut ws);
    drop(ws);
    // The node keeps taking its jobs while the client is away, and retains them.
    let mut other = a.ws("uid=5");
    a.send_ok(r#"{"topic":"uids","topic_ids":[4],"msg":"missed"}"#);
    a.send_ok(r#"{"topic":"uids","topic_ids":[5],"msg":"marker"}"#);
    assert_eq!(recv_json(&mut other)["msg"], "marker");
    let mut back = a.ws(&format!("uid=4&since={}", seen["id"].as_str().unwrap()));
    assert_eq!(
        recv_json(&mut back),
        json!({"op":"resumed","complete":true})
    );
    assert_eq!(recv_json(&mut back)["msg"], "missed");
}
