//! Who may publish and who may listen: every refusal path of PROTOCOL.md's
//! "Security and limits", its status, its JSON error and its counter.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tungstenite::client::IntoClientRequest;
use tungstenite::http::HeaderValue;

const KEY: &str = "pub-key-7f3a";
const SECRET: &str = "s3cret-for-tests";

/// The token a backend mints, computed here independently of the server's code.
fn token(secret: &str, uid: &str, expires: u64) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{uid}:{expires}").as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A WebSocket handshake with extra headers: the connection, or the refusal's
/// status and JSON error text.
fn try_ws(
    server: &Server,
    query: &str,
    headers: &[(&'static str, &str)],
) -> Result<Ws, (u16, String)> {
    let mut req = format!("ws://{}/ws?{query}", server.addr)
        .into_client_request()
        .unwrap();
    for (name, value) in headers {
        req.headers_mut()
            .insert(*name, HeaderValue::from_str(value).unwrap());
    }
    match tungstenite::client(req, server.tcp()) {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            let body = resp.body().clone().unwrap_or_default();
            let v: serde_json::Value = serde_json::from_slice(&body)
                .unwrap_or_else(|e| panic!("refusal body is not JSON ({e}): {body:?}"));
            assert_eq!(v["ok"], false);
            Err((
                resp.status().as_u16(),
                v["error"].as_str().unwrap().to_string(),
            ))
        }
        Err(e) => panic!("handshake failed without an HTTP answer: {e}"),
    }
}

fn refused(server: &Server, reason: &str) -> u64 {
    server.stats_with(KEY)["refused"][reason]
        .as_u64()
        .unwrap_or_else(|| panic!("no refused.{reason} counter"))
}

fn authed(server: &Server, method: &str, path: &str, auth: Option<&str>, body: &str) -> Response {
    let auth = auth.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
    server.raw(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
}

trait StatsWithKey {
    fn stats_with(&self, key: &str) -> serde_json::Value;
}

impl StatsWithKey for Server {
    fn stats_with(&self, key: &str) -> serde_json::Value {
        let r = authed(self, "GET", "/stats", Some(&format!("Bearer {key}")), "");
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }
}

const MSG: &str = r#"{"topic":"all","msg":"hello"}"#;

/// `POST /send` with the right key.
fn publish(server: &Server, body: &str) -> Response {
    authed(
        server,
        "POST",
        "/send",
        Some(&format!("Bearer {KEY}")),
        body,
    )
}

#[test]
fn the_api_key_guards_send_stats_and_metrics() {
    let server = Server::start(&[&format!("-api-key={KEY}")]);
    let good = format!("Bearer {KEY}");
    for (method, path, body) in [
        ("POST", "/send", MSG),
        ("GET", "/stats", ""),
        ("GET", "/metrics", ""),
    ] {
        for auth in [
            None,
            Some("Bearer wrong"),
            Some(&format!("Basic {KEY}")[..]),
            Some(&format!("Bearer {KEY}x")[..]),
        ] {
            let r = authed(&server, method, path, auth, body);
            assert_eq!(r.status, 401, "{method} {path} with {auth:?}: {}", r.text());
            assert!(r.error().contains("API key"), "{}", r.text());
            assert_eq!(r.header("WWW-Authenticate"), Some("Bearer"));
        }
        let r = authed(&server, method, path, Some(&good), body);
        assert_eq!(r.status, 200, "{method} {path}: {}", r.text());
    }
    // Open to anyone: the page, the client script and the health check.
    for path in ["/", "/wspush.js", "/healthz"] {
        assert_eq!(server.get(path).status, 200, "{path}");
    }
    assert_eq!(refused(&server, "api_key"), 12);
    let metrics = authed(&server, "GET", "/metrics", Some(&good), "").text();
    assert!(
        metrics.contains("wspush_refused_total{reason=\"api_key\"} 12"),
        "{metrics}"
    );
}

#[test]
fn an_unauthorized_send_is_refused_before_its_body_is_read_and_publishes_nothing() {
    let server = Server::start(&[&format!("-api-key={KEY}")]);
    let mut ws = server.ws("uid=1");
    // Declares a large body and sends none of it: the answer comes anyway.
    let mut s = server.tcp();
    s.write_all(b"POST /send HTTP/1.1\r\nHost: x\r\nContent-Length: 900000\r\n\r\n")
        .unwrap();
    let r = read_response(&mut s);
    assert_eq!(r.status, 401);
    // A refused publish never reaches anyone: the next push is the authorized one.
    let r = authed(
        &server,
        "POST",
        "/send",
        None,
        r#"{"topic":"all","msg":"forged"}"#,
    );
    assert_eq!(r.status, 401);
    let r = publish(&server, MSG);
    assert_eq!(r.status, 200);
    assert_eq!(recv_json(&mut ws)["msg"], "hello");
}

#[test]
fn the_api_key_may_come_from_the_environment() {
    let server = Server::start_with(&[], &[("WSPUSH_API_KEY", KEY)], None);
    assert_eq!(authed(&server, "POST", "/send", None, MSG).status, 401);
    assert_eq!(publish(&server, MSG).status, 200);
}

#[test]
fn a_signed_uid_connects_and_receives_its_messages() {
    let server = Server::start(&[&format!("-secret={SECRET}"), &format!("-api-key={KEY}")]);
    let expires = unix_now() + 3600;
    let q = format!(
        "uid=42&expires={expires}&token={}",
        token(SECRET, "42", expires)
    );
    let mut ws = try_ws(&server, &q, &[]).expect("a valid token is accepted");
    let r = publish(
        &server,
        r#"{"topic":"uids","topic_ids":["42"],"msg":"for 42"}"#,
    );
    assert_eq!(r.status, 200);
    assert_eq!(recv_json(&mut ws)["msg"], "for 42");
}

#[test]
fn missing_forged_and_expired_tokens_are_401_before_any_upgrade() {
    let server = Server::start(&[&format!("-secret={SECRET}"), &format!("-api-key={KEY}")]);
    let now = unix_now();
    let later = now + 3600;
    let for_7 = token(SECRET, "7", later);
    let cases = [
        ("".to_string(), "uid"),
        (format!("uid=7&expires={later}"), "token"),
        (format!("uid=7&token={for_7}"), "expires"),
        (format!("expires={later}&token={for_7}"), "uid"),
        // A token minted for uid 7, presented as uid 8.
        (format!("uid=8&expires={later}&token={for_7}"), "not valid"),
        // The right uid, but a later expiry than the one signed.
        (
            format!("uid=7&expires={}&token={for_7}", later + 1),
            "not valid",
        ),
        // Signed with another secret.
        (
            format!("uid=7&expires={later}&token={}", token("other", "7", later)),
            "not valid",
        ),
        (format!("uid=7&expires={later}&token=abc"), "token"),
        // Expiry is exclusive: a token whose second has come is refused.
        (
            format!("uid=7&expires={now}&token={}", token(SECRET, "7", now)),
            "expired",
        ),
        (
            format!(
                "uid=7&expires={}&token={}",
                now - 1,
                token(SECRET, "7", now - 1)
            ),
            "expired",
        ),
    ];
    for (q, says) in &cases {
        let (status, error) = try_ws(&server, q, &[])
            .err()
            .unwrap_or_else(|| panic!("{q} was accepted"));
        assert_eq!(status, 401, "{q}");
        assert!(error.contains(says), "{q}: {error}");
    }
    assert_eq!(refused(&server, "token"), cases.len() as u64);
    // One second more and the same kind of token is fine.
    let soon = unix_now() + 2;
    try_ws(
        &server,
        &format!("uid=7&expires={soon}&token={}", token(SECRET, "7", soon)),
        &[],
    )
    .expect("an unexpired token");
}

#[test]
fn a_refused_handshake_ends_the_connection_and_never_carries_a_push() {
    let server = Server::start(&[&format!("-secret={SECRET}")]);
    let later = unix_now() + 3600;
    let mut s = server.tcp();
    write!(
        s,
        "GET /ws?uid=9&expires={later}&token={} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        token(SECRET, "8", later)
    )
    .unwrap();
    let r = read_response(&mut s);
    assert_eq!(r.status, 401);
    server.send_ok(r#"{"topic":"uids","topic_ids":["9"],"msg":"secret"}"#);
    server.send_ok(r#"{"topic":"all","msg":"everyone"}"#);
    // Nothing follows the refusal: the server closes the connection.
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .expect("the server closes the connection");
    assert!(rest.is_empty(), "bytes after a refusal: {rest:?}");
}

#[test]
fn origins_outside_the_list_are_403() {
    let server = Server::start(&["-origins=https://app.example.com, https://admin.example.com"]);
    let (status, error) = try_ws(&server, "uid=1", &[("Origin", "https://evil.example.com")])
        .expect_err("a foreign origin is refused");
    assert_eq!((status, error.as_str()), (403, "origin not allowed"));
    assert!(try_ws(&server, "uid=1", &[("Origin", "https://admin.example.com")]).is_ok());
    assert!(try_ws(&server, "uid=1", &[("Origin", "HTTPS://APP.EXAMPLE.COM")]).is_ok());
    // Non-browser clients send no Origin and are let in.
    assert!(try_ws(&server, "uid=1", &[]).is_ok());
    assert_eq!(server.stats()["refused"]["origin"], 1);
}

#[test]
fn the_per_address_cap_counts_direct_clients_by_their_own_address() {
    // No trusted proxies: a client cannot escape the cap with a forged header.
    let server = Server::start(&["-max-per-ip=2", "-trusted-proxies="]);
    let a = server.ws("uid=1");
    let _b = server.ws("uid=2");
    let (status, error) = try_ws(&server, "uid=3", &[("X-Forwarded-For", "198.51.100.7")])
        .expect_err("a third connection from one address is refused");
    assert_eq!(status, 429);
    assert!(error.contains("this address"), "{error}");
    drop(a);
    // The freed slot serves the next client (the close is seen asynchronously).
    let deadline = std::time::Instant::now() + WAIT;
    let _c = loop {
        match try_ws(&server, "uid=3", &[]) {
            Ok(ws) => break ws,
            Err((429, _)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("still refused: {e:?}"),
        }
    };
    drop((_b, _c));
    // /stats needs a slot of its own too.
    wait_until("a slot for /stats", WAIT, || {
        try_get_status(&server, "/healthz") == Some(200)
    });
    assert!(server.stats()["refused"]["per_ip"].as_u64() >= Some(1));
}

#[test]
fn behind_a_trusted_proxy_the_cap_counts_the_forwarded_client() {
    let server = Server::start(&["-max-per-ip=2", "-trusted-proxies=127.0.0.1"]);
    let xff = |ip| [("X-Forwarded-For", ip)];
    let _a1 = try_ws(&server, "uid=1", &xff("203.0.113.1")).unwrap();
    let _a2 = try_ws(&server, "uid=2", &xff("203.0.113.1")).unwrap();
    let (status, _) =
        try_ws(&server, "uid=3", &xff("203.0.113.1")).expect_err("the forwarded client is capped");
    assert_eq!(status, 429);
    // Another client behind the same proxy is not affected, nor is one named by X-Real-IP.
    let _b = try_ws(&server, "uid=4", &xff("203.0.113.2")).unwrap();
    let _c = try_ws(&server, "uid=5", &[("X-Real-IP", "203.0.113.3")]).unwrap();
    // The proxy's own connections without a forwarded client are not capped.
    let _local: Vec<Ws> = (0..3).map(|i| server.ws(&format!("uid=l{i}"))).collect();
    assert_eq!(server.stats()["refused"]["per_ip"], 1);
}

#[test]
fn keys_and_tokens_never_reach_the_log() {
    let dir = TempDir::new("security-log");
    let log = dir.0.join("wspush.log");
    let mut server = Server::start_with(
        &["-log=debug", &format!("-secret={SECRET}")],
        &[("WSPUSH_API_KEY", KEY)],
        Some(&log),
    );
    let later = unix_now() + 3600;
    let good = token(SECRET, "5", later);
    let bad = token(SECRET, "6", later);
    let ws = try_ws(&server, &format!("uid=5&expires={later}&token={good}"), &[]).unwrap();
    assert!(try_ws(&server, &format!("uid=5&expires={later}&token={bad}"), &[]).is_err());
    assert_eq!(
        authed(&server, "POST", "/send", Some("Bearer guess-key"), MSG).status,
        401
    );
    assert_eq!(publish(&server, MSG).status, 200);
    drop(ws);
    assert_eq!(server.terminate().code(), Some(0));

    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("ws open uid=5"),
        "connections are logged: {text}"
    );
    assert!(text.contains("refused"), "refusals are logged: {text}");
    for secret in [KEY, SECRET, "guess-key", &good, &bad] {
        assert!(!text.contains(secret), "{secret} is in the log:\n{text}");
    }
}

#[test]
fn every_limit_hit_is_counted_by_reason() {
    let server = Server::start(&["-max-body=100", "-request-timeout=1s", "-max-connections=3"]);
    // Over -max-connections.
    let held: Vec<Ws> = (0..3).map(|i| server.ws(&format!("uid={i}"))).collect();
    assert_eq!(server.get("/healthz").status, 503);
    drop(held);
    wait_until("the held connections to close", WAIT, || {
        try_get_status(&server, "/healthz") == Some(200)
    });
    let big_header = format!(
        "GET /healthz HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(9000)
    );
    assert_eq!(server.raw(big_header.as_bytes()).status, 431);
    let big_body = format!("{{\"topic\":\"all\",\"msg\":\"{}\"}}", "b".repeat(200));
    assert_eq!(server.send(&big_body).status, 413);
    // A request that never completes: the 408 is the event to wait for.
    let mut slow = server.tcp();
    slow.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
    assert_eq!(read_response(&mut slow).status, 408);
    // A client frame over 64 KiB: its masked header alone declares the size.
    let mut ws = server.tcp();
    write!(
        ws,
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    assert_eq!(read_response(&mut ws).status, 101);
    ws.write_all(&[0x82, 0xFF, 0, 0, 0, 0, 0, 1, 0, 1, 1, 2, 3, 4])
        .unwrap();
    let mut close = [0u8; 4];
    ws.read_exact(&mut close).unwrap();
    assert_eq!(
        (close[0], u16::from_be_bytes([close[2], close[3]])),
        (0x88, 1009)
    );
    drop((slow, ws));
    wait_until("a slot for /stats", WAIT, || {
        try_get_status(&server, "/healthz") == Some(200)
    });
    let refused = &server.stats()["refused"];
    for (reason, n) in [
        ("header_size", 1),
        ("body_size", 1),
        ("request_timeout", 1),
        ("frame_size", 1),
        ("api_key", 0),
    ] {
        assert_eq!(refused[reason], n, "{reason}: {refused}");
    }
    // The polls that waited for a free slot may have been refused too.
    assert!(refused["max_connections"].as_u64() >= Some(1), "{refused}");
}

/// A raw handshake with `extra` header lines; the status and the body text.
fn raw_ws_status(server: &Server, query: &str, extra: &str) -> (u16, String) {
    let r = server.raw(
        format!(
            "GET /ws?{query} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
        )
        .as_bytes(),
    );
    (r.status, r.text())
}

#[test]
fn forwarded_for_split_over_several_lines_is_read_as_one_list() {
    let server = Server::start(&["-max-per-ip=1", "-trusted-proxies=127.0.0.1"]);
    // Each handshake comes from the same client, named on the last of two lines; the
    // first line is what that client itself sent and is not to be believed.
    let mut held = Vec::new();
    let mut statuses = Vec::new();
    for n in 1..=5 {
        let mut s = server.tcp();
        write!(
            s,
            "GET /ws?uid={n} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             X-Forwarded-For: 10.0.0.{n}\r\nX-Forwarded-For: 203.0.113.5\r\n\r\n"
        )
        .unwrap();
        statuses.push(read_response(&mut s).status);
        held.push(s);
    }
    assert_eq!(statuses, [101, 429, 429, 429, 429]);
    assert_eq!(server.stats()["refused"]["per_ip"], 4);
}

#[test]
fn two_different_x_real_ip_lines_are_refused_as_ambiguous() {
    let server = Server::start(&["-max-per-ip=5", "-trusted-proxies=127.0.0.1"]);
    let (status, text) = raw_ws_status(
        &server,
        "uid=1",
        "X-Real-IP: 203.0.113.1\r\nX-Real-IP: 203.0.113.2\r\n",
    );
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("X-Real-IP"), "{text}");
    // The same value twice names one client.
    let (status, text) = raw_ws_status(
        &server,
        "uid=2",
        "X-Real-IP: 203.0.113.1\r\nX-Real-IP: 203.0.113.1\r\n",
    );
    assert_eq!(status, 101, "{text}");
    assert_eq!(server.stats()["refused"]["forwarded"], 1);
}

#[test]
fn client_strings_with_control_bytes_reach_the_log_escaped_on_one_line() {
    let dir = TempDir::new("security-log-injection");
    let log = dir.0.join("wspush.log");
    let mut server = Server::start_with(&["-log=debug"], &[], Some(&log));
    let forged = "wspush warn FORGED";
    let ws = server.ws(&format!("uid=a%0A{}%0D%1B[31m", forged.replace(' ', "%20")));
    let r = server.raw(b"GET /nowhere%0Ainjected HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gz\xc2\x85ip\r\nConnection: close\r\n\r\n");
    assert!(r.status >= 400);
    drop(ws);
    assert_eq!(server.terminate().code(), Some(0));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("ws open uid=a\\n"), "{text}");
    for line in text.lines() {
        assert!(
            line.split(' ').nth(1) == Some("wspush"),
            "a line that is not the logger's own: {line:?}\n{text}"
        );
        assert!(
            !line.chars().any(|c| c.is_control()),
            "a control byte in the log: {line:?}"
        );
    }
}

#[test]
fn too_many_or_too_long_types_on_ws_are_400_and_counted() {
    let server = Server::start(&["-max-types=4"]);
    let (status, text) = raw_ws_status(&server, "uid=1&types=a,b,c,d,e", "");
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("types"), "{text}");
    let long = "x".repeat(129);
    let (status, text) = raw_ws_status(&server, &format!("uid=1&types={long}"), "");
    assert_eq!(status, 400, "{text}");
    // At the limit (duplicates and blanks do not count) it is served.
    let (status, text) = raw_ws_status(&server, "uid=1&types=a,b,c,d,a,,", "");
    assert_eq!(status, 101, "{text}");
    let s = server.stats();
    assert_eq!(s["refused"]["types"], 2, "{s}");
    let metrics = server.get("/metrics").text();
    assert!(
        metrics.contains("wspush_refused_total{reason=\"types\"} 2"),
        "{metrics}"
    );
}
