//! Request-head parsing (request line + header fields) on top of `httparse`,
//! plus the framing rules (body length, keep-alive, 100-continue) and the
//! crate's error type.

use std::fmt;

use super::response::Response;

/// httparse needs a fixed array; 64 covers every real client with room to
/// spare, and more is treated as an oversized head rather than a syntax error.
const MAX_HEADERS: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Options,
    Other,
}

impl Method {
    /// Methods are case-sensitive (RFC 9110 §9.1), so `get` is `Other`.
    fn from_token(token: &str) -> Self {
        match token {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            "OPTIONS" => Method::Options,
            _ => Method::Other,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    /// No Content-Length and no Transfer-Encoding.
    None,
    /// An explicit Content-Length (`Content-Length: 0` stays `Length(0)`).
    Length(usize),
    Chunked,
}

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Upper bound on the head in bytes, leading empty lines included.
    pub max_head: usize,
    /// Upper bound on the decoded body in bytes.
    pub max_body: usize,
}

#[derive(Debug, Clone)]
pub struct Head {
    pub method: Method,
    /// Request target before '?' (or `*` for `OPTIONS *`).
    pub path: String,
    /// Raw text after '?', "" if none.
    pub query: String,
    pub version: Version,
    /// The header lines: every name (lowercased) and value (minus surrounding
    /// whitespace) copied into one buffer, and where each pair lies in it, so a
    /// request costs two allocations for its headers however many it has.
    fields: Vec<u8>,
    spans: Vec<Field>,
    pub body: BodyKind,
    /// HTTP/1.1: unless `Connection: close`; HTTP/1.0: only with `Connection: keep-alive`.
    pub keep_alive: bool,
    /// `Expect: 100-continue` on an HTTP/1.1 request.
    pub expect_continue: bool,
}

impl Head {
    /// First value of the header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.values(name).next()
    }

    /// All values of the header `name` joined with ", ", as RFC 9110 §5.3
    /// allows for list-valued fields split over several lines.
    pub fn header_joined(&self, name: &str) -> Option<Vec<u8>> {
        let mut values = self.values(name);
        let mut joined = values.next()?.to_vec();
        for value in values {
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(value);
        }
        Some(joined)
    }

    /// The value of a header that may appear once: lines repeating the same value
    /// count as one, lines that disagree are an error, since a proxy and this
    /// server might each believe a different one.
    pub fn header_single(&self, name: &str) -> Result<Option<&[u8]>, HttpError> {
        let mut values = self.values(name);
        let first = values.next();
        if values.any(|v| Some(v) != first) {
            return Err(bad(format!(
                "{name} given more than once with different values"
            )));
        }
        Ok(first)
    }

    /// Whether `token` appears in the comma-separated list carried by the
    /// (possibly repeated) header `name`, case-insensitively.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.values(name)
            .any(|value| list_items(value).any(|item| item.eq_ignore_ascii_case(token.as_bytes())))
    }

    /// Every header line in order: the name lowercased, the value trimmed.
    pub fn lines(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.spans
            .iter()
            .map(|f| (&self.fields[f.name()], &self.fields[f.value()]))
    }

    fn values<'h>(&'h self, name: &str) -> impl Iterator<Item = &'h [u8]> {
        // Names are stored lowercased and asked for in lowercase nearly always:
        // then a plain comparison does (a request asks for a dozen names).
        let lower = !name.bytes().any(|b| b.is_ascii_uppercase());
        self.spans
            .iter()
            .filter(move |f| {
                let stored = &self.fields[f.name()];
                if lower {
                    stored == name.as_bytes()
                } else {
                    stored.eq_ignore_ascii_case(name.as_bytes())
                }
            })
            .map(|f| &self.fields[f.value()])
    }
}

/// Where one header line's name and value lie in [`Head`]'s buffer: the name
/// from `start`, the value from `name_end` to `end`. `max_head` bounds the
/// buffer far below `u32::MAX`.
#[derive(Debug, Clone, Copy)]
struct Field {
    start: u32,
    name_end: u32,
    end: u32,
}

impl Field {
    fn name(self) -> std::ops::Range<usize> {
        self.start as usize..self.name_end as usize
    }

    fn value(self) -> std::ops::Range<usize> {
        self.name_end as usize..self.end as usize
    }
}

