//! Incremental decoder for `Transfer-Encoding: chunked` request bodies
//! (RFC 9112 §7.1). It keeps its position between calls, so a body trickling
//! in one byte per read costs O(n) overall instead of a re-parse per read.
//!
//! Line endings: strictly CRLF. The head parser tolerates bare LF because
//! httparse does, but inside chunked framing a lenient reading that differs
//! from a front proxy's is the classic request-smuggling vector, so a bare LF
//! (or a CR not followed by LF) is a 400 here.

use super::request::HttpError;

/// A chunk size wider than 16 hex digits cannot fit in 64 bits.
const MAX_SIZE_DIGITS: u8 = 16;

/// Chunk extensions and trailers are parsed and thrown away; this much of
/// them, beyond the amount of body data received, is allowed before the
/// peer is considered to be padding the stream to burn our time.
const MAX_METADATA_SLACK: usize = 16 * 1024;

#[derive(Debug)]
enum State {
    /// Reading the hex digits of a chunk size.
    Size {
        size: u64,
        digits: u8,
    },
    /// Whitespace after the size; only legal before a ';' extension.
    SizeSpace {
        size: u64,
    },
    /// Inside `;ext...`, skipped up to CR.
    Extension {
        size: u64,
    },
    /// Saw the CR ending a chunk-size line.
    SizeLf {
        size: u64,
    },
    Data {
        remaining: u64,
    },
    DataCr,
    DataLf,
    /// At the start of a trailer line, or of the final empty line.
    TrailerStart,
    Trailer,
    TrailerLf,
    FinalLf,
    Done,
    Failed(HttpError),
}

#[derive(Debug)]
pub struct ChunkedDecoder {
    state: State,
    body: Vec<u8>,
    max_body: usize,
    metadata: usize,
}

impl ChunkedDecoder {
    pub fn new(max_body: usize) -> Self {
        ChunkedDecoder {
            state: State::Size { size: 0, digits: 0 },
            body: Vec::new(),
            max_body,
            metadata: 0,
        }
    }

    /// Consume as much of `input` as possible. Returns (bytes consumed,
    /// done). Decoded data is appended to an internal body buffer. Once done,
    /// bytes after the final CRLF are left unconsumed (they belong to the
    /// next pipelined request). After an error every later call returns the
    /// same error.
    pub fn feed(&mut self, input: &[u8]) -> Result<(usize, bool), HttpError> {
        match self.run(input) {
            Ok(r) => Ok(r),
            Err(e) => {
                self.state = State::Failed(e.clone());
                Err(e)
            }
        }
    }

    pub fn into_body(self) -> Vec<u8> {
        self.body
    }

    fn run(&mut self, input: &[u8]) -> Result<(usize, bool), HttpError> {
        let mut pos = 0;
        while pos < input.len() {
            let b = input[pos];
            self.state = match self.state {
                State::Size { size, digits } => match (super::hex_val(b), digits) {
                    (Some(d), _) => {
                        if digits >= MAX_SIZE_DIGITS {
                            return Err(bad("chunk size too long"));
                        }
                        let size = (size << 4) | u64::from(d);
                        // Refuse on the size line itself, before any of an
                        // oversized chunk's data has to be buffered.
                        let room = self.max_body.saturating_sub(self.body.len());
                        if size > u64::try_from(room).unwrap_or(u64::MAX) {
                            return Err(HttpError::BodyTooLarge);
                        }
                        State::Size {
                            size,
                            digits: digits + 1,
                        }
                    }
                    (None, 0) => return Err(bad("invalid chunk size")),
                    (None, _) => match b {
                        b';' => self.extension(size)?,
                        b' ' | b'\t' => self.space(size)?,
                        b'\r' => State::SizeLf { size },
                        _ => return Err(bad("invalid chunk size")),
                    },
                },
                State::SizeSpace { size } => match b {
                    b';' => self.extension(size)?,
                    b' ' | b'\t' => self.space(size)?,
                    _ => return Err(bad("invalid chunk size line")),
                },
                State::Extension { size } => match b {
                    b'\r' => State::SizeLf { size },
                    _ if is_field_byte(b) => self.extension(size)?,
                    _ => return Err(bad("invalid chunk extension")),
                },
                State::SizeLf { size } => match b {
                    b'\n' if size == 0 => State::TrailerStart,
                    b'\n' => State::Data { remaining: size },
                    _ => return Err(bad("chunk size line not ended by CRLF")),
                },
                State::Data { remaining } => {
                    // Bulk copy: chunk data skips the per-byte state machine.
                    let avail = input.len() - pos;
                    let take = usize::try_from(remaining).map_or(avail, |r| r.min(avail));
                    self.body.extend_from_slice(&input[pos..pos + take]);
                    pos += take;
                    self.state = match remaining - take as u64 {
                        0 => State::DataCr,
                        remaining => State::Data { remaining },
                    };
                    continue;
                }
                State::DataCr => match b {
                    b'\r' => State::DataLf,
                    _ => return Err(bad("chunk data not followed by CRLF")),
                },
                State::DataLf => match b {
                    b'\n' => State::Size { size: 0, digits: 0 },
                    _ => return Err(bad("chunk data not followed by CRLF")),
                },
                State::TrailerStart => match b {
                    b'\r' => State::FinalLf,
                    _ if is_field_byte(b) => self.trailer()?,
                    _ => return Err(bad("invalid chunked trailer")),
                },
                State::Trailer => match b {
                    b'\r' => State::TrailerLf,
                    _ if is_field_byte(b) => self.trailer()?,
                    _ => return Err(bad("invalid chunked trailer")),
                },
                State::TrailerLf => match b {
                    b'\n' => State::TrailerStart,
                    _ => return Err(bad("trailer line not ended by CRLF")),
                },
                State::FinalLf => match b {
                    b'\n' => {
                        self.state = State::Done;
                        return Ok((pos + 1, true));
                    }
                    _ => return Err(bad("chunked body not ended by CRLF")),
                },
                State::Done => return Ok((pos, true)),
                State::Failed(ref e) => return Err(e.clone()),
            };
            pos += 1;
        }
        match self.state {
            State::Failed(ref e) => Err(e.clone()),
            State::Done => Ok((pos, true)),
            _ => Ok((pos, false)),
        }
    }

