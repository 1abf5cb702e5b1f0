//! Message assembly: turns decoded frames into whole messages, enforcing
//! fragmentation order, the message size limit, fail-fast UTF-8 validation
//! of text (down to the byte of a frame still arriving) and the close-payload rules.

use super::deflate::Inflater;
use super::frame::{self, Frame, MAX_CONTROL_PAYLOAD, OpCode, ProtocolError};
use super::utf8::Utf8State;

/// Bytes of an incomplete frame unmasked at a time for validation, on the stack.
const PEEK_CHUNK: usize = 256;

#[derive(Debug, PartialEq, Eq)]
pub enum Message {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    /// `None` when the peer sent an empty close payload (no status code).
    Close(Option<CloseFrame>),
}

#[derive(Debug, PartialEq, Eq)]
pub struct CloseFrame {
    pub code: u16,
    pub reason: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DataKind {
    Text,
    Binary,
    /// permessage-deflate: validated (text) once inflated, when the message is whole.
    DeflatedText,
    DeflatedBinary,
}

/// One per connection, so it is kept small (40 bytes on 64-bit targets) and
/// holds no heap memory between messages.
#[derive(Debug)]
pub struct Assembler {
    /// Fragments received so far; empty and unallocated while idle.
    buf: Vec<u8>,
    max_message: usize,
    /// Payload bytes of the frame still arriving that `check_incomplete` has
    /// validated, so `push` and later checks go on from there. 32 bits keep the
    /// struct small; past 4 GiB the rest of the frame is checked when it is whole.
    frame_checked: u32,
    /// Kind of the fragmented message in progress, if any.
    partial: Option<DataKind>,
    /// Where the text validated so far ends: on a character boundary or inside
    /// a code point that the next bytes must complete.
    utf8: Utf8State,
}

impl Assembler {
    pub fn new(max_message: usize) -> Self {
        Assembler {
            buf: Vec::new(),
            max_message,
            frame_checked: 0,
            partial: None,
            utf8: Utf8State::Boundary,
        }
    }

    /// Checks the part of the next frame that has arrived, so a text message fails
    /// at its first invalid byte, and a message that will be too big fails on its
    /// header, without waiting for the rest of the frame.
    ///
    /// `wire` is the input from the start of the frame that the next `push` will
    /// get, still masked; it is not modified, so `frame::decode` can be retried on
    /// it. Call this whenever `decode` needs more bytes. Header errors are left to
    /// `decode`, and fragmentation-order errors to `push`.
    pub fn check_incomplete(&mut self, wire: &[u8]) -> Result<(), ProtocolError> {
        let Ok(Some(header)) = frame::parse_header_with(wire, usize::MAX, true) else {
            return Ok(());
        };
        let (text, total) = match (header.opcode, self.partial) {
            (OpCode::Text, None) => (!header.compressed, header.len),
            (OpCode::Binary, None) => (false, header.len),
            (OpCode::Continuation, Some(kind)) => (
                kind == DataKind::Text,
                self.buf.len().saturating_add(header.len),
            ),
            _ => return Ok(()),
        };
        let result = if total > self.max_message {
            Err(ProtocolError::MessageTooBig)
        } else if text {
            self.check_arrived_text(wire, &header)
        } else {
            Ok(())
        };
        if result.is_err() {
            self.reset();
        }
        result
    }

    fn check_arrived_text(
        &mut self,
        wire: &[u8],
        header: &frame::Header,
    ) -> Result<(), ProtocolError> {
        let mut chunk = [0u8; PEEK_CHUNK];
        loop {
            let from = self.frame_checked as usize;
            let room = (u32::MAX - self.frame_checked) as usize;
            let out = chunk.get_mut(..room.min(PEEK_CHUNK)).unwrap_or_default();
            let n = frame::unmask_arrived(wire, header, from, out);
            if n == 0 {
                return Ok(());
            }
            self.utf8
                .feed(&chunk[..n])
                .map_err(|_| ProtocolError::InvalidUtf8)?;
            // n <= room, so this stays within u32.
            self.frame_checked += n as u32;
        }
    }

    /// Feed one decoded frame; returns a whole message when one completes.
    ///
    /// After an error the connection must be closed; the assembler drops any
    /// partial message so it no longer holds memory.
    pub fn push(&mut self, frame: Frame<'_>) -> Result<Option<Message>, ProtocolError> {
        self.push_with(frame, None)
    }

