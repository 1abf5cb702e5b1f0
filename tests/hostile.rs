//! Hostile clients against the real binary: slowloris on headers and on bodies,
//! thousands of connections reset mid-handshake and mid-frame, a 2^63-byte frame
//! length, endless pings from a client that never reads, a push client that never
//! reads while broadcasts flow, and running out of file descriptors. After each the
//! server must still serve a normal client, hold no leftover connections, and its
//! memory must be back near where it started: no cost proportional to the abuse.

mod common;
use common::raw_ws::{self, *};
use common::*;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tungstenite::Message;

/// How far above its baseline the server's resident memory may be after an attack.
/// Generous: allocator caches and the connection table's capacity may stay; what
/// must not stay is anything that grows with the number of attackers or bytes.
const RSS_SLACK: u64 = 8 << 20;

fn rss(server: &Server) -> u64 {
    server.stats()["rss_bytes"]
        .as_u64()
        .expect("rss_bytes in /stats")
}

/// Resident memory after a little ordinary traffic, so lazily created buffers exist.
fn baseline(server: &Server) -> u64 {
    let mut ws = server.ws("uid=warm");
    for i in 0..20 {
        server.send_ok(&json!({"topic":"uids","topic_ids":["warm"],"msg":i}).to_string());
        recv_json(&mut ws);
    }
    close(ws);
    wait_idle(server);
    rss(server)
}

/// Closes a push connection the way a client should: close frame, then wait for
/// the server's close and the end of the stream.
fn close(mut ws: Ws) {
    ws.close(None).unwrap();
    while ws.read().is_ok() {}
}

/// No connection is left but the one asking for /stats.
fn wait_idle(server: &Server) -> Value {
    wait_stats(server, "every connection to close", |s| {
        s["connections"] == 0 && s["http_connections"] == 1
    })
}

