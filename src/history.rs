//! Retention for resume and offline delivery on one node (the `list` and Disque backends).
//!
//! Every delivered message gets a sequence number from the node and is kept for its
//! targets (each uid, or `all`) until it expires, capped by `-history-ttl`, by
//! `-history-size` messages per target and by `-history-bytes` for the node. A resume
//! (`since`) merges the uid's ring with the `all` ring by sequence number, so the order
//! a connection saw live is the order it is replayed in.
//!
//! One entry is shared by every ring that holds it (a message for three uids is stored
//! once), so retention costs per message, not per connection or per target.
//!
//! Completeness is tracked, not guessed: each ring remembers the newest sequence number
//! it lost to a bound (`lost_upto`), and a ring that empties hands that mark to a
//! node-wide floor before it is freed. A resume from before a loss answers
//! `complete: false`; a message that reached its own `timeout` is not a loss, since it
//! would never be pushed anyway.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::rc::Rc;
use std::sync::Arc;

use crate::message::{Envelope, Target};

/// The bounds, from `-history-ttl`, `-history-size` and `-history-bytes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Seconds a message is kept at most (also the life of one without `timeout`);
    /// 0 keeps nothing.
    pub ttl: u64,
    /// Messages kept per uid (and for `all`).
    pub size: usize,
    /// Bytes kept for the whole node.
    pub bytes: usize,
}

impl Limits {
    pub fn enabled(&self) -> bool {
        self.ttl > 0 && self.size > 0 && self.bytes > 0
    }
}

/// Where a resume starts, parsed from `?since=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Since {
    /// `since=0`: everything retained.
    Start,
    /// After this sequence number of the current epoch.
    After(u64),
    /// An id of another epoch (a restarted node): everything retained, but the client
    /// may have missed what was sent between its id and the restart.
    Foreign,
}

/// `since` is neither `0` nor an id this server could have issued.
#[derive(Debug, PartialEq, Eq)]
pub struct BadSince;

impl fmt::Display for BadSince {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "since must be 0 or a message id")
    }
}

/// Which run of the node issued an id: ids of an earlier run are recognised as foreign.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Epoch(pub u32);

impl Epoch {
    /// A value that differs between runs.
    pub fn new() -> Self {
        Epoch((random_per_run() as u32).max(1))
    }

    /// A delivery id: `<epoch hex>-<seq>`. Clients treat it as opaque.
    pub fn id(self, seq: u64) -> String {
        format!("{:x}-{seq}", self.0)
    }

    pub fn parse_since(self, s: &str) -> Result<Since, BadSince> {
        Ok(match parse_id(s)? {
            None => Since::Start,
            Some((epoch, seq)) if epoch == self => Since::After(seq),
            Some(_) => Since::Foreign,
        })
    }
}

/// 64 bits that differ between runs (and between calls): the standard library's
/// random hash seed over the time and the pid. Names epochs and nodes; no secret.
pub fn random_per_run() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// Reads `since`: `0` (None) or an id `<epoch hex>-<seq>`, whichever run issued it.
pub fn parse_id(s: &str) -> Result<Option<(Epoch, u64)>, BadSince> {
    if s == "0" {
        return Ok(None);
    }
    let (epoch, seq) = s.split_once('-').ok_or(BadSince)?;
    let valid_hex = !epoch.is_empty() && epoch.len() <= 8;
    let epoch = u32::from_str_radix(epoch, 16)
        .ok()
        .filter(|_| valid_hex)
        .ok_or(BadSince)?;
    if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return Err(BadSince);
    }
    let seq: u64 = seq.parse().map_err(|_| BadSince)?;
    Ok(Some((Epoch(epoch), seq)))
}

/// Where a connection of a Redis Cluster node resumes one stream from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamSince {
    /// Everything retained (`0`, or no id of this stream given).
    Start,
    /// After this seq of the stream's epoch.
    After(Epoch, u64),
    /// An id of plain Redis or another backend: read whole, never complete.
    Foreign,
    /// After this seq, whatever the epoch: a node's own position in a stream it
    /// subscribed to before it saw any of its ids (the moment it subscribed).
    AfterTime(u64),
}

/// A cluster resume: `since=<u id>,<g id>` (either part `0` or left out), a
/// position in the uid's stream and one in the broadcasts'.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterSince {
    pub uid: StreamSince,
    pub all: StreamSince,
}

