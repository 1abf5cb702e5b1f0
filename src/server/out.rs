//! A connection's unsent output: a queue of chunks and the one write loop.
//!
//! Push frames are `Arc`-shared with every other receiver of the same message, so
//! a backlog costs a pointer per message, not a copy.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::sync::Arc;

/// An output chunk: shared push frames or bytes owned by this connection.
pub enum Chunk {
    Shared(Arc<[u8]>),
    Owned(Vec<u8>),
}

impl Chunk {
    pub(super) fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Shared(b) => b,
            Chunk::Owned(b) => b,
        }
    }
}

/// Unsent output. `head_off` bytes of the first chunk are already written.
#[derive(Default)]
pub struct OutQueue {
    chunks: VecDeque<Chunk>,
    head_off: usize,
    bytes: usize,
}

/// How many chunks one vectored write takes.
pub(super) const IOV_MAX: usize = 64;

impl OutQueue {
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub(super) fn push(&mut self, chunk: Chunk, already_written: usize) {
        let len = chunk.bytes().len() - already_written;
        if self.chunks.is_empty() {
            self.head_off = already_written;
        }
        self.bytes += len;
        self.chunks.push_back(chunk);
    }

    /// Drops everything not yet started, keeping a partly written chunk so the peer
    /// never sees half a frame followed by another frame. Returns how many shared
    /// (push) chunks were dropped.
    pub fn discard_unstarted(&mut self) -> u64 {
        let keep = usize::from(self.head_off > 0).min(self.chunks.len());
        let dropped = self
            .chunks
            .drain(keep..)
            .filter(|c| matches!(c, Chunk::Shared(_)))
            .count() as u64;
        self.bytes = self
            .chunks
            .front()
            .map_or(0, |c| c.bytes().len() - self.head_off);
        if self.chunks.is_empty() {
            self.chunks = VecDeque::new();
        }
        dropped
    }

    /// Push chunks that never started to be written.
    pub fn unsent_pushes(&self) -> u64 {
        let skip = usize::from(self.head_off > 0);
        self.chunks
            .iter()
            .skip(skip)
            .filter(|c| matches!(c, Chunk::Shared(_)))
            .count() as u64
    }

    /// Writes until the queue is empty or the socket would block.
    pub(super) fn flush<W: Write>(&mut self, sock: &mut W) -> io::Result<()> {
        while !self.chunks.is_empty() {
            let mut slices = [IoSlice::new(&[]); IOV_MAX];
            let mut n = 0;
            for (i, c) in self.chunks.iter().take(IOV_MAX).enumerate() {
                let b = c.bytes();
                slices[n] = IoSlice::new(if i == 0 { &b[self.head_off..] } else { b });
                n += 1;
            }
            match write_some(sock, &slices[..n])? {
                0 => return Ok(()),
                written => self.advance(written),
            }
        }
        // An emptied queue gives its memory back: idle connections hold no buffers.
        self.chunks = VecDeque::new();
        Ok(())
    }

    fn advance(&mut self, mut written: usize) {
        self.bytes -= written;
        while written > 0 {
            let Some(front) = self.chunks.front() else {
                break;
            };
            let left = front.bytes().len() - self.head_off;
            if written >= left {
                written -= left;
                self.head_off = 0;
                self.chunks.pop_front();
            } else {
                self.head_off += written;
                written = 0;
            }
        }
    }
}

/// The one write to a socket, retried when interrupted: one buffer goes as a
/// plain write (`send`), several as a vectored one (`writev`). On a socket `send`
/// skips the file layer `writev` takes (position lock, iovec import), which is a
/// tenth of the kernel's cost of a small push on loopback, and a broadcast is one
/// such write per receiver. `Ok(0)` means the socket takes nothing more now.
pub(super) fn write_some<W: Write>(sock: &mut W, slices: &[IoSlice<'_>]) -> io::Result<usize> {
    loop {
        let written = match slices {
            [one] => sock.write(one),
            _ => sock.write_vectored(slices),
        };
        match written {
            Ok(0) if slices.iter().any(|s| !s.is_empty()) => {
                return Err(io::ErrorKind::WriteZero.into());
            }
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The socket has failed or the peer is gone: the connection must be closed.
#[derive(Debug)]
pub struct Broken(pub io::Error);

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket that takes at most `room` bytes, then would block.
    struct Tight {
        room: usize,
        got: Vec<u8>,
    }

    impl Write for Tight {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            self.got.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn partial_writes_resume_where_they_stopped() {
        let shared: Arc<[u8]> = Arc::from(&b"abcdef"[..]);
        let mut q = OutQueue::default();
        q.push(Chunk::Shared(shared.clone()), 2);
        q.push(Chunk::Owned(b"XYZ".to_vec()), 0);
        q.push(Chunk::Shared(shared), 0);
        assert_eq!(q.bytes(), 4 + 3 + 6);
        let mut s = Tight {
            room: 5,
            got: vec![],
        };
        q.flush(&mut s).unwrap();
        assert_eq!(s.got, b"cdefX");
        assert_eq!(q.bytes(), 8);
        s.room = 100;
        q.flush(&mut s).unwrap();
        assert_eq!(s.got, b"cdefXYZabcdef");
        assert!(q.is_empty());
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn discarding_keeps_a_started_frame_whole() {
        let f: Arc<[u8]> = Arc::from(&b"frame"[..]);
        let mut q = OutQueue::default();
        q.push(Chunk::Shared(f.clone()), 3);
        q.push(Chunk::Shared(f.clone()), 0);
        q.push(Chunk::Owned(b"pong".to_vec()), 0);
        q.push(Chunk::Shared(f), 0);
        assert_eq!(q.unsent_pushes(), 2);
        assert_eq!(q.discard_unstarted(), 2);
        assert_eq!(q.bytes(), 2);
        let mut s = Tight {
            room: 100,
            got: vec![],
        };
        q.flush(&mut s).unwrap();
        assert_eq!(s.got, b"me");
    }
}
