//! Lookup of single parameters in a raw `application/x-www-form-urlencoded`
//! query string.

use super::request::HttpError;

/// Percent-decoded value of the first `name=` parameter in a raw query string
/// ('+' means space). Ok(None) when absent; a value that is not UTF-8 after
/// decoding → Err(HttpError::BadRequest naming the parameter). Malformed
/// %-escapes are kept literally.
///
/// Keys are compared after decoding, and a bare `name` (no '=') counts as
/// present with an empty value, both as in the WHATWG URL standard.
pub fn get(query: &str, name: &str) -> Result<Option<String>, HttpError> {
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if !key_matches(key, name) {
            continue;
        }
        return String::from_utf8(decode(value))
            .map(Some)
            .map_err(|_| HttpError::BadRequest(format!("query parameter '{name}' is not UTF-8")));
    }
    Ok(None)
}

fn key_matches(raw: &str, name: &str) -> bool {
    if raw.contains(['%', '+']) {
        decode(raw) == name.as_bytes()
    } else {
        raw == name
    }
}

fn decode(raw: &str) -> Vec<u8> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hi = bytes.get(i + 1).and_then(|&h| super::hex_val(h));
                let lo = bytes.get(i + 2).and_then(|&l| super::hex_val(l));
                if let (Some(hi), Some(lo)) = (hi, lo) {
                    out.push((hi << 4) | lo);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            _ => out.push(b),
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn some(v: &str) -> Result<Option<String>, HttpError> {
        Ok(Some(v.to_owned()))
    }

    #[test]
    fn basic_lookup() {
        let q = "topic=news&id=42&empty=";
        assert_eq!(get(q, "topic"), some("news"));
        assert_eq!(get(q, "id"), some("42"));
        assert_eq!(get(q, "empty"), some(""));
        assert_eq!(get(q, "missing"), Ok(None));
        assert_eq!(get(q, "to"), Ok(None));
        assert_eq!(get("", "a"), Ok(None));
        assert_eq!(get("&&a=1&", "a"), some("1"));
    }

    #[test]
    fn first_of_repeated() {
        assert_eq!(get("a=1&a=2", "a"), some("1"));
    }

    #[test]
    fn bare_key_and_extra_equals() {
        assert_eq!(get("flag&x=1", "flag"), some(""));
        assert_eq!(get("t=a=b", "t"), some("a=b"));
    }

    #[test]
    fn decoding() {
        assert_eq!(get("q=a+b%20c", "q"), some("a b c"));
        assert_eq!(get("q=%2B%26%3d", "q"), some("+&="));
        assert_eq!(get("q=caf%C3%A9", "q"), some("café"));
        assert_eq!(get("q=café", "q"), some("café"));
        assert_eq!(get("my%5Fkey=v&my+k=w", "my_key"), some("v"));
        assert_eq!(get("my+k=w", "my k"), some("w"));
    }

    #[test]
    fn malformed_escapes_kept() {
        assert_eq!(get("q=100%", "q"), some("100%"));
        assert_eq!(get("q=%zz%4", "q"), some("%zz%4"));
        assert_eq!(get("q=%%41", "q"), some("%A"));
        assert_eq!(get("q=%é", "q"), some("%é"));
    }

    #[test]
    fn invalid_utf8() {
        match get("a=1&bin=%FF%FE", "bin") {
            Err(HttpError::BadRequest(msg)) => assert!(msg.contains("bin"), "{msg}"),
            other => panic!("{other:?}"),
        }
        // Only the requested parameter is decoded.
        assert_eq!(get("bin=%FF&a=1", "a"), some("1"));
    }
}