    /// `push` for a connection that negotiated permessage-deflate: a message whose
    /// first frame has RSV1 set is inflated with `inflater` (within the message size
    /// limit) when it is whole. Without an inflater such a frame is a protocol error.
    pub fn push_with(
        &mut self,
        frame: Frame<'_>,
        inflater: Option<&mut Inflater>,
    ) -> Result<Option<Message>, ProtocolError> {
        let result = self.dispatch(frame, inflater);
        if result.is_err() {
            self.reset();
        }
        result
    }

    /// True when no fragmented message is in progress.
    pub fn is_idle(&self) -> bool {
        self.partial.is_none()
    }

    fn dispatch(
        &mut self,
        frame: Frame<'_>,
        inflater: Option<&mut Inflater>,
    ) -> Result<Option<Message>, ProtocolError> {
        // Only data frames are ever checked while incomplete.
        let checked = std::mem::take(&mut self.frame_checked) as usize;
        if frame.opcode.is_control() {
            // `Frame` can be built by hand, so do not rely on `decode` having checked these.
            if !frame.fin {
                return Err(ProtocolError::FragmentedControl);
            }
            if frame.payload.len() > MAX_CONTROL_PAYLOAD {
                return Err(ProtocolError::ControlTooLong);
            }
        }
        match frame.opcode {
            OpCode::Ping => Ok(Some(Message::Ping(frame.payload.to_vec()))),
            OpCode::Pong => Ok(Some(Message::Pong(frame.payload.to_vec()))),
            OpCode::Close => parse_close(frame.payload).map(|close| Some(Message::Close(close))),
            OpCode::Text | OpCode::Binary => {
                let text = frame.opcode == OpCode::Text;
                let kind = match (frame.compressed, inflater.is_some(), text) {
                    (false, _, true) => DataKind::Text,
                    (false, _, false) => DataKind::Binary,
                    (true, false, _) => return Err(ProtocolError::ReservedBits),
                    (true, true, true) => DataKind::DeflatedText,
                    (true, true, false) => DataKind::DeflatedBinary,
                };
                self.start(kind, frame, checked, inflater)
            }
            OpCode::Continuation if frame.compressed => Err(ProtocolError::ReservedBits),
            OpCode::Continuation => self.continue_message(frame, checked, inflater),
        }
    }

    fn start(
        &mut self,
        kind: DataKind,
        frame: Frame<'_>,
        checked: usize,
        inflater: Option<&mut Inflater>,
    ) -> Result<Option<Message>, ProtocolError> {
        if self.partial.is_some() {
            return Err(ProtocolError::ExpectedContinuation);
        }
        if frame.payload.len() > self.max_message {
            return Err(ProtocolError::MessageTooBig);
        }
        if frame.fin {
            // The common unfragmented case skips the reassembly buffer entirely,
            // and one pass of std's validator over the whole payload is the fastest.
            self.utf8 = Utf8State::Boundary;
            return match kind {
                DataKind::Text => std::str::from_utf8(frame.payload)
                    .map(|text| Some(Message::Text(text.to_owned())))
                    .map_err(|_| ProtocolError::InvalidUtf8),
                DataKind::Binary => Ok(Some(Message::Binary(frame.payload.to_vec()))),
                DataKind::DeflatedText | DataKind::DeflatedBinary => {
                    self.inflate(kind, frame.payload, inflater).map(Some)
                }
            };
        }
        self.partial = Some(kind);
        self.append(kind, frame.payload, checked)?;
        Ok(None)
    }

    fn continue_message(
        &mut self,
        frame: Frame<'_>,
        checked: usize,
        inflater: Option<&mut Inflater>,
    ) -> Result<Option<Message>, ProtocolError> {
        let Some(kind) = self.partial else {
            return Err(ProtocolError::UnexpectedContinuation);
        };
        if self.buf.len().saturating_add(frame.payload.len()) > self.max_message {
            return Err(ProtocolError::MessageTooBig);
        }
        self.append(kind, frame.payload, checked)?;
        if !frame.fin {
            return Ok(None);
        }
        if !self.utf8.is_boundary() {
            return Err(ProtocolError::InvalidUtf8);
        }
        // `take` hands the allocation to the message, leaving the idle assembler with none.
        let bytes = std::mem::take(&mut self.buf);
        self.reset();
        match kind {
            // Already validated fragment by fragment; this last pass is the
            // price of staying free of `unsafe` (`from_utf8_unchecked`).
            DataKind::Text => String::from_utf8(bytes)
                .map(|text| Some(Message::Text(text)))
                .map_err(|_| ProtocolError::InvalidUtf8),
            DataKind::Binary => Ok(Some(Message::Binary(bytes))),
            DataKind::DeflatedText | DataKind::DeflatedBinary => {
                self.inflate(kind, &bytes, inflater).map(Some)
            }
        }
    }

