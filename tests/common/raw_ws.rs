//! A WebSocket client written by hand, for what a real client library refuses to
//! do: frames split or joined at chosen bytes, forbidden close codes, 64-bit lengths
//! with nothing behind them, and sockets shaped with socket options. [`RawWs`] holds
//! one such connection for tests that talk frame by frame.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use super::{Server, WAIT, read_response};

/// The FIN bit of a frame's first byte.
pub const FIN: u8 = 0x80;
pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
pub const CONTINUATION: u8 = 0x0;
pub const CLOSE: u8 = 0x8;
pub const PING: u8 = 0x9;
pub const PONG: u8 = 0xA;

/// Any fixed key will do; this one is RFC 6455 §5.7's.
const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// RFC 6455 §1.3's example handshake key and the accept value the RFC gives for it.
pub const RFC_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
pub const RFC_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// The upgrade request for `/ws?query`, with `connection` as the Connection header.
pub fn upgrade_request(query: &str, connection: &str) -> String {
    format!(
        "GET /ws?{query} HTTP/1.1\r\nHost: x\r\nConnection: {connection}\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {RFC_KEY}\r\n\r\n"
    )
}

/// A raw push connection: the handshake is done and its 101 read, nothing more.
pub fn connect(server: &Server, query: &str) -> TcpStream {
    let mut s = server.tcp();
    upgrade(&mut s, query);
    s
}

/// Performs the opening handshake on `s` and checks the 101 and its accept value.
pub fn upgrade(s: &mut TcpStream, query: &str) {
    s.write_all(upgrade_request(query, "Upgrade").as_bytes())
        .unwrap();
    let r = read_response(s);
    assert_eq!(r.status, 101, "handshake refused: {}", r.text());
    assert_eq!(r.header("sec-websocket-accept"), Some(RFC_ACCEPT));
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

/// The same frame unmasked, which a client must never send.
pub fn unmasked_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = header(fin, opcode, payload.len() as u64);
    f.truncate(f.len() - KEY.len());
    f[1] &= 0x7f;
    f.extend_from_slice(payload);
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

impl Frame {
    /// The status code of a close frame.
    pub fn close_code(&self) -> u16 {
        assert_eq!(self.opcode, CLOSE, "not a close frame: {self:?}");
        assert!(self.payload.len() >= 2, "close without a code: {self:?}");
        u16::from_be_bytes([self.payload[0], self.payload[1]])
    }
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
    assert_eq!(h[1] & 0x80, 0, "a server frame is masked (RFC 6455 §5.1)");
    // RSV1 marks a permessage-deflate message; RSV2 and RSV3 are never used.
    assert_eq!(h[0] & 0x30, 0, "reserved bits set in a server frame");
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
    let reason = String::from_utf8_lossy(f.payload.get(2..).unwrap_or_default()).into_owned();
    assert_eq!(f.close_code(), code, "close code (reason {reason:?})");
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

/// One push connection driven frame by frame: what it sends is masked unless said
/// otherwise, and what it reads is checked as a client must check server frames.
pub struct RawWs {
    pub s: TcpStream,
}

impl RawWs {
    /// Opens `/ws?query` with the RFC's example key and checks the accept value.
    pub fn connect(server: &Server, query: &str) -> RawWs {
        RawWs {
            s: connect(server, query),
        }
    }

    pub fn write(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("write to the server");
    }

    /// Sends one masked frame whose first byte is `b0` (FIN, reserved bits, opcode).
    pub fn send(&mut self, b0: u8, payload: &[u8]) {
        self.write(&frame(b0 & FIN != 0, b0 & !FIN, payload));
    }

    /// The next frame, pings included; `None` once the server ended the connection.
    pub fn read_frame(&mut self) -> Option<Frame> {
        read_frame(&mut self.s)
    }

    pub fn expect_frame(&mut self) -> Frame {
        self.read_frame()
            .expect("a frame, but the server closed the connection")
    }

    /// The next frame is a close, then the connection ends. Returns the close code.
    pub fn expect_close(&mut self) -> u16 {
        let code = self.expect_frame().close_code();
        self.expect_eof();
        code
    }

    /// Nothing more arrives: the server ends the connection.
    pub fn expect_eof(&mut self) {
        expect_end(&mut self.s);
    }
}
