//! wspush: a WebSocket push server. `POST /send` publishes through a queue backend;
//! every node pushes what arrives to its matching WebSocket connections.
//!
//! Layers, outermost first: `config` (flags) → `server` (reactor, connections,
//! timers) → `http` and `ws` (pure protocol codecs) → `message` (the `/send` schema
//! and push encoding) → `hub` (who receives what) → `queue` (backends).

#[macro_use]
pub mod log;
pub mod auth;
pub mod config;

pub mod history;
pub mod http;
pub mod hub;
pub mod message;
pub mod queue;
pub mod server;
pub mod ws;
