//! Frame codec: decodes masked client frames (unmasking them in place) and
//! encodes unmasked server frames. Pure slice-in/value-out; buffering and
//! I/O belong to the caller.

use std::fmt;

/// RFC 6455 §5.5: control frames carry at most 125 payload bytes.
pub const MAX_CONTROL_PAYLOAD: usize = 125;

const FIN_BIT: u8 = 0x80;
const RSV_BITS: u8 = 0x70;
/// RFC 7692: RSV1 on a message's first frame marks it compressed.
const RSV1_BIT: u8 = 0x40;
const OPCODE_BITS: u8 = 0x0F;
const MASK_BIT: u8 = 0x80;
const LEN_BITS: u8 = 0x7F;
/// Largest length that fits in the 7-bit field; 126 and 127 are markers.
const SHORT_LEN_MAX: u8 = 125;
const LEN_16_MARKER: u8 = 126;
const LEN_64_MARKER: u8 = 127;
/// RFC 6455 §5.2: the 64-bit length's most significant bit must be 0.
const LEN_64_TOP_BIT: u8 = 0x80;
const MASK_KEY_LEN: usize = 4;
/// 2 fixed bytes + 8-byte extended length; server frames carry no mask key.
const MAX_SERVER_HEADER_LEN: usize = 10;
/// A close payload starts with a 2-byte status code.
const CLOSE_CODE_LEN: usize = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    pub fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }

    /// `None` for the reserved opcodes 0x3-0x7 and 0xB-0xF.
    pub fn from_u8(bits: u8) -> Option<Self> {
        match bits {
            0x0 => Some(OpCode::Continuation),
            0x1 => Some(OpCode::Text),
            0x2 => Some(OpCode::Binary),
            0x8 => Some(OpCode::Close),
            0x9 => Some(OpCode::Ping),
            0xA => Some(OpCode::Pong),
            _ => None,
        }
    }

    pub fn as_u8(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub fin: bool,
    pub opcode: OpCode,
    /// RSV1 set: the message this frame starts is deflate-compressed (RFC 7692).
    pub compressed: bool,
    /// Already unmasked.
    pub payload: &'a [u8],
}

/// Everything a client can do wrong at the frame or message level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// RSV1-3 set although no extension was negotiated.
    ReservedBits,
    UnknownOpcode(u8),
    /// RFC 6455 §5.1: every client-to-server frame must be masked.
    Unmasked,
    FragmentedControl,
    ControlTooLong,
    /// 64-bit length with the most significant bit set.
    BadLength,
    /// Declared frame payload exceeds the configured limit.
    FrameTooBig,
    /// Assembled message exceeds the configured limit.
    MessageTooBig,
    UnexpectedContinuation,
    ExpectedContinuation,
    /// In a text message or a close reason.
    InvalidUtf8,
    /// A close payload of exactly one byte (half a status code).
    BadClosePayload,
    /// A compressed message whose DEFLATE data does not decode.
    BadCompressedData,
    InvalidCloseCode(u16),
}

impl ProtocolError {
    /// The status code to send in our close frame. Kept as the single
    /// mapping so every caller closes with the same code for the same fault.
    pub fn close_code(&self) -> u16 {
        match self {
            ProtocolError::InvalidUtf8 | ProtocolError::BadCompressedData => 1007,
            ProtocolError::FrameTooBig | ProtocolError::MessageTooBig => 1009,
            ProtocolError::ReservedBits
            | ProtocolError::UnknownOpcode(_)
            | ProtocolError::Unmasked
            | ProtocolError::FragmentedControl
            | ProtocolError::ControlTooLong
            | ProtocolError::BadLength
            | ProtocolError::UnexpectedContinuation
            | ProtocolError::ExpectedContinuation
            | ProtocolError::BadClosePayload
            | ProtocolError::InvalidCloseCode(_) => 1002,
        }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::ReservedBits => {
                f.write_str("reserved bits set without a negotiated extension")
            }
            ProtocolError::UnknownOpcode(op) => write!(f, "unknown opcode {op:#x}"),
            ProtocolError::Unmasked => f.write_str("client frame is not masked"),
            ProtocolError::FragmentedControl => f.write_str("fragmented control frame"),
            ProtocolError::ControlTooLong => {
                f.write_str("control frame payload longer than 125 bytes")
            }
            ProtocolError::BadLength => {
                f.write_str("64-bit payload length has its most significant bit set")
            }
            ProtocolError::FrameTooBig => f.write_str("frame payload exceeds the limit"),
            ProtocolError::MessageTooBig => f.write_str("message exceeds the limit"),
            ProtocolError::UnexpectedContinuation => {
                f.write_str("continuation frame without a message to continue")
            }
            ProtocolError::ExpectedContinuation => {
                f.write_str("new data frame while a fragmented message is in progress")
            }
            ProtocolError::InvalidUtf8 => f.write_str("invalid UTF-8"),
            ProtocolError::BadClosePayload => f.write_str("close payload of one byte"),
            ProtocolError::BadCompressedData => f.write_str("compressed data does not inflate"),
            ProtocolError::InvalidCloseCode(code) => write!(f, "invalid close code {code}"),
        }
    }
}