/// Everything that can go wrong while reading a request. Every variant means
/// the connection cannot be trusted any more: respond and close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    BadRequest(String),
    HeadTooLarge,
    BodyTooLarge,
    NotImplemented(String),
}

impl HttpError {
    /// The single mapping from errors to status codes.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::BadRequest(_) => 400,
            HttpError::HeadTooLarge => 431,
            HttpError::BodyTooLarge => 413,
            HttpError::NotImplemented(_) => 501,
        }
    }

    /// JSON error response; the caller should send it with `keep_alive =
    /// false` since the stream position is unknown after a framing error.
    pub fn response(&self) -> Response {
        Response::error(self.status(), &self.to_string())
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::BadRequest(what) => write!(f, "bad request: {what}"),
            HttpError::HeadTooLarge => f.write_str("request head too large"),
            HttpError::BodyTooLarge => f.write_str("request body too large"),
            HttpError::NotImplemented(what) => write!(f, "not implemented: {what}"),
        }
    }
}

impl std::error::Error for HttpError {}

fn bad(what: impl Into<String>) -> HttpError {
    HttpError::BadRequest(what.into())
}

/// Parse a request head from the front of `buf`. Ok(None): incomplete, read
/// more. Ok(Some((head, n))): the head took n bytes; the body (if any)
/// starts at buf[n].
pub fn parse_head(buf: &[u8], limits: &Limits) -> Result<Option<(Head, usize)>, HttpError> {
    // RFC 9112 §2.2: ignore empty lines before the request line (some
    // clients send a stray CRLF after a POST body).
    let mut start = 0;
    loop {
        match buf.get(start..) {
            Some([b'\n', ..]) => start += 1,
            Some([b'\r', b'\n', ..]) => start += 2,
            Some([b'\r']) => return incomplete(buf, limits),
            Some([b'\r', ..]) => return Err(bad("invalid new line")),
            _ => break,
        }
    }

    // The caller re-parses the whole buffer after every read, so the
    // not-yet-complete case must stay cheap: look for the blank line with a
    // plain byte scan bounded by max_head, and only then run httparse.
    let window = &buf[..buf.len().min(limits.max_head)];
    let Some(end) = find_head_end(window, start) else {
        check_method_prefix(&buf[start..])?;
        return incomplete(buf, limits);
    };

    let mut header_buf = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut header_buf);
    let parsed = match req.parse(&buf[start..end]) {
        Ok(httparse::Status::Complete(len)) => start + len,
        // The blank line is in the slice, so httparse can only be short of
        // data if it disagrees with our scan about where the head ends.
        Ok(httparse::Status::Partial) => return Err(bad("malformed request head")),
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::HeadTooLarge),
        Err(e) => return Err(bad(e.to_string())),
    };

    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(bad("incomplete request line"));
    };
    let method = Method::from_token(method);
    let version = match minor {
        0 => Version::Http10,
        _ => Version::Http11,
    };

    // Only origin-form (and asterisk-form for OPTIONS) is served; absolute-
    // and authority-form are for proxies.
    if !(target.starts_with('/') || (target == "*" && method == Method::Options)) {
        return Err(bad("invalid request target"));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));

    let mut fields = Vec::with_capacity(end - start);
    let mut spans = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let start = fields.len() as u32;
        fields.extend(h.name.bytes().map(|b| b.to_ascii_lowercase()));
        let name_end = fields.len() as u32;
        fields.extend_from_slice(trim_ows(h.value));
        spans.push(Field {
            start,
            name_end,
            end: fields.len() as u32,
        });
    }

    let mut head = Head {
        method,
        path: path.to_owned(),
        query: query.to_owned(),
        version,
        fields,
        spans,
        body: BodyKind::None,
        keep_alive: false,
        expect_continue: false,
    };
    check_host(&head)?;
    head.body = body_kind(&head, limits)?;
    head.keep_alive = match version {
        Version::Http11 => !head.has_token("connection", "close"),
        Version::Http10 => {
            head.has_token("connection", "keep-alive") && !head.has_token("connection", "close")
        }
    };
    // RFC 9110 §10.1.1: a 100-continue expectation on HTTP/1.0 must be ignored.
    head.expect_continue = version == Version::Http11 && head.has_token("expect", "100-continue");

    Ok(Some((head, parsed)))
}

