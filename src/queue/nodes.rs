//! A Redis Cluster's primaries by slot, each behind one plain connection: the
//! commands of a turn go out as one pipeline per primary, and a command that must
//! run on the connection that wrote (`WAIT` after the writes it confirms) follows
//! them in that same pipeline.
//!
//! This is written over the `redis` crate's plain connections rather than its
//! cluster client, for what a `200` promises: that client sends a command again
//! on a fresh connection after a timeout, and a `WAIT` on a connection that wrote
//! nothing confirms at once, so a write no replica has could be answered `200`
//! when a primary's host goes silent. Here nothing is sent twice once it may have
//! run; only a command answered `MOVED` or `ASK` (which did not run) goes again,
//! to the node named. A primary that fails is left alone for a backoff, so a
//! silent host costs one timeout per backoff, not one per batch, and the slots of
//! the other primaries go on meanwhile.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ::redis::{Cmd, Connection, ErrorKind, RedisError, RedisResult, ServerErrorKind, Value};

use super::Backoff;
use super::publisher::{Endpoint, FIRST_BACKOFF, is_broken};
use super::shards::SlotMap;

/// How often the slot map may be read again while it looks stale.
const REFRESH_EVERY: Duration = Duration::from_millis(100);

/// Rounds of redirects one [`Nodes::run`] follows (a slot moving while it runs).
const REDIRECTS: usize = 3;

/// One command's answer, with the answer of the pipeline's closing command (`WAIT`)
/// on the connection that ran it.
#[derive(Debug)]
pub struct Done {
    pub reply: Value,
    pub tail: Option<Value>,
}

/// One primary's connection and, after a failure, when to try it again.
struct Node {
    con: Option<Connection>,
    retry_at: Instant,
    backoff: Backoff,
}

/// The cluster as one client sees it: the slot map and a connection per primary.
pub struct Nodes {
    seeds: Vec<Endpoint>,
    timeout: Duration,
    max_backoff: Duration,
    map: SlotMap,
    nodes: HashMap<String, Node>,
    /// A failure or a redirect said the map may be out of date.
    stale: bool,
    read_at: Option<Instant>,
}

/// Where one command goes this round.
#[derive(Clone)]
enum To {
    Slot(u16),
    /// After `ASKING`, to the node importing the slot.
    Ask(String),
}

impl Nodes {
    pub fn new(seeds: Vec<Endpoint>, timeout: Duration, max_backoff: Duration) -> Self {
        Nodes {
            seeds,
            timeout,
            max_backoff,
            map: SlotMap::default(),
            nodes: HashMap::new(),
            stale: true,
            read_at: None,
        }
    }

