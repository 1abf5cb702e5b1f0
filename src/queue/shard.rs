//! Redis Cluster's sharded subscriptions: a router thread that follows the node's
//! interest and the slot map, and one thread per primary holding a plain
//! connection in `SSUBSCRIBE` mode for the shard channels of the slots it owns.
//!
//! The router groups each turn's interest changes by the primary owning each
//! channel's slot and hands them to that primary's thread as one command. A shard
//! thread that loses its connection, or is told `sunsubscribe` for a channel it did
//! not drop (its slots moved: a failover, a resharding), ends and gives back its
//! channels with this node's position in each stream; the router reads the slot map
//! again and gives them to their new owners, which read each stream after its
//! position before any live message ("catch-up"). What a stream can no longer fill
//! sends only that stream's connections off to resume (1012).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ::redis::{Connection, Value};

use super::subconn::SubConn;
use crossbeam_channel::{Receiver, Sender, TryRecvError};

use super::cluster::{Read, ReadFrom};
use super::publisher::{Endpoint, FIRST_BACKOFF};
use super::redis::{Backlog, Interest, Join, net_interest};
use super::shards::{Chan, Layout, SlotMap, place};
use super::streams::{first_seq_at, parse_place};
use super::{Backoff, Inbound, Link, Notifier, ReactorGone};
use crate::history::StreamSince;
use crate::message;

/// How long a shard thread blocks in one read, and the router's turn.
const TICK: Duration = Duration::from_millis(10);

/// Streams read by one pipeline of a catch-up: a lost shard's thousands of uids
/// are read in steps, each bounded in time by `-queue-timeout`.
const CATCH_UP_CHUNK: usize = 256;

/// What the router and the shard threads share, from the flags.
pub struct Setup {
    pub seeds: Vec<Endpoint>,
    pub layout: Arc<Layout>,
    pub timeout: Duration,
    pub backoff: Duration,
    /// `-queue-backlog`, and the counts the queue reads.
    pub backlog: (usize, Arc<AtomicUsize>, Arc<AtomicU64>),
    /// The most messages one stream's catch-up reads (`-history-size`).
    pub catch_up: usize,
    pub reads: Sender<Read>,
    pub received: Arc<AtomicU64>,
    pub channels: Arc<AtomicUsize>,
    pub link: Arc<Link>,
    pub reconnects: Arc<AtomicU64>,
    pub notifier: Notifier,
}

/// This node's place in one stream: what it has delivered up to.
pub type Pos = StreamSince;

/// A command to a shard thread.
enum Cmd {
    /// Subscribe these channels (catching each up from its position), then ask
    /// for these joins' reads.
    Sub(Vec<(Chan, Pos)>, Vec<Join>),
    Unsub(Vec<Chan>),
}

/// The channels (with positions) and joins a turn gives one primary's thread.
type Work = (Vec<(Chan, Pos)>, Vec<Join>);

/// What a shard thread tells the router.
enum Status {
    /// Its first subscription is confirmed.
    Live(String),
    /// It ended: its channels with their positions, and the joins not yet asked.
    Ended(String, Vec<(Chan, Pos)>, Vec<Join>),
}

struct Handle {
    cmds: Sender<Cmd>,
    thread: JoinHandle<()>,
}

/// The router's state.
pub struct Shards {
    set: Arc<Setup>,
    uids: HashSet<Arc<str>>,
    joins: Vec<Join>,
    map: SlotMap,
    threads: HashMap<String, Handle>,
    starting: HashSet<String>,
    /// Channels (and joins) without a live owner: given out once the map is read.
    lost: Vec<(Chan, Pos)>,
    lost_joins: Vec<Join>,
    stale_map: bool,
    retry_at: Instant,
    backoff: Backoff,
    status: (Sender<Status>, Receiver<Status>),
    was_up: bool,
    been_up: bool,
}

impl Shards {
    pub fn new(set: Setup) -> Self {
        let backoff = Backoff::new(FIRST_BACKOFF, set.backoff);
        Shards {
            set: Arc::new(set),
            uids: HashSet::new(),
            joins: Vec::new(),
            map: SlotMap::default(),
            threads: HashMap::new(),
            starting: HashSet::new(),
            lost: vec![(Chan::All, StreamSince::Start)],
            lost_joins: Vec::new(),
            stale_map: true,
            retry_at: Instant::now(),
            backoff,
            // At most two statuses per shard thread's life: bounded by the primaries.
            status: crossbeam_channel::unbounded(),
            was_up: false,
            been_up: false,
        }
    }

