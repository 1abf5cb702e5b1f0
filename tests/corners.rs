//! The corners hand-written WebSocket servers often get wrong, each against the real
//! binary with frames made by hand: token lists in `Connection`, control frames
//! between fragments, continuations with nothing to continue, a new message inside a
//! fragmented one, forbidden close codes and payloads, pongs that meet a full socket,
//! and several frames (plus part of one more) in a single read.

mod common;
use common::raw_ws::*;
use common::*;

use std::io::Write;
use std::net::TcpStream;

/// A connection to an `-echo` server, upgraded, with a frame written.
fn echo_text(s: &mut TcpStream, text: &str) {
    s.write_all(&frame(true, TEXT, text.as_bytes())).unwrap();
    let f = next_frame(s);
    assert_eq!((f.fin, f.opcode), (true, TEXT));
    assert_eq!(String::from_utf8(f.payload).unwrap(), text);
}

#[test]
fn connection_is_a_case_insensitive_token_list() {
    let server = Server::start(&["-echo"]);
    for connection in [
        "keep-alive, Upgrade",
        "Keep-Alive,upgrade",
        "UPGRADE",
        "  upgrade  ,  keep-alive ",
        "keep-alive\r\nConnection: Upgrade",
        ", , Upgrade,",
    ] {
        let mut s = server.tcp();
        s.write_all(upgrade_request("uid=1", connection).as_bytes())
            .unwrap();
        let r = read_response(&mut s);
        assert_eq!(r.status, 101, "Connection: {connection:?}: {}", r.text());
        assert!(
            r.header("sec-websocket-accept") == Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "{r:?}"
        );
        echo_text(&mut s, connection);
    }
    // A token is matched whole, not as a substring.
    for connection in [
        "keep-alive",
        "upgraded",
        "keep-alive; upgrade",
        "no-upgrade",
    ] {
        let r = server.raw(upgrade_request("", connection).as_bytes());
        assert_eq!(r.status, 400, "Connection: {connection:?}");
    }
}

#[test]
fn control_frames_between_fragments_are_answered_and_the_message_survives() {
    let server = Server::start(&["-echo"]);
    let mut s = connect(&server, "uid=1");
    let wire = [
        frame(false, TEXT, b"Hel"),
        frame(true, PING, b"first"),
        frame(false, CONTINUATION, b"lo "),
        frame(true, PONG, b"unsolicited"),
        frame(false, CONTINUATION, b""),
        frame(true, PING, b"second"),
        frame(true, CONTINUATION, "wörld".as_bytes()),
    ]
    .concat();
    s.write_all(&wire).unwrap();
    for ping in ["first", "second"] {
        let f = next_frame(&mut s);
        assert_eq!((f.opcode, f.payload), (PONG, ping.as_bytes().to_vec()));
    }
    let f = next_frame(&mut s);
    assert_eq!((f.fin, f.opcode), (true, TEXT));
    assert_eq!(f.payload, "Hello wörld".as_bytes());

    // A close in the middle of a fragmented message is answered and ends it.
    s.write_all(&frame(false, BINARY, b"\x00\x01")).unwrap();
    s.write_all(&frame(true, CLOSE, &close_payload(1000, b"bye")))
        .unwrap();
    expect_close(&mut s, 1000);
}

#[test]
fn a_continuation_with_nothing_to_continue_is_a_protocol_error() {
    let server = Server::start(&["-echo"]);
    for fin in [true, false] {
        let mut s = connect(&server, "");
        s.write_all(&frame(fin, CONTINUATION, b"x")).unwrap();
        expect_close(&mut s, 1002);
    }
    // Also right after a fragmented message has completed.
    let mut s = connect(&server, "");
    s.write_all(&[frame(false, TEXT, b"a"), frame(true, CONTINUATION, b"b")].concat())
        .unwrap();
    let f = next_frame(&mut s);
    assert_eq!((f.opcode, f.payload), (TEXT, b"ab".to_vec()));
    s.write_all(&frame(true, CONTINUATION, b"c")).unwrap();
    expect_close(&mut s, 1002);
}

#[test]
fn a_new_data_frame_inside_a_fragmented_message_is_a_protocol_error() {
    let server = Server::start(&["-echo"]);
    for (first, second, fin) in [
        (TEXT, TEXT, true),
        (TEXT, BINARY, false),
        (BINARY, TEXT, true),
        (BINARY, BINARY, false),
    ] {
        let mut s = connect(&server, "");
        s.write_all(&[frame(false, first, b"a"), frame(fin, second, b"b")].concat())
            .unwrap();
        expect_close(&mut s, 1002);
    }
}