impl std::error::Error for ProtocolError {}

/// A client frame's header, parsed before its payload has (all) arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    pub opcode: OpCode,
    pub compressed: bool,
    /// Declared payload length, already checked against the limit.
    pub len: usize,
    pub key: [u8; 4],
    /// Offset of the payload from the start of the frame.
    pub payload_at: usize,
}

/// Parses the header at the front of `buf`: `Ok(None)` until all of it has arrived.
///
/// Every header rule is checked as soon as the bytes it needs are present, so
/// a hostile header is rejected without waiting for (or allocating) its payload.
/// Non-minimal length encodings are tolerated, as most implementations do.
pub fn parse_header(buf: &[u8], max_payload: usize) -> Result<Option<Header>, ProtocolError> {
    parse_header_with(buf, max_payload, false)
}

/// `parse_header` for a connection that negotiated permessage-deflate when
/// `deflate` is set: RSV1 is then allowed on the first frame of a data message.
pub fn parse_header_with(
    buf: &[u8],
    max_payload: usize,
    deflate: bool,
) -> Result<Option<Header>, ProtocolError> {
    let Some(&b0) = buf.first() else {
        return Ok(None);
    };
    let opcode_bits = b0 & OPCODE_BITS;
    let opcode = OpCode::from_u8(opcode_bits).ok_or(ProtocolError::UnknownOpcode(opcode_bits));
    let compressed = b0 & RSV1_BIT != 0;
    let rsv1_ok = deflate && matches!(opcode, Ok(OpCode::Text | OpCode::Binary));
    if b0 & RSV_BITS & !RSV1_BIT != 0 || (compressed && !rsv1_ok) {
        return Err(ProtocolError::ReservedBits);
    }
    let opcode = opcode?;
    let fin = b0 & FIN_BIT != 0;
    if opcode.is_control() && !fin {
        return Err(ProtocolError::FragmentedControl);
    }

    let Some(&b1) = buf.get(1) else {
        return Ok(None);
    };
    if b1 & MASK_BIT == 0 {
        return Err(ProtocolError::Unmasked);
    }
    let len7 = b1 & LEN_BITS;
    // Also catches the 126/127 markers, before any extended length arrives.
    if opcode.is_control() && len7 > SHORT_LEN_MAX {
        return Err(ProtocolError::ControlTooLong);
    }

    let (declared, key_at): (u64, usize) = match len7 {
        LEN_16_MARKER => match array_at::<2>(buf, 2) {
            Some(ext) => (u64::from(u16::from_be_bytes(ext)), 4),
            None => return Ok(None),
        },
        LEN_64_MARKER => {
            // The top bit lives in the first extended byte; no need to wait for the other seven.
            if buf.get(2).is_some_and(|&b| b & LEN_64_TOP_BIT != 0) {
                return Err(ProtocolError::BadLength);
            }
            match array_at::<8>(buf, 2) {
                Some(ext) => (u64::from_be_bytes(ext), 10),
                None => return Ok(None),
            }
        }
        short => (u64::from(short), 2),
    };
    let len = usize::try_from(declared)
        .ok()
        .filter(|&len| len <= max_payload)
        .ok_or(ProtocolError::FrameTooBig)?;

    let Some(key) = array_at::<MASK_KEY_LEN>(buf, key_at) else {
        return Ok(None);
    };
    let payload_at = key_at + MASK_KEY_LEN;
    // Only reachable when max_payload is close to usize::MAX.
    payload_at
        .checked_add(len)
        .ok_or(ProtocolError::FrameTooBig)?;
    Ok(Some(Header {
        fin,
        opcode,
        compressed,
        len,
        key,
        payload_at,
    }))
}

