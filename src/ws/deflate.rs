//! permessage-deflate (RFC 7692), server side: negotiating the extension from
//! `Sec-WebSocket-Extensions`, compressing a push once into a frame every
//! receiver can share, and inflating client messages within a size bound.

use miniz_oxide::DataFormat;
use miniz_oxide::deflate::core::{
    CompressionStrategy, CompressorOxide, TDEFLFlush, TDEFLStatus, compress,
    create_comp_flags_from_zip_params,
};
use miniz_oxide::inflate::TINFLStatus;
use miniz_oxide::inflate::core::{DecompressorOxide, decompress, inflate_flags};

use super::frame::{self, OpCode, ProtocolError};

pub const EXTENSION: &str = "permessage-deflate";
/// RFC 7692 §7.1.2: LZ77 window sizes from 2^8 to 2^15 bytes.
const MIN_WINDOW_BITS: u8 = 8;
const MAX_WINDOW_BITS: u8 = 15;
/// The window asked of a client that lets the server choose. A client that keeps
/// its context between messages makes the server keep this many bytes of history
/// for it; push clients send little, so a small window costs them nothing that
/// matters. 9 rather than 8: zlib silently widens an 8-bit window to 9.
const CLIENT_WINDOW_BITS_CHOSEN: u8 = 9;
/// Every message ends with an empty stored block that the sender strips
/// (RFC 7692 §7.2.1) and the receiver puts back.
const SYNC_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];
/// miniz's default trade of speed for size; a push is compressed once however
/// many receivers it has.
const LEVEL: i32 = 6;
/// Negative window bits: a raw DEFLATE stream, no zlib header or checksum.
const RAW_WINDOW_BITS: i32 = -15;
/// First output buffer for inflating, grown by doubling up to the bound.
const INFLATE_START: usize = 1024;

/// What was agreed with one client. The server never keeps context between the
/// messages it sends (`server_no_context_takeover` is always in the answer), so
/// one compressed frame is valid for every receiver that negotiated the extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeflateParams {
    /// The client's `server_max_window_bits`: matches may reach back at most
    /// 2^bits bytes, so longer messages are sent to it uncompressed.
    pub server_max_window_bits: u8,
    /// The client resets its compressor for every message, so the server keeps
    /// no history for it.
    pub client_no_context_takeover: bool,
    /// The window the client compresses with; with context takeover this is how
    /// much history the server keeps for it once it has sent a compressed message.
    pub client_max_window_bits: u8,
    /// Whether the answer carries `client_max_window_bits` (only when offered).
    answer_client_bits: bool,
    /// Whether the answer carries `server_max_window_bits` (only when offered).
    answer_server_bits: bool,
}

impl DeflateParams {
    /// The `Sec-WebSocket-Extensions` value of the 101 response.
    pub fn response_header(&self) -> String {
        let mut out = format!("{EXTENSION}; server_no_context_takeover");
        if self.client_no_context_takeover {
            out.push_str("; client_no_context_takeover");
        }
        if self.answer_server_bits {
            out.push_str(&format!(
                "; server_max_window_bits={}",
                self.server_max_window_bits
            ));
        }
        if self.answer_client_bits {
            out.push_str(&format!(
                "; client_max_window_bits={}",
                self.client_max_window_bits
            ));
        }
        out
    }

    /// Whether the client takes the compressor's full 2^15-byte window; one that
    /// asked for less gets [`Window::Narrow`] frames.
    pub fn window(&self) -> Window {
        if self.server_max_window_bits >= MAX_WINDOW_BITS {
            Window::Full
        } else {
            Window::Narrow
        }
    }
}

/// Picks the first acceptable permessage-deflate offer from the request's
/// `Sec-WebSocket-Extensions` values (one per header line, each a comma-separated
/// list). Other extensions are ignored; an offer with an unknown, repeated or
/// malformed parameter is declined (RFC 7692 §5); `None` means the connection
/// goes on uncompressed, never that the handshake fails.
pub fn negotiate<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Option<DeflateParams> {
    values
        .into_iter()
        .flat_map(|v| v.split(|&b| b == b','))
        .find_map(accept_offer)
}

