//! The reactor's fairness and its close rules against the real binary: one
//! client's input does not starve the others, a burst the server merged does not
//! evict a client that reads, one close frame per connection, and random
//! interleavings of opens, closes, resets and sends leave a serving server.

mod common;
use common::raw_ws::{self, *};
use common::*;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

/// Fixes #10 item 10: a client whose input never lets up is read a budget at a
/// time, so everyone else is still answered promptly.
#[test]
fn a_client_flooding_input_does_not_starve_the_others() {
    let server = Server::start(&[]);
    let flooder = raw_ws::connect(&server, "uid=flood");
    // Binary messages are read and dropped (no -echo): pure input work.
    let burst: Vec<u8> = (0..16)
        .flat_map(|_| frame(true, BINARY, &[7u8; 60_000]))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let mut s = flooder.try_clone().unwrap();
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if s.write_all(&burst).is_err() {
                    break;
                }
            }
        })
    };
    // Let the flood fill the pipe before asking.
    thread::sleep(Duration::from_millis(200));
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        let t = Instant::now();
        let mut s = server.tcp();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut got = Vec::new();
        let answered = s.read_to_end(&mut got).is_ok() && got.starts_with(b"HTTP/1.1 200");
        slowest = slowest.max(t.elapsed());
        if !answered {
            slowest = Duration::MAX;
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = flooder.shutdown(std::net::Shutdown::Both);
    writer.join().unwrap();
    assert!(
        slowest < Duration::from_secs(1),
        "a /healthz took {slowest:?} while one client flooded"
    );
}

/// A push client on a small receive window that reads all the time; counts the
/// text frames it gets until the connection ends.
fn reader(server: &Server, uid: &str) -> (Arc<AtomicUsize>, thread::JoinHandle<Option<u16>>) {
    let mut s = tcp_small_rcvbuf(server.addr, 16 * 1024);
    upgrade(&mut s, &format!("uid={uid}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let got = Arc::new(AtomicUsize::new(0));
    let count = got.clone();
    let handle = thread::spawn(move || {
        while let Some(f) = read_frame(&mut s) {
            match f.opcode {
                TEXT => {
                    count.fetch_add(1, Ordering::Relaxed);
                }
                CLOSE => return Some(u16::from_be_bytes([f.payload[0], f.payload[1]])),
                _ => {}
            }
        }
        None
    });
    (got, handle)
}

/// Fixes #10 item 5: /sends pipelined on one connection reach the reactor as one
/// burst; a client that reads at its own steady pace gets all of it.
#[test]
fn a_burst_merged_by_the_server_does_not_evict_a_client_that_reads() {
    const SENDS: usize = 32;
    const PER_SEND: usize = 60;
    let server = Server::start(&["-max-body=262144", "-max-backlog=1048576"]);
    let (got, handle) = reader(&server, "r");
    sync_uid(&server, "r");
    let msg = "m".repeat(4000);
    let batch: Vec<_> = (0..PER_SEND)
        .map(|_| json!({"topic": "uids", "topic_ids": ["r"], "msg": msg}))
        .collect();
    let body = serde_json::to_string(&batch).unwrap();
    let request = format!(
        "POST /send HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut s = server.tcp();
    let all: Vec<u8> = (0..SENDS).flat_map(|_| request.bytes()).collect();
    s.write_all(&all).unwrap();
    for _ in 0..SENDS {
        assert_eq!(read_response(&mut s).status, 200);
    }
    wait_until("every message arrived", WAIT, || {
        got.load(Ordering::Relaxed) == SENDS * PER_SEND || handle.is_finished()
    });
    assert_eq!(
        server.stats()["evicted_slow"],
        0,
        "a reading client was evicted"
    );
    assert_eq!(got.load(Ordering::Relaxed), SENDS * PER_SEND);
}

/// Waits until the hub holds a connection, so a /send finds its receiver.
fn sync_uid(server: &Server, _uid: &str) {
    wait_stats(server, "the push connection", |v| v["connections"] == 1);
}

/// Fixes #10 item 11: after the server's 1001, a protocol error from the peer
/// does not draw a second close frame (RFC 6455 §5.5.1).
#[test]
fn one_close_frame_per_connection_even_after_a_protocol_error() {
    let server = Server::start(&[]);
    let mut s = raw_ws::connect(&server, "uid=1");
    sync_uid(&server, "1");
    server.request_shutdown();
    let f = next_frame(&mut s);
    assert_eq!(f.opcode, CLOSE);
    assert_eq!(u16::from_be_bytes([f.payload[0], f.payload[1]]), 1001);
    // An unmasked frame: a protocol error the server would answer with 1002.
    s.write_all(&[0x81, 0x02, b'h', b'i']).unwrap();
    expect_end(&mut s);
}

/// A small deterministic generator: the same seed replays the same run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// Fixes #10 item 17: random interleavings of opens, graceful closes, resets,
/// half frames, subscribes and sends; the server stays up, keeps no leftover
/// connection, and still delivers.
#[test]
fn random_opens_closes_and_sends_leave_a_serving_server() {
    let seed = std::env::var("WSPUSH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_1234_u64);
    let mut rng = Rng(seed);
    let server = Server::start(&["-max-backlog=70000", "-max-body=65536"]);
    let mut open: Vec<TcpStream> = Vec::new();
    for _ in 0..400 {
        match rng.below(8) {
            0 | 1 if open.len() < 40 => {
                let uid = rng.below(4);
                open.push(raw_ws::connect(&server, &format!("uid={uid}")));
            }
            2 if !open.is_empty() => {
                let mut s = open.swap_remove(rng.below(open.len()));
                let _ = s.write_all(&frame(true, CLOSE, &close_payload(1000, b"")));
            }
            3 if !open.is_empty() => raw_ws::reset(open.swap_remove(rng.below(open.len()))),
            4 if !open.is_empty() => {
                // Half a frame, then gone.
                let mut s = open.swap_remove(rng.below(open.len()));
                let _ = s.write_all(&frame(true, TEXT, b"half a frame")[..5]);
            }
            5 if !open.is_empty() => {
                let i = rng.below(open.len());
                let op = br#"{"op":"subscribe","types":["a"]}"#;
                let _ = open[i].write_all(&frame(true, TEXT, op));
            }
            6 if !open.is_empty() => {
                // A protocol error: an unmasked frame.
                let mut s = open.swap_remove(rng.below(open.len()));
                let _ = s.write_all(&[0x81, 0x00]);
            }
            _ => {
                let uid = rng.below(5);
                let types = if rng.below(2) == 0 { "a" } else { "b" };
                let body = json!([{"topic": "uids", "topic_ids": [uid.to_string()], "types": types, "msg": "x"}]);
                assert_eq!(server.send(&body.to_string()).status, 200, "seed {seed}");
            }
        }
    }
    for s in open.drain(..) {
        raw_ws::reset(s);
    }
    wait_stats(&server, "every connection gone", |v| v["connections"] == 0);
    let mut ws = server.ws("uid=last");
    sync(&mut ws);
    server.send_ok(r#"{"topic":"uids","topic_ids":["last"],"msg":"still here"}"#);
    assert_eq!(recv_json(&mut ws)["msg"], "still here", "seed {seed}");
}