/// The server is back to normal: nothing left open, a new push client receives
/// what is sent to it, and memory is near the baseline.
fn assert_recovered(server: &Server, baseline: u64) {
    wait_idle(server);
    let mut ws = server.ws("uid=after");
    server.send_ok(r#"{"topic":"uids","topic_ids":["after"],"msg":"still serving"}"#);
    assert_eq!(recv_json(&mut ws)["msg"], "still serving");
    close(ws);
    wait_idle(server);
    let now = rss(server);
    assert!(
        now <= baseline + RSS_SLACK,
        "resident memory {now} bytes, {} KiB over the baseline {baseline}",
        (now - baseline) >> 10
    );
}

/// Reads what the server sends until a close frame, which must carry `code`;
/// returns the frames before it.
fn frames_until_close(s: &mut TcpStream, code: u16) -> Vec<raw_ws::Frame> {
    let mut before = Vec::new();
    loop {
        let f = next_frame(s);
        if f.opcode == CLOSE {
            let got = u16::from_be_bytes([f.payload[0], f.payload[1]]);
            assert_eq!(got, code, "{}", String::from_utf8_lossy(&f.payload[2..]));
            return before;
        }
        before.push(f);
    }
}

// ---- slowloris ----------------------------------------------------------------

#[test]
fn slowloris_on_headers_and_on_bodies_gets_408_while_others_are_served() {
    const EACH: usize = 40;
    let server = Server::start(&["-request-timeout=2s"]);
    let base = baseline(&server);
    let mut ws = server.ws("uid=1");

    // Each slow client has sent a request's beginning and adds one byte a tick.
    let body = r#"{"topic":"uids","topic_ids":["1"],"msg":"never"}"#;
    let mut slow: Vec<(TcpStream, Vec<u8>)> = Vec::new();
    for i in 0..2 * EACH {
        let mut s = server.tcp();
        let (start, drip) = if i % 2 == 0 {
            (
                b"POST /send HTTP/1.1\r\nHost: x\r\n".to_vec(),
                b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n".to_vec(),
            )
        } else {
            (
                format!(
                    "POST /send HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                )
                .into_bytes(),
                body.as_bytes()[..body.len() - 1].to_vec(),
            )
        };
        s.write_all(&start).unwrap();
        slow.push((s, drip));
    }

    let start = Instant::now();
    let mut served_meanwhile = false;
    for tick in 0.. {
        let elapsed = start.elapsed();
        if elapsed > Duration::from_millis(3500) {
            break;
        }
        for (s, drip) in &mut slow {
            if let Some(&b) = drip.get(tick) {
                // The server may have answered and stopped listening; that is fine.
                let _ = s.write(&[b]);
            }
        }
        if tick == 3 {
            // A normal client is served while every slow one is still dripping.
            server.send_ok(r#"{"topic":"uids","topic_ids":["1"],"msg":"meanwhile"}"#);
            assert_eq!(recv_json(&mut ws)["msg"], "meanwhile");
            // Well before any slow client's request timeout.
            served_meanwhile = start.elapsed() < Duration::from_millis(1500);
        }
        thread::sleep(Duration::from_millis(100));
    }
    assert!(served_meanwhile, "the normal client was not served in time");

    for (i, (mut s, _)) in slow.into_iter().enumerate() {
        let r = read_response(&mut s);
        assert_eq!(r.status, 408, "slow client {i}: {}", r.text());
        let mut b = [0u8; 16];
        assert!(
            matches!(s.read(&mut b), Ok(0)),
            "slow client {i} still open"
        );
    }
    // Nothing of the unfinished bodies was published.
    server.send_ok(r#"{"topic":"uids","topic_ids":["1"],"msg":"after"}"#);
    assert_eq!(recv_json(&mut ws)["msg"], "after");
    close(ws);
    assert_recovered(&server, base);
}

// ---- resets -------------------------------------------------------------------

#[test]
fn thousands_of_connections_reset_mid_handshake_and_mid_frame_leave_nothing_behind() {
    const TOTAL: usize = 2000;
    // Each batch connects at once, more than the usual listen queue of 128 holds.
    const BATCH: usize = 250;
    let server = Server::start(&[]);
    let base = baseline(&server);
    let mut bystander = server.ws("uid=bystander");

    let request = upgrade_request("uid=victim", "Upgrade");
    let text = frame(true, TEXT, &[b'x'; 1000]);
    let mut done = 0;
    while done < TOTAL {
        let mut handshaking = Vec::with_capacity(BATCH / 2);
        let mut framing = Vec::with_capacity(BATCH / 2);
        for i in 0..BATCH {
            let mut s = server.tcp();
            if i % 2 == 0 {
                // Cut somewhere inside the request head.
                let cut = 1 + (done + i) * 7 % (request.len() - 2);
                s.write_all(&request.as_bytes()[..cut]).unwrap();
                handshaking.push(s);
            } else {
                s.write_all(request.as_bytes()).unwrap();
                framing.push(s);
            }
        }
        for (i, s) in framing.iter_mut().enumerate() {
            let r = read_response(s);
            assert_eq!(r.status, 101);
            // Cut inside the header or the payload of a frame.
            let cut = 1 + (done + i) * 13 % (text.len() - 2);
            s.write_all(&text[..cut]).unwrap();
        }
        for s in handshaking.into_iter().chain(framing) {
            reset(s);
        }
        done += BATCH;
    }

    wait_stats(&server, "the reset connections to be gone", |s| {
        s["connections"] == 1 && s["http_connections"] == 1
    });
    server.send_ok(r#"{"topic":"uids","topic_ids":["bystander"],"msg":"unharmed"}"#);
    assert_eq!(recv_json(&mut bystander)["msg"], "unharmed");
    close(bystander);
    assert_recovered(&server, base);
}

// ---- huge declared lengths ----------------------------------------------------

#[test]
fn a_64_bit_length_of_2_pow_63_is_refused_before_any_payload() {
    let server = Server::start(&["-echo"]);
    let base = baseline(&server);
    // The most significant bit must be 0 (RFC 6455 §5.2): a protocol error.
    for len in [1u64 << 63, u64::MAX] {
        let mut s = connect(&server, "");
        s.write_all(&header(true, BINARY, len)).unwrap();
        expect_close(&mut s, 1002);
    }
    // Well-formed but over -max-frame: too big, refused on the header alone.
    for len in [(1u64 << 63) - 1, 1 << 32, 65537] {
        let mut s = connect(&server, "");
        s.write_all(&header(true, BINARY, len)).unwrap();
        expect_close(&mut s, 1009);
    }
    // The same with the length split over two writes.
    let mut s = connect(&server, "");
    s.set_nodelay(true).unwrap();
    let h = header(true, BINARY, 1 << 63);
    s.write_all(&h[..2]).unwrap();
    thread::sleep(Duration::from_millis(50));
    s.write_all(&h[2..]).unwrap();
    expect_close(&mut s, 1002);
    // And the limit itself is fine.
    drop(s);
    let mut s = connect(&server, "");
    s.write_all(&frame(true, BINARY, &vec![7; 65536])).unwrap();
    let f = next_frame(&mut s);
    assert_eq!((f.opcode, f.payload.len()), (BINARY, 65536));
    drop(s);
    assert_recovered(&server, base);
}

// ---- endless pings ------------------------------------------------------------

#[test]
fn a_client_pinging_without_reading_is_evicted_and_others_are_unaffected() {
    let server = Server::start(&["-max-backlog=65536", "-max-body=65280"]);
    let base = baseline(&server);
    let mut other = server.ws("uid=other");

    let mut s = tcp_small_rcvbuf(server.addr, 4096);
    upgrade(&mut s, "uid=pinger");
    let ping = frame(true, PING, &[b'p'; 125]);
    let batch: Vec<u8> = ping.repeat(512);
    let deadline = Instant::now() + WAIT;
    let mut sent = 0;
    loop {
        s.write_all(&batch)
            .expect("the server stopped reading pings");
        sent += 512;
        if server.stats()["evicted_slow"] == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline && sent < 500_000,
            "not evicted after {sent} unread pongs"
        );
    }
    // The pongs it was given came in order, then the close for being too slow.
    let pongs = frames_until_close(&mut s, 1008);
    assert!(
        pongs
            .iter()
            .all(|f| f.opcode == PONG && f.payload == [b'p'; 125])
    );
    assert!(
        pongs.len() < sent,
        "every pong was delivered: no backlog was built"
    );
    expect_end(&mut s);
    drop(s);

    server.send_ok(r#"{"topic":"uids","topic_ids":["other"],"msg":"unaffected"}"#);
    assert_eq!(recv_json(&mut other)["msg"], "unaffected");
    sync(&mut other);
    let stats = server.stats();
    assert_eq!(stats["evicted_slow"], 1, "{stats}");
    close(other);
    assert_recovered(&server, base);
}

// ---- a reader that never reads ------------------------------------------------

#[test]
fn a_push_client_that_never_reads_is_evicted_while_broadcasts_flow_to_the_others() {
    const MAX: usize = 2000;
    let server = Server::start(&["-max-backlog=65536", "-max-body=65280"]);
    let base = baseline(&server);

    let mut stalled = tcp_small_rcvbuf(server.addr, 4096);
    upgrade(&mut stalled, "uid=stalled");
    // A reader on its own thread takes every broadcast until the last one.
    let mut reader = server.ws("uid=reader");
    sync(&mut reader);
    let reading = thread::spawn(move || {
        let mut got = Vec::new();
        loop {
            match reader.read().expect("reader") {
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if v["msg"] == "last" {
                        return got;
                    }
                    got.push(v["msg"]["n"].as_u64().unwrap());
                }
                _ => continue,
            }
        }
    });

    // Broadcasts over one keep-alive connection until the stalled client is evicted.
    let filler = "f".repeat(4096);
    let mut api = server.tcp();
    let mut sent = 0u64;
    let deadline = Instant::now() + WAIT;
    loop {
        let body = json!({"topic":"all","msg":{"n":sent,"filler":filler}}).to_string();
        let req = format!(
            "POST /send HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        api.write_all(req.as_bytes()).unwrap();
        assert_eq!(read_response(&mut api).status, 200);
        sent += 1;
        if sent.is_multiple_of(10) && server.stats()["evicted_slow"] == 1 {
            break;
        }
        assert!(
            (sent as usize) < MAX && Instant::now() < deadline,
            "not evicted after {sent} broadcasts"
        );
    }
    server.send_ok(r#"{"topic":"all","msg":"last"}"#);
    let got = reading.join().expect("reader thread");
    assert_eq!(
        got,
        (0..sent).collect::<Vec<_>>(),
        "the reader missed pushes"
    );

    // What the stalled client was given arrives whole and in order, then 1008.
    let pushes = frames_until_close(&mut stalled, 1008);
    for (i, f) in pushes.iter().enumerate() {
        let v: Value = serde_json::from_slice(&f.payload).unwrap();
        assert_eq!(v["msg"]["n"], i as u64);
    }
    assert!((pushes.len() as u64) < sent);
    expect_end(&mut stalled);
    drop(stalled);
    let stats = server.stats();
    assert_eq!(stats["evicted_slow"], 1, "{stats}");
    assert!(stats["dropped"].as_u64().unwrap() > 0, "{stats}");
    drop(api);
    assert_recovered(&server, base);
}

// ---- out of descriptors -------------------------------------------------------

/// CPU time the process has used (user + system), from /proc/PID/stat.
#[cfg(target_os = "linux")]
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // USER_HZ, which the kernel fixes at 100 for user space.
    Duration::from_millis(ticks * 10)
}

/// Connects and completes the opening handshake, or says how it was refused.
fn try_push_connection(server: &Server) -> Result<TcpStream, String> {
    let mut s = server.tcp();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(upgrade_request("", "Upgrade").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            Ok(_) => return Err(format!("closed: {}", String::from_utf8_lossy(&head))),
            Err(e) => return Err(format!("{e}: {}", String::from_utf8_lossy(&head))),
        }
    }
    if head.starts_with(b"HTTP/1.1 101 ") {
        s.set_read_timeout(Some(WAIT)).unwrap();
        Ok(s)
    } else {
        Err(String::from_utf8_lossy(&head).into_owned())
    }
}

#[cfg(target_os = "linux")]
#[test]
fn running_out_of_descriptors_refuses_politely_without_spinning_and_recovers() {
    const NOFILE: u32 = 64;
    let server = Server::start_with_nofile(NOFILE, &[]);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert_eq!(
        line.split_whitespace().nth(3),
        Some(NOFILE.to_string().as_str()),
        "{line}"
    );
    // A keep-alive connection opened first stays usable for /stats throughout.
    let mut ctl = server.tcp();
    let stats = |ctl: &mut TcpStream| -> Value {
        ctl.write_all(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let r = read_response(ctl);
        assert_eq!(r.status, 200);
        r.json()
    };
    let base = stats(&mut ctl)["rss_bytes"].as_u64().unwrap();

    let mut held = Vec::new();
    let refusal = loop {
        match try_push_connection(&server) {
            Ok(s) => held.push(s),
            Err(why) => break why,
        }
        assert!(held.len() < NOFILE as usize, "never ran out of descriptors");
    };
    assert!(
        refusal.starts_with("HTTP/1.1 503 "),
        "refused without a 503: {refusal}"
    );
    assert!(held.len() > 32, "only {} connections fit", held.len());

    // Exhausted: new clients are refused at once, and the server does not spin.
    let cpu_before = cpu_time(server.pid());
    let window = Instant::now();
    let mut refused = 0;
    while window.elapsed() < Duration::from_secs(2) {
        // A client that only connects gets the whole 503 and the end of the stream.
        let mut s = server.tcp();
        let r = read_response(&mut s);
        assert_eq!(r.status, 503, "{}", r.text());
        refused += 1;
        thread::sleep(Duration::from_millis(100));
    }
    let used = cpu_time(server.pid()) - cpu_before;
    let elapsed = window.elapsed();
    assert!(
        used < elapsed / 2,
        "the server used {used:?} of CPU in {elapsed:?} while out of descriptors"
    );
    let s = stats(&mut ctl);
    assert!(
        s["refused"]["max_connections"].as_u64().unwrap() > refused,
        "{s}"
    );
    assert_eq!(s["connections"], held.len(), "{s}");

    // Descriptors come back: new clients are served again.
    for s in held.drain(..) {
        drop(s);
    }
    let deadline = Instant::now() + WAIT;
    let mut ws = loop {
        match try_push_connection(&server) {
            Ok(s) => break s,
            Err(why) => assert!(Instant::now() < deadline, "not recovered: {why}"),
        }
        thread::sleep(Duration::from_millis(50));
    };
    ws.write_all(&frame(true, PING, b"back")).unwrap();
    let f = next_frame(&mut ws);
    assert_eq!((f.opcode, f.payload), (PONG, b"back".to_vec()));
    drop(ws);
    drop(ctl);
    assert_recovered(&server, base);
}

// ---- pipelining without reading ------------------------------------------------

#[test]
fn an_http_client_pipelining_without_reading_is_paused_not_buffered() {
    // Far more replies than -max-backlog (2 MiB) and than one read's worth of requests.
    const REQUESTS: usize = 3000;
    let server = Server::start(&[]);
    let base = baseline(&server);
    let page = server.get("/").body;

    let mut s = tcp_small_rcvbuf(server.addr, 4096);
    // Each tiny request asks for the demo page; written all at once, none read.
    let mut writer = s.try_clone().unwrap();
    let writing = thread::spawn(move || {
        let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        writer.write_all(&request.repeat(REQUESTS)).unwrap();
    });
    thread::sleep(Duration::from_millis(500));
    let during = rss(&server);
    assert!(
        during <= base + RSS_SLACK,
        "{REQUESTS} pipelined requests for a {}-byte page: resident memory {} KiB \
         over the baseline while the client is not reading",
        page.len(),
        (during - base) >> 10
    );
    // Reading resumes the server: every request is answered, in order.
    for i in 0..REQUESTS {
        let r = read_response(&mut s);
        assert_eq!(r.status, 200, "reply {i}");
        assert!(r.body == page, "reply {i}");
    }
    writing.join().unwrap();
    drop(s);
    assert_recovered(&server, base);
}
