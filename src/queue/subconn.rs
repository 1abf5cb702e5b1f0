//! A subscriber's connection to one Redis Cluster primary, in sharded pub/sub mode.
//!
//! The `redis` crate's connection counts a read that timed out as a reply still
//! owed and skips the next value it reads, which a subscriber polling with short
//! timeouts cannot afford (it would drop messages), and its `PubSub` has no
//! `SSUBSCRIBE`. So this connection keeps its own input buffer: a read that times
//! out loses nothing, and only complete RESP2 values ([`frame_len`]) are handed to
//! the crate's parser.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use ::redis::Value;

/// The most bytes one value may take: a shard message is a wire batch, bounded by
/// `-max-batch` messages of bounded size; this only guards against a broken peer.
const MAX_VALUE: usize = 64 << 20;

/// Bytes that are not RESP2.
#[derive(Debug, PartialEq, Eq)]
pub struct NotResp;

/// Where a RESP2 value starting at `buf[at..]` ends, if it is complete.
pub fn frame_len(buf: &[u8], at: usize) -> Result<Option<usize>, NotResp> {
    let Some(kind) = buf.get(at) else {
        return Ok(None);
    };
    let Some(nl) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let line = &buf[at + 1..at + nl];
    let after = at + nl + 2;
    let number = || -> Result<i64, NotResp> {
        std::str::from_utf8(line)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or(NotResp)
    };
    match kind {
        b'+' | b'-' | b':' => Ok(Some(after)),
        b'$' => {
            let n = number()?;
            if n < 0 {
                return Ok(Some(after));
            }
            let end = after + usize::try_from(n).map_err(|_| NotResp)? + 2;
            Ok((buf.len() >= end).then_some(end))
        }
        b'*' => {
            let n = number()?;
            let mut end = after;
            for _ in 0..n.max(0) {
                match frame_len(buf, end)? {
                    Some(e) => end = e,
                    None => return Ok(None),
                }
            }
            Ok(Some(end))
        }
        _ => Err(NotResp),
    }
}

pub struct SubConn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Bytes of `buf` already handed out.
    start: usize,
}

impl SubConn {
    /// `addr` is `HOST:PORT`.
    pub fn connect(addr: &str, timeout: Duration) -> io::Result<SubConn> {
        let sock = addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))?;
        let stream = TcpStream::connect_timeout(&sock, timeout)?;
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(SubConn {
            stream,
            buf: Vec::new(),
            start: 0,
        })
    }

    /// `AUTH [user] pass` before anything else, as the plain connections of the
    /// same node do; a refusal is an error.
    pub fn auth(&mut self, user: Option<&str>, pass: &str, timeout: Duration) -> io::Result<()> {
        let mut cmd = ::redis::cmd("AUTH");
        if let Some(user) = user {
            cmd.arg(user);
        }
        cmd.arg(pass);
        self.send(&cmd)?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            match self.next(left)? {
                Some(Value::Okay) => return Ok(()),
                Some(Value::ServerError(e)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!("AUTH refused: {}", e.details().unwrap_or("")),
                    ));
                }
                Some(other) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("AUTH answered {other:?}"),
                    ));
                }
                None => {}
            }
        }
    }

    pub fn send(&mut self, cmd: &::redis::Cmd) -> io::Result<()> {
        self.stream.write_all(&cmd.get_packed_command())
    }

    /// Several commands in one write (their replies come in order).
    pub fn send_all(&mut self, cmds: &[::redis::Cmd]) -> io::Result<()> {
        let mut out = Vec::new();
        for c in cmds {
            out.extend_from_slice(&c.get_packed_command());
        }
        self.stream.write_all(&out)
    }

    /// The next value, waiting at most `wait`; `None` when none came whole.
    pub fn next(&mut self, wait: Duration) -> io::Result<Option<Value>> {
        loop {
            let bad = || io::Error::new(io::ErrorKind::InvalidData, "not RESP");
            if let Some(end) = frame_len(&self.buf, self.start).map_err(|_| bad())? {
                let v =
                    ::redis::parse_redis_value(&self.buf[self.start..end]).map_err(|_| bad())?;
                self.start = end;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
                return Ok(Some(v));
            }
            if self.buf.len() - self.start > MAX_VALUE {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "value too long"));
            }
            self.buf.drain(..self.start);
            self.start = 0;
            self.stream.set_read_timeout(Some(wait))?;
            let mut chunk = [0u8; 16 << 10];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None);
                }
                // A signal (SIGSTOP/SIGCONT of the process): read again.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_values_are_taken() {
        let msg = b"*3\r\n$8\r\nsmessage\r\n$2\r\nch\r\n$5\r\nhello\r\n";
        assert_eq!(frame_len(msg, 0), Ok(Some(msg.len())));
        for cut in 0..msg.len() {
            assert_eq!(frame_len(&msg[..cut], 0), Ok(None), "cut at {cut}");
        }
        assert_eq!(frame_len(b"+PONG\r\n:1\r\n", 7), Ok(Some(11)));
        assert_eq!(frame_len(b"$-1\r\n", 0), Ok(Some(5)));
        assert_eq!(frame_len(b"?x\r\n", 0), Err(NotResp));
    }
}