impl ClusterSince {
    pub fn parse(s: &str) -> Result<ClusterSince, BadSince> {
        let mut out = ClusterSince {
            uid: StreamSince::Start,
            all: StreamSince::Start,
        };
        // A plain id names no cluster stream: both are read whole.
        if let Ok(Some(_)) = parse_id(s) {
            out.uid = StreamSince::Foreign;
            out.all = StreamSince::Foreign;
            return Ok(out);
        }
        let mut parts = 0;
        for part in s.split(',') {
            parts += 1;
            if parts > 2 {
                return Err(BadSince);
            }
            if part == "0" {
                continue;
            }
            let (slot, rest) = match part.as_bytes().first() {
                Some(b'u') => (&mut out.uid, &part[1..]),
                Some(b'g') => (&mut out.all, &part[1..]),
                _ => return Err(BadSince),
            };
            let (epoch, seq) = parse_id(rest)?.ok_or(BadSince)?;
            *slot = StreamSince::After(epoch, seq);
        }
        Ok(out)
    }
}

/// `since` is `0`, an id of this server's form, or a Redis Cluster position.
pub fn check_since(s: &str) -> Result<(), BadSince> {
    parse_id(s)
        .map(drop)
        .or_else(|_| ClusterSince::parse(s).map(drop))
}

impl Default for Epoch {
    fn default() -> Self {
        Self::new()
    }
}

/// Why a message left retention early, for `/stats` and `/metrics`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trim {
    /// `-history-size`: the target's ring was full.
    Size,
    /// `-history-bytes`: the node's retention was full.
    Bytes,
    /// `-history-ttl` passed before the message's own `timeout`.
    Ttl,
}

impl Trim {
    pub const ALL: [Trim; 3] = [Trim::Size, Trim::Bytes, Trim::Ttl];

    pub fn label(self) -> &'static str {
        match self {
            Trim::Size => "size",
            Trim::Bytes => "bytes",
            Trim::Ttl => "ttl",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Live,
    /// Dropped by a bound: a resume from before it is incomplete.
    Lost,
    /// Reached its own `timeout`: gone, and nobody misses it.
    Expired,
}

struct Entry {
    seq: u64,
    /// Unix seconds until which it would be retained had no bound cut it short.
    until: u64,
    /// Unix seconds when it was stored; `-history-ttl` counts from here.
    stored: u64,
    /// The message's own `timeout`; 0 = none.
    expires: u64,
    types: Box<str>,
    frame: Arc<[u8]>,
    /// Rings still holding it; at 0 its bytes are given back.
    holders: std::cell::Cell<u32>,
    state: std::cell::Cell<State>,
}

impl Entry {
    fn cost(&self) -> usize {
        ENTRY_OVERHEAD + self.frame.len() + self.types.len()
    }

    fn retain_until(stored: u64, expires: u64, ttl: u64) -> u64 {
        let cap = stored.saturating_add(ttl);
        if expires == 0 { cap } else { cap.min(expires) }
    }

    fn expired(&self, now: u64) -> bool {
        self.expires != 0 && now >= self.expires
    }
}

/// What an entry costs beside its frame and type: the entry itself, its `Rc` and
/// `Arc` headers, and one ring slot.
const ENTRY_OVERHEAD: usize = 96;

#[derive(Default)]
struct Ring {
    entries: VecDeque<Rc<Entry>>,
    /// The newest sequence number this ring lost to a bound.
    lost_upto: u64,
    /// Until when the newest of those losses would have been retained: a resume from
    /// the start (`since=0`) is incomplete only while a lost message would still be
    /// in retention.
    lost_until: u64,
}

impl Ring {
    fn lose(&mut self, e: &Entry) {
        self.lost_upto = self.lost_upto.max(e.seq);
        self.lost_until = self.lost_until.max(e.until);
    }
}

/// A resume's outcome: whether nothing after `since` is missing, and how far it got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Replayed {
    pub complete: bool,
    pub messages: usize,
    /// The sequence number the connection has now seen up to.
    pub last_seq: u64,
}

/// Figures for `/stats` and `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HistoryStats {
    pub messages: usize,
    pub bytes: usize,
    pub trimmed_size: u64,
    pub trimmed_bytes: u64,
    pub trimmed_ttl: u64,
}

impl HistoryStats {
    pub fn trimmed(&self, why: Trim) -> u64 {
        match why {
            Trim::Size => self.trimmed_size,
            Trim::Bytes => self.trimmed_bytes,
            Trim::Ttl => self.trimmed_ttl,
        }
    }
}