    /// Runs until `stop`; then the shard threads hand over what they hold.
    pub fn run(mut self, interest: Receiver<Interest>, stop: Arc<AtomicBool>) {
        while !stop.load(Ordering::Acquire) {
            self.take_statuses();
            self.take_interest(&interest);
            if self.stale_map && Instant::now() >= self.retry_at {
                self.refresh();
            }
            // Up once `all` is subscribed and nothing waits for an owner; a shard
            // still starting for new uids holds back only their joins.
            let all_live = self
                .owner(&Chan::All)
                .is_some_and(|o| self.threads.contains_key(&o) && !self.starting.contains(&o));
            let up = !self.stale_map && self.lost.is_empty() && all_live;
            // Up again after having been up: a reconnect (the first time is not).
            if up && !self.was_up && self.been_up {
                self.set.reconnects.fetch_add(1, Ordering::Relaxed);
            }
            self.been_up |= up;
            self.was_up = up;
            self.set.link.set_up(up);
            self.set.channels.store(self.uids.len(), Ordering::Relaxed);
            if let Ok(s) = self.status.1.recv_timeout(TICK) {
                self.on_status(s);
            }
        }
        for (_, h) in self.threads.drain() {
            drop(h.cmds);
            let _ = h.thread.join();
        }
        let _ = self.set.notifier.send(Inbound::Drained);
    }

    fn take_statuses(&mut self) {
        while let Ok(s) = self.status.1.try_recv() {
            self.on_status(s);
        }
    }

    fn on_status(&mut self, s: Status) {
        match s {
            Status::Live(addr) => {
                self.starting.remove(&addr);
                self.backoff.reset();
            }
            Status::Ended(addr, chans, joins) => {
                if let Some(h) = self.threads.remove(&addr) {
                    let _ = h.thread.join();
                }
                self.starting.remove(&addr);
                // Only what is still wanted: a uid may have left meanwhile.
                let uids = &self.uids;
                self.lost.extend(chans.into_iter().filter(|(c, _)| match c {
                    Chan::Uid(u) => uids.contains(u),
                    Chan::All => true,
                }));
                self.lost_joins.extend(joins);
                self.stale_map = true;
                // The map may still name the lost primary (a failover takes a
                // while): ask it again after a backoff, not in a tight loop.
                self.retry_at = Instant::now() + self.backoff.next_delay();
            }
        }
    }

    /// This turn's joins and leaves, netted per uid, as one command per primary.
    fn take_interest(&mut self, interest: &Receiver<Interest>) {
        let n = interest.len();
        if n == 0 {
            return;
        }
        let changes: Vec<Interest> = interest.try_iter().take(n).collect();
        let (on, off) = net_interest(&mut self.uids, &mut self.joins, changes);
        let off: HashSet<Chan> = off.into_iter().map(Chan::Uid).collect();
        self.lost.retain(|(c, _)| !off.contains(c));
        let mut by_owner: HashMap<String, Vec<Chan>> = HashMap::new();
        for chan in off {
            if let Some(owner) = self.owner(&chan) {
                by_owner.entry(owner).or_default().push(chan);
            }
        }
        for (owner, chans) in by_owner {
            if let Some(h) = self.threads.get(&owner) {
                let _ = h.cmds.send(Cmd::Unsub(chans));
            }
        }
        let on = on.into_iter().map(|u| (Chan::Uid(u), StreamSince::Start));
        let joins = std::mem::take(&mut self.joins);
        self.assign(on.collect(), joins);
    }

    fn owner(&self, chan: &Chan) -> Option<String> {
        self.map
            .owner(self.set.layout.slot(chan))
            .map(str::to_string)
    }

