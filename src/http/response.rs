//! Response values and their HTTP/1.1 wire encoding. Encoding is on the hot
//! path, so it appends straight into the caller's output buffer.

/// Interim response sent when a request carries `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Omitted from the wire when empty.
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: Vec<u8>) -> Self {
        Response {
            status,
            content_type,
            headers: Vec::new(),
            body,
        }
    }

    pub fn json(status: u16, body: Vec<u8>) -> Self {
        Self::new(status, "application/json", body)
    }

    /// `{"ok":false,"error":"<message>"}`. Built by hand rather than through a
    /// serde_json map, whose key order is alphabetical, not this one.
    pub fn error(status: u16, message: &str) -> Self {
        const PREFIX: &[u8] = b"{\"ok\":false,\"error\":";
        let mut body = Vec::with_capacity(PREFIX.len() + message.len() + 3);
        body.extend_from_slice(PREFIX);
        if serde_json::to_writer(&mut body, message).is_err() {
            // Serializing a str into a Vec cannot fail; keep the JSON valid anyway.
            body.truncate(PREFIX.len());
            body.extend_from_slice(b"\"\"");
        }
        body.push(b'}');
        Self::json(status, body)
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// Status line (always "HTTP/1.1"), Content-Type, Content-Length,
    /// `Connection: keep-alive` or `Connection: close`, extra headers, blank
    /// line, then the body unless `head_only` (HEAD responses still carry the
    /// real Content-Length).
    ///
    /// Statuses that cannot have content (1xx, 204, 304) get neither
    /// Content-Type, Content-Length nor body (RFC 9110 §8.6). The 101 of a
    /// WebSocket upgrade is not built here (`ws::handshake::response`).
    pub fn encode(&self, keep_alive: bool, head_only: bool, out: &mut Vec<u8>) {
        let has_content = !matches!(self.status, 100..=199 | 204 | 304);
        out.reserve(128 + self.body.len());

        out.extend_from_slice(b"HTTP/1.1 ");
        push_decimal(out, usize::from(self.status));
        out.push(b' ');
        out.extend_from_slice(reason(self.status).as_bytes());
        out.extend_from_slice(b"\r\n");

        if has_content {
            if !self.content_type.is_empty() {
                out.extend_from_slice(b"Content-Type: ");
                out.extend_from_slice(self.content_type.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"Content-Length: ");
            push_decimal(out, self.body.len());
            out.extend_from_slice(b"\r\n");
        }

        out.extend_from_slice(if keep_alive {
            b"Connection: keep-alive\r\n"
        } else {
            b"Connection: close\r\n"
        });

        for (name, value) in &self.headers {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            push_field_value(out, value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");

        if has_content && !head_only {
            out.extend_from_slice(&self.body);
        }
    }
}

/// A CR or LF in a header value would let whoever supplied it inject headers
/// or a whole response; they become spaces instead.
fn push_field_value(out: &mut Vec<u8>, value: &[u8]) {
    if value.iter().any(|&b| b == b'\r' || b == b'\n') {
        out.extend(
            value
                .iter()
                .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
        );
    } else {
        out.extend_from_slice(value);
    }
}

fn push_decimal(out: &mut Vec<u8>, mut n: usize) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Standard reason phrase (RFC 9110 wording); unknown codes get their
/// class name so the status line stays informative.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        203 => "Non-Authoritative Information",
        204 => "No Content",
        205 => "Reset Content",
        206 => "Partial Content",
        300 => "Multiple Choices",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        416 => "Range Not Satisfiable",
        417 => "Expectation Failed",
        421 => "Misdirected Request",
        422 => "Unprocessable Content",
        425 => "Too Early",
        426 => "Upgrade Required",
        428 => "Precondition Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        451 => "Unavailable For Legal Reasons",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => match status / 100 {
            1 => "Informational",
            2 => "Success",
            3 => "Redirection",
            4 => "Client Error",
            5 => "Server Error",
            _ => "Unknown",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(r: &Response, keep_alive: bool, head_only: bool) -> String {
        let mut out = Vec::new();
        r.encode(keep_alive, head_only, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn byte_exact_small_json() {
        let r = Response::json(200, b"{\"ok\":true}".to_vec());
        assert_eq!(
            encoded(&r, true, false),
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\nConnection: keep-alive\r\n\r\n{\"ok\":true}"
        );
        assert_eq!(
            encoded(&r, false, false),
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\nConnection: close\r\n\r\n{\"ok\":true}"
        );
    }

    #[test]
    fn head_only_keeps_length() {
        let r = Response::new(404, "text/plain", b"nope\n".to_vec());
        assert_eq!(
            encoded(&r, true, true),
            "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\n"
        );
    }

    #[test]
    fn extra_headers_and_append() {
        let r = Response::new(405, "", Vec::new())
            .with_header("Allow", "GET, POST")
            .with_header("X-Evil", "a\r\nSet-Cookie: x");
        let mut out = b"previous".to_vec();
        r.encode(false, false, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "previousHTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\nAllow: GET, POST\r\nX-Evil: a  Set-Cookie: x\r\n\r\n"
        );
    }

    #[test]
    fn bodyless_statuses() {
        let r = Response::new(204, "application/json", b"ignored".to_vec());
        assert_eq!(
            encoded(&r, true, false),
            "HTTP/1.1 204 No Content\r\nConnection: keep-alive\r\n\r\n"
        );
    }

    #[test]
    fn large_length_digits() {
        let r = Response::new(200, "application/octet-stream", vec![0; 1_234_567]);
        let mut out = Vec::new();
        r.encode(true, true, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("\r\nContent-Length: 1234567\r\n"), "{text}");
        let mut out = Vec::new();
        push_decimal(&mut out, usize::MAX);
        assert_eq!(out, usize::MAX.to_string().as_bytes());
        let mut out = Vec::new();
        push_decimal(&mut out, 0);
        assert_eq!(out, b"0");
    }

    #[test]
    fn error_json_escaping() {
        let r = Response::error(400, "bad \"thing\"\n\t\u{1}\\ é");
        assert_eq!(r.status, 400);
        assert_eq!(r.content_type, "application/json");
        assert_eq!(
            String::from_utf8(r.body.clone()).unwrap(),
            "{\"ok\":false,\"error\":\"bad \\\"thing\\\"\\n\\t\\u0001\\\\ é\"}"
        );
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["ok"], false);
        assert_eq!(v["error"], "bad \"thing\"\n\t\u{1}\\ é");
        assert_eq!(
            Response::error(500, "").body,
            b"{\"ok\":false,\"error\":\"\"}"
        );
    }

    #[test]
    fn reasons() {
        for (code, text) in [
            (100, "Continue"),
            (101, "Switching Protocols"),
            (200, "OK"),
            (204, "No Content"),
            (400, "Bad Request"),
            (401, "Unauthorized"),
            (403, "Forbidden"),
            (404, "Not Found"),
            (405, "Method Not Allowed"),
            (408, "Request Timeout"),
            (413, "Content Too Large"),
            (426, "Upgrade Required"),
            (431, "Request Header Fields Too Large"),
            (500, "Internal Server Error"),
            (501, "Not Implemented"),
            (503, "Service Unavailable"),
            (505, "HTTP Version Not Supported"),
            (299, "Success"),
            (499, "Client Error"),
            (42, "Unknown"),
        ] {
            assert_eq!(reason(code), text);
        }
        assert_eq!(CONTINUE, b"HTTP/1.1 100 Continue\r\n\r\n");
    }
}