#[test]
fn forbidden_close_codes_and_a_one_byte_close_payload_are_protocol_errors() {
    let server = Server::start(&[]);
    for code in [
        0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
    ] {
        let mut s = connect(&server, "");
        s.write_all(&frame(true, CLOSE, &close_payload(code, b"")))
            .unwrap();
        expect_close(&mut s, 1002);
    }
    let mut s = connect(&server, "");
    s.write_all(&frame(true, CLOSE, &[0x03])).unwrap();
    expect_close(&mut s, 1002);

    // Codes a peer may send are echoed, as RFC 6455 §5.5.1 asks; so is an empty close.
    for code in [
        1000, 1001, 1002, 1003, 1007, 1008, 1011, 3000, 3999, 4000, 4999,
    ] {
        let mut s = connect(&server, "");
        s.write_all(&frame(true, CLOSE, &close_payload(code, b"fine")))
            .unwrap();
        expect_close(&mut s, code);
    }
    let mut s = connect(&server, "");
    s.write_all(&frame(true, CLOSE, b"")).unwrap();
    let f = next_frame(&mut s);
    assert_eq!((f.opcode, f.payload), (CLOSE, vec![]));
    expect_end(&mut s);
}

#[test]
fn invalid_utf8_in_a_close_reason_is_1007() {
    let server = Server::start(&[]);
    for reason in [&b"\xff"[..], b"ok\xc3", b"\xed\xa0\x80", b"\xc0\xaf"] {
        let mut s = connect(&server, "");
        s.write_all(&frame(true, CLOSE, &close_payload(1000, reason)))
            .unwrap();
        expect_close(&mut s, 1007);
    }
    // Valid multi-byte UTF-8 is fine.
    let mut s = connect(&server, "");
    s.write_all(&frame(
        true,
        CLOSE,
        &close_payload(1001, "au revoir ✓".as_bytes()),
    ))
    .unwrap();
    expect_close(&mut s, 1001);
}

/// The kernel's largest send buffer, which bounds what a socket can absorb before
/// the server's writes would block.
fn tcp_wmem_max() -> usize {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|t| t.split_whitespace().last()?.parse().ok())
        .unwrap_or(4 << 20)
}

#[test]
fn pongs_that_meet_a_full_socket_are_all_sent_later_in_order() {
    // Twice what the server's socket and ours can hold, so the server's writes must
    // hit WouldBlock and queue; the backlog limit is set well above it.
    const PONG_LEN: usize = 2 + 125;
    let count = (2 * tcp_wmem_max()).div_ceil(PONG_LEN).max(20_000);
    let backlog = (4 * count * PONG_LEN).to_string();
    let server = Server::start(&[&format!("-max-backlog={backlog}")]);
    let mut s = raw_ws::tcp_small_rcvbuf(server.addr, 4096);
    upgrade(&mut s, "uid=1");

    let payload = |i: usize| -> Vec<u8> {
        let mut p = format!("{i:010}").into_bytes();
        p.resize(125, b'.');
        p
    };
    // Written in large batches while nothing is read: the server keeps reading.
    let mut batch = Vec::with_capacity(512 * 131);
    for i in 0..count {
        batch.extend_from_slice(&frame(true, PING, &payload(i)));
        if batch.len() >= 512 * 131 || i + 1 == count {
            s.write_all(&batch).unwrap();
            batch.clear();
        }
    }
    for i in 0..count {
        let f = read_frame(&mut s).expect("connection ended before every pong");
        assert_eq!(f.opcode, PONG, "frame {i}");
        assert!(f.payload == payload(i), "pong {i} out of order or damaged");
    }
    let stats = server.stats();
    assert_eq!(stats["evicted_slow"], 0, "{stats}");
    // The connection is still fine.
    s.write_all(&frame(true, PING, b"last")).unwrap();
    let f = next_frame(&mut s);
    assert_eq!((f.opcode, f.payload), (PONG, b"last".to_vec()));
}

#[test]
fn several_frames_and_part_of_another_in_one_read_are_all_handled_in_order() {
    let server = Server::start(&["-echo"]);
    let fourth_payload = "the fourth, split ✓".repeat(10);
    let fourth = frame(true, TEXT, fourth_payload.as_bytes());
    // Split inside the header, right after it, and inside the payload.
    for split in [1, 2, 5, 6, 8, 9, fourth.len() / 2, fourth.len() - 1] {
        let mut s = connect(&server, "");
        s.set_nodelay(true).unwrap();
        let first = [
            frame(true, TEXT, b"one"),
            frame(true, BINARY, &[2, 2]),
            frame(false, TEXT, b"thr"),
            frame(true, CONTINUATION, b"ee"),
            fourth[..split].to_vec(),
        ]
        .concat();
        s.write_all(&first).unwrap();
        // The complete ones are answered without waiting for the rest.
        for (opcode, payload) in [(TEXT, &b"one"[..]), (BINARY, &[2, 2]), (TEXT, b"three")] {
            let f = next_frame(&mut s);
            assert_eq!(
                (f.opcode, &f.payload[..]),
                (opcode, payload),
                "split {split}"
            );
        }
        s.write_all(&fourth[split..]).unwrap();
        let f = next_frame(&mut s);
        assert_eq!(f.opcode, TEXT);
        assert_eq!(f.payload, fourth_payload.as_bytes(), "split {split}");
    }
}