    /// Gives channels and joins to the threads of their slots' primaries.
    fn assign(&mut self, chans: Vec<(Chan, Pos)>, joins: Vec<Join>) {
        let mut work: HashMap<String, Work> = HashMap::new();
        for (chan, pos) in chans {
            match self.owner(&chan) {
                Some(o) if !self.stale_map => work.entry(o).or_default().0.push((chan, pos)),
                _ => self.lost.push((chan, pos)),
            }
        }
        for j in joins {
            match self.owner(&Chan::Uid(j.uid.clone())) {
                Some(o) if !self.stale_map => work.entry(o).or_default().1.push(j),
                _ => self.lost_joins.push(j),
            }
        }
        for (owner, (chans, joins)) in work {
            let cmds = self.thread_for(&owner);
            if let Err(e) = cmds.send(Cmd::Sub(chans, joins)) {
                // The thread ended meanwhile: its Ended status comes; this with it.
                if let Cmd::Sub(chans, joins) = e.0 {
                    self.lost.extend(chans);
                    self.lost_joins.extend(joins);
                    self.stale_map = true;
                }
            }
        }
    }

    fn thread_for(&mut self, owner: &str) -> Sender<Cmd> {
        if let Some(h) = self.threads.get(owner) {
            return h.cmds.clone();
        }
        // One command per router turn at most, each bounded by the interest
        // changes it nets (-queue-interest).
        let (tx, rx) = crossbeam_channel::unbounded();
        let shard = ShardThread {
            addr: owner.to_string(),
            set: self.set.clone(),
            status: self.status.0.clone(),
        };
        let thread = thread::Builder::new()
            .name("wspush-cluster-shard".into())
            .spawn(move || shard.run(rx));
        match thread {
            Ok(thread) => {
                self.starting.insert(owner.to_string());
                self.threads.insert(
                    owner.to_string(),
                    Handle {
                        cmds: tx.clone(),
                        thread,
                    },
                );
            }
            Err(e) => warn!("Redis Cluster: cannot start a shard thread: {e}"),
        }
        tx
    }

    /// Reads the slot map from any seed or known primary, then gives out what
    /// waits for an owner.
    fn refresh(&mut self) {
        let known: Vec<Endpoint> = match self.set.seeds.first() {
            Some(seed) => self
                .map
                .primaries()
                .filter_map(|a| seed.at(a).ok())
                .collect(),
            None => Vec::new(),
        };
        let Ok((map, _, _)) = SlotMap::read(self.set.seeds.iter().chain(&known), self.set.timeout)
        else {
            self.retry_at = Instant::now() + self.backoff.next_delay();
            return;
        };
        self.map = map;
        self.stale_map = false;
        let chans = std::mem::take(&mut self.lost);
        let joins = std::mem::take(&mut self.lost_joins);
        self.assign(chans, joins);
    }
}

/// One primary's subscriptions.
struct ShardThread {
    addr: String,
    set: Arc<Setup>,
    status: Sender<Status>,
}

/// A shard thread's connections and what it holds.
struct Live {
    sub: SubConn,
    data: Connection,
    chans: HashMap<Chan, Pos>,
    backlog: Backlog,
    heard: Instant,
    pinged: bool,
    /// Our SUNSUBSCRIBEs not confirmed yet, per channel.
    dropping: HashMap<Chan, u32>,
}

/// Why a shard thread ends.
enum End {
    /// Connection lost, or its slots moved: give the channels back.
    Lost(String),
    /// The router stopped and the channel went quiet.
    Stopped,
    ReactorGone,
}

impl From<::redis::RedisError> for End {
    fn from(e: ::redis::RedisError) -> Self {
        End::Lost(e.to_string())
    }
}

impl From<std::io::Error> for End {
    fn from(e: std::io::Error) -> Self {
        End::Lost(e.to_string())
    }
}

impl From<ReactorGone> for End {
    fn from(_: ReactorGone) -> Self {
        End::ReactorGone
    }
}

impl ShardThread {
    fn run(self, cmds: Receiver<Cmd>) {
        let mut pending: Vec<Join> = Vec::new();
        let mut chans: HashMap<Chan, Pos> = HashMap::new();
        let end = match self.connect() {
            Ok(mut live) => {
                let end = self.work(&mut live, &cmds, &mut pending);
                let _ = live.backlog.flush_all(&self.set.notifier);
                chans = std::mem::take(&mut live.chans);
                end
            }
            Err(e) => End::Lost(e.to_string()),
        };
        let End::Lost(why) = end else { return };
        warn!("Redis Cluster shard {}: {why}", self.addr);
        // Commands not taken yet go back with the rest.
        for cmd in cmds.try_iter() {
            match cmd {
                Cmd::Sub(c, j) => {
                    for (chan, pos) in c {
                        chans.entry(chan).or_insert(pos);
                    }
                    pending.extend(j);
                }
                Cmd::Unsub(c) => {
                    for chan in &c {
                        chans.remove(chan);
                    }
                }
            }
        }
        let chans = chans.into_iter().collect();
        let _ = self
            .status
            .send(Status::Ended(self.addr.clone(), chans, pending));
    }

