//! Faults a real network has, between real hosts: every wspush node, Redis, nginx
//! and client runs in a network namespace of its own (tests/common/netns.rs), so a
//! partition, a host that goes away and a slow link are what the kernel does to
//! packets, not a killed process on loopback. A Redis Cluster's primary host going
//! away with `/send` running is one of them.
//!
//! These need root and `ip`/`nft`/`tc`, so they are ignored by default; `make unit`
//! runs them with `--include-ignored` where it can create a namespace.
#![cfg(target_os = "linux")]

mod common;
#[path = "common/netns.rs"]
mod netns;

use common::cluster;
use common::flood::{Flood, Outcome, longest_gap};
use common::{RespClient, Response, WAIT, Ws, read_response, report, require_program};
use netns::{Proc, Testbed};

use serde_json::Value;
use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tungstenite::Message;
use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::frame::coding::CloseCode;

const NODE_PORT: u16 = 3210;
const REDIS_PORT: u16 = 6379;
const NGINX_PORT: u16 = 80;

// ---- processes on test hosts ----------------------------------------------------

/// A wspush node on a test host, bound to the host's address.
struct Node {
    proc: Proc,
    addr: SocketAddr,
}

fn start_node(tb: &Testbed, host: &str, args: &[&str]) -> Node {
    let ip = tb.ip(host);
    let mut cmd = tb.command(host, env!("CARGO_BIN_EXE_wspush"));
    cmd.arg(format!("-bind={ip}"))
        .arg(format!("-port={NODE_PORT}"))
        .arg("-log=warn")
        .args(args);
    let mut proc = Proc::spawn(cmd);
    let line = proc.first_line();
    assert!(line.contains("listening"), "wspush on {host}: {line:?}");
    Node {
        proc,
        addr: SocketAddr::from((ip, NODE_PORT)),
    }
}

