//! Who gets in: accepting, refusals over `-max-connections` and `-max-per-ip`, a
//! push client's origin, token and address checks, the descriptor kept in reserve
//! for when the table is full, per-address counts.

use std::collections::HashMap;
use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use mio::net::TcpStream;
use mio::{Interest, Token};

use super::Server;
use super::conn::Conn;
use crate::auth::{self, Refusal};
use crate::http::query;
use crate::http::request::Head;
use crate::http::response::Response;
use crate::message::unix_now;

/// The admission state the reactor keeps.
pub(super) struct Admission {
    /// Tells a connection from later ones that reuse its slab slot.
    serial: u64,
    /// Accepting waits for the next tick (no descriptor to accept with).
    pub(super) paused: bool,
    /// A descriptor held in reserve (see `refuse_with_spare`).
    spare: Option<std::fs::File>,
    /// Connections kept only to deliver their refusal (at most `-refusal-slots`).
    pub(super) refusing: usize,
    /// Open connections per client address, for `-max-per-ip`.
    per_ip: HashMap<IpAddr, u32>,
}

impl Admission {
    pub(super) fn new() -> Self {
        Admission {
            serial: 0,
            paused: false,
            spare: reserve_descriptor(),
            refusing: 0,
            per_ip: HashMap::new(),
        }
    }

    pub(super) fn has_room(&self, ip: IpAddr, max_per_ip: usize) -> bool {
        self.per_ip
            .get(&ip)
            .is_none_or(|n| (*n as usize) < max_per_ip)
    }

    pub(super) fn uncount_ip(&mut self, ip: IpAddr) {
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
    }

    /// Takes the spare descriptor back if it was given up; for the tick.
    pub(super) fn restore_spare(&mut self) {
        if self.spare.is_none() {
            self.spare = reserve_descriptor();
        }
    }
}