    /// Reads the slot map now, from a connected primary or else a seed.
    pub fn refresh(&mut self) -> RedisResult<()> {
        self.read_at = Some(Instant::now());
        let connected: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.con.is_some())
            .map(|(a, _)| a.clone())
            .collect();
        for addr in connected {
            let Some(con) = self.nodes.get_mut(&addr).and_then(|n| n.con.as_mut()) else {
                continue;
            };
            match SlotMap::query(con) {
                Ok(Some(map)) => {
                    self.take_map(map);
                    return Ok(());
                }
                Ok(None) => {}
                Err(_) => self.failed(&addr),
            }
        }
        let (map, seed, con) = SlotMap::read(&self.seeds, self.timeout)?;
        let addr = seed.display.clone();
        self.take_map(map);
        // A seed that is a primary keeps its connection, so an idle publisher's
        // map reads do not open one each time.
        if self.map.names(&addr) {
            self.keep(addr, con);
        }
        Ok(())
    }

    fn take_map(&mut self, map: SlotMap) {
        // Connections to nodes no longer primaries go: a demoted primary answers
        // MOVED anyway, and a node removed must not keep a socket.
        self.nodes.retain(|a, _| map.names(a));
        self.map = map;
        self.stale = false;
    }

    /// The node's state, made on first use.
    fn node(&mut self, addr: &str) -> &mut Node {
        let max = self.max_backoff;
        self.nodes.entry(addr.to_string()).or_insert_with(|| Node {
            con: None,
            retry_at: Instant::now(),
            backoff: Backoff::new(FIRST_BACKOFF, max),
        })
    }

    fn keep(&mut self, addr: String, con: Connection) {
        let node = self.node(&addr);
        node.con = Some(con);
        node.backoff.reset();
    }

    /// Runs each `(slot, command)` on its slot's primary, one pipeline per primary,
    /// closed by `tail` where given; answers in the order of `cmds`.
    pub fn run(&mut self, cmds: &[(u16, Cmd)], tail: Option<&Cmd>) -> Vec<RedisResult<Done>> {
        if self.stale && self.read_at.is_none_or(|t| t.elapsed() >= REFRESH_EVERY) {
            let _ = self.refresh();
        }
        let mut out: Vec<Option<RedisResult<Done>>> = (0..cmds.len()).map(|_| None).collect();
        let mut pending: Vec<(usize, To)> = cmds
            .iter()
            .enumerate()
            .map(|(i, (slot, _))| (i, To::Slot(*slot)))
            .collect();
        for round in 0..REDIRECTS {
            if pending.is_empty() {
                break;
            }
            if round > 0 && self.stale {
                let _ = self.refresh();
            }
            pending = self.round(cmds, tail, pending, &mut out);
        }
        for (i, _) in pending {
            out[i] = Some(Err(client_error("slot still moving after redirects")));
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(client_error("not sent"))))
            .collect()
    }

    /// One round: every pending command sent to its node, then every answer read.
    /// Returns the commands redirected.
    fn round(
        &mut self,
        cmds: &[(u16, Cmd)],
        tail: Option<&Cmd>,
        pending: Vec<(usize, To)>,
        out: &mut [Option<RedisResult<Done>>],
    ) -> Vec<(usize, To)> {
        let mut by_node: HashMap<String, Vec<(usize, bool)>> = HashMap::new();
        for (i, to) in pending {
            let (addr, asking) = match to {
                To::Slot(slot) => match self.map.owner(slot) {
                    Some(a) => (a.to_string(), false),
                    None => {
                        self.stale = true;
                        out[i] = Some(Err(client_error("no primary known for the slot")));
                        continue;
                    }
                },
                To::Ask(a) => (a, true),
            };
            by_node.entry(addr).or_default().push((i, asking));
        }
        let mut sent = Vec::with_capacity(by_node.len());
        for (addr, group) in by_node {
            let mut packed = Vec::new();
            for &(i, asking) in &group {
                if asking {
                    packed.extend_from_slice(b"*1\r\n$6\r\nASKING\r\n");
                }
                cmds[i].1.write_packed_command(&mut packed);
            }
            if let Some(t) = tail {
                t.write_packed_command(&mut packed);
            }
            match self
                .connection(&addr)
                .and_then(|c| c.send_packed_command(&packed))
            {
                Ok(()) => sent.push((addr, group)),
                Err(e) => {
                    self.failed(&addr);
                    for (i, _) in group {
                        out[i] = Some(Err(copy_error(&e)));
                    }
                }
            }
        }
        let mut again = Vec::new();
        for (addr, group) in sent {
            if let Err(e) = self.answers(&addr, &group, tail.is_some(), out, &mut again) {
                self.failed(&addr);
                // Unanswered commands may have run; with a tail, so may the
                // answered ones without their confirmation: all are in doubt.
                for (i, _) in group {
                    if out[i].is_none() || tail.is_some() {
                        out[i] = Some(Err(copy_error(&e)));
                    }
                }
            }
        }
        again
    }

    /// Reads one node's answers in order; redirected commands go to `again`. An
    /// error here is the connection's: every command of the group is in doubt.
    fn answers(
        &mut self,
        addr: &str,
        group: &[(usize, bool)],
        has_tail: bool,
        out: &mut [Option<RedisResult<Done>>],
        again: &mut Vec<(usize, To)>,
    ) -> RedisResult<()> {
        let con = self
            .nodes
            .get_mut(addr)
            .and_then(|n| n.con.as_mut())
            .ok_or_else(|| client_error("connection gone"))?;
        let mut answered = Vec::with_capacity(group.len());
        for &(i, asking) in group {
            if asking {
                con.recv_response()?.extract_error()?;
            }
            match con.recv_response().and_then(Value::extract_error) {
                Ok(reply) => {
                    out[i] = Some(Ok(Done { reply, tail: None }));
                    answered.push(i);
                }
                Err(e) if is_broken(&e) => return Err(e),
                Err(e) => match redirect(&e) {
                    Some(to) => {
                        if matches!(to, To::Slot(_)) {
                            self.stale = true;
                        }
                        again.push((i, to));
                    }
                    None => {
                        if is_map_error(&e) {
                            self.stale = true;
                        }
                        out[i] = Some(Err(e));
                    }
                },
            }
        }
        if has_tail {
            let t = con.recv_response()?;
            for i in answered {
                if let Some(Ok(done)) = &mut out[i] {
                    done.tail = Some(t.clone());
                }
            }
        }
        Ok(())
    }

    /// The node's connection, opened if it has none and is not in its backoff.
    fn connection(&mut self, addr: &str) -> RedisResult<&mut Connection> {
        let node = self.node(addr);
        if node.con.is_none() {
            if Instant::now() < node.retry_at {
                return Err(client_error(
                    "primary failed a moment ago; trying again soon",
                ));
            }
            let con = self.open(addr)?;
            self.keep(addr.to_string(), con);
        }
        self.node(addr)
            .con
            .as_mut()
            .ok_or_else(|| client_error("connection gone"))
    }

    /// A new connection to a node the map names, with the seeds' settings.
    fn open(&self, addr: &str) -> RedisResult<Connection> {
        let seed = self.seeds.first().ok_or_else(|| client_error("no seed"))?;
        let e = seed
            .at(addr)
            .map_err(|e| client_error_owned(e.to_string()))?;
        e.connect(self.timeout)
    }

    /// A node's connection failed: drop it, wait a backoff, and read the map again
    /// (its slots may have a new primary).
    fn failed(&mut self, addr: &str) {
        let node = self.node(addr);
        node.con = None;
        node.retry_at = Instant::now() + node.backoff.next_delay();
        self.stale = true;
    }
}

