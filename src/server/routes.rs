//! What each URL does: the routing table of PROTOCOL.md.
//!
//! Handlers see a whole request (head and body) and return an [`Answer`]; the
//! HTTP phase (`http_conn.rs`) performs it. Nothing here touches a socket.

use std::net::IpAddr;

use serde::Deserialize;

use super::Server;
use super::admission::refusal_response;
use super::stats::{self, Snapshot};
use crate::auth::{self, Refusal};
use crate::config::Deflate;
use crate::http::query;
use crate::http::request::{Head, HttpError, Method};
use crate::http::response::Response;
use crate::hub::{self, FilterError, FilterLimits, TypeSet};
use crate::message::{self, Envelope, MAX_UID_LEN};
use crate::ws::deflate::{self, DeflateParams};
use crate::ws::handshake::{self, UpgradeHeaders};

/// The paths the server knows (PROTOCOL.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Route {
    Ws,
    Sse,
    Send,
    DemoPage,
    DemoClient,
    Health,
    Stats,
    Metrics,
    Presence,
    NotFound,
}

impl Route {
    pub(super) fn of(path: &str) -> Route {
        match path {
            "/ws" => Route::Ws,
            "/sse" => Route::Sse,
            "/send" => Route::Send,
            "/" | "/index.html" => Route::DemoPage,
            "/wspush.js" => Route::DemoClient,
            "/healthz" => Route::Health,
            "/stats" => Route::Stats,
            "/metrics" => Route::Metrics,
            "/presence" => Route::Presence,
            _ => Route::NotFound,
        }
    }

    /// Publishing, presence and the figures need the API key when one is set.
    fn guarded(self) -> bool {
        matches!(
            self,
            Route::Send | Route::Stats | Route::Metrics | Route::Presence
        )
    }
}

/// A handled HTTP request's outcome.
pub(super) enum Answer {
    Respond(Response),
    /// Answer, then close: a refused client gets nothing more on this connection.
    Refuse(Response),
    Upgrade(Upgrade),
    /// Open an event stream (`/sse`).
    EventStream(Listener),
    Publish(Vec<Envelope>),
    /// `/presence` for these uids.
    Ask(Vec<String>),
}

/// A push receiver that passed every check, on either transport.
pub(super) struct Listener {
    pub uid: Option<String>,
    pub types: TypeSet,
    /// The client behind a trusted proxy, to count against `-max-per-ip`.
    pub client_ip: Option<IpAddr>,
    /// Resume after this delivery id (`0`: everything retained): `?since=`, or on
    /// `/sse` the `Last-Event-ID` a browser's EventSource sends when it reconnects.
    pub since: Option<String>,
}

/// A WebSocket handshake that passed every check.
pub(super) struct Upgrade {
    pub accept: String,
    /// permessage-deflate as agreed, when `-deflate=on` and the client offered it.
    pub deflate: Option<DeflateParams>,
    pub listener: Listener,
}

const DEMO_PAGE: &[u8] = include_bytes!("../../demo/socket.html");
const DEMO_CLIENT: &[u8] = include_bytes!("../../demo/wspush.js");

impl Server {
    /// Checks that need only the head, made before any body is read: the API key
    /// guards publishing and the figures.
    pub(super) fn precheck(&self, head: &Head) -> Option<Refusal> {
        let key = self.cfg.api_key.as_ref()?;
        if !Route::of(&head.path).guarded() {
            return None;
        }
        auth::check_api_key(key.as_bytes(), head.header("authorization")).err()
    }

    pub(super) fn route(&mut self, key: usize, head: &Head, body: &[u8]) -> Answer {
        let get = matches!(head.method, Method::Get | Method::Head);
        let respond = Answer::Respond;
        match Route::of(&head.path) {
            Route::Ws if head.method == Method::Get => self.handshake(key, head),
            Route::Ws => respond(not_allowed("GET")),
            Route::Sse if head.method == Method::Get => self.event_stream(key, head),
            Route::Sse => respond(not_allowed("GET")),
            Route::Send if head.method == Method::Post => self.send_request(body),
            Route::Send => respond(not_allowed("POST")),
            Route::NotFound => respond(Response::error(404, "not found")),
            _ if !get => respond(not_allowed("GET, HEAD")),
            Route::DemoPage => respond(Response::new(
                200,
                "text/html; charset=utf-8",
                DEMO_PAGE.to_vec(),
            )),
            Route::DemoClient => respond(Response::new(
                200,
                "text/javascript; charset=utf-8",
                DEMO_CLIENT.to_vec(),
            )),
            Route::Health => respond(self.health()),
            Route::Stats => respond(Response::json(200, self.snapshot(|s| s.to_json()))),
            Route::Metrics => respond(Response::new(
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                self.snapshot(|s| s.to_prometheus()),
            )),
            Route::Presence => match presence_uids(&head.query, self.cfg.presence_max) {
                Ok(uids) => Answer::Ask(uids),
                Err(e) => respond(Response::error(e.status(), &e.to_string())),
            },
        }
    }