impl Server {
    pub(super) fn accept(&mut self) {
        if self.admission.paused || !self.shutdown.running() {
            return;
        }
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                Ok((sock, peer)) => self.admit(sock, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if out_of_descriptors(&e) && self.admission.spare.is_some() => {
                    if !self.refuse_with_spare() {
                        return;
                    }
                }
                Err(e) => {
                    // Out of descriptors without a spare, and the like: retrying at
                    // once would spin, so pause accepting until the next tick.
                    warn!("accept failed, pausing until the next tick: {e}");
                    self.admission.paused = true;
                    return;
                }
            }
        }
    }

    /// Out of descriptors: gives up the spare one for a moment to accept a waiting
    /// client, tell it 503 and close it, then takes the spare back. So a client is
    /// refused rather than left waiting in the listen queue, and the listener does
    /// not stay readable. Returns whether to go on accepting: false once nobody is
    /// waiting any more, or when the spare could not be taken back (then accepting
    /// pauses until the next tick, which retries the spare).
    fn refuse_with_spare(&mut self) -> bool {
        let Some(listener) = &self.listener else {
            return false;
        };
        drop(self.admission.spare.take());
        let accepted = listener.accept().map(|(sock, peer)| {
            debug!("refused {peer}: out of descriptors");
            refuse_at_once(sock);
        });
        if accepted.is_ok() {
            self.counters.refused[Refusal::Capacity.index()] += 1;
        }
        self.admission.spare = reserve_descriptor();
        match (accepted, &self.admission.spare) {
            (Ok(_), Some(_)) => true,
            (Err(e), Some(_)) if e.kind() == io::ErrorKind::WouldBlock => false,
            (Err(e), Some(_)) if e.kind() == io::ErrorKind::Interrupted => true,
            (result, _) => {
                let e = result
                    .err()
                    .map_or("no spare descriptor".into(), |e| e.to_string());
                warn!("out of descriptors, pausing accept until the next tick: {e}");
                self.admission.paused = true;
                false
            }
        }
    }

    /// What a new connection runs into: the connection cap, then its address's.
    fn refusal_for(&self, counted_ip: Option<IpAddr>) -> Option<Refusal> {
        // Connections still being refused do not count against the limit, so a
        // refused client that lingers never keeps a freed slot from a new one.
        if self.conns.len() - self.admission.refusing >= self.cfg.max_connections {
            Some(Refusal::Capacity)
        } else if counted_ip.is_some_and(|ip| !self.admission.has_room(ip, self.cfg.max_per_ip)) {
            Some(Refusal::PerIp)
        } else {
            None
        }
    }

    fn admit(&mut self, mut sock: TcpStream, peer: SocketAddr) {
        // A trusted proxy's connections are counted per client once the handshake
        // names the client; every other peer is counted by its own address now.
        let ip = auth::canonical(peer.ip());
        let counted_ip = (self.cfg.max_per_ip > 0
            && !auth::is_trusted(&self.cfg.trusted_proxies, ip))
        .then_some(ip);
        let refusal = self.refusal_for(counted_ip);
        if let Some(r) = refusal {
            self.count_refusal(r, peer, "connect");
            if self.admission.refusing >= self.cfg.refusal_slots {
                return; // dropping the socket closes it
            }
        }
        let _ = sock.set_nodelay(true);
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut sock, Token(key), interest)
        {
            warn!("register {peer}: {e}");
            return;
        }
        self.admission.serial += 1;
        let now = Instant::now();
        let deadline = now + self.cfg.keepalive_timeout;
        let mut conn = Conn::new(sock, peer, self.admission.serial, now, deadline);
        conn.refused = refusal.is_some();
        entry.insert(conn);
        if let Some(r) = refusal {
            self.admission.refusing += 1;
            // A refused client still gets a readable answer: the reply goes out
            // through the normal draining path rather than a reset.
            if !self.reply(key, &refusal_response(r), false, false).alive() {
                return;
            }
        } else if let Some(ip) = counted_ip {
            self.count_ip(key, ip);
        }
        // Data may already be waiting; edge-triggered readiness reports it anyway,
        // but reading now saves a round through the poll.
        self.on_event(key, false);
    }

    /// Origin, token and per-address checks for a push connection, in that order.
    /// Returns the forwarded client address to count, when a trusted proxy named one.
    pub(super) fn admit_listener(
        &self,
        key: usize,
        head: &Head,
        uid: Option<&str>,
    ) -> Result<Option<IpAddr>, Refusal> {
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
        let Some(conn) = self.conns.get(key) else {
            return Ok(None);
        };
        if self.cfg.max_per_ip == 0 || conn.client_ip.is_some() {
            return Ok(None); // no limit, or already counted by its own address
        }
        // Here the peer is a trusted proxy (or a local tool): only a client it names
        // is counted.
        // A proxy appends its own X-Forwarded-For line to the client's: read all of them.
        let forwarded = head.header_joined("x-forwarded-for");
        let real = head
            .header_single("x-real-ip")
            .map_err(|_| Refusal::Forwarded)?;
        if forwarded.is_none() && real.is_none() {
            return Ok(None);
        }
        let ip = auth::client_ip(
            conn.peer.ip(),
            &self.cfg.trusted_proxies,
            forwarded.as_deref(),
            real,
        );
        if self.admission.has_room(ip, self.cfg.max_per_ip) {
            Ok(Some(ip))
        } else {
            Err(Refusal::PerIp)
        }
    }

    pub(super) fn count_ip(&mut self, key: usize, ip: IpAddr) {
        if let Some(conn) = self.conns.get_mut(key) {
            *self.admission.per_ip.entry(ip).or_default() += 1;
            conn.client_ip = Some(ip);
        }
    }

    pub(super) fn count_refusal(&mut self, r: Refusal, peer: SocketAddr, what: &str) {
        self.counters.refused[r.index()] += 1;
        info!("refused {peer} {what}: {r}");
    }
}

/// The one answer every refusal gets: its status and a JSON error.
pub(super) fn refusal_response(r: Refusal) -> Response {
    let resp = Response::error(r.status(), &r.to_string());
    match r {
        Refusal::ApiKey => resp.with_header("WWW-Authenticate", "Bearer"),
        _ => resp,
    }
}

/// Opens the descriptor kept in reserve for `refuse_with_spare`.
#[cfg(unix)]
fn reserve_descriptor() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}

/// Elsewhere running out of sockets does not show as a per-process descriptor
/// limit, so there is nothing to reserve.
#[cfg(not(unix))]
fn reserve_descriptor() -> Option<std::fs::File> {
    None
}

/// EMFILE or ENFILE: the process or the system has no descriptor left.
#[cfg(unix)]
fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

#[cfg(not(unix))]
fn out_of_descriptors(_e: &io::Error) -> bool {
    false
}

/// Answers a client accepted on the spare descriptor with a 503 and closes it:
/// there is no descriptor to keep it open with. What the client already sent is
/// read first, since closing with unread input would reset the connection and
/// could destroy the reply before the client reads it.
fn refuse_at_once(mut sock: TcpStream) {
    /// Reads taken at most: a fresh connection has sent one request, if any.
    const DRAIN_READS: usize = 4;
    let mut sink = [0u8; 1024];
    for _ in 0..DRAIN_READS {
        match sock.read(&mut sink) {
            Ok(n) if n > 0 => continue,
            _ => break,
        }
    }
    let mut out = Vec::with_capacity(160);
    Response::error(503, "server out of descriptors").encode(false, false, &mut out);
    // A fresh socket's send buffer takes this much at once.
    let _ = std::io::Write::write(&mut sock, &out);
    let _ = sock.shutdown(std::net::Shutdown::Write);
}