/// What a redirect asks: `MOVED` (read the map again, go by slot) or `ASK`.
fn redirect(e: &RedisError) -> Option<To> {
    let (addr, slot) = e.redirect_node()?;
    match e.kind() {
        ErrorKind::Server(ServerErrorKind::Ask) => Some(To::Ask(addr.to_string())),
        _ => Some(To::Slot(slot)),
    }
}

/// An answer saying this node is not where the slot is served now.
fn is_map_error(e: &RedisError) -> bool {
    matches!(
        e.kind(),
        ErrorKind::Server(
            ServerErrorKind::ClusterDown | ServerErrorKind::ReadOnly | ServerErrorKind::TryAgain
        )
    )
}

fn client_error(why: &'static str) -> RedisError {
    RedisError::from((ErrorKind::Client, why))
}

fn client_error_owned(why: String) -> RedisError {
    RedisError::from((ErrorKind::Client, "node address", why))
}

/// An error for each command of a failed pipeline (`RedisError` is not `Clone`).
fn copy_error(e: &RedisError) -> RedisError {
    RedisError::from((ErrorKind::Io, "connection to the primary", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(map: Vec<(u16, u16, &str)>) -> Nodes {
        let mut n = Nodes::new(Vec::new(), Duration::from_secs(1), Duration::from_secs(1));
        let ranges = map.into_iter().map(|(a, b, c)| (a, b, c.to_string()));
        n.take_map(SlotMap::new(ranges.collect()));
        n
    }

    fn server_error(line: &str) -> RedisError {
        let v = ::redis::parse_redis_value(format!("-{line}\r\n").as_bytes()).unwrap();
        v.extract_error().unwrap_err()
    }

    #[test]
    fn moved_goes_by_slot_and_ask_to_the_node_named() {
        let moved = redirect(&server_error("MOVED 3999 10.0.0.2:6379"));
        assert!(matches!(moved, Some(To::Slot(3999))));
        match redirect(&server_error("ASK 3999 10.0.0.3:6380")) {
            Some(To::Ask(addr)) => assert_eq!(addr, "10.0.0.3:6380"),
            _ => panic!("ASK names its node"),
        }
        assert!(redirect(&server_error("ERR no such thing")).is_none());
        assert!(is_map_error(&server_error(
            "CLUSTERDOWN The cluster is down"
        )));
        assert!(!is_map_error(&server_error("ERR no such thing")));
    }

    #[test]
    fn a_failed_node_waits_its_backoff_and_marks_the_map_stale() {
        let mut n = nodes(vec![(0, 16383, "a:1")]);
        assert!(!n.stale);
        n.failed("a:1");
        assert!(n.stale);
        let e = n.connection("a:1").err().expect("in its backoff");
        assert!(e.to_string().contains("trying again soon"), "{e}");
    }
}