/// A real redis-server on a test host, without persistence, with `extra` flags.
fn start_redis(tb: &Testbed, host: &str, dir: &common::TempDir, extra: &[&str]) -> Proc {
    let bin = require_program("redis-server", "REDIS_SERVER", "redis-server");
    let mut cmd = tb.command(host, bin);
    cmd.args(["--bind", &tb.ip(host).to_string()])
        .args(["--port", &REDIS_PORT.to_string()])
        .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
        .args(extra)
        .arg("--dir")
        .arg(&dir.0);
    let mut proc = Proc::spawn(cmd);
    let addr = tb.host(host).addr(REDIS_PORT);
    let deadline = Instant::now() + WAIT;
    loop {
        let pong = tb.connect(host, addr, WAIT).ok().and_then(|mut s| {
            s.write_all(b"PING\r\n").ok()?;
            let mut line = String::new();
            std::io::BufReader::new(s).read_line(&mut line).ok()?;
            Some(line)
        });
        if pong.as_deref() == Some("+PONG\r\n") {
            return proc;
        }
        assert!(proc.exited().is_none(), "redis-server exited at start");
        assert!(
            Instant::now() < deadline,
            "redis-server did not answer PING"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A real nginx on a test host running `deploy/nginx.conf` with the two nodes'
/// addresses, its own listen address and `edits` substituted.
fn start_nginx(
    tb: &Testbed,
    host: &str,
    primary: SocketAddr,
    backup: SocketAddr,
    edits: &[(&str, &str)],
    dir: &common::TempDir,
) -> (Proc, SocketAddr) {
    let bin = require_program("nginx", "NGINX", "nginx");
    let addr = tb.host(host).addr(NGINX_PORT);
    let mut site =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nginx.conf"))
            .expect("read deploy/nginx.conf");
    let (primary, backup) = (format!("server {primary} "), format!("server {backup} "));
    let listen = format!("listen {addr};");
    let mut all = vec![
        ("server 127.0.0.1:3210 ", primary.as_str()),
        ("server 127.0.0.1:3211 ", backup.as_str()),
        ("listen 3220;", listen.as_str()),
    ];
    all.extend_from_slice(edits);
    for (from, to) in all {
        assert!(site.contains(from), "deploy/nginx.conf has no {from:?}");
        site = site.replace(from, to);
    }
    let d = dir.0.display();
    std::fs::write(dir.0.join("wspush.conf"), site).unwrap();
    let main = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\nevents {{ worker_connections 256; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         include {d}/wspush.conf;\n}}\n"
    );
    std::fs::write(dir.0.join("nginx.conf"), main).unwrap();
    let mut cmd = tb.command(host, bin);
    cmd.arg("-p")
        .arg(&dir.0)
        .arg("-e")
        .arg(dir.0.join("error.log"))
        .arg("-c")
        .arg(dir.0.join("nginx.conf"));
    let mut proc = Proc::spawn(cmd);
    let deadline = Instant::now() + WAIT;
    while tb.connect(host, addr, WAIT).is_err() {
        assert!(proc.exited().is_none(), "nginx exited at start");
        assert!(Instant::now() < deadline, "nginx did not start listening");
        std::thread::sleep(Duration::from_millis(20));
    }
    (proc, addr)
}

// ---- a client on a test host ----------------------------------------------------

/// HTTP and WebSocket clients that run on one test host.
#[derive(Clone, Copy)]
struct At<'a> {
    tb: &'a Testbed,
    host: &'a str,
}

impl At<'_> {
    fn tcp(&self, to: SocketAddr) -> TcpStream {
        self.tb
            .connect(self.host, to, WAIT)
            .unwrap_or_else(|e| panic!("connect {} -> {to}: {e}", self.host))
    }

    fn raw(&self, to: SocketAddr, request: &str) -> Response {
        let mut s = self.tcp(to);
        s.write_all(request.as_bytes()).unwrap();
        read_response(&mut s)
    }

    fn get(&self, to: SocketAddr, path: &str) -> Response {
        self.raw(
            to,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
    }

    fn send(&self, to: SocketAddr, body: &str) -> Response {
        self.raw(to, &common::send_request(body))
    }

    /// `/send` to `to` from this host, for a thread of its own.
    fn sender(&self, to: SocketAddr) -> impl Fn(&str) -> Response + Send + 'static {
        let dial = self.tb.dialer(self.host);
        move |body| {
            let mut s = dial
                .connect(to, WAIT)
                .unwrap_or_else(|e| panic!("connect -> {to}: {e}"));
            s.write_all(common::send_request(body).as_bytes()).unwrap();
            read_response(&mut s)
        }
    }

    /// Opens a push connection to `to` from this host with the given `since`, from
    /// any thread (a flood's reader resuming after 1012).
    fn reconnect(&self, to: SocketAddr, uid: &str) -> common::flood::Reconnect {
        let dial = self.tb.dialer(self.host);
        let uid = uid.to_string();
        Box::new(move |since| {
            let stream = dial
                .connect(to, WAIT)
                .unwrap_or_else(|e| panic!("connect -> {to}: {e}"));
            let url = format!("ws://{to}/ws?uid={uid}&since={since}");
            let (ws, resp) = tungstenite::client(url.into_client_request().unwrap(), stream)
                .unwrap_or_else(|e| panic!("resume on {to}: {e}"));
            assert_eq!(resp.status(), 101, "resume on {to}");
            ws
        })
    }

    /// A RESP client of the Redis at `to`.
    fn resp(&self, to: SocketAddr) -> RespClient {
        RespClient::over(self.tcp(to))
    }

    /// The first word of `ROLE` on the Redis at `to` (`master`, `slave`).
    fn role(&self, to: SocketAddr) -> String {
        self.resp(to).cmd(&["ROLE"]).array()[0].text()
    }

    fn send_ok(&self, to: SocketAddr, body: &str) {
        let r = self.send(to, body);
        assert_eq!(r.status, 200, "/send to {to}: {}", r.text());
    }

    fn stats(&self, to: SocketAddr) -> Value {
        let r = self.get(to, "/stats");
        assert_eq!(r.status, 200, "/stats on {to}");
        r.json()
    }

    fn health(&self, to: SocketAddr) -> Option<u16> {
        let mut s = self.tb.connect(self.host, to, WAIT).ok()?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut all = Vec::new();
        s.read_to_end(&mut all).ok()?;
        String::from_utf8_lossy(&all)
            .strip_prefix("HTTP/1.1 ")?
            .get(..3)?
            .parse()
            .ok()
    }

    fn ws(&self, to: SocketAddr, query: &str) -> Result<Ws, String> {
        let stream = self
            .tb
            .connect(self.host, to, WAIT)
            .map_err(|e| e.to_string())?;
        let url = format!("ws://{to}/ws?{query}");
        let (ws, resp) = tungstenite::client(url.into_client_request().unwrap(), stream)
            .map_err(|e| e.to_string())?;
        if resp.status() != 101 {
            return Err(format!("handshake answered {}", resp.status()));
        }
        Ok(ws)
    }

    /// Polls `/stats` on `node` until `pred` holds.
    fn wait_stats(&self, node: SocketAddr, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let s = self.stats(node);
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {s}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls `/healthz` until it answers `status`; how long that took.
    fn wait_health(&self, node: SocketAddr, status: u16) -> Duration {
        let start = Instant::now();
        common::wait_until(&format!("/healthz {status} on {node}"), WAIT, || {
            self.health(node) == Some(status)
        });
        start.elapsed()
    }
}

/// The next push's `msg`, within `WAIT`; pings and pongs are skipped (the node's
/// pings would otherwise keep a read waiting for ever).
/// The next push's `msg`, as text.
fn next_msg(ws: &mut Ws) -> String {
    next_push(ws)["msg"].as_str().expect("msg text").to_string()
}

/// The next text frame, as JSON; pings and pongs are skipped.
fn next_push(ws: &mut Ws) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(Instant::now() < deadline, "no push within {WAIT:?}");
        match ws.read().expect("read push") {
            Message::Text(t) => {
                return serde_json::from_str(&t).unwrap_or_else(|e| panic!("{e}: {t}"));
            }
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a push, got {other:?}"),
        }
    }
}

