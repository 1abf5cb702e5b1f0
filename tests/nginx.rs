//! `deploy/nginx.conf` in a real nginx in front of two real nodes (active and
//! `backup`) on one real Redis: clients connect through nginx, the active node is
//! killed, clients reconnect through nginx to the backup and get what is sent next.

mod common;
use common::*;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Reconnects through nginx until the handshake succeeds (a client's retry loop).
fn reconnect(nginx: SocketAddr, query: &str) -> Ws {
    let deadline = Instant::now() + WAIT;
    loop {
        match ws_to(nginx, query) {
            Ok(ws) => return ws,
            Err(e) => assert!(Instant::now() < deadline, "no reconnect through nginx: {e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads until the connection ends; pushes that arrive first are returned.
fn read_until_closed(ws: &mut Ws) -> Vec<String> {
    let mut got = vec![];
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Text(t)) => got.push(t.to_string()),
            Ok(_) => continue,
            Err(_) => return got,
        }
    }
}

#[test]
fn clients_fail_over_to_the_backup_through_nginx() {
    let redis = RedisServer::start();
    let channel = format!("-queue-name={}", unique_name("nginx"));
    let flag = redis.queue_flag();
    let mut primary = Server::start(&[&flag, &channel]);
    let backup = Server::start(&[&flag, &channel]);
    wait_health(&primary, 200);
    wait_health(&backup, 200);
    let nginx = Nginx::start(primary.addr, backup.addr, &[]);

    let mut c1 = ws_to(nginx.addr, "uid=1").expect("handshake through nginx");
    let mut c2 = ws_to(nginx.addr, "uid=2&types=chat").expect("handshake through nginx");
    wait_stats(&primary, "both clients on the active node", |s| {
        s["connections"] == 2
    });
    assert_eq!(backup.stats()["connections"], 0, "the backup idles");

    let r = send_to(
        nginx.addr,
        r#"[{"topic":"uids","topic_ids":[1],"msg":"one"},{"topic":"all","types":"chat","msg":"two"}]"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(recv_json(&mut c1)["msg"], "one");
    assert_eq!(recv_json(&mut c1)["msg"], "two");
    assert_eq!(recv_json(&mut c2)["msg"], "two");

    primary.kill();
    let killed = Instant::now();
    // nginx closes the tunnels of the dead node; the clients notice and reconnect.
    assert!(read_until_closed(&mut c1).is_empty());
    assert!(read_until_closed(&mut c2).is_empty());
    let mut c1 = reconnect(nginx.addr, "uid=1");
    let mut c2 = reconnect(nginx.addr, "uid=2&types=chat");
    let reconnected = killed.elapsed();
    wait_stats(&backup, "both clients on the backup", |s| {
        s["connections"] == 2
    });

    // /send through nginx now reaches the backup, and the backup's clients.
    let r = send_to(
        nginx.addr,
        r#"[{"topic":"uids","topic_ids":[1],"msg":"after"},{"topic":"all","types":"chat","msg":"chat after"}]"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(recv_json(&mut c1)["msg"], "after");
    assert_eq!(recv_json(&mut c2)["msg"], "chat after");
    let receiving = killed.elapsed();
    report(&format!(
        "measured: active node killed -> clients reconnected through nginx after {reconnected:?}, \
         receiving via the backup after {receiving:?}"
    ));
    assert!(
        receiving < Duration::from_secs(5),
        "failover took {receiving:?}"
    );
    assert_eq!(get_from(nginx.addr, "/healthz").status, 200);
    let log = nginx.error_log();
    assert!(!log.contains("[emerg]"), "{log}");
}

#[test]
fn pings_keep_a_quiet_connection_open_through_nginx() {
    // With nginx cutting silent tunnels after 3 s and the node pinging after 1 s,
    // a connection that carries no pushes for 5 s must still be there.
    let redis = RedisServer::start();
    let flag = redis.queue_flag();
    let args = [flag.as_str(), "-ping-interval=1s", "-idle-timeout=4s"];
    let primary = Server::start(&args);
    let backup = Server::start(&args);
    wait_health(&primary, 200);
    wait_health(&backup, 200);
    let nginx = Nginx::start(
        primary.addr,
        backup.addr,
        &[("proxy_read_timeout 120s;", "proxy_read_timeout 3s;")],
    );
    let mut ws = ws_to(nginx.addr, "uid=q").expect("handshake through nginx");
    // Reading answers the node's pings (tungstenite replies by itself).
    assert_eq!(recv_json_within(&mut ws, Duration::from_secs(5)), None);
    let r = send_to(
        nginx.addr,
        r#"{"topic":"uids","topic_ids":["q"],"msg":"still here"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(recv_json(&mut ws)["msg"], "still here");
    assert_eq!(primary.stats()["ws_closed"], 0);
}

#[test]
fn the_shipped_config_outlasts_the_ping_interval() {
    let conf =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nginx.conf")).unwrap();
    let ws = conf
        .split("location = /ws")
        .nth(1)
        .expect("a /ws location")
        .split('}')
        .next()
        .unwrap();
    for needed in [
        "proxy_http_version 1.1;",
        "proxy_set_header Upgrade $http_upgrade;",
        "proxy_set_header Connection $wspush_connection;",
        "proxy_pass http://wspush;",
    ] {
        assert!(ws.contains(needed), "/ws lacks {needed}");
    }
    let secs = |name: &str| -> u64 {
        let line = ws
            .lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("/ws lacks {name}"));
        let v = line
            .split_whitespace()
            .nth(1)
            .unwrap()
            .trim_end_matches(';');
        v.trim_end_matches('s').parse().unwrap()
    };
    let Ok(wspush::config::Command::Run(defaults)) = wspush::config::parse::<&str>(&[]) else {
        panic!("default config");
    };
    assert!(secs("proxy_read_timeout") > defaults.ping_interval.as_secs());
    assert!(secs("proxy_send_timeout") > defaults.ping_interval.as_secs());
    assert!(conf.contains(" backup;"), "a backup node");
    assert!(conf.contains("proxy_connect_timeout"), "a bounded connect");
}

#[test]
fn the_readme_shows_the_shipped_config() {
    let root = env!("CARGO_MANIFEST_DIR");
    let conf = std::fs::read_to_string(format!("{root}/deploy/nginx.conf")).unwrap();
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    for line in conf.lines() {
        let directive = line.split('#').next().unwrap().trim_end();
        if !directive.trim().is_empty() {
            assert!(
                readme.contains(&format!("{directive}\n")),
                "README.md's nginx config lacks {directive:?} from deploy/nginx.conf"
            );
        }
    }
}

/// An event stream through the shipped config: nginx passes each event on at once
/// (`proxy_buffering off`), so a push arrives while the stream stays open.
#[test]
fn an_event_stream_passes_through_nginx_unbuffered() {
    use std::io::{Read, Write};
    let primary = Server::start(&[]);
    let backup = Server::start(&[]);
    let nginx = Nginx::start(primary.addr, backup.addr, &[]);
    let mut s = tcp_to(nginx.addr);
    s.write_all(b"GET /sse?uid=5 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let head = read_response(&mut s);
    assert_eq!(head.status, 200);
    assert!(
        head.header("content-type")
            .unwrap_or_default()
            .starts_with("text/event-stream")
    );
    wait_stats(&primary, "the stream on the active node", |st| {
        st["sse_opened"] == 1
    });
    let r = send_to(
        nginx.addr,
        r#"{"topic":"uids","topic_ids":["5"],"msg":"via nginx"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("via nginx") {
        let n = s
            .read(&mut buf)
            .expect("the event arrives before the read timeout");
        assert!(n > 0, "the stream ended: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("id: "), "{text}");
    assert!(text.contains("data: {"), "{text}");
}