pub struct History {
    limits: Limits,
    epoch: Epoch,
    by_uid: HashMap<Box<str>, Ring>,
    all: Ring,
    /// Every entry still costing bytes, oldest first: `-history-bytes` and
    /// `-history-ttl` trim from the front. Entries gone from every ring stay here as
    /// tombstones until they reach the front.
    order: VecDeque<Rc<Entry>>,
    /// The newest sequence number lost by a ring that has since been freed: a uid
    /// without a ring cannot tell its own losses, so it answers from this.
    lost_floor: u64,
    /// The newest sequence number stored; a connection that has seen it is current.
    head: u64,
    stats: HistoryStats,
}

impl History {
    pub fn new(limits: Limits, epoch: Epoch) -> Self {
        History {
            limits,
            epoch,
            by_uid: HashMap::new(),
            all: Ring::default(),
            order: VecDeque::new(),
            lost_floor: 0,
            head: 0,
            stats: HistoryStats::default(),
        }
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    pub fn stats(&self) -> HistoryStats {
        self.stats
    }

    /// Keeps a delivered message for its targets. `seq` must grow from call to call.
    pub fn append(&mut self, seq: u64, env: &Envelope, now: u64) {
        debug_assert!(seq > self.head, "sequence numbers must grow");
        self.head = self.head.max(seq);
        if !self.limits.enabled() || env.is_expired(now) {
            return;
        }
        let entry = Rc::new(Entry {
            seq,
            until: Entry::retain_until(now, env.expires, self.limits.ttl),
            stored: now,
            expires: env.expires,
            types: env.types.clone(),
            frame: env.frame.clone(),
            holders: std::cell::Cell::new(0),
            state: std::cell::Cell::new(State::Live),
        });
        match &env.target {
            Target::All => self.hold(None, &entry),
            Target::Uids(uids) => {
                for uid in uids.iter() {
                    self.hold(Some(uid), &entry);
                }
            }
        }
        self.stats.messages += 1;
        self.stats.bytes += entry.cost();
        self.order.push_back(entry);
        self.trim_bytes();
    }

    fn hold(&mut self, uid: Option<&str>, entry: &Rc<Entry>) {
        let size = self.limits.size;
        let ring = match uid {
            None => &mut self.all,
            Some(u) => match self.by_uid.get_mut(u) {
                Some(r) => r,
                None => self.by_uid.entry(u.into()).or_default(),
            },
        };
        entry.holders.set(entry.holders.get() + 1);
        ring.entries.push_back(entry.clone());
        while ring.entries.len() > size {
            let old = ring
                .entries
                .pop_front()
                .expect("ring longer than its bound");
            if old.state.get() == State::Live {
                ring.lose(&old);
                self.stats.trimmed_size += 1;
            }
            release(&mut self.stats, &old, State::Lost);
        }
    }

    fn trim_bytes(&mut self) {
        while self.stats.bytes > self.limits.bytes {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if old.state.get() == State::Live {
                self.stats.trimmed_bytes += 1;
                self.forget(&old, State::Lost);
            }
        }
    }

    /// Marks an entry gone from every ring at once; the rings drop it lazily, and a
    /// ring that finds a lost entry records the loss.
    fn forget(&mut self, entry: &Entry, state: State) {
        if entry.state.get() != State::Live {
            return;
        }
        entry.state.set(state);
        self.stats.messages -= 1;
        self.stats.bytes -= entry.cost();
    }

    /// Expiry-driven trimming, run on the reactor's timer tick: messages past their
    /// own `timeout` or past `-history-ttl` leave, and emptied rings are freed.
    pub fn sweep(&mut self, now: u64) {
        let ttl = self.limits.ttl;
        while let Some(front) = self.order.front() {
            let gone = front.state.get() != State::Live;
            let ttl_passed = now >= front.stored.saturating_add(ttl);
            if !gone && !ttl_passed {
                break;
            }
            let old = self.order.pop_front().expect("front exists");
            if !gone {
                let state = if old.expired(now) {
                    State::Expired
                } else {
                    self.stats.trimmed_ttl += 1;
                    State::Lost
                };
                self.forget(&old, state);
            }
        }
        // Messages that reached their own timeout behind younger ones.
        for e in self.order.iter().filter(|e| e.state.get() == State::Live) {
            if e.expired(now) {
                e.state.set(State::Expired);
                self.stats.messages -= 1;
                self.stats.bytes -= e.cost();
            }
        }
        compact(&mut self.all);
        let mut floor = self.lost_floor;
        self.by_uid.retain(|_, ring| {
            compact(ring);
            // A ring with a recent loss stays (empty) so `since=0` still sees it.
            let keep = !ring.entries.is_empty() || ring.lost_until > now;
            if !keep {
                floor = floor.max(ring.lost_upto);
            }
            keep
        });
        self.lost_floor = floor;
    }

    /// Replays what `uid` (and `all`) got after `since`, oldest first, passing each
    /// frame that `accepts` its type to `push`.
    pub fn replay(
        &mut self,
        uid: Option<&str>,
        since: Since,
        now: u64,
        accepts: impl Fn(&str) -> bool,
        mut push: impl FnMut(&Arc<[u8]>),
    ) -> Replayed {
        let after = match since {
            Since::After(seq) => seq,
            Since::Start | Since::Foreign => 0,
        };
        compact(&mut self.all);
        let own = uid.and_then(|u| {
            let ring = self.by_uid.get_mut(u)?;
            compact(ring);
            Some(&*ring)
        });
        let intact = |ring: &Ring| match since {
            Since::Start => ring.lost_until <= now,
            Since::After(seq) => ring.lost_upto <= seq,
            Since::Foreign => false,
        };
        let mut complete = intact(&self.all)
            && match own {
                Some(ring) => intact(ring),
                // A uid without a ring lost nothing recently; only an old `since` may
                // predate a loss of a ring that is gone.
                None => uid.is_none() || since == Since::Start || self.lost_floor <= after,
            };
        let empty = VecDeque::new();
        let mine = own.map_or(&empty, |r| &r.entries);
        let mut a = self.all.entries.iter().peekable();
        let mut m = mine.iter().peekable();
        let mut messages = 0;
        loop {
            let next = match (a.peek(), m.peek()) {
                (Some(x), Some(y)) if x.seq <= y.seq => a.next(),
                (Some(_), Some(_)) => m.next(),
                (Some(_), None) => a.next(),
                (None, Some(_)) => m.next(),
                (None, None) => break,
            };
            let e = next.expect("peeked");
            if e.seq <= after {
                continue;
            }
            match e.state.get() {
                State::Lost => complete = false,
                State::Expired => {}
                State::Live if e.expired(now) || !accepts(&e.types) => {}
                State::Live => {
                    push(&e.frame);
                    messages += 1;
                }
            }
        }
        Replayed {
            complete,
            messages,
            last_seq: self.head.max(after),
        }
    }
}

/// Drops what a ring no longer holds from its front, recording losses.
fn compact(ring: &mut Ring) {
    while ring
        .entries
        .front()
        .is_some_and(|e| e.state.get() != State::Live)
    {
        let old = ring.entries.pop_front().expect("front exists");
        if old.state.get() == State::Lost {
            ring.lose(&old);
        }
        old.holders.set(old.holders.get().saturating_sub(1));
    }
}

/// One ring lets go of an entry; the last one gives its bytes back.
fn release(stats: &mut HistoryStats, entry: &Entry, state: State) {
    let left = entry.holders.get().saturating_sub(1);
    entry.holders.set(left);
    if left == 0 && entry.state.get() == State::Live {
        entry.state.set(state);
        stats.messages -= 1;
        stats.bytes -= entry.cost();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_positions_name_their_streams() {
        let p = |s: &str| ClusterSince::parse(s);
        let (e1, e2) = (Epoch(0x1f), Epoch(0x2e));
        assert_eq!(
            p("u1f-5,g2e-9"),
            Ok(ClusterSince {
                uid: StreamSince::After(e1, 5),
                all: StreamSince::After(e2, 9)
            })
        );
        assert_eq!(p("0,g2e-9").map(|s| s.uid), Ok(StreamSince::Start));
        assert_eq!(p("g2e-9").map(|s| s.uid), Ok(StreamSince::Start));
        // A plain id (its epoch may start with a hex letter) is no cluster position.
        assert_eq!(p("a3f-7").map(|s| s.all), Ok(StreamSince::Foreign));
        assert!(p("u1f-5,g2e-9,u1-1").is_err());
        assert!(p("x1-1").is_err());
        assert!(check_since("u1f-5,0").is_ok() && check_since("a3f-7").is_ok());
        assert!(check_since("u1f-").is_err());
    }

    const LIMITS: Limits = Limits {
        ttl: 300,
        size: 100,
        bytes: 1 << 20,
    };

    fn env(target: Target, types: &str, expires: u64, body: &str) -> Envelope {
        Envelope {
            target,
            types: types.into(),
            expires,
            seq: 0,
            lane: Default::default(),
            frame: Arc::from(body.as_bytes()),
        }
    }

    fn uids(list: &[&str]) -> Target {
        Target::Uids(list.iter().map(|u| Box::from(*u)).collect())
    }

    /// Replays into a list of frame bodies.
    fn replay(
        h: &mut History,
        uid: Option<&str>,
        since: Since,
        now: u64,
    ) -> (Vec<String>, Replayed) {
        let mut got = Vec::new();
        let r = h.replay(
            uid,
            since,
            now,
            |_| true,
            |f| got.push(String::from_utf8(f.to_vec()).unwrap()),
        );
        (got, r)
    }

    #[test]
    fn ids_round_trip_and_other_epochs_are_foreign() {
        let e = Epoch(0xabc);
        assert_eq!(e.id(42), "abc-42");
        assert_eq!(e.parse_since("abc-42"), Ok(Since::After(42)));
        assert_eq!(e.parse_since("0"), Ok(Since::Start));
        assert_eq!(e.parse_since("abd-42"), Ok(Since::Foreign));
        for bad in [
            "",
            "-",
            "abc-",
            "-4",
            "xyz-1",
            "abc-1x",
            "abc-+1",
            "123456789-1",
            "abc-99999999999999999999",
        ] {
            assert_eq!(e.parse_since(bad), Err(BadSince), "{bad:?}");
        }
        assert_ne!(Epoch::new(), Epoch(0));
    }

    #[test]
    fn replay_merges_uid_and_all_in_order_once() {
        let mut h = History::new(LIMITS, Epoch(1));
        h.append(1, &env(uids(&["a"]), "t", 0, "a1"), 10);
        h.append(2, &env(Target::All, "t", 0, "all2"), 10);
        h.append(3, &env(uids(&["b"]), "t", 0, "b3"), 10);
        h.append(4, &env(uids(&["a", "b"]), "t", 0, "ab4"), 10);
        let (got, r) = replay(&mut h, Some("a"), Since::Start, 11);
        assert_eq!(got, ["a1", "all2", "ab4"]);
        assert_eq!(
            r,
            Replayed {
                complete: true,
                messages: 3,
                last_seq: 4
            }
        );
        let (got, r) = replay(&mut h, Some("a"), Since::After(2), 11);
        assert_eq!(got, ["ab4"]);
        assert!(r.complete);
        let (got, _) = replay(&mut h, None, Since::Start, 11);
        assert_eq!(got, ["all2"]);
        assert_eq!(h.stats().messages, 4, "a message for two uids is kept once");
    }

    #[test]
    fn type_filter_and_own_timeout_apply_on_replay_without_a_loss() {
        let mut h = History::new(LIMITS, Epoch(1));
        h.append(1, &env(uids(&["a"]), "chat", 0, "c1"), 10);
        h.append(2, &env(uids(&["a"]), "notice", 0, "n2"), 10);
        h.append(3, &env(uids(&["a"]), "chat", 20, "c3"), 10);
        let mut got = Vec::new();
        let r = h.replay(
            Some("a"),
            Since::After(0),
            30,
            |t| t == "chat",
            |f| got.push(f.clone()),
        );
        assert_eq!(got, [Arc::<[u8]>::from(&b"c1"[..])]);
        assert!(r.complete, "a message past its own timeout is not missing");
        h.sweep(30);
        assert_eq!(h.stats().messages, 2);
        let (_, r) = replay(&mut h, Some("a"), Since::After(0), 30);
        assert!(r.complete);
    }

    #[test]
    fn size_bound_drops_oldest_and_marks_older_resumes_incomplete() {
        let mut h = History::new(Limits { size: 2, ..LIMITS }, Epoch(1));
        for seq in 1..=4 {
            h.append(seq, &env(uids(&["a"]), "t", 0, &format!("m{seq}")), 10);
        }
        assert_eq!(h.stats().trimmed(Trim::Size), 2);
        let (got, r) = replay(&mut h, Some("a"), Since::After(1), 10);
        assert_eq!(got, ["m3", "m4"]);
        assert!(!r.complete, "m2 is gone");
        let (_, r) = replay(&mut h, Some("a"), Since::After(2), 10);
        assert!(r.complete, "everything after m2 is there");
        let (_, r) = replay(&mut h, Some("a"), Since::Start, 10);
        assert!(!r.complete, "a trimmed message would still be retained");
        let (_, r) = replay(&mut h, Some("b"), Since::Start, 10);
        assert!(r.complete, "another uid lost nothing");
    }

    #[test]
    fn byte_bound_is_node_wide_and_oldest_first() {
        let cost = ENTRY_OVERHEAD + 2 + 1;
        let mut h = History::new(
            Limits {
                bytes: cost * 3,
                ..LIMITS
            },
            Epoch(1),
        );
        h.append(1, &env(uids(&["a"]), "t", 0, "m1"), 10);
        h.append(2, &env(uids(&["b"]), "t", 0, "m2"), 10);
        h.append(3, &env(uids(&["a"]), "t", 0, "m3"), 10);
        h.append(4, &env(uids(&["c"]), "t", 0, "m4"), 10);
        assert_eq!(h.stats().bytes, cost * 3);
        assert_eq!(h.stats().trimmed(Trim::Bytes), 1);
        let (got, r) = replay(&mut h, Some("a"), Since::After(0), 10);
        assert_eq!(got, ["m3"]);
        assert!(!r.complete);
        let (got, r) = replay(&mut h, Some("b"), Since::After(0), 10);
        assert_eq!(got, ["m2"]);
        assert!(r.complete);
    }

    #[test]
    fn ttl_bound_trims_and_a_freed_ring_still_reports_its_loss() {
        let mut h = History::new(Limits { ttl: 60, ..LIMITS }, Epoch(1));
        h.append(1, &env(uids(&["a"]), "t", 0, "m1"), 100);
        h.append(2, &env(uids(&["b"]), "t", 0, "m2"), 150);
        h.sweep(160);
        assert_eq!(h.stats().trimmed(Trim::Ttl), 1);
        assert_eq!(h.stats().messages, 1);
        let (got, r) = replay(&mut h, Some("a"), Since::After(0), 160);
        assert!(got.is_empty());
        assert!(!r.complete, "m1 left retention before its client came back");
        let (_, r) = replay(&mut h, Some("a"), Since::Start, 160);
        assert!(r.complete, "since=0 asks only for what is still retained");
        let (_, r) = replay(&mut h, Some("a"), Since::After(1), 160);
        assert!(r.complete);
    }

    #[test]
    fn foreign_ids_replay_everything_as_incomplete() {
        let mut h = History::new(LIMITS, Epoch(2));
        h.append(1, &env(uids(&["a"]), "t", 0, "m1"), 10);
        let (got, r) = replay(&mut h, Some("a"), Since::Foreign, 10);
        assert_eq!(got, ["m1"]);
        assert!(!r.complete);
    }

    #[test]
    fn retention_off_keeps_nothing_but_still_counts_sequence() {
        let mut h = History::new(Limits { ttl: 0, ..LIMITS }, Epoch(1));
        h.append(7, &env(uids(&["a"]), "t", 0, "m"), 10);
        let (got, r) = replay(&mut h, Some("a"), Since::After(0), 10);
        assert!(got.is_empty());
        assert_eq!(r.last_seq, 7);
        assert_eq!(h.stats(), HistoryStats::default());
    }

    #[test]
    fn random_interleavings_keep_the_books_straight() {
        // A small deterministic generator: appends, sweeps and replays in any order
        // must keep `messages`/`bytes` equal to what a replay of everything finds.
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut h = History::new(
            Limits {
                ttl: 50,
                size: 5,
                bytes: 4000,
            },
            Epoch(1),
        );
        let mut now = 1000;
        for seq in 1..5000u64 {
            let r = next();
            now += r % 3;
            let target = match r % 7 {
                0 => Target::All,
                1 => uids(&["a", "b"]),
                n => uids(&[["a", "b", "c", "d", "e"][(n % 5) as usize]]),
            };
            let expires = if r % 5 == 0 { now + r % 40 } else { 0 };
            h.append(
                seq,
                &env(target, "t", expires, &"x".repeat((r % 50) as usize)),
                now,
            );
            if r % 11 == 0 {
                h.sweep(now);
            }
            let mut seen = Vec::new();
            for uid in ["a", "b", "c", "d", "e", "z"] {
                h.replay(
                    Some(uid),
                    Since::Start,
                    now,
                    |_| true,
                    |f| seen.push(f.clone()),
                );
            }
            assert!(h.stats().bytes <= 4000);
        }
        h.sweep(now + 1000);
        assert_eq!(h.stats().messages, 0);
        assert_eq!(h.stats().bytes, 0);
        assert!(h.by_uid.is_empty());
        assert!(h.order.is_empty());
    }
}
