//! What each URL does: the routing table of PROTOCOL.md.
//!
//! Handlers see a whole request (head and body) and return an [`Action`]; the
//! reactor performs it. Nothing here touches a socket.

use serde::Deserialize;

use super::stats::{self, Snapshot};
use super::{Action, Server, refusal_response};
use crate::auth::{self, Refusal};
use crate::http::query;
use crate::http::request::{Head, HttpError, Method};
use crate::http::response::Response;
use crate::hub::{self, TypeSet};
use crate::message::{self, MAX_UID_LEN, unix_now};
use crate::ws::handshake::{self, UpgradeHeaders};

const DEMO_PAGE: &[u8] = include_bytes!("../../demo/socket.html");
const DEMO_CLIENT: &[u8] = include_bytes!("../../demo/wspush.js");

impl Server {
    /// Checks that need only the head, made before any body is read: the API key
    /// guards publishing and the figures.
    pub(super) fn precheck(&self, head: &Head) -> Option<Refusal> {
        let key = self.cfg.api_key.as_ref()?;
        let guarded = matches!(head.path.as_str(), "/send" | "/stats" | "/metrics");
        if !guarded {
            return None;
        }
        auth::check_api_key(key.as_bytes(), head.header("authorization")).err()
    }

    pub(super) fn route(&mut self, key: usize, head: &Head, body: &[u8]) -> Action {
        let get = matches!(head.method, Method::Get | Method::Head);
        let respond = Action::Respond;
        match head.path.as_str() {
            "/ws" if head.method == Method::Get => self.handshake(key, head),
            "/ws" => respond(not_allowed("GET")),
            "/send" if head.method == Method::Post => self.send_request(body),
            "/send" => respond(not_allowed("POST")),
            "/" | "/index.html" if get => respond(Response::new(
                200,
                "text/html; charset=utf-8",
                DEMO_PAGE.to_vec(),
            )),
            "/wspush.js" if get => respond(Response::new(
                200,
                "text/javascript; charset=utf-8",
                DEMO_CLIENT.to_vec(),
            )),
            "/healthz" if get => respond(self.health()),
            "/stats" if get => respond(Response::json(200, self.snapshot(|s| s.to_json()))),
            "/metrics" if get => respond(Response::new(
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                self.snapshot(|s| s.to_prometheus()),
            )),
            "/" | "/index.html" | "/wspush.js" | "/healthz" | "/stats" | "/metrics" => {
                respond(not_allowed("GET, HEAD"))
            }
            _ => respond(Response::error(404, "not found")),
        }
    }

    fn handshake(&mut self, key: usize, head: &Head) -> Action {
        if self.shutdown.is_some() {
            return Action::Respond(Response::error(503, "server is shutting down"));
        }
        let connection = head.header_joined("connection");
        let upgrade = head.header_joined("upgrade");
        let headers = UpgradeHeaders {
            upgrade: upgrade.as_deref(),
            connection: connection.as_deref(),
            version: head.header("sec-websocket-version"),
            key: head.header("sec-websocket-key"),
        };
        let accept = match handshake::check(&headers) {
            Ok(accept) => accept,
            Err(e) => {
                let resp = Response::error(e.status(), &e.to_string());
                return Action::Respond(if e.status() == 426 {
                    resp.with_header("Sec-WebSocket-Version", "13")
                } else {
                    resp
                });
            }
        };
        let (uid, types) = match ws_params(&head.query) {
            Ok(params) => params,
            Err(e) => return Action::Respond(e.response()),
        };
        match self.admit_listener(key, head, uid.as_deref()) {
            Ok(client_ip) => Action::Upgrade {
                accept,
                uid,
                types,
                client_ip,
            },
            Err(r) => {
                let peer = self.conns[key].peer;
                self.count_refusal(r, peer, "/ws");
                Action::Refuse(refusal_response(r))
            }
        }
    }