fn accept_offer(offer: &[u8]) -> Option<DeflateParams> {
    let mut parts = offer.split(|&b| b == b';').map(<[u8]>::trim_ascii);
    if !parts.next()?.eq_ignore_ascii_case(EXTENSION.as_bytes()) {
        return None;
    }
    let mut seen = [false; 4];
    let mut params = DeflateParams {
        server_max_window_bits: MAX_WINDOW_BITS,
        client_no_context_takeover: false,
        client_max_window_bits: MAX_WINDOW_BITS,
        answer_client_bits: false,
        answer_server_bits: false,
    };
    for part in parts {
        let (name, value) = match part.iter().position(|&b| b == b'=') {
            Some(eq) => (
                part[..eq].trim_ascii(),
                Some(unquote(part[eq + 1..].trim_ascii())?),
            ),
            None => (part, None),
        };
        let slot = match name.to_ascii_lowercase().as_slice() {
            b"server_no_context_takeover" if value.is_none() => 0,
            b"client_no_context_takeover" if value.is_none() => {
                params.client_no_context_takeover = true;
                1
            }
            b"server_max_window_bits" => {
                params.server_max_window_bits = window_bits(value?)?;
                params.answer_server_bits = true;
                2
            }
            b"client_max_window_bits" => {
                let limit = match value {
                    Some(v) => window_bits(v)?,
                    None => MAX_WINDOW_BITS,
                };
                params.client_max_window_bits = limit.min(CLIENT_WINDOW_BITS_CHOSEN);
                params.answer_client_bits = true;
                3
            }
            _ => return None,
        };
        if std::mem::replace(&mut seen[slot], true) {
            return None;
        }
    }
    Some(params)
}

/// RFC 7692 §7.1.2.1: a window value is 8..=15 in plain digits, maybe quoted.
fn window_bits(value: &[u8]) -> Option<u8> {
    let text = std::str::from_utf8(value).ok()?;
    if text.starts_with('0') || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse()
        .ok()
        .filter(|bits| (MIN_WINDOW_BITS..=MAX_WINDOW_BITS).contains(bits))
}

/// A quoted-string value must be quoted whole and contain no escapes (digits only).
fn unquote(value: &[u8]) -> Option<&[u8]> {
    match value {
        [b'"', inner @ .., b'"'] if !inner.contains(&b'"') && !inner.contains(&b'\\') => {
            Some(inner)
        }
        v if v.contains(&b'"') => None,
        v => Some(v),
    }
}

/// How far back a compressed frame's matches may reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Window {
    /// 2^15 bytes: what a client that sets no `server_max_window_bits` takes.
    Full,
    /// Matches of distance 1 only (run-length), valid for every window a client may
    /// ask for (2^8 and up): a client that narrows the window still gets compressed
    /// frames, shared by all such clients, at some cost in ratio.
    Narrow,
}

/// The server's one compressor: each message is compressed on its own (no context
/// kept), once per window kind, whatever the number of receivers.
pub struct Compressor {
    inner: Box<CompressorOxide>,
    /// The run-length compressor for [`Window::Narrow`], made when first needed.
    narrow: Option<Box<CompressorOxide>>,
    /// Messages shorter than this are sent uncompressed: below a few hundred bytes
    /// the saving does not pay for the receivers' inflate.
    min_len: usize,
    /// Compressed output, reused between messages.
    scratch: Vec<u8>,
}

impl Compressor {
    pub fn new(min_len: usize) -> Self {
        Compressor {
            inner: Box::new(CompressorOxide::new(create_comp_flags_from_zip_params(
                LEVEL,
                RAW_WINDOW_BITS,
                0,
            ))),
            narrow: None,
            min_len,
            scratch: Vec::new(),
        }
    }

    /// A whole final frame with RSV1 set carrying `payload` compressed, or `None`
    /// when the payload is below the threshold or does not shrink.
    pub fn frame(&mut self, opcode: OpCode, payload: &[u8]) -> Option<Vec<u8>> {
        self.frame_for(Window::Full, opcode, payload)
    }

    /// [`frame`](Self::frame) for clients that take `window`.
    pub fn frame_for(&mut self, window: Window, opcode: OpCode, payload: &[u8]) -> Option<Vec<u8>> {
        if payload.len() < self.min_len {
            return None;
        }
        let deflated = self.deflate_with(window, payload)?;
        (deflated.len() < payload.len()).then(|| frame::encode_compressed(opcode, deflated))
    }

