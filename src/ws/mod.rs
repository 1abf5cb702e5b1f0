//! RFC 6455 (version 13), server side: the opening handshake, the frame codec and
//! message assembly. Pure byte-level code with no I/O; `server` drives it.

pub mod assembler;
pub mod deflate;
pub mod frame;
pub mod handshake;
pub mod utf8;
