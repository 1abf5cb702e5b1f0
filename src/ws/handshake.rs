//! Opening handshake (RFC 6455 §4.2): validates the upgrade-related request
//! headers and builds the 101 response. HTTP parsing, the method and Host
//! checks are left to the caller; this only sees the four header values.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use sha1::{Digest, Sha1};

pub const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Sec-WebSocket-Key carries a 16-byte nonce.
const KEY_BYTES: usize = 16;
/// Padded base64 length of 16 bytes; checked first so decoding never sees
/// an oversized input.
const KEY_BASE64_LEN: usize = 24;

/// base64(sha1(key + GUID)).
pub fn accept_key(client_key: &[u8]) -> String {
    let mut hasher = Sha1::new();
    hasher.update(client_key);
    hasher.update(GUID.as_bytes());
    STANDARD.encode(hasher.finalize())
}

/// Raw header values as they appeared in the request; `None` when absent.
#[derive(Debug, Clone, Copy, Default)]
pub struct UpgradeHeaders<'a> {
    pub upgrade: Option<&'a [u8]>,
    pub connection: Option<&'a [u8]>,
    pub version: Option<&'a [u8]>,
    pub key: Option<&'a [u8]>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeError {
    /// Upgrade header missing or not naming "websocket".
    NotUpgrade,
    MissingConnectionUpgrade,
    /// Sec-WebSocket-Version missing or not 13.
    UnsupportedVersion,
    /// Sec-WebSocket-Key missing or not base64 of 16 bytes.
    BadKey,
}

impl HandshakeError {
    /// HTTP status for the rejection. For 426 the caller must add
    /// `Sec-WebSocket-Version: 13` so the client can retry (RFC 6455 §4.4).
    pub fn status(&self) -> u16 {
        match self {
            HandshakeError::UnsupportedVersion => 426,
            HandshakeError::NotUpgrade
            | HandshakeError::MissingConnectionUpgrade
            | HandshakeError::BadKey => 400,
        }
    }
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HandshakeError::NotUpgrade => "Upgrade header missing or not websocket",
            HandshakeError::MissingConnectionUpgrade => {
                "Connection header does not contain upgrade"
            }
            HandshakeError::UnsupportedVersion => "Sec-WebSocket-Version missing or not 13",
            HandshakeError::BadKey => "Sec-WebSocket-Key missing or not base64 of 16 bytes",
        })
    }
}

impl std::error::Error for HandshakeError {}

/// Validates the headers and returns the Sec-WebSocket-Accept value.
pub fn check(h: &UpgradeHeaders<'_>) -> Result<String, HandshakeError> {
    if !h.upgrade.is_some_and(|v| has_token(v, b"websocket")) {
        return Err(HandshakeError::NotUpgrade);
    }
    if !h.connection.is_some_and(|v| has_token(v, b"upgrade")) {
        return Err(HandshakeError::MissingConnectionUpgrade);
    }
    if h.version.map(<[u8]>::trim_ascii) != Some(b"13".as_slice()) {
        return Err(HandshakeError::UnsupportedVersion);
    }
    let key = h
        .key
        .map(<[u8]>::trim_ascii)
        .ok_or(HandshakeError::BadKey)?;
    if !is_valid_key(key) {
        return Err(HandshakeError::BadKey);
    }
    // The accept value hashes the key exactly as sent, minus the surrounding
    // whitespace that HTTP does not count as part of a header value.
    Ok(accept_key(key))
}

/// Header values may be comma-separated lists with optional whitespace, and
/// tokens compare case-insensitively (RFC 9110 §5.6.1).
fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|item| item.trim_ascii().eq_ignore_ascii_case(token))
}

fn is_valid_key(key: &[u8]) -> bool {
    if key.len() != KEY_BASE64_LEN {
        return false;
    }
    // Room for the decoder's 3-bytes-per-4-chars estimate, so only real
    // decoding errors fail, never a too-small buffer.
    let mut nonce = [0u8; KEY_BASE64_LEN / 4 * 3];
    STANDARD.decode_slice(key, &mut nonce) == Ok(KEY_BYTES)
}

/// The full 101 response bytes.
pub fn response(accept: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\n\
         Upgrade: websocket\r\n\
         Connection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\
         \r\n"
    )
    .into_bytes()
}