    /// A compressed frame of `payload` whatever its size, even one that grows: for
    /// `-echo`, whose conformance clients expect every reply in the form they use.
    /// `None` only if the compressor fails.
    pub fn frame_always(
        &mut self,
        window: Window,
        opcode: OpCode,
        payload: &[u8],
    ) -> Option<Vec<u8>> {
        let deflated = self.deflate_with(window, payload)?;
        Some(frame::encode_compressed(opcode, deflated))
    }

    /// The message's DEFLATE data with the trailing empty block stripped.
    #[cfg(test)]
    fn deflate(&mut self, payload: &[u8]) -> Option<&[u8]> {
        self.deflate_with(Window::Full, payload)
    }

    fn deflate_with(&mut self, window: Window, payload: &[u8]) -> Option<&[u8]> {
        let inner = match window {
            Window::Full => &mut self.inner,
            Window::Narrow => self.narrow.get_or_insert_with(|| {
                Box::new(CompressorOxide::with_params(
                    DataFormat::Raw,
                    1,
                    CompressionStrategy::RLE,
                    MIN_WINDOW_BITS,
                ))
            }),
        };
        inner.reset();
        self.scratch.clear();
        // Room for incompressible input (stored blocks: 5 bytes per 64 KiB) and the flush.
        self.scratch
            .resize(payload.len() + payload.len() / 1024 + 64, 0);
        let (mut input, mut written) = (payload, 0);
        loop {
            let out = self.scratch.get_mut(written..).unwrap_or_default();
            let (status, used, wrote) = compress(inner, input, out, TDEFLFlush::Sync);
            input = input.get(used..).unwrap_or_default();
            written += wrote;
            match status {
                TDEFLStatus::Okay if input.is_empty() && written < self.scratch.len() => break,
                TDEFLStatus::Okay => {
                    let grown = self.scratch.len() * 2;
                    self.scratch.resize(grown, 0);
                }
                _ => return None,
            }
        }
        let data = self.scratch.get(..written)?;
        data.strip_suffix(&SYNC_TAIL)
    }
}

/// Inflates one client's compressed messages. Holds no memory unless the client
/// keeps its compression context between messages and has sent one: then only
/// the last 2^client_max_window_bits bytes of history.
#[derive(Debug, Default)]
pub struct Inflater {
    window: Vec<u8>,
    /// 0 = no context takeover: every message stands alone.
    window_bits: u8,
}

impl Inflater {
    pub fn new(params: &DeflateParams) -> Self {
        Inflater {
            window: Vec::new(),
            window_bits: if params.client_no_context_takeover {
                0
            } else {
                params.client_max_window_bits
            },
        }
    }

    /// Heap bytes kept between messages.
    pub fn held_bytes(&self) -> usize {
        self.window.capacity()
    }