    fn handshake(&mut self, key: usize, head: &Head) -> Answer {
        if let Some(resp) = self.shutdown.refusal() {
            return Answer::Respond(resp);
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
                return Answer::Respond(if e.status() == 426 {
                    resp.with_header("Sec-WebSocket-Version", "13")
                } else {
                    resp
                });
            }
        };
        let listener = match self.listener(key, head, "/ws", None) {
            Ok(listener) => listener,
            Err(action) => return action,
        };
        // An offer that cannot be accepted leaves the connection uncompressed, never
        // refused (RFC 7692 §5).
        let deflate = match self.cfg.deflate {
            Deflate::On => {
                deflate::negotiate(head.header_joined("sec-websocket-extensions").as_deref())
            }
            Deflate::Off => None,
        };
        Answer::Upgrade(Upgrade {
            accept,
            deflate,
            listener,
        })
    }

    /// `GET /sse`: the same checks and parameters as `/ws`; the `Last-Event-ID` of
    /// an EventSource's reconnect, when present, is where it resumes.
    fn event_stream(&mut self, key: usize, head: &Head) -> Answer {
        if let Some(resp) = self.shutdown.refusal() {
            return Answer::Respond(resp);
        }
        let last_event_id = match head.header_single("last-event-id") {
            Ok(id) => id.map(|id| String::from_utf8_lossy(id).into_owned()),
            Err(e) => return Answer::Respond(e.response()),
        };
        match self.listener(key, head, "/sse", last_event_id) {
            Ok(listener) => Answer::EventStream(listener),
            Err(action) => action,
        }
    }

    /// A push receiver's parameters and checks, shared by both transports: the
    /// query, the type filter's limits, then origin, token and per-address room.
    /// `since` overrides the query's `since` when given.
    fn listener(
        &mut self,
        key: usize,
        head: &Head,
        path: &str,
        since: Option<String>,
    ) -> Result<Listener, Answer> {
        let (uid, types, query_since) = match ws_params(&head.query) {
            Ok(params) => params,
            Err(e) => return Err(Answer::Respond(e.response())),
        };
        let since = match since {
            Some(s) => match crate::history::check_since(&s) {
                Ok(_) => Some(s),
                Err(e) => {
                    let e = HttpError::BadRequest(format!("Last-Event-ID: {e}"));
                    return Err(Answer::Respond(e.response()));
                }
            },
            None => query_since,
        };
        let types = match hub::type_set(types.split(','), &FilterLimits::new(&self.cfg)) {
            Ok(types) => types,
            Err(e) => {
                if let Some(peer) = self.conns.get(key).map(|c| c.peer) {
                    self.count_refusal(Refusal::Types(e), peer, path);
                }
                return Err(Answer::Refuse(refusal_response(Refusal::Types(e))));
            }
        };
        match self.admit_listener(key, head, uid.as_deref()) {
            Ok(client_ip) => Ok(Listener {
                uid,
                types,
                client_ip,
                since,
            }),
            Err(r) => {
                if let Some(peer) = self.conns.get(key).map(|c| c.peer) {
                    self.count_refusal(r, peer, path);
                }
                Err(Answer::Refuse(refusal_response(r)))
            }
        }
    }

    fn send_request(&mut self, body: &[u8]) -> Answer {
        if let Some(resp) = self.shutdown.refusal() {
            return Answer::Respond(resp);
        }
        match message::parse_send(body, &message::Rules::new(&self.cfg), &mut self.clock) {
            Ok(batch) => Answer::Publish(batch),
            Err(e) => Answer::Respond(Response::error(400, &e.to_string())),
        }
    }

    fn health(&self) -> Response {
        let state = self.queue.state();
        if !self.shutdown.running() {
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
            queue_state: self.queue.state(),
            queue_reconnects: self.queue.reconnects(),
            history: self.history.stats(),
            queue_backlog: self.queue.backlog(),
            queue_routing: self.queue.routing(),
            uptime_seconds: self.started.elapsed().as_secs(),
            rss_bytes: stats::rss_bytes(),
        })
    }
}

fn not_allowed(allow: &'static str) -> Response {
    Response::error(405, "method not allowed").with_header("Allow", allow)
}

