//! Server-Sent Events (the `text/event-stream` of the HTML standard, §9.2): the
//! response head of `/sse` and the bytes of its events. Pure: bytes in, bytes out.

/// The response head of an event stream. No `Content-Length` and no chunking: the
/// body is the stream and ends when the connection does (HTTP/1.1 `Connection:
/// close` framing), which every EventSource and proxy understands.
/// `X-Accel-Buffering: no` keeps nginx from holding events back.
pub const RESPONSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\n\
Content-Type: text/event-stream; charset=utf-8\r\n\
Cache-Control: no-cache\r\n\
X-Accel-Buffering: no\r\n\
Connection: close\r\n\
\r\n";

/// A comment line: EventSource ignores it, while proxies see traffic.
pub const HEARTBEAT: &[u8] = b": ping\n\n";

/// One event: `id:` (when given), `event:` (when given), then `data` as one `data:`
/// line per line of it. The client joins data lines with `\n`, so a push whose JSON
/// spans lines arrives as the same JSON (a CR in it, only ever whitespace between
/// JSON tokens, arrives as LF: the same JSON value).
pub fn event(id: Option<&[u8]>, name: Option<&str>, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 32 + id.map_or(0, <[u8]>::len));
    if let Some(id) = id.filter(|id| is_field_value(id)) {
        out.extend_from_slice(b"id: ");
        out.extend_from_slice(id);
        out.push(b'\n');
    }
    if let Some(name) = name.filter(|n| is_field_value(n.as_bytes())) {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(name.as_bytes());
        out.push(b'\n');
    }
    for line in lines(data) {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out.push(b'\n');
    out
}

/// A field value may not hold a line break, and an id may not hold NUL (the client
/// would ignore the id).
fn is_field_value(v: &[u8]) -> bool {
    !v.iter().any(|b| matches!(b, b'\r' | b'\n' | 0))
}

/// The lines of `data` as the event stream splits them: at CRLF, CR or LF.
fn lines(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(data);
    std::iter::from_fn(move || {
        let d = rest?;
        match d.iter().position(|&b| b == b'\r' || b == b'\n') {
            None => {
                rest = None;
                Some(d)
            }
            Some(i) => {
                let skip = if d[i] == b'\r' && d.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                rest = Some(&d[i + skip..]);
                Some(&d[..i])
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_with_id_and_data() {
        assert_eq!(
            event(Some(b"1f-3"), None, br#"{"msg":1}"#),
            b"id: 1f-3\ndata: {\"msg\":1}\n\n"
        );
        assert_eq!(
            event(None, Some("resumed"), br#"{"complete":true}"#),
            b"event: resumed\ndata: {\"complete\":true}\n\n"
        );
    }

    #[test]
    fn data_over_several_lines_is_one_data_line_each() {
        assert_eq!(
            event(None, None, b"{\"a\":\r\n1,\r\"b\":\n2}"),
            b"data: {\"a\":\ndata: 1,\ndata: \"b\":\ndata: 2}\n\n"
        );
        assert_eq!(event(None, None, b""), b"data: \n\n");
        assert_eq!(event(None, None, b"x\n"), b"data: x\ndata: \n\n");
    }

    #[test]
    fn a_field_with_a_line_break_is_left_out() {
        assert_eq!(event(Some(b"a\nb"), None, b"1"), b"data: 1\n\n");
        assert_eq!(event(Some(b"a\0"), Some("x\ry"), b"1"), b"data: 1\n\n");
    }

    #[test]
    fn the_head_streams_without_buffering() {
        let head = std::str::from_utf8(RESPONSE_HEAD).unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(head.contains("Content-Type: text/event-stream"));
        assert!(head.contains("Cache-Control: no-cache"));
        assert!(head.contains("X-Accel-Buffering: no"));
        assert!(!head.contains("Content-Length"));
        assert!(head.ends_with("\r\n\r\n"));
    }
}