fn incomplete<T>(buf: &[u8], limits: &Limits) -> Result<Option<T>, HttpError> {
    if buf.len() > limits.max_head {
        Err(HttpError::HeadTooLarge)
    } else {
        Ok(None)
    }
}

/// Offset just past the first empty line at or after `from`. httparse
/// accepts bare-LF line endings, so the scan accepts both "\n\n" and
/// "\n\r\n" as the terminator to agree with it.
fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while let Some(off) = buf.get(i..)?.iter().position(|&b| b == b'\n') {
        let nl = i + off;
        match buf.get(nl + 1..) {
            Some([b'\n', ..]) => return Some(nl + 2),
            Some([b'\r', b'\n', ..]) => return Some(nl + 3),
            _ => i = nl + 1,
        }
    }
    None
}

/// Reject non-HTTP traffic (a TLS ClientHello, binary junk) from the first
/// bytes instead of buffering up to max_head waiting for a blank line.
fn check_method_prefix(rest: &[u8]) -> Result<(), HttpError> {
    for &b in rest {
        if b == b' ' {
            return Ok(());
        }
        if !is_tchar(b) {
            return Err(bad("invalid method"));
        }
    }
    Ok(())
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// Non-empty, trimmed items of a comma-separated field value.
fn list_items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(trim_ows)
        .filter(|item| !item.is_empty())
}

/// RFC 9112 §3.2: an HTTP/1.1 request without Host, or any request with more than
/// one Host line, is answered 400. HTTP/1.0 predates Host and may omit it.
fn check_host(head: &Head) -> Result<(), HttpError> {
    match (head.values("host").count(), head.version) {
        (0, Version::Http11) => Err(bad("missing Host header")),
        (0 | 1, _) => Ok(()),
        _ => Err(bad("more than one Host header")),
    }
}

/// Message framing per RFC 9112 §6. Ambiguous framing is refused outright
/// because a front proxy may have read it differently (request smuggling).
fn body_kind(head: &Head, limits: &Limits) -> Result<BodyKind, HttpError> {
    let has_te = head.header("transfer-encoding").is_some();
    let has_cl = head.header("content-length").is_some();
    if has_te && has_cl {
        return Err(bad("both Transfer-Encoding and Content-Length"));
    }

    if has_te {
        let mut codings = 0;
        let mut chunked = false;
        for value in head.values("transfer-encoding") {
            for coding in list_items(value) {
                codings += 1;
                if !coding.eq_ignore_ascii_case(b"chunked") {
                    // Any coding we would have to undo ourselves, even when
                    // chunked is applied last.
                    let name = String::from_utf8_lossy(coding);
                    return Err(HttpError::NotImplemented(format!(
                        "transfer coding \"{name}\""
                    )));
                }
                chunked = true;
            }
        }
        if !chunked {
            return Err(bad("empty Transfer-Encoding"));
        }
        if codings > 1 {
            return Err(bad("chunked applied more than once"));
        }
        if head.version == Version::Http10 {
            return Err(bad("chunked Transfer-Encoding on HTTP/1.0"));
        }
        return Ok(BodyKind::Chunked);
    }

    let mut length: Option<usize> = None;
    for value in head.values("content-length") {
        let parsed = parse_decimal(value).ok_or_else(|| bad("invalid Content-Length"))?;
        match length {
            Some(prev) if prev != parsed => return Err(bad("conflicting Content-Length")),
            _ => length = Some(parsed),
        }
    }
    match length {
        None => Ok(BodyKind::None),
        Some(n) if n > limits.max_body => Err(HttpError::BodyTooLarge),
        Some(n) => Ok(BodyKind::Length(n)),
    }
}