/// The uids of a `/presence?uid=U[,U…]` query: each once, in order, at most `max`.
fn presence_uids(query: &str, max: usize) -> Result<Vec<String>, HttpError> {
    let raw = query::get(query, "uid")?.unwrap_or_default();
    let mut uids: Vec<String> = Vec::new();
    for uid in raw.split(',') {
        if uid.is_empty() {
            return Err(HttpError::BadRequest(
                "uid must list one or more uids, separated by commas".into(),
            ));
        }
        if uid.len() > MAX_UID_LEN {
            return Err(HttpError::BadRequest(format!(
                "uid is longer than {MAX_UID_LEN} bytes"
            )));
        }
        if !uids.iter().any(|u| u == uid) {
            uids.push(uid.to_string());
        }
        if uids.len() > max {
            return Err(HttpError::BadRequest(format!(
                "more than {max} uids (-presence-max)"
            )));
        }
    }
    Ok(uids)
}

/// `uid`, `types` and `since` from a `/ws` or `/sse` query string.
type WsParams = (Option<String>, String, Option<String>);

fn ws_params(query: &str) -> Result<WsParams, HttpError> {
    let uid = query::get(query, "uid")?.filter(|u| !u.is_empty());
    if uid.as_ref().is_some_and(|u| u.len() > MAX_UID_LEN) {
        return Err(HttpError::BadRequest(format!(
            "uid is longer than {MAX_UID_LEN} bytes"
        )));
    }
    let types = query::get(query, "types")?.unwrap_or_default();
    let since = query::get(query, "since")?;
    if let Some(s) = &since {
        crate::history::check_since(s).map_err(|e| HttpError::BadRequest(format!("since: {e}")))?;
    }
    Ok((uid, types, since))
}

/// The client's `{"op":"subscribe","types":[…]}`; anything else is not an op.
pub(super) fn subscribe_op(
    text: &str,
    limits: &FilterLimits,
) -> Option<Result<TypeSet, FilterError>> {
    #[derive(Deserialize)]
    struct Op {
        op: String,
        types: Vec<String>,
    }
    let op: Op = serde_json::from_str(text).ok()?;
    (op.op == "subscribe").then(|| hub::type_set(op.types, limits))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_routes() {
        assert_eq!(Route::of("/ws"), Route::Ws);
        assert_eq!(Route::of("/sse"), Route::Sse);
        assert_eq!(Route::of("/index.html"), Route::DemoPage);
        assert_eq!(Route::of("/ws/"), Route::NotFound);
        assert!(Route::Metrics.guarded() && !Route::Health.guarded());
    }

    #[test]
    fn ws_query() {
        let (uid, types, since) = ws_params("uid=a%20b&types=notice,chat&since=1f-3").unwrap();
        assert_eq!(uid.as_deref(), Some("a b"));
        assert_eq!(types, "notice,chat");
        assert_eq!(since.as_deref(), Some("1f-3"));
        assert_eq!(ws_params("").unwrap(), (None, String::new(), None));
        assert_eq!(
            ws_params("uid=&types=").unwrap(),
            (None, String::new(), None)
        );
        assert!(ws_params("since=yesterday").is_err());
        assert!(ws_params(&format!("uid={}", "x".repeat(300))).is_err());
    }

    #[test]
    fn presence_uids_are_listed_once_and_bounded() {
        assert_eq!(presence_uids("uid=a,b%2Cc,a", 5).unwrap(), ["a", "b", "c"]);
        assert!(presence_uids("uid=", 5).is_err());
        assert!(presence_uids("", 5).is_err());
        assert!(presence_uids("uid=a,,b", 5).is_err());
        assert!(presence_uids("uid=a,b,c", 2).is_err());
        assert_eq!(presence_uids("uid=a,a,a", 1).unwrap(), ["a"]);
        assert!(presence_uids(&format!("uid={}", "x".repeat(300)), 5).is_err());
    }

    #[test]
    fn subscribe_ops() {
        let limits = FilterLimits {
            max_types: 2,
            max_type_len: 3,
        };
        let op = |text| subscribe_op(text, &limits);
        assert_eq!(
            op(r#"{"op":"subscribe","types":["a"]}"#),
            Some(hub::type_set(["a"], &limits))
        );
        assert_eq!(op(r#"{"op":"subscribe","types":[]}"#), Some(Ok(None)));
        assert_eq!(
            op(r#"{"op":"subscribe","types":["a","b","c"]}"#),
            Some(Err(FilterError::TooMany(2)))
        );
        assert_eq!(
            op(r#"{"op":"subscribe","types":["abcd"]}"#),
            Some(Err(FilterError::TooLong(3)))
        );
        assert_eq!(op(r#"{"op":"other","types":["a"]}"#), None);
        assert_eq!(op("hello"), None);
    }
}