/// Decode one client frame from the front of `buf`, unmasking its payload in place.
///
/// `Ok(None)` = need more bytes (the caller appends and calls again with the
/// grown buffer); `buf` is left untouched in that case, so retrying is safe.
/// `Ok(Some((frame, consumed)))` = one frame; `consumed` bytes of `buf` belong to it.
pub fn decode(
    buf: &mut [u8],
    max_payload: usize,
) -> Result<Option<(Frame<'_>, usize)>, ProtocolError> {
    decode_with(buf, max_payload, false)
}

/// `decode` for a connection that negotiated permessage-deflate when `deflate`
/// is set (see `parse_header_with`).
pub fn decode_with(
    buf: &mut [u8],
    max_payload: usize,
    deflate: bool,
) -> Result<Option<(Frame<'_>, usize)>, ProtocolError> {
    let Some(header) = parse_header_with(buf, max_payload, deflate)? else {
        return Ok(None);
    };
    let end = header.payload_at + header.len;
    let Some(payload) = buf.get_mut(header.payload_at..end) else {
        return Ok(None);
    };
    apply_mask(payload, header.key);
    Ok(Some((
        Frame {
            fin: header.fin,
            opcode: header.opcode,
            compressed: header.compressed,
            payload,
        },
        end,
    )))
}

/// Unmasks the payload bytes `from..` that have arrived of an incomplete frame
/// into `out`, leaving `wire` untouched so that `decode` can retry on it later.
pub fn unmask_arrived(wire: &[u8], header: &Header, from: usize, out: &mut [u8]) -> usize {
    let start = header.payload_at.saturating_add(from);
    let end = wire.len().min(header.payload_at.saturating_add(header.len));
    let arrived = wire.get(start..end).unwrap_or_default();
    let n = arrived.len().min(out.len());
    let dst = &mut out[..n];
    dst.copy_from_slice(&arrived[..n]);
    let mut key = header.key;
    key.rotate_left(from % MASK_KEY_LEN);
    apply_mask(dst, key);
    n
}

/// `N` bytes of `buf` starting at `at`, or `None` if they have not all arrived.
fn array_at<const N: usize>(buf: &[u8], at: usize) -> Option<[u8; N]> {
    buf.get(at..)?.first_chunk::<N>().copied()
}

/// XOR-masking is its own inverse, so this both masks and unmasks.
/// Works a u64 at a time because payloads can be large and byte-wise XOR
/// would dominate decode time.
fn apply_mask(data: &mut [u8], key: [u8; 4]) {
    let [k0, k1, k2, k3] = key;
    // Native byte order on both sides keeps each key byte over the data byte it belongs to.
    let wide = u64::from_ne_bytes([k0, k1, k2, k3, k0, k1, k2, k3]);
    let (chunks, tail) = data.as_chunks_mut::<8>();
    for chunk in chunks {
        *chunk = (u64::from_ne_bytes(*chunk) ^ wide).to_ne_bytes();
    }
    // Chunks are 8 bytes, a multiple of the key length, so the tail restarts at key[0].
    for (byte, k) in tail.iter_mut().zip(key.iter().cycle()) {
        *byte ^= k;
    }
}

/// A server-to-client frame header, built on the stack.
pub struct OutHeader {
    bytes: [u8; MAX_SERVER_HEADER_LEN],
    len: usize,
}

