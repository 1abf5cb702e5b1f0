//! The frame decoder and the message assembler on arbitrary bytes, split at
//! arbitrary points the way reads split a TCP stream.
//!
//! Input: 5 header bytes, then the stream.
//! - byte 0: the frame size limit (low nibble) and message size limit (high nibble)
//! - bytes 1-4: read sizes, cycled (each 1..=256)
//!
//! Invariants:
//! - `decode` never claims more bytes than it was given, and leaves the buffer
//!   untouched unless it returns a frame;
//! - a prefix of a buffer decodes to "need more" or to exactly what the whole
//!   buffer decodes to (same frame, same length, or the same error);
//! - what is left waiting for more bytes never exceeds one header plus the limit:
//!   a declared length is checked before its payload is buffered;
//! - decoding and assembling the stream read by read, checking each incomplete
//!   frame as the reactor does, yields the same messages and the same error as
//!   doing it in one go (failing early changes when, never what);
//! - messages respect the limits and the control-frame rules;
//! - the stream as compressed data inflates within the message limit or fails,
//!   and compressing it and inflating the result gives it back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wspush::ws::assembler::{Assembler, Message};
use wspush::ws::deflate::{self, Compressor, Inflater};
use wspush::ws::frame::{self, OpCode, ProtocolError};

/// 2 fixed bytes, an 8-byte extended length and the 4-byte mask key.
const MAX_HEADER: usize = 14;
const LIMITS: [usize; 16] = [
    0, 1, 2, 7, 8, 125, 126, 127, 128, 200, 255, 256, 1000, 4096, 65535, 65536,
];
/// Frames of one input whose prefixes are checked one by one.
const PREFIX_CHECKED_FRAMES: usize = 8;

#[derive(Debug, PartialEq)]
enum Event {
    Message(Message),
    Error(ProtocolError),
}

fuzz_target!(|data: &[u8]| {
    let Some((head, stream)) = data.split_first_chunk::<5>() else {
        return;
    };
    let max_frame = LIMITS[usize::from(head[0] & 0x0F)];
    let max_message = LIMITS[usize::from(head[0] >> 4)];
    let reads = [head[1], head[2], head[3], head[4]].map(|b| usize::from(b) + 1);

    check_prefixes(stream, max_frame);

    let whole = run(stream, &[stream.len().max(1)], max_frame, max_message);
    let split = run(stream, &reads, max_frame, max_message);
    assert_eq!(whole, split, "read boundaries changed the outcome");
    let byte_by_byte = run(stream, &[1], max_frame, max_message);
    assert_eq!(
        whole, byte_by_byte,
        "byte-by-byte reads changed the outcome"
    );

    check_deflate(stream, max_message);
});

fn check_deflate(stream: &[u8], max_message: usize) {
    for offer in [
        &b"permessage-deflate"[..],
        b"permessage-deflate; client_no_context_takeover",
    ] {
        let params = deflate::negotiate([offer]).expect("a valid offer");
        let mut inflater = Inflater::new(&params);
        if let Ok(out) = inflater.inflate(stream, max_message) {
            assert!(out.len() <= max_message);
        }
        let mut inflater = Inflater::new(&params);
        if let Some(frame) = Compressor::new(0).frame(OpCode::Binary, stream) {
            // A server frame: 2, 4 or 10 header bytes, no mask.
            let at = match frame[1] {
                126 => 4,
                127 => 10,
                _ => 2,
            };
            let back = inflater.inflate(&frame[at..], stream.len()).expect("own output");
            assert_eq!(back, stream);
        }
    }
}

