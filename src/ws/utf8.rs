//! Incremental UTF-8 validation: one byte of state carries a code point that is
//! split across fragments or across reads, so a text message fails at the first
//! byte that no continuation could make valid.

/// What the next byte of a sequence in progress must be (RFC 3629 §4), or that no
/// sequence is in progress. Ranges narrower than 80..=BF exclude overlong forms,
/// UTF-16 surrogates and code points above U+10FFFF at their second byte.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Utf8State {
    #[default]
    Boundary,
    /// 1, 2 or 3 more bytes in 80..=BF.
    Tail(u8),
    /// After E0: A0..=BF, then one tail byte.
    E0,
    /// After ED: 80..=9F, then one tail byte.
    Ed,
    /// After F0: 90..=BF, then two tail bytes.
    F0,
    /// After F4: 80..=8F, then two tail bytes.
    F4,
}

/// The input holds a byte sequence that is not UTF-8 whatever follows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidUtf8;

impl Utf8State {
    /// True when the bytes fed so far end on a character boundary.
    pub fn is_boundary(self) -> bool {
        self == Utf8State::Boundary
    }

    /// Validates `bytes` as the continuation of everything fed before.
    ///
    /// Only the bytes around a split code point go through the byte-wise state
    /// machine; the rest goes through `std::str::from_utf8`, which is much faster
    /// on long runs (ASCII above all).
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), InvalidUtf8> {
        while !self.is_boundary() {
            let Some((&b, rest)) = bytes.split_first() else {
                return Ok(());
            };
            *self = self.step(b)?;
            bytes = rest;
        }
        match std::str::from_utf8(bytes) {
            Ok(_) => Ok(()),
            // `error_len() == None`: a valid prefix of a sequence cut by the end of input.
            Err(e) if e.error_len().is_none() => {
                for &b in bytes.get(e.valid_up_to()..).unwrap_or_default() {
                    *self = self.step(b)?;
                }
                Ok(())
            }
            Err(_) => Err(InvalidUtf8),
        }
    }

    fn step(self, b: u8) -> Result<Utf8State, InvalidUtf8> {
        let tail = |n: u8| {
            if n == 0 {
                Utf8State::Boundary
            } else {
                Utf8State::Tail(n)
            }
        };
        let next = match (self, b) {
            (Utf8State::Boundary, 0x00..=0x7F) => Utf8State::Boundary,
            (Utf8State::Boundary, 0xC2..=0xDF) => Utf8State::Tail(1),
            (Utf8State::Boundary, 0xE0) => Utf8State::E0,
            (Utf8State::Boundary, 0xED) => Utf8State::Ed,
            (Utf8State::Boundary, 0xE1..=0xEC | 0xEE..=0xEF) => Utf8State::Tail(2),
            (Utf8State::Boundary, 0xF0) => Utf8State::F0,
            (Utf8State::Boundary, 0xF1..=0xF3) => Utf8State::Tail(3),
            (Utf8State::Boundary, 0xF4) => Utf8State::F4,
            (Utf8State::Tail(n), 0x80..=0xBF) => tail(n - 1),
            (Utf8State::E0, 0xA0..=0xBF) | (Utf8State::Ed, 0x80..=0x9F) => Utf8State::Tail(1),
            (Utf8State::F0, 0x90..=0xBF) | (Utf8State::F4, 0x80..=0x8F) => Utf8State::Tail(2),
            _ => return Err(InvalidUtf8),
        };
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(chunks: &[&[u8]]) -> Result<Utf8State, InvalidUtf8> {
        let mut state = Utf8State::default();
        for chunk in chunks {
            state.feed(chunk)?;
        }
        Ok(state)
    }

    #[test]
    fn state_is_one_or_two_bytes() {
        assert!(std::mem::size_of::<Utf8State>() <= 2);
    }

    /// Every split of every input into two and into single bytes agrees with std
    /// on the whole input: valid, invalid, or a valid but unfinished prefix.
    #[test]
    fn agrees_with_std_at_every_split() {
        let samples: &[&[u8]] = &[
            b"",
            b"plain ascii",
            "h\u{e9}llo \u{20ac} \u{1f600} \u{10ffff} \u{7ff} \u{800} \u{ffff}".as_bytes(),
            b"\xc0\xaf",
            b"\xc1\xbf",
            b"\xe0\x80\xaf",
            b"\xe0\x9f\xbf",
            b"\xed\xa0\x80",
            b"\xed\x9f\xbf",
            b"\xf0\x8f\xbf\xbf",
            b"\xf4\x90\x80\x80",
            b"\xf4\x8f\xbf\xbf",
            b"\xf5\x80\x80\x80",
            b"\xff",
            b"\x80",
            b"a\xe2\x82",
            b"\xf0\x9f\x98",
            b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited",
            b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xf4\x90\x80\x80edited",
        ];
        for &s in samples {
            let std_says = match std::str::from_utf8(s) {
                Ok(_) => Ok(true),
                Err(e) if e.error_len().is_none() => Ok(false),
                Err(_) => Err(InvalidUtf8),
            };
            for cut in 0..=s.len() {
                let got = feed_all(&[&s[..cut], &s[cut..]]).map(Utf8State::is_boundary);
                assert_eq!(got, std_says, "{s:x?} cut at {cut}");
            }
            let bytes: Vec<&[u8]> = s.chunks(1).collect();
            let got = feed_all(&bytes).map(Utf8State::is_boundary);
            assert_eq!(got, std_says, "{s:x?} byte by byte");
        }
    }

    /// The error comes with the first byte that makes the input invalid, not later.
    #[test]
    fn fails_at_the_first_bad_byte() {
        let s = b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xf4\x90\x80\x80edited";
        let first_bad = 12; // the 0x90 after F4
        let mut state = Utf8State::default();
        for (i, b) in s.iter().enumerate() {
            let r = state.feed(std::slice::from_ref(b));
            assert_eq!(r.is_err(), i == first_bad, "byte {i}");
            if r.is_err() {
                break;
            }
        }
    }

    #[test]
    fn exhaustive_two_and_three_byte_prefixes() {
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                let s = [a, b];
                let std_bad = matches!(std::str::from_utf8(&s), Err(e) if e.error_len().is_some());
                let mut st = Utf8State::default();
                let ours_bad = st.feed(&[a]).and_then(|_| st.feed(&[b])).is_err();
                assert_eq!(ours_bad, std_bad, "{a:02x} {b:02x}");
            }
        }
    }
}