impl OutHeader {
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Server-to-client frame header (never masked), with 7/16/64-bit length as RFC 6455 requires (minimal encoding).
pub fn header(fin: bool, opcode: OpCode, len: usize) -> OutHeader {
    let mut bytes = [0u8; MAX_SERVER_HEADER_LEN];
    bytes[0] = if fin { FIN_BIT } else { 0 } | opcode.as_u8();
    let n = if let Ok(short) = u8::try_from(len)
        && short <= SHORT_LEN_MAX
    {
        bytes[1] = short;
        2
    } else if let Ok(medium) = u16::try_from(len) {
        bytes[1] = LEN_16_MARKER;
        bytes[2..4].copy_from_slice(&medium.to_be_bytes());
        4
    } else {
        bytes[1] = LEN_64_MARKER;
        // usize is at most 64 bits on every target Rust supports, so this is lossless.
        bytes[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    OutHeader { bytes, len: n }
}

/// [`header`], appended to `out`.
pub fn encode_header(fin: bool, opcode: OpCode, len: usize, out: &mut Vec<u8>) {
    out.extend_from_slice(header(fin, opcode, len).as_slice());
}

/// A whole unmasked, final frame: header + payload.
pub fn encode(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len().saturating_add(MAX_SERVER_HEADER_LEN));
    encode_header(true, opcode, payload.len(), &mut out);
    out.extend_from_slice(payload);
    out
}

/// A whole final frame with RSV1 set: `deflated` is a message compressed as
/// RFC 7692 §7.2.1 says (trailing empty block removed).
pub fn encode_compressed(opcode: OpCode, deflated: &[u8]) -> Vec<u8> {
    let mut out = encode(opcode, deflated);
    out[0] |= RSV1_BIT;
    out
}

/// A close frame with a status code and a reason (reason truncated on a char
/// boundary so the payload stays <= 125 bytes).
///
/// The code is not validated: sending 1005/1006/1015 is the caller's mistake.
pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut cut = reason.len().min(MAX_CONTROL_PAYLOAD - CLOSE_CODE_LEN);
    // Terminates: 0 is always a char boundary.
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let reason = reason.as_bytes().get(..cut).unwrap_or_default();
    let payload_len = CLOSE_CODE_LEN + reason.len();
    let mut out = Vec::with_capacity(MAX_SERVER_HEADER_LEN + payload_len);
    encode_header(true, OpCode::Close, payload_len, &mut out);
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(reason);
    out
}

/// Test-only client-side encoder, shared with the sibling modules' tests.
#[cfg(test)]
pub(super) mod test_util {
    use super::{FIN_BIT, MASK_BIT, OpCode, apply_mask, encode_header};

    /// RFC 6455 §5.7's example key, so hand-checked vectors line up.
    pub const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    /// A masked client frame whose first byte is given raw, so tests can set
    /// RSV bits and reserved opcodes the typed API cannot express.
    pub fn raw_client_frame(b0: u8, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
        let mut out = Vec::with_capacity(payload.len() + 14);
        encode_header(false, OpCode::Continuation, payload.len(), &mut out);
        out[0] = b0;
        out[1] |= MASK_BIT;
        out.extend_from_slice(&key);
        let start = out.len();
        out.extend_from_slice(payload);
        apply_mask(&mut out[start..], key);
        out
    }

    pub fn client_frame(fin: bool, opcode: OpCode, payload: &[u8]) -> Vec<u8> {
        let b0 = if fin { FIN_BIT } else { 0 } | opcode.as_u8();
        raw_client_frame(b0, payload, KEY)
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::{KEY, client_frame, raw_client_frame};
    use super::*;

    const MAX: usize = 1 << 20;

    /// fin, opcode, payload, consumed — detached from the buffer so the test keeps no borrow.
    type OwnedFrame = (bool, OpCode, Vec<u8>, usize);

    fn decode_owned(bytes: &[u8], max: usize) -> Result<Option<OwnedFrame>, ProtocolError> {
        let mut buf = bytes.to_vec();
        Ok(decode(&mut buf, max)?.map(|(f, n)| (f.fin, f.opcode, f.payload.to_vec(), n)))
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 + 7) as u8).collect()
    }