/// Reads until the connection ends; how many pushes came first.
fn read_until_closed(ws: &mut Ws) -> usize {
    let mut pushes = 0;
    loop {
        match ws.read() {
            Ok(Message::Text(_)) => pushes += 1,
            Ok(_) => continue,
            Err(_) => return pushes,
        }
    }
}

fn uid_msg(uid: &str, msg: &str) -> String {
    format!(r#"{{"topic":"uids","topic_ids":["{uid}"],"msg":"{msg}"}}"#)
}

// ---- a node partitioned from Redis ------------------------------------------------

#[test]
#[ignore = "needs root and ip netns"]
fn a_node_partitioned_from_redis_answers_503_while_the_other_serves() {
    let tb = Testbed::new(&["redis", "a", "b", "clients"]);
    let dir = common::TempDir::new("netns-redis");
    let _redis = start_redis(&tb, "redis", &dir, &[]);
    let timeout = Duration::from_secs(1);
    let queue = format!("-queue=redis/{}", tb.host("redis").addr(REDIS_PORT));
    let args = [queue.as_str(), "-queue-timeout=1s", "-queue-backoff=1s"];
    let a = start_node(&tb, "a", &args);
    let b = start_node(&tb, "b", &args);
    let at = At {
        tb: &tb,
        host: "clients",
    };
    at.wait_health(a.addr, 200);
    at.wait_health(b.addr, 200);
    let mut on_a = at.ws(a.addr, "uid=ua").expect("client on a");
    let mut on_b = at.ws(b.addr, "uid=ub").expect("client on b");
    at.wait_stats(a.addr, "client on a", |s| s["connections"] == 1);
    at.wait_stats(b.addr, "client on b", |s| s["connections"] == 1);
    // Both nodes reach both clients through Redis.
    at.send_ok(a.addr, &uid_msg("ub", "a->b"));
    at.send_ok(b.addr, &uid_msg("ua", "b->a"));
    assert_eq!(next_msg(&mut on_b), "a->b");
    assert_eq!(next_msg(&mut on_a), "b->a");

    let fault = tb.partition("a", "redis", Some(REDIS_PORT));
    let cut = Instant::now();
    let r = at.send(a.addr, &uid_msg("ua", "during"));
    let answered = cut.elapsed();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.error().contains("Redis"), "{}", r.text());
    assert!(
        answered <= timeout + Duration::from_millis(500),
        "/send answered after {answered:?}, -queue-timeout is {timeout:?}"
    );
    at.wait_health(a.addr, 503);
    let unhealthy = cut.elapsed();

    // The other node is whole: every 200 it gives reaches its client.
    for i in 0..20 {
        at.send_ok(b.addr, &uid_msg("ub", &format!("b{i}")));
    }
    for i in 0..20 {
        assert_eq!(next_msg(&mut on_b), format!("b{i}"));
    }
    assert_eq!(at.health(b.addr), Some(200));
    assert_eq!(at.health(a.addr), Some(503), "a is still cut off");
    // Hold the partition until a has given up both its connections (the quiet
    // subscriber notices with its PING), so the heal is a real reconnect.
    common::wait_until("a to drop its Redis connections", WAIT, || {
        tb.established("a", "redis", REDIS_PORT) == 0
    });
    let dropped = cut.elapsed();

    tb.heal(fault);
    let healed = Instant::now();
    let healthy = at.wait_health(a.addr, 200);
    // Healthy means both its connections are back: /send on it is accepted again,
    // and what either node sends reaches its client.
    at.send_ok(a.addr, &uid_msg("ua", "a again"));
    let serving = healed.elapsed();
    at.send_ok(b.addr, &uid_msg("ua", "b again"));
    // A /send that answered 503 may still have reached Redis (its bytes were in
    // flight when the node gave up): "not known to be taken", so it may show up.
    let mut got = vec![next_msg(&mut on_a)];
    if got[0] == "during" {
        got.push(next_msg(&mut on_a));
    }
    got.push(next_msg(&mut on_a));
    assert_eq!(got[got.len() - 2..], ["a again", "b again"], "{got:?}");
    report(&format!(
        "measured: partition a<->redis: /send on a answered 503 after {answered:?} \
         (-queue-timeout=1s), /healthz on a 503 after {unhealthy:?}, both connections given up after {dropped:?}; healed: /healthz 200 \
         after {healthy:?}, /send on a accepted and delivered after {serving:?}; the 503'd \
         message {} delivered after the heal",
        if got.len() == 3 { "was" } else { "was not" }
    ));
}

