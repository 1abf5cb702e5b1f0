//! `GET /presence` against the real binary: from the local hub with `-queue=list`,
//! across nodes with Redis (a real `redis-server`), and a node that is killed drops
//! out within `-presence-ttl`.

mod common;
use common::*;

use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn presence(node: &Server, uids: &str) -> Value {
    let r = node.get(&format!("/presence?uid={uids}"));
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["presence"].clone()
}

/// Polls until `node` answers `want`, within `within`; returns how long it took.
fn wait_presence(node: &Server, uids: &str, want: &Value, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let got = presence(node, uids);
        if &got == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "presence {got} never became {want}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn presence_on_one_node_comes_from_its_hub() {
    let a = Server::start(&["-presence-max=3", "-api-key=k"]);
    let bearer = |path: &str| {
        raw_to(
            a.addr,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
    };
    let _one = a.ws("uid=1");
    let _two = [a.ws("uid=2"), a.ws("uid=2")];
    let r = bearer("/presence?uid=1,2,3");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"ok":true,"presence":{"1":1,"2":2,"3":0}}));
    // Behind the API key, and bounded.
    assert_eq!(a.get("/presence?uid=1").status, 401);
    let r = bearer("/presence?uid=1,2,3,4");
    assert_eq!(r.status, 400);
    assert!(r.error().contains("-presence-max"), "{}", r.text());
    assert_eq!(bearer("/presence?uid=").status, 400);
    assert_eq!(bearer("/presence").status, 400);
}

#[test]
fn presence_across_nodes_and_a_killed_node_drops_out() {
    let redis = RedisServer::start();
    let channel = format!("-queue-name={}", unique_name("presence"));
    let flag = redis.queue_flag();
    let args = [flag.as_str(), channel.as_str(), "-presence-ttl=1s"];
    let a = Server::start(&args);
    let mut b = Server::start(&args);
    wait_health(&a, 200);
    wait_health(&b, 200);
    let on_a = [a.ws("uid=p1"), a.ws("uid=p1")];
    let on_b = [b.ws("uid=p1"), b.ws("uid=p2")];
    let all = json!({"p1":3,"p2":1,"p3":0});
    wait_presence(&a, "p1,p2,p3", &all, WAIT);
    wait_presence(&b, "p1,p2,p3", &all, WAIT);
    // /stats `users` stays this node's.
    assert_eq!(a.stats()["users"], 1);
    assert_eq!(b.stats()["users"], 2);

    // A connection leaves: seen on the other node within a turn.
    drop(on_b);
    let b_only = json!({"p1":2,"p2":0,"p3":0});
    let _ = wait_presence(&a, "p1,p2,p3", &b_only, WAIT);
    let on_b = b.ws("uid=p2");
    wait_presence(&a, "p1,p2,p3", &json!({"p1":2,"p2":1,"p3":0}), WAIT);

    // SIGKILL: nothing is cleaned up, the heartbeat just stops.
    b.kill();
    let gone = wait_presence(
        &a,
        "p1,p2,p3",
        &json!({"p1":2,"p2":0,"p3":0}),
        Duration::from_secs(5),
    );
    report(&format!(
        "measured: a killed node's uids left /presence after {gone:?} with -presence-ttl=1s"
    ));
    assert!(gone <= Duration::from_millis(1500), "{gone:?}");
    drop((on_a, on_b));
}