    /// The payload of one compressed message (the RSV1 frames' payloads joined).
    ///
    /// Never produces or allocates more than `max` bytes of message (plus the
    /// history window): a message that would inflate past `max` fails with
    /// `MessageTooBig` (close 1009) as soon as it does; undecodable data fails
    /// with `BadCompressedData` (close 1007).
    pub fn inflate(&mut self, compressed: &[u8], max: usize) -> Result<Vec<u8>, ProtocolError> {
        let history = self.window.len();
        // One byte over the bound: miniz reports a full buffer as "more output"
        // even when nothing more would come, so only the byte past `max` proves it.
        let limit = history.saturating_add(max).saturating_add(1);
        let mut out = std::mem::take(&mut self.window);
        let start = compressed.len().saturating_mul(4).max(INFLATE_START);
        out.resize(history.saturating_add(start).min(limit), 0);
        let mut state = Box::<DecompressorOxide>::default();
        let mut pos = history;
        let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF
            | inflate_flags::TINFL_FLAG_HAS_MORE_INPUT;
        let result = (|| {
            for mut input in [compressed, &SYNC_TAIL[..]] {
                loop {
                    let (status, used, wrote) = decompress(&mut state, input, &mut out, pos, flags);
                    input = input.get(used..).unwrap_or_default();
                    pos += wrote;
                    if pos - history > max {
                        return Err(ProtocolError::MessageTooBig);
                    }
                    match status {
                        TINFLStatus::NeedsMoreInput if input.is_empty() => break,
                        // A final block ends the message; anything after it is ignored.
                        TINFLStatus::Done => return Ok(()),
                        TINFLStatus::HasMoreOutput if out.len() >= limit => {
                            return Err(ProtocolError::MessageTooBig);
                        }
                        TINFLStatus::HasMoreOutput => {
                            let grown = out.len().saturating_mul(2).min(limit);
                            out.resize(grown, 0);
                        }
                        _ => return Err(ProtocolError::BadCompressedData),
                    }
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            // A failed connection is closed: its history goes with it.
            self.window = Vec::new();
            return Err(e);
        }
        out.truncate(pos);
        if self.window_bits != 0 {
            let keep = pos.min(1 << self.window_bits);
            self.window = out[pos - keep..].to_vec();
        }
        out.drain(..history);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::frame::{decode, test_util::raw_client_frame};

    fn offer(value: &str) -> Option<DeflateParams> {
        negotiate([value.as_bytes()])
    }

    /// RFC 7692 §7.2.3.1: "Hello" compressed without context takeover.
    const HELLO: [u8; 7] = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];

    #[test]
    fn rfc_hello_inflates() {
        let params = offer("permessage-deflate").unwrap();
        let mut inf = Inflater::new(&params);
        assert_eq!(inf.inflate(&HELLO, 1024).unwrap(), b"Hello");
        // RFC 7692 §7.2.3.2: the second "Hello" with context takeover is a back-reference.
        assert_eq!(
            inf.inflate(&[0xf2, 0x00, 0x11, 0x00, 0x00], 1024).unwrap(),
            b"Hello"
        );
        // §7.2.3.3: a stored (uncompressed) block.
        let stored = [
            0x00, 0x05, 0x00, 0xfa, 0xff, b'H', b'e', b'l', b'l', b'o', 0x00,
        ];
        assert_eq!(inf.inflate(&stored, 1024).unwrap(), b"Hello");
        // §7.2.3.4: BFINAL set.
        assert_eq!(
            inf.inflate(&[0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00], 1024)
                .unwrap(),
            b"Hello"
        );
        // §7.2.3.5: two blocks in one message.
        let two = [
            0xf2, 0x48, 0x05, 0x00, 0x00, 0x00, 0xff, 0xff, 0xca, 0xc9, 0xc9, 0x07, 0x00,
        ];
        assert_eq!(inf.inflate(&two, 1024).unwrap(), b"Hello");
    }

    #[test]
    fn rfc_hello_compresses_to_the_rfc_bytes_in_an_rsv1_frame() {
        let mut c = Compressor::new(0);
        let frame = c.frame(OpCode::Text, b"Hello");
        // Five bytes do not shrink, so they go uncompressed...
        assert_eq!(frame, None);
        assert_eq!(c.deflate(b"Hello").unwrap(), HELLO);
        // ...and the frame layout is the RFC's: 0xc1 = FIN | RSV1 | text.
        assert_eq!(
            frame::encode_compressed(OpCode::Text, &HELLO),
            [&[0xc1, 0x07][..], &HELLO].concat()
        );
    }

    fn json_push(n: usize) -> Vec<u8> {
        let item = r#"{"types":"news","msg":{"title":"Price update","body":"AAPL 189.20 +0.4%"},"time":"2024-05-01 12:00:00"}"#;
        item.repeat(n.div_ceil(item.len())).as_bytes()[..n].to_vec()
    }

    #[test]
    fn one_compressed_frame_serves_every_receiver() {
        let mut c = Compressor::new(256);
        let payload = json_push(300);
        let frame = c
            .frame(OpCode::Text, &payload)
            .expect("300 bytes of JSON shrink");
        assert!(frame.len() < payload.len(), "{} bytes", frame.len());
        assert_eq!(frame[0], 0xc1);
        // Compressing again gives the same bytes: nothing carried over.
        assert_eq!(c.frame(OpCode::Text, &payload).as_ref(), Some(&frame));
        let deflated = &frame[2..];
        // Receivers with and without context takeover, whatever came before.
        for value in [
            "permessage-deflate",
            "permessage-deflate; client_no_context_takeover",
            "permessage-deflate; client_max_window_bits",
        ] {
            let params = offer(value).unwrap();
            let mut inf = Inflater::new(&params);
            inf.inflate(&HELLO, 1024).unwrap();
            assert_eq!(inf.inflate(deflated, 1 << 16).unwrap(), payload);
        }
    }

    #[test]
    fn below_the_threshold_stays_uncompressed() {
        let mut c = Compressor::new(256);
        assert_eq!(c.frame(OpCode::Text, &json_push(255)), None);
        assert!(c.frame(OpCode::Text, &json_push(256)).is_some());
    }

    #[test]
    fn round_trips_of_many_shapes() {
        let mut state: u32 = 0x1234_5678;
        let mut random = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    state as u8
                })
                .collect()
        };
        let mut c = Compressor::new(0);
        let inputs = [
            vec![],
            b"a".to_vec(),
            json_push(5000),
            vec![0; 200_000],
            random(70_000),
            [json_push(40_000), random(1000), json_push(40_000)].concat(),
        ];
        for input in &inputs {
            let deflated = c.deflate(input).unwrap().to_vec();
            for params in [
                offer("permessage-deflate").unwrap(),
                offer("permessage-deflate; client_no_context_takeover").unwrap(),
            ] {
                let mut inf = Inflater::new(&params);
                assert_eq!(&inf.inflate(&deflated, input.len()).unwrap(), input);
                assert_eq!(&inf.inflate(&deflated, input.len()).unwrap(), input);
            }
        }
    }