#[test]
#[ignore = "needs root and ip netns"]
fn a_node_refused_by_redis_answers_503_at_once_and_recovers() {
    let tb = Testbed::new(&["redis", "a", "clients"]);
    let dir = common::TempDir::new("netns-redis");
    let _redis = start_redis(&tb, "redis", &dir, &[]);
    let queue = format!("-queue=redis/{}", tb.host("redis").addr(REDIS_PORT));
    let a = start_node(
        &tb,
        "a",
        &[&queue, "-queue-timeout=2s", "-queue-backoff=1s"],
    );
    let at = At {
        tb: &tb,
        host: "clients",
    };
    at.wait_health(a.addr, 200);
    let mut client = at.ws(a.addr, "uid=u").expect("client on a");
    at.wait_stats(a.addr, "the client", |s| s["connections"] == 1);
    at.send_ok(a.addr, &uid_msg("u", "before"));
    assert_eq!(next_msg(&mut client), "before");

    // Redis's host answers every packet from a with a reset: unlike a partition,
    // the node learns at once and need not wait for -queue-timeout.
    let fault = tb.refuse("redis", "a", REDIS_PORT);
    let cut = Instant::now();
    let r = at.send(a.addr, &uid_msg("u", "refused"));
    let answered = cut.elapsed();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        answered < Duration::from_secs(1),
        "a reset took {answered:?} to become a 503"
    );
    at.wait_health(a.addr, 503);
    let unhealthy = cut.elapsed();
    // The idle subscriber meets the reset with its next PING.
    common::wait_until("a to drop its Redis connections", WAIT, || {
        tb.established("a", "redis", REDIS_PORT) == 0
    });
    let dropped = cut.elapsed();

    tb.heal(fault);
    let healed = Instant::now();
    at.wait_health(a.addr, 200);
    let healthy = healed.elapsed();
    at.send_ok(a.addr, &uid_msg("u", "after"));
    assert_eq!(
        next_msg(&mut client),
        "after",
        "the refused one never went out"
    );
    report(&format!(
        "measured: redis port refused (tcp reset): /send on a answered 503 after \
         {answered:?} (-queue-timeout=2s), /healthz 503 after {unhealthy:?}, both connections gone after \
         {dropped:?}; healed: /healthz 200 after {healthy:?} (-queue-backoff=1s)"
    ));
}

// ---- nginx failover and fail-back across hosts -----------------------------------

/// A push client that connects through nginx and keeps what it got, so a resume
/// (`since=` the last message it saw) could be checked against it.
/// A client as `wspush.js` is: it keeps the last delivery id and connects with
/// `since`, so what was sent while it was away is replayed when it is back.
struct Client {
    query: String,
    ws: Ws,
    got: Vec<String>,
    last_id: String,
    /// The `complete` flag of each resume.
    resumes: Vec<bool>,
}

impl Client {
    fn connect(at: At, nginx: SocketAddr, query: &str) -> Client {
        let ws = at
            .ws(nginx, &format!("{query}&since=0"))
            .expect("handshake through nginx");
        Client {
            query: query.to_string(),
            ws,
            got: Vec::new(),
            last_id: "0".into(),
            resumes: Vec::new(),
        }
    }

    fn recv(&mut self) -> &str {
        loop {
            let v = next_push(&mut self.ws);
            if v["op"] == "resumed" {
                self.resumes.push(v["complete"] == true);
                continue;
            }
            self.last_id = v["id"].as_str().expect("delivery id").to_string();
            self.got
                .push(v["msg"].as_str().expect("msg text").to_string());
            return self.got.last().unwrap();
        }
    }

