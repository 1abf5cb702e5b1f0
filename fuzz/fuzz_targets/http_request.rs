//! The HTTP request-head parser and the chunked body decoder on arbitrary
//! bytes, with small limits so the limit paths are reached.
//!
//! Input: 4 header bytes, then the stream.
//! - byte 0: the head limit (16 + 4 × byte)
//! - byte 1: the body limit (8 × byte)
//! - bytes 2-3: read sizes for the chunked decoder, alternated (each 1..=256)
//!
//! Invariants:
//! - a complete head never claims more than it was given or more than the limit;
//! - every shorter prefix of a complete head is "need more", and every longer
//!   buffer yields the same head: how reads split a request never changes it;
//! - a declared body length never exceeds the body limit;
//! - the chunked decoder gives the same body, length consumed and error whether
//!   fed in one piece, read by read or byte by byte, and never holds more than the limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wspush::http::{BodyKind, ChunkedDecoder, HttpError, Limits, parse_head};

fuzz_target!(|data: &[u8]| {
    let Some((head, stream)) = data.split_first_chunk::<4>() else {
        return;
    };
    let limits = Limits {
        max_head: 16 + 4 * usize::from(head[0]),
        max_body: 8 * usize::from(head[1]),
    };
    check_head(stream, &limits);

    let reads = [usize::from(head[2]) + 1, usize::from(head[3]) + 1];
    let whole = chunked(stream, &[stream.len().max(1)], limits.max_body);
    assert_eq!(whole, chunked(stream, &reads, limits.max_body));
    assert_eq!(whole, chunked(stream, &[1], limits.max_body));
    // The body after a chunked head goes through the decoder as the server does it.
    if let Ok(Some((h, n))) = parse_head(stream, &limits)
        && h.body == BodyKind::Chunked
    {
        let body = &stream[n..];
        assert_eq!(
            chunked(body, &[body.len().max(1)], limits.max_body),
            chunked(body, &reads, limits.max_body)
        );
    }
});

fn check_head(stream: &[u8], limits: &Limits) {
    let whole = parse_head(stream, limits);
    let Ok(Some((head, n))) = &whole else {
        return;
    };
    let n = *n;
    assert!(n <= stream.len(), "claimed {n} of {} bytes", stream.len());
    assert!(n <= limits.max_head, "a {n}-byte head over the limit");
    if let BodyKind::Length(len) = head.body {
        assert!(len <= limits.max_body);
    }
    assert!(head.path.starts_with('/') || head.path == "*");
    let shape = format!("{head:?}");
    for k in 0..n {
        match parse_head(&stream[..k], limits) {
            Ok(None) => {}
            other => panic!("a {k}-byte prefix of a {n}-byte head gave {other:?}"),
        }
    }
    for k in [n, n + 1, stream.len()] {
        if k > stream.len() {
            continue;
        }
        match parse_head(&stream[..k], limits) {
            Ok(Some((h, m))) => {
                assert_eq!(m, n);
                assert_eq!(format!("{h:?}"), shape);
            }
            other => panic!("{k} bytes of a {n}-byte head gave {other:?}"),
        }
    }
}

/// Feeds the decoder the way the reactor does: each read is offered whole (the
/// decoder consumes all of it unless it finishes). Returns the body and the bytes
/// consumed once done, `None` if it wants more, or the error.
fn chunked(
    stream: &[u8],
    reads: &[usize],
    max_body: usize,
) -> Result<Option<(Vec<u8>, usize)>, HttpError> {
    let mut d = ChunkedDecoder::new(max_body);
    let mut consumed = 0;
    let mut offset = 0;
    let mut sizes = reads.iter().cycle();
    while offset < stream.len() {
        let take = (*sizes.next().unwrap()).min(stream.len() - offset);
        let piece = &stream[offset..offset + take];
        offset += take;
        let (n, done) = d.feed(piece)?;
        assert!(n <= piece.len());
        consumed += n;
        if done {
            let body = d.into_body();
            assert!(
                body.len() <= max_body,
                "{} byte body over {max_body}",
                body.len()
            );
            return Ok(Some((body, consumed)));
        }
        assert_eq!(
            n,
            piece.len(),
            "an unfinished decoder left input unconsumed"
        );
    }
    Ok(None)
}