    #[test]
    fn a_deflate_bomb_stops_at_the_bound() {
        let mut c = Compressor::new(0);
        let bomb = c.deflate(&vec![0; 16 << 20]).unwrap().to_vec();
        assert!(bomb.len() < 20_000, "{} bytes", bomb.len());
        let params = offer("permessage-deflate; client_no_context_takeover").unwrap();
        let mut inf = Inflater::new(&params);
        let err = inf.inflate(&bomb, 65_536).unwrap_err();
        assert_eq!(err, ProtocolError::MessageTooBig);
        assert_eq!(err.close_code(), 1009);
        assert_eq!(inf.held_bytes(), 0);
        // The bound is inclusive.
        let exact = c.deflate(&[7; 65_536]).unwrap().to_vec();
        assert_eq!(inf.inflate(&exact, 65_536).unwrap(), vec![7; 65_536]);
        let over = c.deflate(&[7; 65_537]).unwrap().to_vec();
        assert_eq!(
            inf.inflate(&over, 65_536),
            Err(ProtocolError::MessageTooBig)
        );
    }

    #[test]
    fn garbage_is_bad_data() {
        let params = offer("permessage-deflate").unwrap();
        let mut inf = Inflater::new(&params);
        // BTYPE 11 is reserved.
        let err = inf.inflate(&[0xff, 0xff, 0xff], 1024).unwrap_err();
        assert_eq!(err, ProtocolError::BadCompressedData);
        assert_eq!(err.close_code(), 1007);
        assert_eq!(inf.held_bytes(), 0);
    }

    /// Memory kept per connection between messages.
    #[test]
    fn idle_connections_hold_little_or_nothing() {
        assert!(std::mem::size_of::<Inflater>() <= 32);
        let payload = json_push(40_000);
        let deflated = Compressor::new(0).deflate(&payload).unwrap().to_vec();
        assert!(payload.len() > 32_768);
        let held = |value: &str| {
            let mut inf = Inflater::new(&offer(value).unwrap());
            assert_eq!(
                inf.held_bytes(),
                0,
                "{value}: nothing before the first message"
            );
            inf.inflate(&deflated, 1 << 20).unwrap();
            inf.held_bytes()
        };
        assert_eq!(held("permessage-deflate; client_no_context_takeover"), 0);
        // A client that lets the server pick its window gets 2^9 bytes.
        assert_eq!(held("permessage-deflate; client_max_window_bits"), 512);
        assert_eq!(held("permessage-deflate; client_max_window_bits=12"), 512);
        // One that does not say keeps the full 32 KiB window.
        assert_eq!(held("permessage-deflate"), 32_768);
    }