    fn connect(&self) -> ::redis::RedisResult<Live> {
        // A node the slot map names takes the seeds' credentials.
        let seed = self.set.seeds.first().ok_or_else(|| {
            ::redis::RedisError::from((::redis::ErrorKind::Client, "no seed node"))
        })?;
        let e = seed.at(&self.addr).map_err(|e| {
            ::redis::RedisError::from((::redis::ErrorKind::Client, "address", e.to_string()))
        })?;
        let mut sub = SubConn::connect(&self.addr, self.set.timeout)?;
        if let Some((user, pass)) = seed.credentials() {
            sub.auth(user.as_deref(), &pass, self.set.timeout)?;
        }
        let (held, dropped) = (self.set.backlog.1.clone(), self.set.backlog.2.clone());
        Ok(Live {
            sub,
            data: e.connect(self.set.timeout)?,
            chans: HashMap::new(),
            backlog: Backlog::new(self.set.backlog.0, held, dropped),
            heard: Instant::now(),
            pinged: false,
            dropping: HashMap::new(),
        })
    }

    fn work(&self, live: &mut Live, cmds: &Receiver<Cmd>, pending: &mut Vec<Join>) -> End {
        let mut said_live = false;
        // Stopping ends at the first quiet tick; a never-quiet channel gets `timeout`.
        let mut stopping: Option<Instant> = None;
        loop {
            loop {
                match cmds.try_recv() {
                    Ok(Cmd::Sub(chans, joins)) => {
                        pending.extend(joins);
                        if let Err(e) = self.subscribe(live, chans) {
                            return e;
                        }
                        if !said_live {
                            said_live = true;
                            let _ = self.status.send(Status::Live(self.addr.clone()));
                        }
                        self.ask_reads(std::mem::take(pending));
                    }
                    Ok(Cmd::Unsub(chans)) => {
                        if let Err(e) = self.unsubscribe(live, chans) {
                            return e;
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        stopping.get_or_insert_with(Instant::now);
                        break;
                    }
                }
            }
            if let Err(e) = live.backlog.flush(&self.set.notifier) {
                return e.into();
            }
            let heard = match self.read_one(live) {
                Ok(heard) => heard,
                Err(e) => return e,
            };
            if let Some(t) = stopping {
                let quiet = !heard && live.backlog.is_empty();
                if quiet || t.elapsed() >= self.set.timeout {
                    return End::Stopped;
                }
            }
        }
    }

    /// One `SSUBSCRIBE` for the new channels, their confirmations awaited (messages
    /// of channels held already are delivered meanwhile), then each caught up.
    fn subscribe(&self, live: &mut Live, chans: Vec<(Chan, Pos)>) -> Result<(), End> {
        let new: HashMap<Chan, Pos> = chans
            .into_iter()
            .filter(|(c, _)| !live.chans.contains_key(c))
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        // Held from here: a failure below gives them back with their positions.
        for (chan, pos) in &new {
            live.chans.insert(chan.clone(), *pos);
        }
        live.sub
            .send_all(&self.per_slot("SSUBSCRIBE", new.keys()))?;
        let deadline = Instant::now() + self.set.timeout;
        let mut confirmed = 0;
        while confirmed < new.len() {
            if Instant::now() >= deadline {
                return Err(End::Lost("SSUBSCRIBE not confirmed in time".into()));
            }
            if let Some(v) = live.sub.next(TICK)? {
                live.heard = Instant::now();
                if let Value::ServerError(e) = &v {
                    // MOVED: the map is stale; anything else is no better.
                    return Err(End::Lost(format!("SSUBSCRIBE refused: {e:?}")));
                }
                if let Some(("ssubscribe", _)) = push_kind(&v) {
                    confirmed += 1;
                } else {
                    self.on_push(live, v)?;
                }
            }
        }
        // From here every message of these streams reaches this connection; a
        // position without an id starts at this moment by this primary's clock.
        let (secs, micros): (u64, u64) = ::redis::cmd("TIME").query(&mut live.data)?;
        let now = first_seq_at(secs * 1000 + micros / 1000).saturating_sub(1);
        let (behind, fresh): (Vec<_>, Vec<_>) = new
            .into_iter()
            .partition(|(_, p)| matches!(p, StreamSince::After(..) | StreamSince::AfterTime(_)));
        for (chan, _) in fresh {
            live.chans.insert(chan, StreamSince::AfterTime(now));
        }
        let mut unfilled = Vec::new();
        for chunk in behind.chunks(CATCH_UP_CHUNK) {
            self.catch_up(live, chunk, &mut unfilled)?;
            live.heard = Instant::now();
        }
        self.report_unfilled(unfilled)?;
        Ok(())
    }

    /// Reads streams after this node's position in each (one pipeline) and
    /// delivers what they missed; a stream that cannot fill its gap goes to
    /// `unfilled`. Each stream's new position is kept.
    fn catch_up(
        &self,
        live: &mut Live,
        chans: &[(Chan, Pos)],
        unfilled: &mut Vec<Chan>,
    ) -> Result<(), End> {
        let layout = &self.set.layout;
        let limit = self.set.catch_up;
        let mut pipe = ::redis::pipe();
        for (chan, pos) in chans {
            pipe.add_command(layout.read_cmd(chan, *pos, limit, None));
        }
        let replies: Vec<Value> = pipe.query(&mut live.data)?;
        let mut missed = Vec::new();
        for ((chan, pos), reply) in chans.iter().zip(replies) {
            let read = layout
                .parse_read(chan, *pos, reply, limit)
                .map_err(|e| End::Lost(e.to_string()))?;
            if !read.complete {
                unfilled.push(chan.clone());
            }
            let next = match (read.epoch, read.batch.last()) {
                (Some(e), Some(last)) => StreamSince::After(e, last.seq),
                _ => *pos,
            };
            live.chans.insert(chan.clone(), next);
            if read.complete {
                missed.extend(read.batch);
            }
        }
        if !missed.is_empty() {
            let n = missed.len() as u64;
            self.set.received.fetch_add(n, Ordering::Relaxed);
            info!(
                "Redis Cluster: {} missed messages read from history",
                missed.len()
            );
            live.backlog.push(missed, &self.set.notifier)?;
        }
        Ok(())
    }

    fn report_unfilled(&self, unfilled: Vec<Chan>) -> Result<(), End> {
        if unfilled.is_empty() {
            return Ok(());
        }
        warn!("Redis Cluster: a gap is no longer in history; its connections resume");
        let event = if unfilled.contains(&Chan::All) {
            Inbound::Unfilled
        } else {
            let uids = unfilled.iter().filter_map(|c| match c {
                Chan::Uid(u) => Some(u.to_string()),
                Chan::All => None,
            });
            Inbound::UnfilledFor(uids.collect())
        };
        self.set.notifier.send(event)?;
        Ok(())
    }

    fn unsubscribe(&self, live: &mut Live, chans: Vec<Chan>) -> Result<(), End> {
        let held: Vec<Chan> = chans
            .into_iter()
            .filter(|c| live.chans.remove(c).is_some())
            .collect();
        for c in &held {
            *live.dropping.entry(c.clone()).or_default() += 1;
        }
        if !held.is_empty() {
            live.sub
                .send_all(&self.per_slot("SUNSUBSCRIBE", held.iter()))?;
        }
        Ok(())
    }

    /// One command per slot: a sharded (un)subscription may name several
    /// channels only when they share a slot.
    fn per_slot<'a>(&self, cmd: &str, chans: impl Iterator<Item = &'a Chan>) -> Vec<::redis::Cmd> {
        let mut by_slot: HashMap<u16, ::redis::Cmd> = HashMap::new();
        for c in chans {
            by_slot
                .entry(self.set.layout.slot(c))
                .or_insert_with(|| ::redis::cmd(cmd))
                .arg(self.set.layout.channel(c));
        }
        by_slot.into_values().collect()
    }

