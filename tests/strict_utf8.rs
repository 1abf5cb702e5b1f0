//! Invalid UTF-8 fails a connection at the first bad byte, even while the frame that
//! carries it is still arriving: the server closes with 1007 without waiting for the
//! rest, which a client that stalls after the bad byte would otherwise never send.

mod common;
use common::raw_ws::*;
use common::*;

use std::io::Write;
use std::net::TcpStream;

/// The Autobahn 6.4.x payload: "κόσμε", then U+110000 (F4 90 80 80), then more text.
const PAYLOAD: &[u8] = b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xf4\x90\x80\x80edited";
/// Index of the 0x90: the first byte no continuation can make valid.
const FIRST_BAD: usize = 12;

fn write_flushed(s: &mut TcpStream, bytes: &[u8]) {
    s.write_all(bytes).unwrap();
    s.flush().unwrap();
}

#[test]
fn a_text_frame_still_arriving_fails_at_its_first_invalid_byte() {
    let server = Server::start(&["-echo"]);
    // Everything up to and including the bad byte, then the client stalls.
    let wire = frame(true, TEXT, PAYLOAD);
    let header = wire.len() - PAYLOAD.len();
    let mut s = connect(&server, "");
    write_flushed(&mut s, &wire[..header + FIRST_BAD]);
    write_flushed(&mut s, &wire[header + FIRST_BAD..header + FIRST_BAD + 1]);
    expect_close(&mut s, 1007);
}

#[test]
fn a_valid_prefix_of_a_text_frame_keeps_the_connection_open() {
    let server = Server::start(&["-echo"]);
    let text = "gr\u{fc}\u{df}e \u{20ac} \u{1f600}";
    let wire = frame(true, TEXT, text.as_bytes());
    let mut s = connect(&server, "");
    // Byte by byte, so every code point is split between reads at some point.
    for b in &wire {
        write_flushed(&mut s, std::slice::from_ref(b));
    }
    let f = next_frame(&mut s);
    assert_eq!((f.opcode, f.payload), (TEXT, text.as_bytes().to_vec()));
}

#[test]
fn a_code_point_broken_across_fragments_fails_before_the_fragment_is_whole() {
    let server = Server::start(&["-echo"]);
    let mut s = connect(&server, "");
    // "€" is E2 82 AC: the first fragment ends after E2, the continuation goes on with
    // 82 and then 'A' where AC should be, and the client stalls there.
    write_flushed(&mut s, &frame(false, TEXT, b"ok\xe2"));
    let rest = b"\x82A and much more text that never comes";
    let cont = frame(true, CONTINUATION, rest);
    let header = cont.len() - rest.len();
    write_flushed(&mut s, &cont[..header + 2]);
    expect_close(&mut s, 1007);
}