    #[test]
    fn negotiation_table() {
        let p = |snct: u8, cnct: bool, cbits: u8, ac: bool, as_: bool| DeflateParams {
            server_max_window_bits: snct,
            client_no_context_takeover: cnct,
            client_max_window_bits: cbits,
            answer_client_bits: ac,
            answer_server_bits: as_,
        };
        let cases: &[(&str, Option<DeflateParams>, &str)] = &[
            ("", None, ""),
            ("x-webkit-deflate-frame", None, ""),
            (
                "permessage-deflate",
                Some(p(15, false, 15, false, false)),
                "permessage-deflate; server_no_context_takeover",
            ),
            (
                // What Chrome and Firefox send.
                "permessage-deflate; client_max_window_bits",
                Some(p(15, false, 9, true, false)),
                "permessage-deflate; server_no_context_takeover; client_max_window_bits=9",
            ),
            (
                "Permessage-Deflate ; Client_No_Context_Takeover ; server_no_context_takeover",
                Some(p(15, true, 15, false, false)),
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
            ),
            (
                "permessage-deflate; server_max_window_bits=10; client_max_window_bits=\"8\"",
                Some(p(10, false, 8, true, true)),
                "permessage-deflate; server_no_context_takeover; server_max_window_bits=10; client_max_window_bits=8",
            ),
            // Bad parameters decline the offer; the next acceptable one wins.
            ("permessage-deflate; foo", None, ""),
            ("permessage-deflate; server_max_window_bits", None, ""),
            ("permessage-deflate; server_max_window_bits=16", None, ""),
            ("permessage-deflate; server_max_window_bits=7", None, ""),
            ("permessage-deflate; server_max_window_bits=010", None, ""),
            ("permessage-deflate; client_max_window_bits=\"10", None, ""),
            ("permessage-deflate; client_no_context_takeover=1", None, ""),
            (
                "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
                None,
                "",
            ),
            (
                "permessage-deflate; server_max_window_bits=99, permessage-deflate; client_no_context_takeover",
                Some(p(15, true, 15, false, false)),
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
            ),
            (
                "foo, permessage-deflate",
                Some(p(15, false, 15, false, false)),
                "permessage-deflate; server_no_context_takeover",
            ),
        ];
        for (value, want, header) in cases {
            let got = offer(value);
            assert_eq!(&got, want, "{value}");
            if let Some(params) = got {
                assert_eq!(&params.response_header(), header, "{value}");
            }
        }
        // Offers spread over several header lines.
        let got = negotiate([
            &b"foo"[..],
            b"permessage-deflate; client_no_context_takeover",
        ]);
        assert_eq!(got, Some(p(15, true, 15, false, false)));
        assert_eq!(negotiate(std::iter::empty()), None);
    }

    #[test]
    fn a_narrow_window_gets_run_length_frames() {
        let params = offer("permessage-deflate; server_max_window_bits=8").unwrap();
        assert_eq!(params.window(), Window::Narrow);
        assert_eq!(offer("permessage-deflate").unwrap().window(), Window::Full);
        let payload = json_push(4000);
        let mut c = Compressor::new(0);
        let narrow = c.frame_for(Window::Narrow, OpCode::Text, &payload).unwrap();
        let full = c.frame(OpCode::Text, &payload).unwrap();
        assert!(narrow.len() < payload.len() && full.len() < narrow.len());
        let mut inf = Inflater::new(&params);
        let header = if narrow[1] == 126 { 4 } else { 2 };
        assert_eq!(inf.inflate(&narrow[header..], 1 << 20).unwrap(), payload);
        let always = c.frame_always(Window::Narrow, OpCode::Text, b"hi").unwrap();
        assert_eq!(always[0], 0xc1, "even what does not shrink is compressed");
    }

    #[test]
    fn compressed_frame_decodes_as_a_client_would_send_it() {
        // A client's compressed frame: RSV1 on the first frame only.
        let mut wire = raw_client_frame(0xc1, &HELLO, [1, 2, 3, 4]);
        let (frame, _) = frame::decode_with(&mut wire, 1024, true).unwrap().unwrap();
        assert!(frame.compressed);
        assert_eq!(frame.payload, HELLO);
        let mut wire = raw_client_frame(0xc1, &HELLO, [1, 2, 3, 4]);
        assert_eq!(decode(&mut wire, 1024), Err(ProtocolError::ReservedBits));
    }
}
