//! A WebSocket client written by hand, for what a real client library refuses to
//! do: frames split or joined at chosen bytes, forbidden close codes, 64-bit lengths
//! with nothing behind them, and sockets shaped with socket options.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use super::{Server, WAIT, read_response};

pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
pub const CONTINUATION: u8 = 0x0;
pub const CLOSE: u8 = 0x8;
pub const PING: u8 = 0x9;
pub const PONG: u8 = 0xA;

/// Any fixed key will do; this one is RFC 6455 §5.7's.
const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// The upgrade request for `/ws?query`, with `connection` as the Connection header.
pub fn upgrade_request(query: &str, connection: &str) -> String {
    format!(
        "GET /ws?{query} HTTP/1.1\r\nHost: x\r\nConnection: {connection}\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
}

/// A raw push connection: the handshake is done and its 101 read, nothing more.
pub fn connect(server: &Server, query: &str) -> TcpStream {
    let mut s = server.tcp();
    upgrade(&mut s, query);
    s
}

/// Performs the opening handshake on `s` and checks the 101.
pub fn upgrade(s: &mut TcpStream, query: &str) {
    s.write_all(upgrade_request(query, "Upgrade").as_bytes())
        .unwrap();
    let r = read_response(s);
    assert_eq!(r.status, 101, "handshake refused: {}", r.text());
}

/// A TCP connection whose receive buffer is shrunk before connecting, so that the
/// server's writes to it soon meet a full window.
pub fn tcp_small_rcvbuf(addr: SocketAddr, rcvbuf: usize) -> TcpStream {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).unwrap();
    sock.set_recv_buffer_size(rcvbuf).unwrap();
    sock.connect_timeout(&addr.into(), WAIT).unwrap();
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_write_timeout(Some(WAIT)).unwrap();
    s
}

/// Closes `s` with a reset (SO_LINGER 0) instead of a FIN.
pub fn reset(s: TcpStream) {
    let sock = Socket::from(s);
    sock.set_linger(Some(Duration::ZERO)).unwrap();
    drop(sock);
}

/// The header of a masked client frame declaring `len` payload bytes, key included.
pub fn header(fin: bool, opcode: u8, len: u64) -> Vec<u8> {
    let mut h = vec![if fin { 0x80 } else { 0 } | opcode];
    if len < 126 {
        h.push(0x80 | len as u8);
    } else if let Ok(len) = u16::try_from(len) {
        h.push(0x80 | 126);
        h.extend_from_slice(&len.to_be_bytes());
    } else {
        h.push(0x80 | 127);
        h.extend_from_slice(&len.to_be_bytes());
    }
    h.extend_from_slice(&KEY);
    h
}

/// A whole masked client frame.
pub fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = header(fin, opcode, payload.len() as u64);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ KEY[i % 4]));
    f
}

/// A whole masked, final client frame with RSV1 set: `deflated` is the message
/// compressed as RFC 7692 §7.2.1 says.
pub fn compressed_frame(opcode: u8, deflated: &[u8]) -> Vec<u8> {
    let mut f = frame(true, opcode, deflated);
    f[0] |= 0x40;
    f
}

/// A client message compressed as a permessage-deflate client sends it.
pub fn deflate(message: &[u8]) -> Vec<u8> {
    miniz_oxide::deflate::compress_to_vec(message, 6)
}

/// The message in a compressed server frame (RFC 7692 §7.2.2: the sender strips
/// the empty block that ends it, the receiver puts it back).
pub fn inflate(payload: &[u8]) -> Vec<u8> {
    let mut data = payload.to_vec();
    // The empty sync block, then an empty final block (fixed Huffman, end of block
    // at once) so that the stream ends where the message does.
    data.extend_from_slice(&[0x00, 0x00, 0xff, 0xff, 0x03, 0x00]);
    miniz_oxide::inflate::decompress_to_vec(&data).expect("the server's compressed frame inflates")
}

/// Performs the opening handshake offering permessage-deflate with `offer` as the
/// `Sec-WebSocket-Extensions` value; returns the extensions the server agreed to.
pub fn upgrade_offering(s: &mut TcpStream, query: &str, offer: &str) -> Option<String> {
    let request = upgrade_request(query, "Upgrade");
    let request = request.replacen(
        "\r\n\r\n",
        &format!("\r\nSec-WebSocket-Extensions: {offer}\r\n\r\n"),
        1,
    );
    s.write_all(request.as_bytes()).unwrap();
    let r = read_response(s);
    assert_eq!(r.status, 101, "handshake refused: {}", r.text());
    r.header("sec-websocket-extensions").map(str::to_string)
}

/// A close frame's payload: the code, then the reason bytes.
pub fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    [&code.to_be_bytes()[..], reason].concat()
}

/// One server frame: FIN, opcode, payload. Server frames are never masked.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    /// RSV1: a permessage-deflate (RFC 7692) compressed message.
    pub rsv1: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

/// Reads one server frame; `None` at end of stream before its first byte.
pub fn read_frame(s: &mut impl Read) -> Option<Frame> {
    let mut h = [0u8; 2];
    match s.read(&mut h[..1]) {
        Ok(0) => return None,
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => return None,
        Err(e) => panic!("read a frame: {e}"),
    }
    s.read_exact(&mut h[1..]).expect("read a frame header");
    assert_eq!(h[1] & 0x80, 0, "a server frame is masked");
    let len = match h[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            s.read_exact(&mut b).unwrap();
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).unwrap();
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    let mut payload = vec![0; usize::try_from(len).unwrap()];
    s.read_exact(&mut payload).expect("read a frame payload");
    Some(Frame {
        fin: h[0] & 0x80 != 0,
        rsv1: h[0] & 0x40 != 0,
        opcode: h[0] & 0x0f,
        payload,
    })
}

/// The next frame that is not a ping from the server.
pub fn next_frame(s: &mut impl Read) -> Frame {
    loop {
        let f = read_frame(s).expect("the connection ended before a frame");
        if f.opcode != PING {
            return f;
        }
    }
}

/// The server's next frame is a close with `code`, and then the connection ends.
pub fn expect_close(s: &mut TcpStream, code: u16) {
    let f = next_frame(s);
    assert_eq!(f.opcode, CLOSE, "expected a close frame, got {f:?}");
    assert!(f.payload.len() >= 2, "close without a code: {f:?}");
    let got = u16::from_be_bytes([f.payload[0], f.payload[1]]);
    let reason = String::from_utf8_lossy(&f.payload[2..]);
    assert_eq!(got, code, "close code (reason {reason:?})");
    expect_end(s);
}

/// Nothing more arrives: the next read is end of stream (or a reset).
pub fn expect_end(s: &mut TcpStream) {
    let mut b = [0u8; 256];
    match s.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Ok(n) => panic!("more bytes after the close: {:?}", &b[..n]),
        Err(e) => panic!("expected the connection to end, got {e}"),
    }
}