/// Decodes frame after frame and checks each one against its prefixes.
fn check_prefixes(stream: &[u8], max: usize) {
    let mut whole = stream.to_vec();
    let mut at = 0;
    let mut frames = 0;
    loop {
        let rest = &stream[at..];
        let result = frame::decode(&mut whole[at..], max)
            .map(|r| r.map(|(f, n)| (f.fin, f.opcode, f.payload.to_vec(), n)));
        if let Ok(Some((_, _, ref payload, n))) = result {
            assert!(n <= rest.len(), "claimed {n} of {} bytes", rest.len());
            assert!(n >= 6 && payload.len() <= max && n - payload.len() <= MAX_HEADER);
        }
        if frames < PREFIX_CHECKED_FRAMES {
            // Incomplete prefixes must not touch the buffer, so one copy serves them all.
            let mut scratch = rest.to_vec();
            let upto = match &result {
                Ok(Some((.., n))) => *n,
                _ => rest.len() + 1,
            };
            for k in 0..upto.min(rest.len() + 1) {
                match frame::decode(&mut scratch[..k], max) {
                    Ok(None) => assert!(
                        k < MAX_HEADER + max,
                        "waiting for more after {k} bytes with a limit of {max}"
                    ),
                    Ok(Some(_)) => panic!("a frame from a {k}-byte prefix of a longer frame"),
                    Err(e) => assert_eq!(Err(e), result.clone().map(|_| ()), "prefix of {k}"),
                }
            }
            assert_eq!(scratch, rest, "an incomplete decode changed the buffer");
            if let Ok(Some((.., n))) = &result {
                // A longer buffer yields the same frame.
                for extra in [0, 1, rest.len() - n] {
                    if n + extra > rest.len() {
                        continue;
                    }
                    let mut longer = rest[..n + extra].to_vec();
                    let got = frame::decode(&mut longer, max)
                        .map(|r| r.map(|(f, n)| (f.fin, f.opcode, f.payload.to_vec(), n)));
                    assert_eq!(got, result);
                }
            }
        }
        frames += 1;
        match result {
            Ok(Some((.., n))) => at += n,
            Ok(None) | Err(_) => return,
        }
    }
}

/// The reactor's read loop: append what arrived, decode and assemble complete
/// frames, keep the incomplete rest. Stops at the first error.
fn run(stream: &[u8], reads: &[usize], max_frame: usize, max_message: usize) -> Vec<Event> {
    let mut events = Vec::new();
    let mut asm = Assembler::new(max_message);
    let mut pending: Vec<u8> = Vec::new();
    let mut offset = 0;
    let mut sizes = reads.iter().cycle();
    while offset < stream.len() {
        let take = (*sizes.next().unwrap()).min(stream.len() - offset);
        pending.extend_from_slice(&stream[offset..offset + take]);
        offset += take;
        let mut pos = 0;
        loop {
            let before = pending.len() - pos;
            match frame::decode(&mut pending[pos..], max_frame) {
                Ok(None) => {
                    let before = pending[pos..].to_vec();
                    if let Err(e) = asm.check_incomplete(&pending[pos..]) {
                        assert!(asm.is_idle(), "a failed assembler keeps a message");
                        events.push(Event::Error(e));
                        return events;
                    }
                    assert_eq!(pending[pos..], before, "checking changed the buffer");
                    break;
                }
                Err(e) => {
                    events.push(Event::Error(e));
                    return events;
                }
                Ok(Some((frame, used))) => {
                    assert!(used <= before);
                    pos += used;
                    match asm.push(frame) {
                        Ok(None) => {}
                        Ok(Some(msg)) => {
                            check_message(&msg, max_message);
                            events.push(Event::Message(msg));
                        }
                        Err(e) => {
                            assert!(asm.is_idle(), "a failed assembler keeps a message");
                            events.push(Event::Error(e));
                            return events;
                        }
                    }
                }
            }
        }
        pending.drain(..pos);
        assert!(
            pending.len() < MAX_HEADER + max_frame,
            "{} bytes buffered with a frame limit of {max_frame}",
            pending.len()
        );
    }
    events
}

fn check_message(msg: &Message, max_message: usize) {
    match msg {
        Message::Text(t) => assert!(t.len() <= max_message),
        Message::Binary(b) => assert!(b.len() <= max_message),
        Message::Ping(p) | Message::Pong(p) => assert!(p.len() <= frame::MAX_CONTROL_PAYLOAD),
        Message::Close(Some(c)) => {
            assert!(wspush::ws::assembler::is_valid_close_code(c.code));
            assert!(c.reason.len() <= frame::MAX_CONTROL_PAYLOAD - 2);
        }
        Message::Close(None) => {}
    }
}