    /// Asks the reader for each join's history: its channel is subscribed now.
    fn ask_reads(&self, joins: Vec<Join>) {
        for j in joins {
            let from = match j.since {
                Some(s) => ReadFrom::Since(s),
                None => ReadFrom::Joined(j.at),
            };
            let read = Read {
                ticket: j.ticket,
                uid: Some(j.uid),
                from,
            };
            if let Err(e) = self.set.reads.try_send(read) {
                let event = Inbound::History {
                    ticket: e.into_inner().ticket,
                    fetched: Err("too many history reads waiting".into()),
                };
                let _ = self.set.notifier.send(event);
            }
        }
    }

    /// One push from the connection; false when none came within a tick.
    fn read_one(&self, live: &mut Live) -> Result<bool, End> {
        match live.sub.next(TICK)? {
            Some(v) => {
                live.heard = Instant::now();
                live.pinged = false;
                self.on_push(live, v)?;
                Ok(true)
            }
            None => {
                // A quiet primary is asked; one that does not answer is gone.
                let quiet = live.heard.elapsed();
                if quiet >= self.set.timeout * 2 {
                    return Err(End::Lost("no answer to PING".into()));
                }
                if quiet >= self.set.timeout && !live.pinged {
                    // In subscribed mode PING is answered as a push ("pong").
                    live.sub.send(&::redis::cmd("PING"))?;
                    live.pinged = true;
                }
                Ok(false)
            }
        }
    }