    /// A client's retry loop: reconnect through nginx until the handshake works.
    fn reconnect(&mut self, at: At, nginx: SocketAddr) {
        let deadline = Instant::now() + WAIT;
        loop {
            match at.ws(nginx, &format!("{}&since={}", self.query, self.last_id)) {
                Ok(ws) => {
                    self.ws = ws;
                    return;
                }
                Err(e) => assert!(Instant::now() < deadline, "no reconnect: {e}"),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
#[ignore = "needs root and ip netns"]
fn nginx_fails_over_to_the_backup_host_and_back() {
    let tb = Testbed::new(&["redis", "primary", "backup", "nginx", "clients"]);
    let redis_dir = common::TempDir::new("netns-redis");
    let nginx_dir = common::TempDir::new("netns-nginx");
    let _redis = start_redis(&tb, "redis", &redis_dir, &[]);
    let queue = format!("-queue=redis/{}", tb.host("redis").addr(REDIS_PORT));
    // nginx learns that a host is gone only when its tunnel stays silent for
    // proxy_read_timeout; the node pings every -ping-interval, so silence means gone.
    // Both are scaled down from 120 s / 30 s to keep the test short.
    let args = [queue.as_str(), "-ping-interval=1s"];
    let mut primary = start_node(&tb, "primary", &args);
    let backup = start_node(&tb, "backup", &args);
    let at = At {
        tb: &tb,
        host: "clients",
    };
    at.wait_health(primary.addr, 200);
    at.wait_health(backup.addr, 200);
    let (_nginx, nginx) = start_nginx(
        &tb,
        "nginx",
        primary.addr,
        backup.addr,
        &[
            ("proxy_read_timeout 120s;", "proxy_read_timeout 3s;"),
            ("fail_timeout=10s", "fail_timeout=2s"),
        ],
        &nginx_dir,
    );

    let mut c1 = Client::connect(at, nginx, "uid=1");
    let mut c2 = Client::connect(at, nginx, "uid=2&types=chat");
    at.wait_stats(primary.addr, "both clients on the primary", |s| {
        s["connections"] == 2
    });
    assert_eq!(at.stats(backup.addr)["connections"], 0, "the backup idles");
    at.send_ok(
        nginx,
        r#"[{"topic":"uids","topic_ids":["1"],"msg":"one"},{"topic":"all","types":"chat","msg":"two"}]"#,
    );
    assert_eq!(c1.recv(), "one");
    assert_eq!(c1.recv(), "two");
    assert_eq!(c2.recv(), "two");

    // The primary's host goes away: its cable first, so nothing (no FIN, no reset)
    // tells anyone, then its process.
    tb.unplug("primary");
    primary.proc.kill();
    let gone = Instant::now();
    // Sent while the clients are cut off: the backup takes it into the history.
    at.send_ok(backup.addr, &uid_msg("1", "in the gap"));
    at.send_ok(
        backup.addr,
        r#"{"topic":"all","types":"chat","msg":"chat in the gap"}"#,
    );
    assert_eq!(read_until_closed(&mut c1.ws), 0);
    assert_eq!(read_until_closed(&mut c2.ws), 0);
    let noticed = gone.elapsed();
    // The first handshake nginx sends to the dead host goes out on a keep-alive
    // connection left from an earlier /send, so nginx waits proxy_read_timeout (not
    // proxy_connect_timeout) before it takes the primary out and tries the backup.
    c1.reconnect(at, nginx);
    c2.reconnect(at, nginx);
    let reconnected = gone.elapsed();
    at.wait_stats(backup.addr, "both clients on the backup", |s| {
        s["connections"] == 2
    });
    // Resumed from the shared history: what was sent in the gap comes first.
    assert_eq!(c1.recv(), "in the gap");
    assert_eq!(c1.recv(), "chat in the gap");
    assert_eq!(c2.recv(), "chat in the gap");
    assert_eq!(
        c1.resumes,
        [true, true],
        "nothing missing after the failover"
    );
    at.send_ok(
        nginx,
        r#"[{"topic":"uids","topic_ids":["1"],"msg":"after"},{"topic":"all","types":"chat","msg":"chat after"}]"#,
    );
    assert_eq!(c1.recv(), "after");
    assert_eq!(c1.recv(), "chat after");
    assert_eq!(c2.recv(), "chat after");
    let receiving = gone.elapsed();

    // The primary's host comes back.
    tb.plug("primary");
    let primary = start_node(&tb, "primary", &args);
    at.wait_health(primary.addr, 200);
    let back = Instant::now();
    // New clients land on the primary once nginx tries it again (fail_timeout).
    let mut c3 = loop {
        let c = Client::connect(at, nginx, "uid=3");
        if at.stats(primary.addr)["connections"] == 1 {
            break c;
        }
        assert!(back.elapsed() < WAIT, "no new client reached the primary");
        drop(c);
        std::thread::sleep(Duration::from_millis(100));
    };
    let failed_back = back.elapsed();
    // The old clients stay where they are.
    at.wait_stats(backup.addr, "the old clients still on the backup", |s| {
        s["connections"] == 2
    });

    // /send on either node reaches clients on both.
    at.send_ok(primary.addr, &uid_msg("1", "primary->1"));
    assert_eq!(c1.recv(), "primary->1");
    // A new client (since=0) first gets the broadcasts still retained.
    assert_eq!(c3.recv(), "two");
    assert_eq!(c3.recv(), "chat in the gap");
    assert_eq!(c3.recv(), "chat after");
    at.send_ok(backup.addr, &uid_msg("3", "backup->3"));
    assert_eq!(c3.recv(), "backup->3");
    at.send_ok(
        primary.addr,
        r#"{"topic":"all","types":"chat","msg":"to all"}"#,
    );
    assert_eq!(c1.recv(), "to all");
    assert_eq!(c2.recv(), "to all");
    assert_eq!(c3.recv(), "to all");
    at.send_ok(
        backup.addr,
        r#"{"topic":"all","types":"chat","msg":"to all again"}"#,
    );
    assert_eq!(c1.recv(), "to all again");
    assert_eq!(c2.recv(), "to all again");
    assert_eq!(c3.recv(), "to all again");
    assert_eq!(
        c1.got,
        [
            "one",
            "two",
            "in the gap",
            "chat in the gap",
            "after",
            "chat after",
            "primary->1",
            "to all",
            "to all again"
        ]
    );
    let log = std::fs::read_to_string(nginx_dir.0.join("error.log")).unwrap_or_default();
    assert!(!log.contains("[emerg]"), "{log}");
    report(&format!(
        "measured: primary host unplugged and killed -> clients' tunnels closed by nginx \
         after {noticed:?} (proxy_read_timeout 3s), both reconnected to the backup after \
         {reconnected:?} (the first retry waits for the dead host once more), receiving \
         after {receiving:?}; primary healthy again -> a new client landed on it after \
         {failed_back:?} (fail_timeout=2s)"
    ));
}

// ---- a slow link ----------------------------------------------------------------

/// What a client that reads as fast as it can saw before its connection ended.
struct Reading {
    /// Kept open, so the server still counts the connection afterwards.
    _ws: Ws,
    msgs: Vec<String>,
    close: Option<CloseCode>,
    ended: Instant,
}

/// Reads every push until the connection ends (or `want` pushes came), counting
/// them in `count` as they arrive.
fn read_all(mut ws: Ws, want: usize, count: Arc<AtomicUsize>) -> Reading {
    let mut msgs = Vec::new();
    let mut close = None;
    while msgs.len() < want {
        match ws.read() {
            Ok(Message::Text(t)) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                msgs.push(v["msg"].as_str().unwrap()[..8].to_string());
                count.fetch_add(1, Ordering::Release);
            }
            Ok(Message::Close(frame)) => close = frame.map(|f| f.code),
            Ok(_) => continue,
            Err(_) => break,
        }
    }
    Reading {
        _ws: ws,
        msgs,
        close,
        ended: Instant::now(),
    }
}

#[test]
#[ignore = "needs root and ip netns"]
fn a_client_on_a_slow_link_is_dropped_while_a_fast_one_gets_everything() {
    let tb = Testbed::new(&["node", "slow", "fast", "backend"]);
    // A client behind 1 mbit/s (125 KB/s): however fast it reads, pushes pile up.
    tb.limit_rate("slow", "1mbit");
    let backlog = 256 * 1024;
    let node = start_node(
        &tb,
        "node",
        &[&format!("-max-backlog={backlog}"), "-max-body=261888"],
    );
    let backend = At {
        tb: &tb,
        host: "backend",
    };
    let slow = At {
        tb: &tb,
        host: "slow",
    }
    .ws(node.addr, "uid=s")
    .expect("slow client");
    let fast = At {
        tb: &tb,
        host: "fast",
    }
    .ws(node.addr, "uid=f")
    .expect("fast client");
    backend.wait_stats(node.addr, "both clients", |s| s["connections"] == 2);

    // 2.4 MB of broadcasts, 20 pushes of 8 KB a /send; the next one goes when the
    // fast client has all so far, so it never lags by more than one batch (160 KB,
    // under the backlog limit), while the slow link would need 20 s for it all.
    const BATCHES: usize = 15;
    const PER: usize = 20;
    let total = BATCHES * PER;
    let (fast_count, slow_count) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let fc = fast_count.clone();
    let fast = std::thread::spawn(move || read_all(fast, total, fc));
    let sc = slow_count.clone();
    let slow = std::thread::spawn(move || read_all(slow, total, sc));
    let pad = "x".repeat(8 * 1024);
    let start = Instant::now();
    for b in 0..BATCHES {
        let batch: Vec<String> = (0..PER)
            .map(|i| format!(r#"{{"topic":"all","msg":"m{:07}{pad}"}}"#, b * PER + i))
            .collect();
        backend.send_ok(node.addr, &format!("[{}]", batch.join(",")));
        common::wait_until("the fast client to keep up", WAIT, || {
            fast_count.load(Ordering::Acquire) == (b + 1) * PER
        });
    }
    let sent = start.elapsed();
    let fast = fast.join().unwrap();
    let slow = slow.join().unwrap();

    let expected: Vec<String> = (0..total).map(|i| format!("m{i:07}")).collect();
    assert_eq!(
        fast.msgs, expected,
        "the fast client gets everything, in order"
    );
    assert_eq!(
        slow.close,
        Some(CloseCode::Policy),
        "the slow client is told why"
    );
    assert!(
        slow.msgs.len() < total,
        "the slow client cannot have kept up"
    );
    assert_eq!(
        slow.msgs[..],
        expected[..slow.msgs.len()],
        "what it got is in order"
    );
    let s = backend.stats(node.addr);
    assert_eq!(s["evicted_slow"], 1, "{s}");
    assert_eq!(s["connections"], 1, "the fast client is still there: {s}");
    report(&format!(
        "measured: 1 mbit/s link, -max-backlog={backlog}: fast client got {total} x 8 KB in \
         {sent:?}; slow client got {} pushes ({} KB) then close 1008, {:?} after the first send",
        slow.msgs.len(),
        slow.msgs.len() * 8,
        slow.ended - start,
    ));
}

// ---- a Redis Cluster primary's host going away -----------------------------------

const REDIS_HOSTS: [&str; 6] = ["r1", "r2", "r3", "r4", "r5", "r6"];
const CLUSTER_QUEUE: &str = "netns-cluster";

/// A Redis Cluster of three primaries with a replica each, one `redis-server` per
/// host of `REDIS_HOSTS`; returns once every node is settled (state ok, replicas
/// in sync).
fn start_cluster(at: At, dirs: &[common::TempDir]) -> Vec<Proc> {
    let tb = at.tb;
    let procs = REDIS_HOSTS
        .iter()
        .zip(dirs)
        .map(|(h, d)| start_redis(tb, h, d, cluster::NODE_ARGS))
        .collect();
    let cli = require_program("redis-cli", "REDIS_CLI", "redis-tools");
    cluster::create(tb.command(REDIS_HOSTS[0], cli), &redis_addrs(tb));
    common::wait_until("every cluster node settled", WAIT * 3, || {
        redis_addrs(tb)
            .iter()
            .all(|a| cluster::settled(&mut at.resp(a.parse().unwrap())))
    });
    procs
}

fn redis_addrs(tb: &Testbed) -> Vec<String> {
    REDIS_HOSTS
        .iter()
        .map(|h| tb.host(h).addr(REDIS_PORT).to_string())
        .collect()
}

/// The test host whose address is `addr`'s.
fn host_at(tb: &Testbed, addr: SocketAddr) -> &'static str {
    REDIS_HOSTS
        .into_iter()
        .find(|h| SocketAddr::from((tb.ip(h), REDIS_PORT)) == addr)
        .unwrap_or_else(|| panic!("no redis host at {addr}"))
}

/// One flood per primary: a uid whose stream lives in that primary's slots, its
/// client on node `b`, `/send` through node `a`; each has delivered 50 already.
fn flood_every_primary(at: At, a: SocketAddr, b: SocketAddr) -> Vec<(SocketAddr, Flood)> {
    let seed = at.tb.host(REDIS_HOSTS[0]).addr(REDIS_PORT);
    let primaries = cluster::slot_map(&at.resp(seed).cmd(&["CLUSTER", "SLOTS"]));
    assert_eq!(primaries.len(), 3, "three primaries");
    let uids = cluster::uid_per_primary(&mut at.resp(seed), &primaries, CLUSTER_QUEUE, "c-");
    let clients: Vec<(SocketAddr, String, Ws)> = uids
        .into_iter()
        .map(|(p, uid)| {
            let ws = at.ws(b, &format!("uid={uid}")).expect("client on b");
            (p, uid, ws)
        })
        .collect();
    at.wait_stats(b, "b subscribed on every primary", |s| {
        s["queue"]["channels"] == 3
    });
    let floods: Vec<(SocketAddr, Flood)> = clients
        .into_iter()
        .map(|(p, uid, mut ws)| {
            // The first write of a fresh cluster may find a replica not yet
            // acknowledging within -queue-wait (503, yet maybe delivered): try
            // again, and read up to the attempt that got its 200.
            let deadline = Instant::now() + WAIT;
            let hello = (0..)
                .map(|n| format!("hello-{n}"))
                .find(|hello| {
                    let r = at.send(a, &uid_msg(&uid, hello));
                    assert!(r.status == 200 || r.status == 503, "{}", r.text());
                    assert!(Instant::now() < deadline, "/send never answered 200");
                    r.status == 200
                })
                .expect("an attempt answered 200");
            while next_msg(&mut ws) != hello {}
            let resume = Some(at.reconnect(b, &uid));
            (p, Flood::start_resuming(at.sender(a), &uid, ws, resume))
        })
        .collect();
    let start = Instant::now();
    for (_, f) in &floods {
        f.await_delivered(50, start, WAIT);
    }
    floods
}

/// How long each step of the fault took, from the cable being pulled.
struct Timings {
    gone: Instant,
    promoted: Duration,
    serving: Duration,
    rejoined: Duration,
}

/// Unplugs the host of the primary `victim` with its flood running, waits for its
/// replica's promotion, plugs the host back, and waits until the old primary is the
/// new one's replica and the flood has 200 deliveries after the promotion. With
/// `-queue-wait` a shard without a replica answers 503, so the host comes back at
/// once, as the killed primary of tests/redis_cluster.rs is restarted at once.
fn unplug_primary(at: At, victim: SocketAddr, flood: &Flood) -> Timings {
    let info = at.resp(victim).cmd(&["INFO", "replication"]).text();
    let replica = cluster::replica_addr(&info).expect("the primary has a replica");
    let host = host_at(at.tb, victim);
    at.tb.unplug(host);
    let gone = Instant::now();
    common::wait_until("the replica promoted", WAIT * 2, || {
        at.role(replica) == "master"
    });
    let promoted = gone.elapsed();
    at.tb.plug(host);
    common::wait_until("the old primary back as a replica", WAIT * 3, || {
        at.role(victim) == "slave" && cluster::settled(&mut at.resp(victim))
    });
    let rejoined = gone.elapsed();
    // The flood goes on being answered 200 and delivered on the new primary.
    flood.await_delivered(200, gone + promoted, WAIT * 2);
    let serving = gone.elapsed();
    Timings {
        gone,
        promoted,
        serving,
        rejoined,
    }
}

#[test]
#[ignore = "needs root and ip netns"]
fn a_redis_cluster_primary_host_going_away_loses_no_200() {
    let mut names = REDIS_HOSTS.to_vec();
    names.extend(["a", "b", "clients"]);
    let tb = Testbed::new(&names);
    let at = At {
        tb: &tb,
        host: "clients",
    };
    let dirs: Vec<_> = REDIS_HOSTS
        .iter()
        .map(|_| common::TempDir::new("netns-cluster"))
        .collect();
    let _redis = start_cluster(at, &dirs);
    let seeds = redis_addrs(&tb)[..2].join(",");
    let (queue, name) = (
        format!("-queue=redis-cluster/{seeds}"),
        format!("-queue-name={CLUSTER_QUEUE}"),
    );
    // -queue-wait: a 200 means a replica has the message, so it survives the
    // primary's host; -queue-timeout bounds each wait on the silent host. The
    // flood sends some 300 a second to each uid: -history-size keeps all of an
    // outage of several seconds, so B's catch-up on the new primary (or the
    // client's resume) finds every 200 there (the contract's "within retention").
    let args = [
        queue.as_str(),
        name.as_str(),
        "-history-size=5000",
        "-queue-wait=500ms",
        "-queue-timeout=1s",
        "-queue-backoff=500ms",
    ];
    let (a, b) = (start_node(&tb, "a", &args), start_node(&tb, "b", &args));
    at.wait_health(a.addr, 200);
    at.wait_health(b.addr, 200);
    let floods = flood_every_primary(at, a.addr, b.addr);
    let victim = floods[0].0;
    let t = unplug_primary(at, victim, &floods[0].1);
    // And after the old primary is back, as its replica.
    let back = Instant::now();
    for (_, f) in &floods {
        f.await_delivered(100, back, WAIT);
    }
    let outs: Vec<(SocketAddr, Outcome)> =
        floods.into_iter().map(|(p, f)| (p, f.finish())).collect();
    let promoted_at = t.gone + t.promoted;
    let after = outs[0]
        .1
        .ok
        .iter()
        .filter(|(_, when)| *when > promoted_at)
        .count();
    assert!(after >= 200, "{after} answered 200 after the promotion");
    report_failover(victim, &t, &outs);
}

/// The `measured:` line: per shard, when 200s came again and the longest pauses.
fn report_failover(victim: SocketAddr, t: &Timings, outs: &[(SocketAddr, Outcome)]) {
    let shards: Vec<String> = outs
        .iter()
        .map(|(p, o)| {
            let (pause, resumed) = longest_gap(&o.ok);
            let again = resumed.map_or(Duration::ZERO, |r| r.saturating_duration_since(t.gone));
            format!(
                "{}{p}: {} answered 200 (all delivered once), {} answered 503, longest pause \
                 between two 200s {pause:?} (ended {again:?} after the unplug), between two \
                 deliveries {:?}",
                if *p == victim { "unplugged " } else { "" },
                o.ok.len(),
                o.refused,
                longest_gap(&o.got).0,
            )
        })
        .collect();
    report(&format!(
        "measured: redis-cluster primary host {victim} unplugged: replica promoted after \
         {:?} (cluster-node-timeout 1000), the host plugged back then and in sync as its \
         replica after {:?}, 200 more delivered after {:?}; {}",
        t.promoted,
        t.rejoined,
        t.serving,
        shards.join("; ")
    ));
}
