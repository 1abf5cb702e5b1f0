//! Message assembly: turns decoded frames into whole messages, enforcing
//! fragmentation order, the message size limit, fail-fast UTF-8 validation
//! of text and the close-payload rules.

use super::frame::{Frame, MAX_CONTROL_PAYLOAD, OpCode, ProtocolError};

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
}

/// One per connection, so it is kept small (40 bytes on 64-bit targets) and
/// holds no heap memory between messages.
#[derive(Debug)]
pub struct Assembler {
    /// Fragments received so far; empty and unallocated while idle.
    buf: Vec<u8>,
    max_message: usize,
    /// Kind of the fragmented message in progress, if any.
    partial: Option<DataKind>,
    /// Length (0..=3) of an incomplete UTF-8 sequence at the end of `buf`.
    /// Everything before it is known valid, so each fragment is validated
    /// from there instead of from the start of the message.
    utf8_pending: u8,
}

impl Assembler {
    pub fn new(max_message: usize) -> Self {
        Assembler {
            buf: Vec::new(),
            max_message,
            partial: None,
            utf8_pending: 0,
        }
    }

    /// Feed one decoded frame; returns a whole message when one completes.
    ///
    /// After an error the connection must be closed; the assembler drops any
    /// partial message so it no longer holds memory.
    pub fn push(&mut self, frame: Frame<'_>) -> Result<Option<Message>, ProtocolError> {
        let result = self.dispatch(frame);
        if result.is_err() {
            self.reset();
        }
        result
    }

    /// True when no fragmented message is in progress.
    pub fn is_idle(&self) -> bool {
        self.partial.is_none()
    }

    fn dispatch(&mut self, frame: Frame<'_>) -> Result<Option<Message>, ProtocolError> {
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
            OpCode::Text => self.start(DataKind::Text, frame),
            OpCode::Binary => self.start(DataKind::Binary, frame),
            OpCode::Continuation => self.continue_message(frame),
        }
    }

    fn start(
        &mut self,
        kind: DataKind,
        frame: Frame<'_>,
    ) -> Result<Option<Message>, ProtocolError> {
        if self.partial.is_some() {
            return Err(ProtocolError::ExpectedContinuation);
        }
        if frame.payload.len() > self.max_message {
            return Err(ProtocolError::MessageTooBig);
        }
        if frame.fin {
            // The common unfragmented case skips the reassembly buffer entirely.
            return match kind {
                DataKind::Text => std::str::from_utf8(frame.payload)
                    .map(|text| Some(Message::Text(text.to_owned())))
                    .map_err(|_| ProtocolError::InvalidUtf8),
                DataKind::Binary => Ok(Some(Message::Binary(frame.payload.to_vec()))),
            };
        }
        self.partial = Some(kind);
        self.append(kind, frame.payload)?;
        Ok(None)
    }

    fn continue_message(&mut self, frame: Frame<'_>) -> Result<Option<Message>, ProtocolError> {
        let Some(kind) = self.partial else {
            return Err(ProtocolError::UnexpectedContinuation);
        };
        if self.buf.len().saturating_add(frame.payload.len()) > self.max_message {
            return Err(ProtocolError::MessageTooBig);
        }
        self.append(kind, frame.payload)?;
        if !frame.fin {
            return Ok(None);
        }
        if self.utf8_pending != 0 {
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
        }
    }

    /// Appends a fragment and, for text, validates only the bytes not yet
    /// known to be valid, so an invalid sequence fails on the fragment that
    /// carries it rather than at the end of the message.
    fn append(&mut self, kind: DataKind, payload: &[u8]) -> Result<(), ProtocolError> {
        let unchecked_from = self
            .buf
            .len()
            .saturating_sub(usize::from(self.utf8_pending));
        self.buf.extend_from_slice(payload);
        if kind == DataKind::Text {
            let unchecked = self.buf.get(unchecked_from..).unwrap_or_default();
            self.utf8_pending = incomplete_utf8_tail(unchecked)?;
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.buf = Vec::new();
        self.partial = None;
        self.utf8_pending = 0;
    }
}

/// Length of a trailing, possibly-completable UTF-8 sequence, or an error if
/// `bytes` contains a sequence that no continuation could make valid.
fn incomplete_utf8_tail(bytes: &[u8]) -> Result<u8, ProtocolError> {
    match std::str::from_utf8(bytes) {
        Ok(_) => Ok(0),
        // `error_len() == None` means "ran out of input", i.e. cut at the fragment end.
        Err(e) if e.error_len().is_none() => {
            u8::try_from(bytes.len() - e.valid_up_to()).map_err(|_| ProtocolError::InvalidUtf8)
        }
        Err(_) => Err(ProtocolError::InvalidUtf8),
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
        assert_eq!(asm.utf8_pending, 1);
        assert_eq!(
            push(&mut asm, false, OpCode::Continuation, b"\x82"),
            Ok(None)
        );
        assert_eq!(asm.utf8_pending, 2);
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