    fn on_push(&self, live: &mut Live, v: Value) -> Result<(), End> {
        let Some((kind, rest)) = push_kind(&v) else {
            return Ok(());
        };
        let channel = match rest.first() {
            Some(Value::BulkString(c)) => c.as_slice(),
            _ => return Ok(()),
        };
        let Some(chan) = self.set.layout.chan_of(channel) else {
            return Ok(());
        };
        match kind {
            "smessage" => {
                let Some(Value::BulkString(payload)) = rest.get(1) else {
                    return Ok(());
                };
                self.set.received.fetch_add(1, Ordering::Relaxed);
                match self.decode(live, &chan, payload) {
                    Ok(Some(batch)) => live.backlog.push(batch, &self.set.notifier)?,
                    Ok(None) => {}
                    Err(e) => warn!("Redis Cluster channel {chan:?}: {e}; skipped"),
                }
                Ok(())
            }
            "sunsubscribe" => {
                // The answer to our own SUNSUBSCRIBE (the channel may be held
                // again since), or the server dropping it: its slot moved.
                if let Some(n) = live.dropping.get_mut(&chan) {
                    *n -= 1;
                    if *n == 0 {
                        live.dropping.remove(&chan);
                    }
                    return Ok(());
                }
                match live.chans.contains_key(&chan) {
                    true => Err(End::Lost(format!("{chan:?} moved off this primary"))),
                    false => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }

    /// `<epoch> <stream id> <wire batch>`, placed on its stream; `None` for a
    /// message already delivered (a catch-up overlapping the live channel).
    fn decode(
        &self,
        live: &mut Live,
        chan: &Chan,
        payload: &[u8],
    ) -> Result<Option<Vec<message::Envelope>>, String> {
        let mut parts = payload.splitn(3, |&b| b == b' ');
        let (Some(epoch), Some(id), Some(wire)) = (parts.next(), parts.next(), parts.next()) else {
            return Err("not a history message".into());
        };
        let (epoch, seq) = parse_place(epoch, id)?;
        let pos = live.chans.get(chan).copied();
        let repeat = match pos {
            Some(StreamSince::After(e, last)) => e == epoch && seq <= last,
            _ => false,
        };
        if repeat {
            return Ok(None);
        }
        let mut batch =
            message::decode_wire(wire, &self.set.layout.rules).map_err(|e| e.to_string())?;
        let id = chan.id(epoch, seq);
        for env in &mut batch {
            env.set_id(seq, &id);
            place(env, chan);
        }
        if pos.is_some() {
            live.chans
                .insert(chan.clone(), StreamSince::After(epoch, seq));
        }
        Ok(Some(batch))
    }
}

/// A RESP2 push: its kind and the rest.
fn push_kind(v: &Value) -> Option<(&str, &[Value])> {
    let Value::Array(items) = v else { return None };
    let kind = match items.first()? {
        Value::BulkString(k) => std::str::from_utf8(k).ok()?,
        Value::SimpleString(k) => k.as_str(),
        _ => return None,
    };
    Some((kind, &items[1..]))
}
