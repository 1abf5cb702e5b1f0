//! HTTP/1.x wire layer: request-head parsing, chunked-body decoding, query
//! decoding, response encoding and Server-Sent Events. Pure byte-in/value-out code, no I/O.

pub mod chunked;
pub mod query;
pub mod request;
pub mod response;
pub mod sse;

pub use chunked::ChunkedDecoder;
pub use request::{BodyKind, Head, HttpError, Limits, Method, Version, parse_head};
pub use response::{CONTINUE, Response, reason};

/// The value of one hexadecimal digit (chunk sizes, %-escapes).
fn hex_val(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}