    /// A whole compressed message, inflated within the size limit.
    fn inflate(
        &self,
        kind: DataKind,
        deflated: &[u8],
        inflater: Option<&mut Inflater>,
    ) -> Result<Message, ProtocolError> {
        let inflater = inflater.ok_or(ProtocolError::ReservedBits)?;
        let bytes = inflater.inflate(deflated, self.max_message)?;
        if kind == DataKind::DeflatedText {
            String::from_utf8(bytes)
                .map(Message::Text)
                .map_err(|_| ProtocolError::InvalidUtf8)
        } else {
            Ok(Message::Binary(bytes))
        }
    }

    /// Appends a fragment and, for text, validates the bytes that
    /// `check_incomplete` has not, so an invalid sequence fails on the fragment
    /// that carries it rather than at the end of the message.
    fn append(
        &mut self,
        kind: DataKind,
        payload: &[u8],
        checked: usize,
    ) -> Result<(), ProtocolError> {
        if kind == DataKind::Text {
            let unchecked = payload.get(checked..).unwrap_or_default();
            self.utf8
                .feed(unchecked)
                .map_err(|_| ProtocolError::InvalidUtf8)?;
        }
        self.buf.extend_from_slice(payload);
        Ok(())
    }

    fn reset(&mut self) {
        self.buf = Vec::new();
        self.frame_checked = 0;
        self.partial = None;
        self.utf8 = Utf8State::Boundary;
    }
}

fn parse_close(payload: &[u8]) -> Result<Option<CloseFrame>, ProtocolError> {
    match payload {
        [] => Ok(None),
        [_] => Err(ProtocolError::BadClosePayload),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !is_valid_close_code(code) {
                return Err(ProtocolError::InvalidCloseCode(code));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| ProtocolError::InvalidUtf8)?;
            Ok(Some(CloseFrame {
                code,
                reason: reason.to_owned(),
            }))
        }
    }
}

/// Codes a peer may put on the wire (RFC 6455 §7.4): 1004-1006 and 1015 are
/// reserved or local-only, and everything else below 3000 is unassigned.
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

#[cfg(test)]
mod tests {
    use super::super::frame::{decode, test_util::client_frame};
    use super::*;