    /// Origin, token and per-address checks for a push connection, in that order.
    /// Returns the forwarded client address to count, when a trusted proxy named one.
    fn admit_listener(
        &self,
        key: usize,
        head: &Head,
        uid: Option<&str>,
    ) -> Result<Option<std::net::IpAddr>, Refusal> {
        if !self.cfg.origins.is_empty()
            && !auth::origin_allowed(&self.cfg.origins, head.header("origin"))
        {
            return Err(Refusal::Origin);
        }
        if let Some(secret) = &self.cfg.secret {
            let param = |name| query::get(&head.query, name).ok().flatten();
            auth::verify_token(
                secret.as_bytes(),
                uid,
                param("expires").as_deref(),
                param("token").as_deref(),
                unix_now(),
            )?;
        }
        let conn = &self.conns[key];
        if self.cfg.max_per_ip == 0 || conn.client_ip.is_some() {
            return Ok(None); // no limit, or already counted by its own address
        }
        // Here the peer is a trusted proxy (or a local tool): only a client it names
        // is counted.
        let (forwarded, real) = (head.header("x-forwarded-for"), head.header("x-real-ip"));
        if forwarded.is_none() && real.is_none() {
            return Ok(None);
        }
        let ip = auth::client_ip(conn.peer.ip(), &self.cfg.trusted_proxies, forwarded, real);

        if self.ip_has_room(ip) {
            Ok(Some(ip))
        } else {
            Err(Refusal::PerIp)
        }
    }

    fn send_request(&mut self, body: &[u8]) -> Action {
        if self.shutdown.is_some() {
            return Action::Respond(Response::error(503, "server is shutting down"));
        }
        match message::parse_send(body, self.cfg.max_batch, &mut self.clock) {
            Ok(batch) => Action::Publish(batch),
            Err(e) => Action::Respond(Response::error(400, &e.to_string())),
        }
    }

    fn health(&self) -> Response {
        let state = self.queue.state();
        if self.shutdown.is_some() {
            Response::error(503, "shutting down")
        } else if state != crate::queue::QueueState::Up {
            Response::error(503, &format!("queue backend {}", state.as_str()))
        } else {
            Response::new(200, "text/plain; charset=utf-8", b"ok".to_vec())
        }
    }

    fn snapshot(&self, render: impl FnOnce(&Snapshot) -> Vec<u8>) -> Vec<u8> {
        let connections = self.hub.connections();
        render(&Snapshot {
            counters: &self.counters,
            connections,
            http_connections: self.conns.len().saturating_sub(connections),
            users: self.hub.users(),
            queue_backend: self.queue.name(),
            queue_state: self.queue.state().as_str(),
            queue_reconnects: self.queue.reconnects(),
            queue_backlog: self.queue.backlog(),
            uptime_seconds: self.started.elapsed().as_secs(),
            rss_bytes: stats::rss_bytes(),
        })
    }
}

fn not_allowed(allow: &'static str) -> Response {
    Response::error(405, "method not allowed").with_header("Allow", allow)
}

/// `uid` and `types` from a `/ws` query string.
fn ws_params(query: &str) -> Result<(Option<String>, TypeSet), HttpError> {
    let uid = query::get(query, "uid")?.filter(|u| !u.is_empty());
    if uid.as_ref().is_some_and(|u| u.len() > MAX_UID_LEN) {
        return Err(HttpError::BadRequest(format!(
            "uid is longer than {MAX_UID_LEN} bytes"
        )));
    }
    let types = query::get(query, "types")?.and_then(|t| hub::type_set(t.split(',')));
    Ok((uid, types))
}

/// The client's `{"op":"subscribe","types":[…]}`; anything else is not an op.
pub(super) fn subscribe_op(text: &str) -> Option<TypeSet> {
    #[derive(Deserialize)]
    struct Op {
        op: String,
        types: Vec<String>,
    }
    let op: Op = serde_json::from_str(text).ok()?;
    (op.op == "subscribe").then(|| hub::type_set(op.types))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_query() {
        let (uid, types) = ws_params("uid=a%20b&types=notice,chat").unwrap();
        assert_eq!(uid.as_deref(), Some("a b"));
        assert_eq!(types.unwrap().len(), 2);
        assert_eq!(ws_params("").unwrap(), (None, None));
        assert_eq!(ws_params("uid=&types=").unwrap(), (None, None));
        assert!(ws_params(&format!("uid={}", "x".repeat(300))).is_err());
    }

    #[test]
    fn subscribe_ops() {
        assert_eq!(
            subscribe_op(r#"{"op":"subscribe","types":["a"]}"#),
            Some(hub::type_set(["a"]))
        );
        assert_eq!(subscribe_op(r#"{"op":"subscribe","types":[]}"#), Some(None));
        assert_eq!(subscribe_op(r#"{"op":"other","types":["a"]}"#), None);
        assert_eq!(subscribe_op("hello"), None);
    }
}