/// 1*DIGIT; values beyond usize saturate, which any body limit then rejects.
fn parse_decimal(v: &[u8]) -> Option<usize> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0usize, |acc, &d| {
        acc.saturating_mul(10).saturating_add(usize::from(d - b'0'))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_head: 8192,
        max_body: 1 << 20,
    };

    fn parse(buf: &[u8]) -> Result<Option<(Head, usize)>, HttpError> {
        parse_head(buf, &LIMITS)
    }

    fn complete(buf: &[u8]) -> (Head, usize) {
        match parse(buf) {
            Ok(Some(r)) => r,
            other => panic!("expected a complete head, got {other:?}"),
        }
    }

    fn err(buf: &[u8]) -> HttpError {
        match parse(buf) {
            Err(e) => e,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    fn is_bad(buf: &[u8]) -> bool {
        matches!(parse(buf), Err(HttpError::BadRequest(_)))
    }

    const AB_POST: &[u8] = b"POST /send HTTP/1.0\r\nContent-length: 12\r\nContent-type: application/json\r\nHost: localhost:3210\r\nUser-Agent: ApacheBench/2.3\r\nAccept: */*\r\n\r\n";
    const AB_POST_KA: &[u8] = b"POST /send HTTP/1.0\r\nConnection: Keep-Alive\r\nContent-length: 12\r\nContent-type: application/json\r\nHost: localhost:3210\r\nUser-Agent: ApacheBench/2.3\r\nAccept: */*\r\n\r\n";

    #[test]
    fn simple_get() {
        let buf =
            b"GET /sub/x?topic=a%20b&x=1 HTTP/1.1\r\nHost: h\r\nX-Thing:  spaced value \t\r\n\r\n";
        let (head, n) = complete(buf);
        assert_eq!(n, buf.len());
        assert_eq!(head.method, Method::Get);
        assert_eq!(head.path, "/sub/x");
        assert_eq!(head.query, "topic=a%20b&x=1");
        assert_eq!(head.version, Version::Http11);
        assert_eq!(head.body, BodyKind::None);
        assert!(head.keep_alive);
        assert!(!head.expect_continue);
        assert_eq!(head.lines().nth(1).unwrap().0, b"x-thing");
        assert_eq!(head.header("X-THING"), Some(&b"spaced value"[..]));
        assert_eq!(head.header("host"), Some(&b"h"[..]));
        assert_eq!(head.header("missing"), None);
    }

    #[test]
    fn methods() {
        for (text, m) in [
            ("GET", Method::Get),
            ("HEAD", Method::Head),
            ("POST", Method::Post),
            ("PUT", Method::Put),
            ("DELETE", Method::Delete),
            ("OPTIONS", Method::Options),
            ("PATCH", Method::Other),
            ("get", Method::Other),
        ] {
            let buf = format!("{text} / HTTP/1.1\r\nHost: h\r\n\r\n");
            assert_eq!(complete(buf.as_bytes()).0.method, m, "{text}");
        }
    }

    #[test]
    fn every_split_point() {
        let buf = b"POST /send?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nConnection: keep-alive, Upgrade\r\n\r\nabc";
        let head_len = buf.len() - 3;
        for i in 0..head_len {
            assert!(matches!(parse(&buf[..i]), Ok(None)), "prefix of {i} bytes");
        }
        let (full, n) = complete(buf);
        assert_eq!(n, head_len);
        for i in head_len..=buf.len() {
            let (head, n) = complete(&buf[..i]);
            assert_eq!(n, head_len);
            assert_eq!(head.path, full.path);
            assert_eq!(head.query, full.query);
            assert!(head.lines().eq(full.lines()));
            assert_eq!(head.body, BodyKind::Length(3));
        }
    }

    #[test]
    fn pipelined() {
        let first = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
        let second = b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n";
        let buf = [&first[..], &second[..]].concat();
        let (head, n) = complete(&buf);
        assert_eq!(head.path, "/a");
        assert_eq!(n, first.len());
        let (head, m) = complete(&buf[n..]);
        assert_eq!(head.path, "/b");
        assert_eq!(n + m, buf.len());
    }

    #[test]
    fn apachebench_http10() {
        let (head, n) = complete(AB_POST);
        assert_eq!(n, AB_POST.len());
        assert_eq!(head.method, Method::Post);
        assert_eq!(head.version, Version::Http10);
        assert_eq!(head.body, BodyKind::Length(12));
        assert!(!head.keep_alive);
        assert_eq!(head.header("content-type"), Some(&b"application/json"[..]));

        let (head, n) = complete(AB_POST_KA);
        assert_eq!(n, AB_POST_KA.len());
        assert_eq!(head.body, BodyKind::Length(12));
        assert!(head.keep_alive);

        let (head, _) = complete(b"GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n");
        assert!(!head.keep_alive);
    }

    #[test]
    fn http11_keep_alive_and_tokens() {
        let (head, _) = complete(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Close\r\n\r\n");
        assert!(!head.keep_alive);

        let (head, _) = complete(
            b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n",
        );
        assert!(head.keep_alive);
        assert!(head.has_token("connection", "upgrade"));
        assert!(head.has_token("Connection", "KEEP-ALIVE"));
        assert!(!head.has_token("connection", "close"));
        assert!(!head.has_token("connection", "keep"));
        assert!(head.has_token("upgrade", "WebSocket"));

        let (head, _) =
            complete(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive\r\nconnection: ,Upgrade ,\r\n\r\n");
        assert!(head.has_token("connection", "upgrade"));
        assert_eq!(head.header("connection"), Some(&b"keep-alive"[..]));
        assert_eq!(
            head.header_joined("CONNECTION").as_deref(),
            Some(&b"keep-alive, ,Upgrade ,"[..])
        );
        assert_eq!(head.header_joined("upgrade"), None);
    }

    #[test]
    fn single_headers_refuse_disagreeing_lines() {
        let (head, _) = complete(
            b"GET / HTTP/1.1\r\nHost: h\r\nX-Real-IP: 1.2.3.4\r\nx-real-ip: 1.2.3.4\r\nX-A: 1\r\nX-A: 2\r\n\r\n",
        );
        assert_eq!(head.header_single("X-Real-IP"), Ok(Some(&b"1.2.3.4"[..])));
        assert_eq!(head.header_single("x-missing"), Ok(None));
        let e = head.header_single("x-a").unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(e.to_string().contains("x-a"), "{e}");
    }

    #[test]
    fn expect_continue() {
        let (head, _) = complete(
            b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n",
        );
        assert!(head.expect_continue);
        let (head, _) =
            complete(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n");
        assert!(!head.expect_continue);
    }

    fn head_of_len(len: usize) -> Vec<u8> {
        let base = b"GET / HTTP/1.1\r\nHost: h\r\nX: \r\n\r\n".len();
        let mut v = b"GET / HTTP/1.1\r\nHost: h\r\nX: ".to_vec();
        v.resize(len - 4, b'a');
        v.extend_from_slice(b"\r\n\r\n");
        assert!(len >= base);
        assert_eq!(v.len(), len);
        v
    }

    #[test]
    fn head_limit_boundary() {
        let exact = head_of_len(8192);
        let (_, n) = complete(&exact);
        assert_eq!(n, 8192);
        assert_eq!(err(&head_of_len(8193)), HttpError::HeadTooLarge);

        // Incomplete: fine up to the limit, rejected one byte past it.
        let partial = &head_of_len(9000)[..8193];
        assert!(matches!(parse(&partial[..8192]), Ok(None)));
        assert_eq!(err(partial), HttpError::HeadTooLarge);

        // A complete head within the limit followed by lots of body is fine.
        let mut with_body = exact.clone();
        with_body.extend_from_slice(&[b'x'; 10_000]);
        assert_eq!(complete(&with_body).1, 8192);

        // Leading empty lines count toward the limit.
        let mut padded = b"\r\n".to_vec();
        padded.extend_from_slice(&head_of_len(8191));
        assert_eq!(err(&padded), HttpError::HeadTooLarge);
    }

    #[test]
    fn too_many_headers() {
        let mut ok = b"GET / HTTP/1.1\r\nHost: h\r\n".to_vec();
        for i in 0..63 {
            ok.extend_from_slice(format!("h{i}: v\r\n").as_bytes());
        }
        let mut over = ok.clone();
        ok.extend_from_slice(b"\r\n");
        assert_eq!(complete(&ok).0.lines().count(), 64);
        over.extend_from_slice(b"h63: v\r\n\r\n");
        assert_eq!(err(&over), HttpError::HeadTooLarge);
    }

    #[test]
    fn leading_empty_lines() {
        let buf = b"\r\n\n\r\nGET /x HTTP/1.1\r\nHost: h\r\n\r\n";
        let (head, n) = complete(buf);
        assert_eq!(head.path, "/x");
        assert_eq!(n, buf.len());
        assert!(matches!(parse(b"\r"), Ok(None)));
        assert!(matches!(parse(b"\r\n\r\n"), Ok(None)));
        assert!(is_bad(b"\rGET / HTTP/1.1\r\nHost: h\r\n\r\n"));
        assert!(matches!(parse(b""), Ok(None)));
        assert_eq!(err(&[b'\n'; 8193]), HttpError::HeadTooLarge);
    }

    #[test]
    fn bare_lf_head() {
        let (head, n) = complete(b"GET /lf HTTP/1.1\nHost: a\n\nrest");
        assert_eq!(head.path, "/lf");
        assert_eq!(n, 26);
    }

    #[test]
    fn syntax_errors() {
        assert!(is_bad(b"GET / HTTP/2.0\r\n\r\n"));
        assert!(is_bad(b"GET / FOO\r\n\r\n"));
        assert!(is_bad(b"GET /a b HTTP/1.1\r\nHost: h\r\n\r\n"));
        assert!(is_bad(b"GET / HTTP/1.1\r\nHost: h\r\nBad Name: x\r\n\r\n"));
        assert!(is_bad(b"GET / HTTP/1.1\r\nHost: h\r\nName : x\r\n\r\n"));
        assert!(is_bad(b"GET / HTTP/1.1\r\nHost: h\r\nNoColon\r\n\r\n"));
        assert!(is_bad(b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x01b\r\n\r\n"));
        assert!(is_bad(b"GET / HTTP/1.1\r\nHost: h\r\n folded: x\r\n\r\n"));
        assert!(is_bad(b"G(T / HTTP/1.1\r\nHost: h\r\n\r\n"));
        // Non-HTTP bytes are refused before any blank line shows up.
        assert!(is_bad(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"));
        assert!(matches!(parse(b"GE"), Ok(None)));
        let HttpError::BadRequest(msg) = err(b"GET / HTTP/1.1\r\nHost: h\r\nBad Name: x\r\n\r\n")
        else {
            unreachable!()
        };
        assert!(msg.contains("header name"), "{msg}");
    }

    #[test]
    fn request_target() {
        assert!(is_bad(
            b"GET http://example.com/ HTTP/1.1\r\nHost: h\r\n\r\n"
        ));
        assert!(is_bad(b"GET example.com:80 HTTP/1.1\r\nHost: h\r\n\r\n"));
        assert!(is_bad(b"GET * HTTP/1.1\r\nHost: h\r\n\r\n"));
        assert!(is_bad(b"OPTIONS *x HTTP/1.1\r\nHost: h\r\n\r\n"));
        let (head, _) = complete(b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!((head.path.as_str(), head.query.as_str()), ("*", ""));
        let (head, _) = complete(b"GET /p?a=1?b HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!((head.path.as_str(), head.query.as_str()), ("/p", "a=1?b"));
        let (head, _) = complete(b"GET /p? HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!((head.path.as_str(), head.query.as_str()), ("/p", ""));
    }

    #[test]
    fn content_length() {
        let cl = |v: &str| parse(format!("POST / HTTP/1.1\r\nHost: h\r\n{v}\r\n\r\n").as_bytes());
        assert_eq!(
            cl("Content-Length: 0").unwrap().unwrap().0.body,
            BodyKind::Length(0)
        );
        assert_eq!(
            cl("Content-Length: 007").unwrap().unwrap().0.body,
            BodyKind::Length(7)
        );
        assert_eq!(
            cl("Content-Length: 5\r\ncontent-length: 5")
                .unwrap()
                .unwrap()
                .0
                .body,
            BodyKind::Length(5)
        );
        for bad_value in ["", "+5", "-1", "5a", "0x10", "5, 5", "5 5", "1e3"] {
            assert!(
                matches!(
                    cl(&format!("Content-Length: {bad_value}")),
                    Err(HttpError::BadRequest(_))
                ),
                "{bad_value:?}"
            );
        }
        assert!(matches!(
            cl("Content-Length: 5\r\nContent-Length: 6"),
            Err(HttpError::BadRequest(_))
        ));
        assert_eq!(
            cl(&format!("Content-Length: {}", LIMITS.max_body))
                .unwrap()
                .unwrap()
                .0
                .body,
            BodyKind::Length(LIMITS.max_body)
        );
        assert_eq!(
            cl(&format!("Content-Length: {}", LIMITS.max_body + 1)).err(),
            Some(HttpError::BodyTooLarge)
        );
        assert_eq!(
            cl("Content-Length: 99999999999999999999999999999999").err(),
            Some(HttpError::BodyTooLarge)
        );
    }

    #[test]
    fn transfer_encoding() {
        let te = |v: &str| parse(format!("POST / HTTP/1.1\r\nHost: h\r\n{v}\r\n\r\n").as_bytes());
        assert_eq!(
            te("Transfer-Encoding: chunked").unwrap().unwrap().0.body,
            BodyKind::Chunked
        );
        assert_eq!(
            te("transfer-encoding: Chunked").unwrap().unwrap().0.body,
            BodyKind::Chunked
        );
        assert!(matches!(
            te("Transfer-Encoding: gzip"),
            Err(HttpError::NotImplemented(_))
        ));
        assert!(matches!(
            te("Transfer-Encoding: gzip, chunked"),
            Err(HttpError::NotImplemented(_))
        ));
        assert!(matches!(
            te("Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked"),
            Err(HttpError::NotImplemented(_))
        ));
        assert!(matches!(
            te("Transfer-Encoding: chunked, identity"),
            Err(HttpError::NotImplemented(_))
        ));
        assert!(matches!(
            te("Transfer-Encoding: chunked, chunked"),
            Err(HttpError::BadRequest(_))
        ));
        assert!(matches!(
            te("Transfer-Encoding: "),
            Err(HttpError::BadRequest(_))
        ));
        assert!(matches!(
            te("Transfer-Encoding: chunked\r\nContent-Length: 3"),
            Err(HttpError::BadRequest(_))
        ));
        assert!(matches!(
            te("Content-Length: 3\r\nTransfer-Encoding: gzip"),
            Err(HttpError::BadRequest(_))
        ));
        assert!(is_bad(
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
    }

    #[test]
    fn host_is_required_once_on_http11_and_at_most_once_on_http10() {
        let msg = |buf: &[u8]| match err(buf) {
            HttpError::BadRequest(m) => m,
            e => panic!("{e:?}"),
        };
        assert_eq!(msg(b"GET / HTTP/1.1\r\n\r\n"), "missing Host header");
        assert_eq!(
            msg(b"GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n"),
            "more than one Host header"
        );
        assert_eq!(
            msg(b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n"),
            "more than one Host header"
        );
        complete(b"GET / HTTP/1.0\r\n\r\n");
        complete(b"GET / HTTP/1.0\r\nHost: a\r\n\r\n");
        // An empty Host is allowed when the target URI has no authority (RFC 9112 §3.2).
        complete(b"GET / HTTP/1.1\r\nHost:\r\n\r\n");
    }

    #[test]
    fn error_mapping() {
        let cases = [
            (HttpError::BadRequest("x".into()), 400),
            (HttpError::HeadTooLarge, 431),
            (HttpError::BodyTooLarge, 413),
            (HttpError::NotImplemented("y".into()), 501),
        ];
        for (e, status) in cases {
            assert_eq!(e.status(), status);
            let r = e.response();
            assert_eq!(r.status, status);
            assert_eq!(r.content_type, "application/json");
            let expected = format!("{{\"ok\":false,\"error\":\"{e}\"}}");
            assert_eq!(r.body, expected.as_bytes());
        }
        assert_eq!(
            HttpError::BadRequest("invalid Content-Length".into()).to_string(),
            "bad request: invalid Content-Length"
        );
    }

    #[test]
    fn never_panics_on_junk() {
        // Cheap deterministic fuzz: every byte value at every position of a
        // small valid request.
        let base = b"POST /a?b HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n";
        for i in 0..base.len() {
            for b in 0..=255u8 {
                let mut v = base.to_vec();
                v[i] = b;
                let _ = parse(&v);
                let _ = parse(&v[..i]);
            }
        }
        let tiny = Limits {
            max_head: 0,
            max_body: 0,
        };
        assert_eq!(
            parse_head(b"G", &tiny).unwrap_err(),
            HttpError::HeadTooLarge
        );
        assert!(matches!(parse_head(b"", &tiny), Ok(None)));
    }
}