    #[test]
    fn rsv1_only_on_a_data_frame_of_a_deflate_connection() {
        for (b0, deflate, ok) in [
            (0xc1, true, true),   // FIN | RSV1 | text
            (0x42, true, true),   // RSV1 | binary, more fragments to come
            (0xc1, false, false), // not negotiated
            (0x40, true, false),  // RSV1 on a continuation
            (0xc9, true, false),  // RSV1 on a ping
            (0xa1, true, false),  // RSV2
            (0x91, true, false),  // RSV3
        ] {
            let mut wire = raw_client_frame(b0, b"x", KEY);
            let got = decode_with(&mut wire, MAX, deflate).map(|f| f.map(|(f, _)| f.compressed));
            let want = if ok {
                Ok(Some(b0 & 0x40 != 0))
            } else {
                Err(ProtocolError::ReservedBits)
            };
            assert_eq!(got, want, "{b0:#x} deflate={deflate}");
            // Rejected from the first byte, before the rest of the header.
            if !ok {
                assert_eq!(
                    parse_header_with(&wire[..1], MAX, deflate),
                    Err(ProtocolError::ReservedBits)
                );
            }
        }
    }

    #[test]
    fn rfc_masked_hello() {
        let mut buf = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let (frame, used) = decode(&mut buf, MAX).unwrap().unwrap();
        assert_eq!(
            frame,
            Frame {
                fin: true,
                opcode: OpCode::Text,
                compressed: false,
                payload: b"Hello"
            }
        );
        assert_eq!(used, 11);
        assert_eq!(
            client_frame(true, OpCode::Text, b"Hello"),
            [
                0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58
            ]
        );
    }

    #[test]
    fn rfc_unmasked_examples() {
        assert_eq!(
            encode(OpCode::Text, b"Hello"),
            [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]
        );
        let mut header = Vec::new();
        encode_header(true, OpCode::Binary, 256, &mut header);
        assert_eq!(header, [0x82, 0x7E, 0x01, 0x00]);
        header.clear();
        encode_header(true, OpCode::Binary, 65536, &mut header);
        assert_eq!(header, [0x82, 0x7F, 0, 0, 0, 0, 0, 0x01, 0, 0]);
    }

    #[test]
    fn decodes_all_length_forms() {
        for (len, header_len) in [
            (0, 6),
            (125, 6),
            (126, 8),
            (65535, 8),
            (65536, 14),
            (70_000, 14),
        ] {
            let payload = pattern(len);
            let bytes = client_frame(true, OpCode::Binary, &payload);
            assert_eq!(bytes.len(), header_len + len);
            let (fin, op, got, used) = decode_owned(&bytes, MAX).unwrap().unwrap();
            assert!(fin);
            assert_eq!(op, OpCode::Binary);
            assert_eq!(got, payload, "len {len}");
            assert_eq!(used, bytes.len());
        }
    }

    #[test]
    fn tolerates_non_minimal_length() {
        // 5 bytes declared through the 16-bit form.
        let mut bytes = vec![0x82, 0x80 | 126, 0, 5];
        bytes.extend_from_slice(&[0; 4]);
        bytes.extend_from_slice(b"abcde");
        let (_, _, got, used) = decode_owned(&bytes, MAX).unwrap().unwrap();
        assert_eq!(got, b"abcde");
        assert_eq!(used, 13);
    }

    #[test]
    fn every_split_point_waits_then_yields_the_same_frame() {
        for len in [0, 1, 7, 8, 9, 125, 126, 300, 65535, 65536, 70_000] {
            let payload = pattern(len);
            let original = client_frame(false, OpCode::Text, &payload);
            let mut buf = original.clone();
            for cut in 0..buf.len() {
                assert_eq!(
                    decode(&mut buf[..cut], MAX),
                    Ok(None),
                    "len {len} cut {cut}"
                );
            }
            // Ok(None) must never have touched the bytes, or a retry would double-unmask.
            assert_eq!(buf, original);
            let (frame, used) = decode(&mut buf, MAX).unwrap().unwrap();
            assert_eq!(frame.payload, &payload[..]);
            assert!(!frame.fin);
            assert_eq!(frame.opcode, OpCode::Text);
            assert_eq!(used, original.len());
        }
    }