    fn count_metadata(&mut self) -> Result<(), HttpError> {
        self.metadata += 1;
        if self.metadata > MAX_METADATA_SLACK.saturating_add(self.body.len()) {
            return Err(bad("too much chunk extension or trailer data"));
        }
        Ok(())
    }

    fn extension(&mut self, size: u64) -> Result<State, HttpError> {
        self.count_metadata()?;
        Ok(State::Extension { size })
    }

    fn space(&mut self, size: u64) -> Result<State, HttpError> {
        self.count_metadata()?;
        Ok(State::SizeSpace { size })
    }

    fn trailer(&mut self) -> Result<State, HttpError> {
        self.count_metadata()?;
        Ok(State::Trailer)
    }
}

fn bad(what: &str) -> HttpError {
    HttpError::BadRequest(what.to_owned())
}

/// Bytes allowed inside an extension or trailer line: visible ASCII, SP,
/// HTAB and obs-text, i.e. no control characters.
fn is_field_byte(b: u8) -> bool {
    b == b'\t' || (b >= 0x20 && b != 0x7f)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 1024;

    /// Feeds `input` in pieces of `step` bytes, the way a caller keeps the
    /// unconsumed tail and appends the next read.
    fn decode_in_steps(
        input: &[u8],
        step: usize,
        max: usize,
    ) -> Result<(Vec<u8>, usize), HttpError> {
        let mut d = ChunkedDecoder::new(max);
        let mut consumed = 0;
        let mut pending: Vec<u8> = Vec::new();
        for piece in input.chunks(step) {
            pending.extend_from_slice(piece);
            let (n, done) = d.feed(&pending)?;
            consumed += n;
            pending.drain(..n);
            if done {
                return Ok((d.into_body(), consumed));
            }
        }
        Err(bad("incomplete"))
    }

    fn decode_all_ways(input: &[u8]) -> Result<(Vec<u8>, usize), HttpError> {
        let whole = decode_in_steps(input, input.len().max(1), LIMIT);
        for step in [1, 2, 3, 7] {
            assert_eq!(decode_in_steps(input, step, LIMIT), whole, "step {step}");
        }
        whole
    }

    #[test]
    fn simple() {
        let input = b"5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n";
        assert_eq!(
            decode_all_ways(input),
            Ok((b"hello, world".to_vec(), input.len()))
        );
    }

    #[test]
    fn one_byte_at_a_time_without_retaining() {
        let input = b"A;x=1\r\n0123456789\r\n1\r\n!\r\n0\r\n\r\n";
        let mut d = ChunkedDecoder::new(LIMIT);
        for (i, b) in input.iter().enumerate() {
            let (n, done) = d.feed(std::slice::from_ref(b)).unwrap();
            assert_eq!(n, 1);
            assert_eq!(done, i == input.len() - 1);
        }
        assert_eq!(d.into_body(), b"0123456789!");
    }

    #[test]
    fn empty_body_and_uppercase_hex() {
        assert_eq!(decode_all_ways(b"0\r\n\r\n"), Ok((Vec::new(), 5)));
        let body = vec![b'z'; 0x1f];
        let mut input = b"1F\r\n".to_vec();
        input.extend_from_slice(&body);
        input.extend_from_slice(b"\r\n0\r\n\r\n");
        assert_eq!(decode_all_ways(&input), Ok((body, input.len())));
    }

    #[test]
    fn extensions_and_trailers() {
        let input = b"4;name=value;q=\"quoted ; \\\" str\"\r\nWiki\r\n5 ;ext\r\npedia\r\n0;last\r\nExpires: never\r\nX-Checksum: abc\r\n\r\n";
        assert_eq!(
            decode_all_ways(input),
            Ok((b"Wikipedia".to_vec(), input.len()))
        );
    }

    #[test]
    fn leaves_pipelined_bytes() {
        let input = b"3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        let mut d = ChunkedDecoder::new(LIMIT);
        assert_eq!(d.feed(input), Ok((13, true)));
        assert_eq!(d.feed(b"more"), Ok((0, true)));
        assert_eq!(d.into_body(), b"abc");
    }

    #[test]
    fn size_limits() {
        let ok = b"0000000000000003\r\nabc\r\n0\r\n\r\n";
        assert_eq!(decode_all_ways(ok), Ok((b"abc".to_vec(), ok.len())));
        assert!(matches!(
            decode_all_ways(b"00000000000000003\r\nabc\r\n0\r\n\r\n"),
            Err(HttpError::BadRequest(_))
        ));
        assert_eq!(
            decode_all_ways(b"ffffffffffffffff\r\n"),
            Err(HttpError::BodyTooLarge)
        );
    }

    #[test]
    fn over_limit_detected_on_size_line() {
        // Exactly the limit is fine, across several chunks.
        let mut input = Vec::new();
        for _ in 0..4 {
            input.extend_from_slice(b"100\r\n");
            input.extend_from_slice(&[b'x'; 256]);
            input.extend_from_slice(b"\r\n");
        }
        input.extend_from_slice(b"0\r\n\r\n");
        assert_eq!(decode_all_ways(&input).unwrap().0.len(), LIMIT);

        // One more chunk: refused as soon as its size digit arrives.
        let mut over = input[..input.len() - 5].to_vec();
        over.extend_from_slice(b"1");
        let mut d = ChunkedDecoder::new(LIMIT);
        assert_eq!(d.feed(&over), Err(HttpError::BodyTooLarge));
        assert_eq!(d.feed(b"\r\n"), Err(HttpError::BodyTooLarge));

        // A single oversized chunk with no data yet.
        let mut d = ChunkedDecoder::new(LIMIT);
        assert_eq!(d.feed(b"401"), Err(HttpError::BodyTooLarge));
        let mut d = ChunkedDecoder::new(0);
        assert_eq!(d.feed(b"0\r\n\r\n"), Ok((5, true)));
    }

    #[test]
    fn strict_framing() {
        for input in [
            &b"\r\n"[..],
            b";x\r\n",
            b"g\r\n",
            b"-1\r\n",
            b"+1\r\n",
            b"0x1\r\n",
            b"1 \r\nx\r\n0\r\n\r\n",
            b"1\nx\r\n0\r\n\r\n",
            b"1\rx",
            b"1\r\nxy\r\n",
            b"1\r\nx\n0\r\n\r\n",
            b"1\r\nx\r\r",
            b"0\r\n\n",
            b"0\r\nTrailer: x\n\r\n",
            b"0\r\n\rX",
            b"1;a\x00b\r\nx\r\n",
            b"1;a\nb\r\nx\r\n",
            b"0\r\nX: \x01\r\n\r\n",
        ] {
            assert!(
                matches!(decode_all_ways(input), Err(HttpError::BadRequest(_))),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn error_is_sticky() {
        let mut d = ChunkedDecoder::new(LIMIT);
        let e = d.feed(b"zz").unwrap_err();
        assert_eq!(d.feed(b"0\r\n\r\n"), Err(e.clone()));
        assert_eq!(d.feed(b""), Err(e));
    }

    #[test]
    fn metadata_is_bounded() {
        let mut d = ChunkedDecoder::new(LIMIT);
        let mut input = b"1;".to_vec();
        input.extend(std::iter::repeat_n(b'a', MAX_METADATA_SLACK + 10));
        assert!(matches!(d.feed(&input), Err(HttpError::BadRequest(_))));

        let mut d = ChunkedDecoder::new(LIMIT);
        let mut input = b"0\r\n".to_vec();
        for _ in 0..2000 {
            input.extend_from_slice(b"X-Pad: 123456789\r\n");
        }
        assert!(matches!(d.feed(&input), Err(HttpError::BadRequest(_))));
    }

    #[test]
    fn never_panics_on_junk() {
        let base = b"3;e=1\r\nabc\r\n0\r\nT: v\r\n\r\n";
        for i in 0..base.len() {
            for b in 0..=255u8 {
                let mut v = base.to_vec();
                v[i] = b;
                for max in [0, 2, 3, LIMIT] {
                    let _ = decode_in_steps(&v, 1, max);
                    let _ = decode_in_steps(&v, v.len(), max);
                }
            }
        }
    }
}