/// The 101 response accepting an extension, e.g. `DeflateParams::response_header()`.
pub fn response_with_extensions(accept: &str, extensions: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\n\
         Upgrade: websocket\r\n\
         Connection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\
         Sec-WebSocket-Extensions: {extensions}\r\n\
         \r\n"
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    const RFC_KEY: &[u8] = b"dGhlIHNhbXBsZSBub25jZQ==";
    // RFC 6455 §1.3 (also what Python's hashlib/base64 give for this key).
    const RFC_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

    fn good() -> UpgradeHeaders<'static> {
        UpgradeHeaders {
            upgrade: Some(b"websocket"),
            connection: Some(b"Upgrade"),
            version: Some(b"13"),
            key: Some(RFC_KEY),
        }
    }

    #[test]
    fn response_with_the_deflate_answer() {
        let params = crate::ws::deflate::negotiate([&b"permessage-deflate"[..]]).unwrap();
        let got = response_with_extensions(RFC_ACCEPT, &params.response_header());
        assert_eq!(
            String::from_utf8(got).unwrap(),
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
             Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n\r\n"
        );
    }

    #[test]
    fn rfc_accept_example() {
        assert_eq!(accept_key(RFC_KEY), RFC_ACCEPT);
        // A second, independent vector (the one in MDN's handshake guide).
        assert_eq!(
            accept_key(b"x3JJHMbDL1EzLkh9GBhXDw=="),
            "HSmrc0sMlYUkAGmm5OPpG2HaGWk="
        );
        assert_eq!(check(&good()), Ok(RFC_ACCEPT.to_owned()));
    }

    #[test]
    fn upgrade_header() {
        for ok in [
            &b"websocket"[..],
            b"WebSocket",
            b"  websocket  ",
            b"h2c, WebSocket",
            b"foo,websocket ,bar",
        ] {
            let h = UpgradeHeaders {
                upgrade: Some(ok),
                ..good()
            };
            assert!(check(&h).is_ok(), "{:?}", String::from_utf8_lossy(ok));
        }
        for bad in [
            None,
            Some(&b""[..]),
            Some(b"h2c"),
            Some(b"websockets"),
            Some(b"web socket"),
        ] {
            let h = UpgradeHeaders {
                upgrade: bad,
                ..good()
            };
            assert_eq!(check(&h), Err(HandshakeError::NotUpgrade));
        }
    }

    #[test]
    fn connection_header() {
        for ok in [
            &b"Upgrade"[..],
            b"upgrade",
            b"keep-alive, Upgrade",
            b"UPGRADE ,keep-alive",
            b" upgrade ",
        ] {
            let h = UpgradeHeaders {
                connection: Some(ok),
                ..good()
            };
            assert!(check(&h).is_ok(), "{:?}", String::from_utf8_lossy(ok));
        }
        for bad in [
            None,
            Some(&b"keep-alive"[..]),
            Some(b"upgrades"),
            Some(b"close"),
            Some(b""),
        ] {
            let h = UpgradeHeaders {
                connection: bad,
                ..good()
            };
            assert_eq!(check(&h), Err(HandshakeError::MissingConnectionUpgrade));
        }
    }

    #[test]
    fn version_header() {
        let h = UpgradeHeaders {
            version: Some(b" 13 "),
            ..good()
        };
        assert!(check(&h).is_ok());
        for bad in [
            None,
            Some(&b"8"[..]),
            Some(b"12"),
            Some(b"130"),
            Some(b"13, 8"),
            Some(b""),
        ] {
            let h = UpgradeHeaders {
                version: bad,
                ..good()
            };
            assert_eq!(check(&h), Err(HandshakeError::UnsupportedVersion));
        }
    }

    #[test]
    fn key_header() {
        for ok in [
            &b"  dGhlIHNhbXBsZSBub25jZQ== "[..],
            b"AAAAAAAAAAAAAAAAAAAAAA==",
            b"/////////////////////w==",
        ] {
            let h = UpgradeHeaders {
                key: Some(ok),
                ..good()
            };
            assert_eq!(check(&h), Ok(accept_key(ok.trim_ascii())));
        }
        for bad in [
            None,
            Some(&b""[..]),
            Some(b"not base64 at all!!!!!!!"), // 24 chars, bad alphabet
            Some(b"dGhlIHNhbXBsZSBub25jZQ"),   // 16 bytes but unpadded
            Some(b"dGhlIHNhbXBsZSBub25jZT=="), // non-zero trailing bits
            Some(b"AAAAAAAAAAAAAAAAAAAA"),     // 15 bytes
            Some(b"AAAAAAAAAAAAAAAAAAAAAAA="), // 17 bytes
            Some(b"AAAAAAAAAAAAAAAAAAAAAAAA"), // 18 bytes
            Some(b"dGhlIHNhbXBsZSBub25jZQ==dGhlIHNhbXBsZSBub25jZQ=="),
        ] {
            let h = UpgradeHeaders { key: bad, ..good() };
            assert_eq!(check(&h), Err(HandshakeError::BadKey), "{bad:?}");
        }
    }

    #[test]
    fn errors_checked_in_header_order() {
        assert_eq!(
            check(&UpgradeHeaders::default()),
            Err(HandshakeError::NotUpgrade)
        );
        let h = UpgradeHeaders {
            version: None,
            key: None,
            ..good()
        };
        assert_eq!(check(&h), Err(HandshakeError::UnsupportedVersion));
    }

    #[test]
    fn status_codes() {
        assert_eq!(HandshakeError::UnsupportedVersion.status(), 426);
        for e in [
            HandshakeError::NotUpgrade,
            HandshakeError::MissingConnectionUpgrade,
            HandshakeError::BadKey,
        ] {
            assert_eq!(e.status(), 400);
            assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn response_bytes() {
        assert_eq!(
            response(RFC_ACCEPT),
            b"HTTP/1.1 101 Switching Protocols\r\n\
              Upgrade: websocket\r\n\
              Connection: Upgrade\r\n\
              Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
              \r\n"
        );
    }
}