    fn frame(fin: bool, opcode: OpCode, payload: &[u8]) -> Frame<'_> {
        Frame {
            fin,
            opcode,
            compressed: false,
            payload,
        }
    }

    fn push(
        asm: &mut Assembler,
        fin: bool,
        opcode: OpCode,
        payload: &[u8],
    ) -> Result<Option<Message>, ProtocolError> {
        asm.push(frame(fin, opcode, payload))
    }

    fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
        [&code.to_be_bytes()[..], reason].concat()
    }

    fn assert_no_heap(asm: &Assembler) {
        assert!(asm.is_idle());
        assert_eq!(asm.buf.capacity(), 0);
    }

    #[test]
    fn struct_is_small_and_idle_holds_no_heap() {
        assert!(std::mem::size_of::<Assembler>() <= 5 * std::mem::size_of::<usize>());
        let asm = Assembler::new(1 << 16);
        assert_no_heap(&asm);
    }

    #[test]
    fn unfragmented_messages() {
        let mut asm = Assembler::new(1024);
        assert_eq!(
            push(&mut asm, true, OpCode::Text, "héllo".as_bytes()),
            Ok(Some(Message::Text("héllo".into())))
        );
        assert_eq!(
            push(&mut asm, true, OpCode::Binary, &[0, 255]),
            Ok(Some(Message::Binary(vec![0, 255])))
        );
        assert_eq!(
            push(&mut asm, true, OpCode::Text, b""),
            Ok(Some(Message::Text(String::new())))
        );
        assert_eq!(
            push(&mut asm, true, OpCode::Ping, b"p"),
            Ok(Some(Message::Ping(b"p".to_vec())))
        );
        assert_eq!(
            push(&mut asm, true, OpCode::Pong, b""),
            Ok(Some(Message::Pong(vec![])))
        );
        assert_eq!(
            push(&mut asm, true, OpCode::Close, b""),
            Ok(Some(Message::Close(None)))
        );
        assert_no_heap(&asm);
    }

    #[test]
    fn fragments_with_interleaved_control_frames() {
        let mut asm = Assembler::new(1024);
        assert_eq!(push(&mut asm, false, OpCode::Text, b"Hel"), Ok(None));
        assert!(!asm.is_idle());
        assert_eq!(
            push(&mut asm, true, OpCode::Ping, b"1"),
            Ok(Some(Message::Ping(b"1".to_vec())))
        );
        assert_eq!(
            push(&mut asm, false, OpCode::Continuation, b"lo "),
            Ok(None)
        );
        assert_eq!(
            push(&mut asm, true, OpCode::Pong, b"2"),
            Ok(Some(Message::Pong(b"2".to_vec())))
        );
        assert_eq!(push(&mut asm, false, OpCode::Continuation, b""), Ok(None));
        let close = close_payload(1000, b"");
        assert_eq!(
            push(&mut asm, true, OpCode::Close, &close),
            Ok(Some(Message::Close(Some(CloseFrame {
                code: 1000,
                reason: String::new()
            }))))
        );
        assert!(!asm.is_idle());
        assert_eq!(
            push(&mut asm, true, OpCode::Continuation, b"world"),
            Ok(Some(Message::Text("Hello world".into())))
        );
        assert_no_heap(&asm);

        assert_eq!(push(&mut asm, false, OpCode::Binary, &[1, 2]), Ok(None));
        assert_eq!(
            push(&mut asm, true, OpCode::Continuation, &[3]),
            Ok(Some(Message::Binary(vec![1, 2, 3])))
        );
        assert_no_heap(&asm);
    }

    #[test]
    fn continuation_with_nothing_to_continue() {
        for fin in [true, false] {
            let mut asm = Assembler::new(1024);
            assert_eq!(
                push(&mut asm, fin, OpCode::Continuation, b"x"),
                Err(ProtocolError::UnexpectedContinuation)
            );
        }
        // Also after a message has just completed.
        let mut asm = Assembler::new(1024);
        push(&mut asm, false, OpCode::Binary, b"a").unwrap();
        push(&mut asm, true, OpCode::Continuation, b"b").unwrap();
        assert_eq!(
            push(&mut asm, true, OpCode::Continuation, b"c"),
            Err(ProtocolError::UnexpectedContinuation)
        );
    }

    #[test]
    fn new_data_frame_inside_fragmented_message() {
        for (first, second) in [
            (OpCode::Text, OpCode::Text),
            (OpCode::Text, OpCode::Binary),
            (OpCode::Binary, OpCode::Text),
        ] {
            for fin in [true, false] {
                let mut asm = Assembler::new(1024);
                push(&mut asm, false, first, b"a").unwrap();
                assert_eq!(
                    push(&mut asm, fin, second, b"b"),
                    Err(ProtocolError::ExpectedContinuation)
                );
                // The failed message is dropped along with its memory.
                assert_no_heap(&asm);
            }
        }
    }

    #[test]
    fn control_frames_checked_even_when_built_by_hand() {
        let mut asm = Assembler::new(1024);
        assert_eq!(
            push(&mut asm, false, OpCode::Ping, b""),
            Err(ProtocolError::FragmentedControl)
        );
        assert_eq!(
            push(&mut asm, true, OpCode::Pong, &[0; 126]),
            Err(ProtocolError::ControlTooLong)
        );
        assert_eq!(
            push(&mut asm, true, OpCode::Ping, &[0; 125]),
            Ok(Some(Message::Ping(vec![0; 125])))
        );
    }

    #[test]
    fn utf8_invalid_in_unfragmented_text() {
        let mut asm = Assembler::new(1024);
        assert_eq!(
            push(&mut asm, true, OpCode::Text, b"ab\xff"),
            Err(ProtocolError::InvalidUtf8)
        );
        assert_eq!(
            push(&mut asm, true, OpCode::Text, b"\xe2\x82"),
            Err(ProtocolError::InvalidUtf8)
        );
    }

    #[test]
    fn utf8_fails_fast_on_non_final_fragment() {
        // Plainly invalid byte in the first fragment.
        let mut asm = Assembler::new(1024);
        assert_eq!(
            push(&mut asm, false, OpCode::Text, b"ok\xffmore"),
            Err(ProtocolError::InvalidUtf8)
        );
        assert_no_heap(&asm);

        // Invalid byte in a middle fragment.
        let mut asm = Assembler::new(1024);
        push(&mut asm, false, OpCode::Text, b"fine").unwrap();
        assert_eq!(
            push(&mut asm, false, OpCode::Continuation, b"\xc0\xaf"),
            Err(ProtocolError::InvalidUtf8)
        );

        // A sequence started in one fragment and broken by the next.
        let mut asm = Assembler::new(1024);
        push(&mut asm, false, OpCode::Text, b"x\xe2\x82").unwrap();
        assert_eq!(
            push(&mut asm, false, OpCode::Continuation, b"A"),
            Err(ProtocolError::InvalidUtf8)
        );

        // A truncated prefix that can never become valid (UTF-16 surrogate) fails at once.
        let mut asm = Assembler::new(1024);
        assert_eq!(
            push(&mut asm, false, OpCode::Text, b"\xed\xa0"),
            Err(ProtocolError::InvalidUtf8)
        );

        // Binary is never validated.
        let mut asm = Assembler::new(1024);
        assert_eq!(push(&mut asm, false, OpCode::Binary, b"\xff"), Ok(None));
    }

    #[test]
    fn code_point_split_across_fragments() {
        let mut asm = Assembler::new(1024);
        // "€" = E2 82 AC, one byte per fragment.
        assert_eq!(push(&mut asm, false, OpCode::Text, b"a\xe2"), Ok(None));
        assert_eq!(asm.utf8, Utf8State::Tail(2));
        assert_eq!(
            push(&mut asm, false, OpCode::Continuation, b"\x82"),
            Ok(None)
        );
        assert_eq!(asm.utf8, Utf8State::Tail(1));
        assert_eq!(
            push(&mut asm, true, OpCode::Continuation, b"\xac!"),
            Ok(Some(Message::Text("a€!".into())))
        );

        // A 4-byte code point split 1 + 3 across the final fragment.
        let emoji = "😀".as_bytes();
        push(&mut asm, false, OpCode::Text, &emoji[..1]).unwrap();
        assert_eq!(
            push(&mut asm, true, OpCode::Continuation, &emoji[1..]),
            Ok(Some(Message::Text("😀".into())))
        );
        assert_no_heap(&asm);
    }

    /// Feeds `wire` (masked frames) to decode + assembler the way the reactor does,
    /// `arrived` bytes at a time, checking incomplete frames after each arrival.
    /// Returns the messages and the number of bytes that had arrived at the error.
    fn feed_wire(
        asm: &mut Assembler,
        wire: &[u8],
        arrived: usize,
    ) -> (Vec<Message>, Option<(usize, ProtocolError)>) {
        let mut pending = Vec::new();
        let mut messages = Vec::new();
        for (i, chunk) in wire.chunks(arrived).enumerate() {
            pending.extend_from_slice(chunk);
            let so_far = (i * arrived + chunk.len()).min(wire.len());
            loop {
                match decode(&mut pending, 1 << 20) {
                    Err(e) => return (messages, Some((so_far, e))),
                    Ok(None) => {
                        let before = pending.clone();
                        if let Err(e) = asm.check_incomplete(&pending) {
                            return (messages, Some((so_far, e)));
                        }
                        assert_eq!(pending, before, "the wire bytes were modified");
                        break;
                    }
                    Ok(Some((frame, used))) => {
                        match asm.push(frame) {
                            Err(e) => return (messages, Some((so_far, e))),
                            Ok(Some(m)) => messages.push(m),
                            Ok(None) => {}
                        }
                        pending.drain(..used);
                    }
                }
            }
        }
        (messages, None)
    }

    /// Autobahn 6.4.3 / 6.4.4: one text frame whose payload turns invalid in its
    /// middle fails at the byte that makes it invalid, before the frame is whole.
    #[test]
    fn utf8_fails_at_first_bad_byte_of_a_frame_still_arriving() {
        let payload = b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xf4\x90\x80\x80edited";
        let wire = client_frame(true, OpCode::Text, payload);
        let header_len = wire.len() - payload.len();
        let first_bad = header_len + 12;
        for arrived in 1..=wire.len() {
            let mut asm = Assembler::new(1024);
            let (messages, err) = feed_wire(&mut asm, &wire, arrived);
            assert!(messages.is_empty());
            let (at, e) = err.expect("invalid text accepted");
            assert_eq!(e, ProtocolError::InvalidUtf8);
            // The error comes with the read that carried the bad byte.
            let read_with_bad = (first_bad / arrived + 1) * arrived;
            assert_eq!(at, read_with_bad.min(wire.len()), "reads of {arrived}");
            assert_no_heap(&asm);
        }
    }

    #[test]
    fn utf8_fails_at_first_bad_byte_across_fragments_still_arriving() {
        // "€" split 1 + 2: the continuation's first byte is fine, its second is not.
        let wire = [
            client_frame(false, OpCode::Text, b"ok\xe2"),
            client_frame(true, OpCode::Ping, b"p"),
            client_frame(true, OpCode::Continuation, b"\x82\x41 and more text"),
        ]
        .concat();
        let bad = wire.len() - b" and more text".len() - 1;
        let mut asm = Assembler::new(1024);
        let (messages, err) = feed_wire(&mut asm, &wire, 1);
        assert_eq!(messages, [Message::Ping(b"p".to_vec())]);
        assert_eq!(err, Some((bad + 1, ProtocolError::InvalidUtf8)));
        assert_no_heap(&asm);
    }

    #[test]
    fn valid_text_arriving_byte_by_byte_is_unchanged() {
        let text = "gr\u{fc}\u{df}e \u{20ac} \u{1f600}!";
        let bytes = text.as_bytes();
        for cut in 0..=bytes.len() {
            let wire = [
                client_frame(false, OpCode::Text, &bytes[..cut]),
                client_frame(true, OpCode::Continuation, &bytes[cut..]),
                client_frame(true, OpCode::Text, bytes),
                client_frame(true, OpCode::Binary, b"\xff\xfe"),
            ]
            .concat();
            for arrived in [1, 2, 3, 7, wire.len()] {
                let mut asm = Assembler::new(1024);
                let (messages, err) = feed_wire(&mut asm, &wire, arrived);
                assert_eq!(err, None, "cut {cut}, reads of {arrived}");
                assert_eq!(
                    messages,
                    [
                        Message::Text(text.into()),
                        Message::Text(text.into()),
                        Message::Binary(b"\xff\xfe".to_vec()),
                    ]
                );
                assert_no_heap(&asm);
            }
        }
    }

    #[test]
    fn too_big_message_fails_on_the_header() {
        let mut asm = Assembler::new(100);
        let wire = client_frame(true, OpCode::Binary, &[0; 101]);
        assert_eq!(
            asm.check_incomplete(&wire[..8]),
            Err(ProtocolError::MessageTooBig)
        );

        let mut asm = Assembler::new(100);
        push(&mut asm, false, OpCode::Text, &[b'a'; 60]).unwrap();
        let wire = client_frame(true, OpCode::Continuation, &[b'a'; 41]);
        assert_eq!(
            asm.check_incomplete(&wire[..6]),
            Err(ProtocolError::MessageTooBig)
        );
        assert_no_heap(&asm);

        // Exactly at the limit is fine, and control frames are not counted.
        let mut asm = Assembler::new(100);
        push(&mut asm, false, OpCode::Text, &[b'a'; 60]).unwrap();
        let wire = client_frame(true, OpCode::Continuation, &[b'a'; 40]);
        assert_eq!(asm.check_incomplete(&wire[..7]), Ok(()));
        let ping = client_frame(true, OpCode::Ping, &[0xff; 125]);
        assert_eq!(asm.check_incomplete(&ping[..9]), Ok(()));
    }

    #[test]
    fn incomplete_checks_leave_order_and_header_errors_to_push_and_decode() {
        let mut asm = Assembler::new(1024);
        // A continuation with nothing to continue, and a bad header: not its business.
        let cont = client_frame(true, OpCode::Continuation, b"\xff\xff");
        assert_eq!(asm.check_incomplete(&cont[..7]), Ok(()));
        assert_eq!(asm.check_incomplete(&[0xF1, 0x80]), Ok(()));
        assert_eq!(asm.check_incomplete(&[]), Ok(()));
        // Binary payloads are never validated.
        let bin = client_frame(true, OpCode::Binary, b"\xff\xff");
        assert_eq!(asm.check_incomplete(&bin[..7]), Ok(()));
        assert_no_heap(&asm);
    }

    fn deflated(data: &[u8]) -> Vec<u8> {
        let frame = crate::ws::deflate::Compressor::new(0)
            .frame(OpCode::Binary, data)
            .expect("shrinks");
        let at = match frame[1] {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        frame[at..].to_vec()
    }

    fn inflater(offer: &str) -> Inflater {
        Inflater::new(&crate::ws::deflate::negotiate([offer.as_bytes()]).unwrap())
    }

    fn compressed(fin: bool, opcode: OpCode, payload: &[u8]) -> Frame<'_> {
        Frame {
            fin,
            opcode,
            compressed: true,
            payload,
        }
    }

    #[test]
    fn compressed_messages_are_inflated_when_whole() {
        let text = "gr\u{fc}\u{df}e ".repeat(40);
        let data = deflated(text.as_bytes());
        let mut inf = inflater("permessage-deflate; client_no_context_takeover");
        let mut asm = Assembler::new(1024);
        assert_eq!(
            asm.push_with(compressed(true, OpCode::Text, &data), Some(&mut inf)),
            Ok(Some(Message::Text(text.clone())))
        );
        // Fragmented: RSV1 on the first frame only, a ping in between.
        let (a, b) = data.split_at(data.len() / 2);
        assert_eq!(
            asm.push_with(compressed(false, OpCode::Binary, a), Some(&mut inf)),
            Ok(None)
        );
        assert_eq!(
            push(&mut asm, true, OpCode::Ping, b"p"),
            Ok(Some(Message::Ping(b"p".to_vec())))
        );
        assert_eq!(
            asm.push_with(frame(true, OpCode::Continuation, b), Some(&mut inf)),
            Ok(Some(Message::Binary(text.clone().into_bytes())))
        );
        assert_no_heap(&asm);
        // Uncompressed messages still pass on a deflate connection.
        assert_eq!(
            asm.push_with(frame(true, OpCode::Text, b"plain"), Some(&mut inf)),
            Ok(Some(Message::Text("plain".into())))
        );
    }

    #[test]
    fn compressed_message_errors() {
        let mut inf = inflater("permessage-deflate; client_no_context_takeover");
        // Invalid UTF-8 once inflated.
        let bad = deflated(&b"\xff".repeat(300));
        let mut asm = Assembler::new(1024);
        assert_eq!(
            asm.push_with(compressed(true, OpCode::Text, &bad), Some(&mut inf)),
            Err(ProtocolError::InvalidUtf8)
        );
        // A bomb: 1 MiB of zeros in a few hundred bytes, against a 64 KiB limit.
        let bomb = deflated(&vec![0; 1 << 20]);
        let mut asm = Assembler::new(65_536);
        let err = asm
            .push_with(compressed(true, OpCode::Binary, &bomb), Some(&mut inf))
            .unwrap_err();
        assert_eq!(
            (err.clone(), err.close_code()),
            (ProtocolError::MessageTooBig, 1009)
        );
        assert_no_heap(&asm);
        // RSV1 without the extension, or on a continuation frame.
        let mut asm = Assembler::new(1024);
        assert_eq!(
            asm.push(compressed(true, OpCode::Text, &bad)),
            Err(ProtocolError::ReservedBits)
        );
        asm.push_with(compressed(false, OpCode::Text, &bad), Some(&mut inf))
            .unwrap();
        assert_eq!(
            asm.push_with(compressed(true, OpCode::Continuation, b""), Some(&mut inf)),
            Err(ProtocolError::ReservedBits)
        );
        assert_no_heap(&asm);
    }

    #[test]
    fn compressed_text_still_arriving_is_not_validated_as_text() {
        let data = deflated("h\u{e9}llo ".repeat(50).as_bytes());
        let mut wire = frame::test_util::raw_client_frame(0xc1, &data, frame::test_util::KEY);
        let mut asm = Assembler::new(1024);
        for k in 0..wire.len() {
            assert_eq!(asm.check_incomplete(&wire[..k]), Ok(()), "prefix {k}");
        }
        let (f, _) = frame::decode_with(&mut wire, 1024, true).unwrap().unwrap();
        let mut inf = inflater("permessage-deflate");
        assert_eq!(
            asm.push_with(f, Some(&mut inf)),
            Ok(Some(Message::Text("h\u{e9}llo ".repeat(50))))
        );
    }

    #[test]
    fn final_fragment_ending_mid_sequence() {
        let mut asm = Assembler::new(1024);
        push(&mut asm, false, OpCode::Text, b"abc").unwrap();
        assert_eq!(
            push(&mut asm, true, OpCode::Continuation, b"\xe2\x82"),
            Err(ProtocolError::InvalidUtf8)
        );
        assert_no_heap(&asm);

        let mut asm = Assembler::new(1024);
        push(&mut asm, false, OpCode::Text, b"\xf0\x9f").unwrap();
        assert_eq!(
            push(&mut asm, true, OpCode::Continuation, b""),
            Err(ProtocolError::InvalidUtf8)
        );
    }

    #[test]
    fn close_codes() {
        for code in [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999,
        ] {
            let mut asm = Assembler::new(1024);
            let payload = close_payload(code, "ok ✓".as_bytes());
            assert_eq!(
                push(&mut asm, true, OpCode::Close, &payload),
                Ok(Some(Message::Close(Some(CloseFrame {
                    code,
                    reason: "ok ✓".into()
                })))),
                "{code}"
            );
        }
        for code in [
            0, 999, 1004, 1005, 1006, 1012, 1013, 1014, 1015, 1016, 2000, 2999, 5000, 65535,
        ] {
            let mut asm = Assembler::new(1024);
            let result = push(&mut asm, true, OpCode::Close, &close_payload(code, b""));
            assert_eq!(result, Err(ProtocolError::InvalidCloseCode(code)), "{code}");
            assert_eq!(result.unwrap_err().close_code(), 1002);
        }
    }

    #[test]
    fn close_payload_shape() {
        let mut asm = Assembler::new(1024);
        assert_eq!(
            push(&mut asm, true, OpCode::Close, b""),
            Ok(Some(Message::Close(None)))
        );
        assert_eq!(
            push(&mut asm, true, OpCode::Close, &[0x03]),
            Err(ProtocolError::BadClosePayload)
        );
        let bad_reason = close_payload(1000, b"\xff");
        let err = push(&mut asm, true, OpCode::Close, &bad_reason).unwrap_err();
        assert_eq!(err, ProtocolError::InvalidUtf8);
        assert_eq!(err.close_code(), 1007);
    }

    #[test]
    fn message_size_limit_is_inclusive() {
        const MAX: usize = 65536;
        let big = vec![b'a'; MAX + 1];

        let mut asm = Assembler::new(MAX);
        assert_eq!(
            push(&mut asm, true, OpCode::Binary, &big[..MAX]),
            Ok(Some(Message::Binary(big[..MAX].to_vec())))
        );
        assert_eq!(
            push(&mut asm, true, OpCode::Binary, &big),
            Err(ProtocolError::MessageTooBig)
        );
        assert_eq!(
            push(&mut asm, true, OpCode::Text, &big),
            Err(ProtocolError::MessageTooBig)
        );

        // Same limit over fragments: rejected on the fragment that crosses it.
        let mut asm = Assembler::new(MAX);
        push(&mut asm, false, OpCode::Text, &big[..40_000]).unwrap();
        assert_eq!(
            push(&mut asm, true, OpCode::Continuation, &big[40_000..MAX]),
            Ok(Some(Message::Text("a".repeat(MAX))))
        );
        push(&mut asm, false, OpCode::Text, &big[..40_000]).unwrap();
        let err = push(&mut asm, false, OpCode::Continuation, &big[40_000..]).unwrap_err();
        assert_eq!(err, ProtocolError::MessageTooBig);
        assert_eq!(err.close_code(), 1009);
        assert_no_heap(&asm);
    }

    #[test]
    fn decode_and_assemble_end_to_end() {
        let mut wire = [
            client_frame(false, OpCode::Text, "gr\u{fc}".as_bytes()),
            client_frame(true, OpCode::Ping, b"hb"),
            client_frame(true, OpCode::Continuation, "\u{df}e".as_bytes()),
            client_frame(true, OpCode::Close, &close_payload(1001, b"away")),
        ]
        .concat();
        let mut asm = Assembler::new(1024);
        let mut messages = Vec::new();
        let mut at = 0;
        while let Some((frame, used)) = decode(&mut wire[at..], 1024).unwrap() {
            if let Some(msg) = asm.push(frame).unwrap() {
                messages.push(msg);
            }
            at += used;
        }
        assert_eq!(
            messages,
            [
                Message::Ping(b"hb".to_vec()),
                Message::Text("grüße".into()),
                Message::Close(Some(CloseFrame {
                    code: 1001,
                    reason: "away".into()
                })),
            ]
        );
    }

    #[test]
    fn random_frames_never_panic() {
        let mut state: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let opcodes = [
            OpCode::Continuation,
            OpCode::Text,
            OpCode::Binary,
            OpCode::Close,
            OpCode::Ping,
            OpCode::Pong,
        ];
        let mut asm = Assembler::new(64);
        for _ in 0..20_000 {
            let len = (next() % 40) as usize;
            let payload: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let opcode = opcodes[(next() % 6) as usize];
            let _ = asm.push(frame(next() % 2 == 0, opcode, &payload));
            if asm.is_idle() {
                assert_eq!(asm.buf.capacity(), 0);
            }
        }
    }
}