    #[test]
    fn several_frames_and_a_partial_one_in_one_buffer() {
        let a = client_frame(false, OpCode::Text, b"first");
        let b = client_frame(true, OpCode::Ping, b"");
        let c = client_frame(true, OpCode::Binary, &pattern(200));
        let d = client_frame(true, OpCode::Continuation, b"tail");
        let mut buf = [&a[..], &b, &c, &d[..d.len() - 1]].concat();
        let mut seen = Vec::new();
        let mut at = 0;
        while let Some((frame, used)) = decode(&mut buf[at..], MAX).unwrap() {
            seen.push((frame.opcode, frame.payload.to_vec()));
            at += used;
        }
        assert_eq!(
            seen,
            [
                (OpCode::Text, b"first".to_vec()),
                (OpCode::Ping, vec![]),
                (OpCode::Binary, pattern(200)),
            ]
        );
        assert_eq!(at, a.len() + b.len() + c.len());
        // Completing the partial frame makes it decodable.
        buf.push(*d.last().unwrap());
        let (frame, used) = decode(&mut buf[at..], MAX).unwrap().unwrap();
        assert_eq!(frame.payload, b"tail");
        assert_eq!(at + used, buf.len());
    }

    #[test]
    fn mask_matches_bytewise_reference_and_round_trips() {
        let key = [0xde, 0xad, 0xbe, 0xef];
        for len in 0..40 {
            let original = pattern(len);
            let mut fast = original.clone();
            apply_mask(&mut fast, key);
            let slow: Vec<u8> = original
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ key[i % 4])
                .collect();
            assert_eq!(fast, slow, "len {len}");
            apply_mask(&mut fast, key);
            assert_eq!(fast, original);
        }
    }

    #[test]
    fn reserved_bits_rejected_from_first_byte() {
        for rsv in [0x40, 0x20, 0x10] {
            assert_eq!(
                decode(&mut [0x81 | rsv], MAX),
                Err(ProtocolError::ReservedBits)
            );
            let bytes = raw_client_frame(0x81 | rsv, b"x", KEY);
            assert_eq!(decode_owned(&bytes, MAX), Err(ProtocolError::ReservedBits));
        }
    }

    #[test]
    fn unknown_opcodes_rejected_from_first_byte() {
        for op in (0x3..=0x7).chain(0xB..=0xF) {
            assert_eq!(
                decode(&mut [0x80 | op], MAX),
                Err(ProtocolError::UnknownOpcode(op))
            );
        }
    }

    #[test]
    fn unmasked_rejected_from_second_byte() {
        assert_eq!(decode(&mut [0x81, 0x05], MAX), Err(ProtocolError::Unmasked));
        assert_eq!(
            decode(&mut [0x81, 0x05, b'H', b'e', b'l', b'l', b'o'], MAX),
            Err(ProtocolError::Unmasked)
        );
    }

    #[test]
    fn fragmented_control_rejected_from_first_byte() {
        for op in [OpCode::Close, OpCode::Ping, OpCode::Pong] {
            assert_eq!(
                decode(&mut [op.as_u8()], MAX),
                Err(ProtocolError::FragmentedControl)
            );
        }
    }

    #[test]
    fn control_payload_limit() {
        let ok = client_frame(true, OpCode::Ping, &[7; 125]);
        assert_eq!(decode_owned(&ok, MAX).unwrap().unwrap().2, vec![7; 125]);
        let long = client_frame(true, OpCode::Ping, &[7; 126]);
        assert_eq!(decode_owned(&long, MAX), Err(ProtocolError::ControlTooLong));
        // Two bytes are enough to see it.
        assert_eq!(
            decode(&mut [0x89, 0x80 | 126], MAX),
            Err(ProtocolError::ControlTooLong)
        );
        assert_eq!(
            decode(&mut [0x88, 0x80 | 127], MAX),
            Err(ProtocolError::ControlTooLong)
        );
    }

    #[test]
    fn length_msb_rejected_from_first_extended_byte() {
        assert_eq!(
            decode(&mut [0x82, 0xFF, 0x80], MAX),
            Err(ProtocolError::BadLength)
        );
        let mut full = [
            0x82, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 1, 2, 3, 4,
        ];
        assert_eq!(decode(&mut full, MAX), Err(ProtocolError::BadLength));
    }

    #[test]
    fn huge_declared_length_rejected_by_header_alone() {
        let mut header = vec![0x82, 0xFF];
        header.extend_from_slice(&(i64::MAX as u64).to_be_bytes());
        // Length complete, mask key not yet arrived.
        assert_eq!(decode(&mut header, 65536), Err(ProtocolError::FrameTooBig));
        header.extend_from_slice(&KEY);
        assert_eq!(decode(&mut header, 65536), Err(ProtocolError::FrameTooBig));
    }

    #[test]
    fn frame_limit_is_inclusive() {
        let at_limit = client_frame(true, OpCode::Binary, &[1; 300]);
        assert!(decode_owned(&at_limit, 300).unwrap().is_some());
        assert_eq!(
            decode_owned(&at_limit, 299),
            Err(ProtocolError::FrameTooBig)
        );
        // Rejected before the payload arrives.
        assert_eq!(
            decode(&mut at_limit.clone()[..4], 299),
            Err(ProtocolError::FrameTooBig)
        );
    }

    #[test]
    fn empty_buffer_needs_more() {
        assert_eq!(decode(&mut [], MAX), Ok(None));
    }

    #[test]
    fn close_codes_for_every_error() {
        use ProtocolError::*;
        let cases = [
            (ReservedBits, 1002),
            (UnknownOpcode(3), 1002),
            (Unmasked, 1002),
            (FragmentedControl, 1002),
            (ControlTooLong, 1002),
            (BadLength, 1002),
            (FrameTooBig, 1009),
            (MessageTooBig, 1009),
            (UnexpectedContinuation, 1002),
            (ExpectedContinuation, 1002),
            (InvalidUtf8, 1007),
            (BadClosePayload, 1002),
            (InvalidCloseCode(1005), 1002),
        ];
        for (err, code) in cases {
            assert_eq!(err.close_code(), code, "{err:?}");
            assert!(!err.to_string().is_empty());
        }
    }

    #[test]
    fn encode_header_lengths() {
        let cases: [(usize, &[u8]); 5] = [
            (0, &[0x81, 0]),
            (125, &[0x81, 125]),
            (126, &[0x81, 126, 0, 126]),
            (65535, &[0x81, 126, 0xFF, 0xFF]),
            (65536, &[0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]),
        ];
        for (len, want) in cases {
            let mut out = Vec::new();
            encode_header(true, OpCode::Text, len, &mut out);
            assert_eq!(out, want, "len {len}");
        }
        let mut out = Vec::new();
        encode_header(false, OpCode::Continuation, 3, &mut out);
        assert_eq!(out, [0x00, 3]);
    }

    #[test]
    fn close_frame_layout_and_truncation() {
        assert_eq!(close_frame(1000, ""), [0x88, 2, 0x03, 0xE8]);
        assert_eq!(
            close_frame(1001, "bye"),
            [0x88, 5, 0x03, 0xE9, b'b', b'y', b'e']
        );

        let ascii = "a".repeat(200);
        let frame = close_frame(1009, &ascii);
        assert_eq!(frame[1], 125);
        assert_eq!(frame.len(), 2 + 125);
        assert_eq!(&frame[4..], &ascii.as_bytes()[..123]);

        // 61 two-byte chars = 122 bytes, then a 3-byte char would overshoot 123.
        let reason = format!("{}€tail", "é".repeat(61));
        let frame = close_frame(1011, &reason);
        let text = std::str::from_utf8(&frame[4..]).unwrap();
        assert_eq!(text, "é".repeat(61));
        assert_eq!(usize::from(frame[1]), 2 + 122);
    }

    #[test]
    fn encoded_server_frames_decode_after_masking() {
        // Ties encoder and decoder together: mask a server frame and read it back.
        for len in [0, 125, 126, 65536] {
            let payload = pattern(len);
            let mut bytes = encode(OpCode::Binary, &payload);
            let header_len = bytes.len() - len;
            bytes[1] |= MASK_BIT;
            bytes.splice(header_len..header_len, KEY);
            apply_mask(&mut bytes[header_len + 4..], KEY);
            assert_eq!(decode_owned(&bytes, MAX).unwrap().unwrap().2, payload);
        }
    }

    #[test]
    fn random_input_never_panics() {
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let len = (next() % 24) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = decode(&mut buf, (next() % 300) as usize);
        }
    }
}
