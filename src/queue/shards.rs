//! Redis Cluster's history layout and scripts: everything a message touches lives in
//! one slot, so every script call stays on one primary.
//!
//! Per stream (a uid's, or the broadcasts'), all under one hash tag:
//! - `<name>:{u:<uid>}:h` / `<name>:{all}:h` — the stream, ids `<ms>-<n>`;
//! - `<name>:{u:<uid>}:e` / `<name>:{all}:e` — its epoch and clock (hash `epoch`,
//!   `ms`, `n`), created with the stream and expiring with it;
//! - `<name>:{u:<uid>}` / `<name>:{all}` — its shard channel (`SPUBLISH` from the
//!   script must stay in the script's slot, so the channel carries the same tag).
//!
//! Each stream numbers its own messages (`seq = ms*1024 + n` from its primary's
//! clock), so a delivery id names its stream: `u<epoch hex>-<seq>` for a uid's,
//! `g<epoch hex>-<seq>` for the broadcasts' ([`crate::history::ClusterSince`]).
//! Both prefixes are letters no hex epoch starts with, so neither id reads as a
//! plain Redis id.

use ::redis::{RedisResult, Value};

use super::publisher::Endpoint;
use super::streams::{PER_MS, Script, bad, epoch_of, parse_entries, text};
use crate::history::{Epoch, StreamSince};
use crate::message::{Envelope, Lane, Rules};

/// Redis Cluster's slot count.
const SLOTS: u16 = 16384;

/// One stream of the cluster layout: a uid's, or the broadcasts'.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Chan {
    Uid(std::sync::Arc<str>),
    All,
}

impl Chan {
    /// The lane its messages count in on a connection.
    pub fn lane(&self) -> Lane {
        match self {
            Chan::Uid(_) => Lane::Main,
            Chan::All => Lane::Broadcast,
        }
    }

    /// The delivery id of its message `seq`.
    pub fn id(&self, epoch: Epoch, seq: u64) -> String {
        let tag = match self {
            Chan::Uid(_) => 'u',
            Chan::All => 'g',
        };
        format!("{tag}{:x}-{seq}", epoch.0)
    }
}

/// CRC16-XMODEM, the checksum Redis Cluster places keys by.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The slot of a key or channel: of its `{hash tag}` when it has a non-empty one.
pub fn slot(key: &str) -> u16 {
    let b = key.as_bytes();
    let tagged = b.iter().position(|&c| c == b'{').and_then(|open| {
        let len = b[open + 1..].iter().position(|&c| c == b'}')?;
        (len > 0).then(|| &b[open + 1..open + 1 + len])
    });
    crc16(tagged.unwrap_or(b)) % SLOTS
}

/// Appends messages to one stream and SPUBLISHes each on its channel. Returns the
/// epoch and the id of each.
const APPEND: &str = r#"
local st = redis.call('HMGET', KEYS[2], 'epoch', 'ms', 'n')
local epoch = st[1] or ARGV[3]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ms = tonumber(st[2]) or 0
local n = tonumber(st[3]) or -1
local ttl = tonumber(ARGV[1])
local maxlen = tonumber(ARGV[2])
local out = {epoch}
for i = 5, #ARGV do
  if now > ms then ms = now; n = 0 else n = n + 1 end
  if n >= 1024 then ms = ms + 1; n = 0 end
  local id = string.format('%d-%d', ms, n)
  redis.call('XADD', KEYS[1], id, 'm', ARGV[i])
  local lost = nil
  local excess = redis.call('XLEN', KEYS[1]) - maxlen
  if excess > 0 then
    local old = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', excess)
    lost = old[#old][1]
    redis.call('XTRIM', KEYS[1], 'MAXLEN', maxlen)
  end
  local minid = string.format('%d-0', ms - ttl)
  local aged = redis.call('XREVRANGE', KEYS[1], '(' .. minid, '-', 'COUNT', 1)
  if #aged > 0 then
    lost = aged[1][1]
    redis.call('XTRIM', KEYS[1], 'MINID', minid)
  end
  if lost then redis.call('XSETID', KEYS[1], id, 'MAXDELETEDID', lost) end
  redis.call('SPUBLISH', ARGV[4], epoch .. ' ' .. id .. ' ' .. ARGV[i])
  out[#out + 1] = id
end
redis.call('HSET', KEYS[2], 'epoch', epoch, 'ms', string.format('%d', ms), 'n', n)
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return out
"#;

/// Reads one stream: its epoch, Redis's clock, and (if it exists) its newest
/// trimmed id and its entries after ARGV[1] (all of them under another epoch), or
/// those of the last ARGV[4] ms.
const READ: &str = r#"
local epoch = redis.call('HGET', KEYS[2], 'epoch')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local start = ARGV[1]
if ARGV[3] ~= '*' and epoch ~= ARGV[3] then start = '-' end
if ARGV[4] then start = string.format('%d-0', math.max(now - tonumber(ARGV[4]), 0)) end
local out = {epoch or false, now, false}
if redis.call('EXISTS', KEYS[1]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  local deleted = '0-0'
  for j = 1, #info, 2 do
    if info[j] == 'max-deleted-entry-id' then deleted = info[j + 1] end
  end
  out[3] = {deleted, redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', ARGV[2])}
end
return out
"#;

/// Names, bounds and scripts of the cluster layout.
pub struct Layout {
    name: String,
    /// `-history-ttl` in milliseconds, `-history-size` per stream.
    pub ttl_ms: u64,
    size: usize,
    append: Script,
    read: Script,
    pub rules: Rules,
}

/// One stream's read.
pub struct StreamRead {
    /// Nothing after the position asked for is missing.
    pub complete: bool,
    /// Oldest first, ids in the frames, expired ones left out.
    pub batch: Vec<Envelope>,
    /// Redis's clock at the read (ms).
    pub redis_ms: u64,
    /// Its epoch, if the stream exists.
    pub epoch: Option<Epoch>,
    /// The newest seq a trim removed, and whether the read stopped at its limit.
    pub trimmed: u64,
    pub cut: bool,
}

impl Layout {
    pub fn new(name: &str, ttl_secs: u64, size: usize, rules: Rules) -> Self {
        Layout {
            name: name.to_string(),
            ttl_ms: ttl_secs.saturating_mul(1000).max(1),
            size: size.max(1),
            append: Script::new(APPEND),
            read: Script::new(READ),
            rules,
        }
    }

    fn tag(&self, chan: &Chan) -> String {
        match chan {
            Chan::Uid(u) => format!("{}:{{u:{u}}}", self.name),
            Chan::All => format!("{}:{{all}}", self.name),
        }
    }

    /// The shard channel of a stream.
    pub fn channel(&self, chan: &Chan) -> String {
        self.tag(chan)
    }

    /// The stream a shard channel's name belongs to, if it is one of ours.
    pub fn chan_of(&self, channel: &[u8]) -> Option<Chan> {
        let rest = std::str::from_utf8(channel)
            .ok()?
            .strip_prefix(&self.name)?;
        match rest {
            ":{all}" => Some(Chan::All),
            _ => rest
                .strip_prefix(":{u:")?
                .strip_suffix('}')
                .map(|u| Chan::Uid(u.into())),
        }
    }

    fn keys(&self, chan: &Chan) -> Vec<String> {
        let tag = self.tag(chan);
        vec![format!("{tag}:h"), format!("{tag}:e")]
    }

    /// The slot every key of a stream lives in.
    pub fn slot(&self, chan: &Chan) -> u16 {
        slot(&self.tag(chan))
    }

    /// The call appending `payloads` (wire batches) to a stream. Sent as `EVAL`: a
    /// pipeline over several primaries cannot redo only the calls that met a
    /// primary without the script cached, and an `EVAL` is never refused for that.
    pub fn append_cmd(&self, chan: &Chan, fresh: Epoch, payloads: &[Vec<u8>]) -> ::redis::Cmd {
        let mut args: Vec<Vec<u8>> = vec![
            self.ttl_ms.to_string().into_bytes(),
            self.size.to_string().into_bytes(),
            format!("{:x}", fresh.0).into_bytes(),
            self.channel(chan).into_bytes(),
        ];
        args.extend(payloads.iter().cloned());
        self.append.call(false, &self.keys(chan), &args)
    }

    /// The call reading a stream after `since`, or (`recent_ms`) its last messages.
    pub fn read_cmd(
        &self,
        chan: &Chan,
        since: StreamSince,
        limit: usize,
        recent_ms: Option<u64>,
    ) -> ::redis::Cmd {
        let (start, epoch) = match since {
            StreamSince::After(e, seq) if seq > 0 => (
                format!("({}-{}", seq / PER_MS, seq % PER_MS),
                format!("{:x}", e.0),
            ),
            StreamSince::After(e, _) => ("-".into(), format!("{:x}", e.0)),
            StreamSince::AfterTime(seq) => {
                (format!("({}-{}", seq / PER_MS, seq % PER_MS), "*".into())
            }
            _ => ("-".into(), String::new()),
        };
        let mut args = vec![
            start.into_bytes(),
            limit.max(1).to_string().into_bytes(),
            epoch.into_bytes(),
        ];
        args.extend(recent_ms.map(|ms| ms.to_string().into_bytes()));
        self.read.call(false, &self.keys(chan), &args)
    }

    /// A [`READ`] reply: what followed `since` in the stream, and whether that is
    /// all of it (same epoch, nothing trimmed after it, not cut by `limit`).
    pub fn parse_read(
        &self,
        chan: &Chan,
        since: StreamSince,
        reply: Value,
        limit: usize,
    ) -> RedisResult<StreamRead> {
        let Value::Array(items) = reply else {
            return Err(bad("cluster read: not an array"));
        };
        let [epoch, Value::Int(now), part] = &items[..] else {
            return Err(bad("cluster read: shape"));
        };
        let redis_ms = u64::try_from(*now).unwrap_or(0);
        let epoch = match epoch {
            Value::Nil | Value::Boolean(false) => None,
            v => Some(epoch_of(v).ok_or_else(|| bad("cluster read: epoch"))?),
        };
        let window_start = redis_ms.saturating_sub(self.ttl_ms) * PER_MS;
        let (after, complete) = match since {
            StreamSince::Start => (0, true),
            StreamSince::After(e, seq) if Some(e) == epoch => (seq, true),
            StreamSince::AfterTime(seq) if epoch.is_some() => (seq, true),
            // No epoch: the stream is gone whole; it was last written over a ttl
            // ago, so it holds nothing after a recent id.
            StreamSince::After(_, seq) | StreamSince::AfterTime(seq) if epoch.is_none() => {
                (seq, seq >= window_start)
            }
            _ => (0, false),
        };
        let part = match (epoch, part) {
            (Some(e), v) => parse_entries(v, limit, &self.rules, |seq| chan.id(e, seq))?,
            (None, _) => None,
        };
        let mut read = StreamRead {
            complete,
            batch: Vec::new(),
            redis_ms,
            epoch,
            trimmed: 0,
            cut: false,
        };
        if let Some(part) = part {
            let bound_cut = match since {
                // Only a bound that cut a message still within retention.
                StreamSince::Start => part.deleted >= window_start,
                _ => part.deleted > after,
            };
            read.complete &= !part.cut && !bound_cut;
            read.trimmed = part.deleted;
            read.cut = part.cut;
            read.batch = placed(part.entries, chan, after, redis_ms / 1000);
        }
        Ok(read)
    }
}

/// The entries after `after` that have not expired by `now` (unix seconds), placed
/// on their stream.
fn placed(entries: Vec<(u64, Envelope)>, chan: &Chan, after: u64, now: u64) -> Vec<Envelope> {
    entries
        .into_iter()
        .filter(|(seq, env)| *seq > after && !env.is_expired(now))
        .map(|(_, mut env)| {
            place(&mut env, chan);
            env
        })
        .collect()
}

/// Gives a message read from (or published on) a stream its stream's target and
/// lane: a copy from a uid's stream is for that uid's connections only.
pub fn place(env: &mut Envelope, chan: &Chan) {
    env.lane = chan.lane();
    if let Chan::Uid(u) = chan {
        env.target = crate::message::Target::Uids(vec![Box::from(&**u)]);
    }
}

/// The epoch and ids an [`APPEND`] reply gave.
pub fn parse_appended(reply: &Value) -> RedisResult<(Epoch, Vec<u64>)> {
    let Value::Array(items) = reply else {
        return Err(bad("cluster append: not an array"));
    };
    let epoch = items
        .first()
        .and_then(epoch_of)
        .ok_or_else(|| bad("cluster append: epoch"))?;
    let seqs = items[1..]
        .iter()
        .map(|v| text(v).and_then(super::streams::seq_of))
        .collect::<Option<Vec<u64>>>()
        .ok_or_else(|| bad("cluster append: id"))?;
    Ok((epoch, seqs))
}

/// The slot map: each slot range with its primary's `HOST:PORT`, sorted by slot.
/// The router of the sharded subscriptions and `nodes.rs` both route by it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlotMap(Vec<(u16, u16, String)>);

impl SlotMap {
    pub fn new(mut ranges: Vec<(u16, u16, String)>) -> Self {
        ranges.sort_unstable();
        SlotMap(ranges)
    }

    /// A `CLUSTER SLOTS` reply; `None` unless it is one and names some range.
    pub fn parse(reply: &Value) -> Option<SlotMap> {
        let Value::Array(ranges) = reply else {
            return None;
        };
        let mut out = Vec::with_capacity(ranges.len());
        for r in ranges {
            let Value::Array(r) = r else { return None };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(primary))) =
                (r.first(), r.get(1), r.get(2))
            else {
                return None;
            };
            let host = primary.first().and_then(text)?;
            let Some(Value::Int(port)) = primary.get(1) else {
                return None;
            };
            let (start, end) = (u16::try_from(*start).ok()?, u16::try_from(*end).ok()?);
            out.push((start, end, format!("{host}:{port}")));
        }
        (!out.is_empty()).then(|| SlotMap::new(out))
    }

    /// `CLUSTER SLOTS` from the first of `nodes` that gives a map, with the
    /// connection it came over.
    pub fn read<'a>(
        nodes: impl IntoIterator<Item = &'a Endpoint>,
        timeout: std::time::Duration,
    ) -> RedisResult<(SlotMap, &'a Endpoint, ::redis::Connection)> {
        let mut last = None;
        for e in nodes {
            let mut con = match e.connect(timeout) {
                Ok(c) => c,
                Err(err) => {
                    last = Some(err);
                    continue;
                }
            };
            match SlotMap::query(&mut con) {
                Ok(Some(map)) => return Ok((map, e, con)),
                Ok(None) => {}
                Err(err) => last = Some(err),
            }
        }
        Err(last.unwrap_or_else(|| {
            ::redis::RedisError::from((::redis::ErrorKind::Client, "no node gave a slot map"))
        }))
    }

    /// `CLUSTER SLOTS` over one connection.
    pub fn query(con: &mut ::redis::Connection) -> RedisResult<Option<SlotMap>> {
        let reply: Value = ::redis::cmd("CLUSTER").arg("SLOTS").query(con)?;
        Ok(SlotMap::parse(&reply))
    }

    /// The primary owning `slot`.
    pub fn owner(&self, slot: u16) -> Option<&str> {
        let i = self.0.partition_point(|(start, _, _)| *start <= slot);
        let (start, end, addr) = self.0.get(i.checked_sub(1)?)?;
        (*start <= slot && slot <= *end).then_some(addr.as_str())
    }

    /// Each primary's `HOST:PORT`, once per range it owns.
    pub fn primaries(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(_, _, a)| a.as_str())
    }

    /// Whether `addr` is a primary of the map.
    pub fn names(&self, addr: &str) -> bool {
        self.primaries().any(|a| a == addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Target, encode_wire, push_frame};

    fn slot_map(ranges: &[(u16, u16, &str)]) -> SlotMap {
        SlotMap::new(
            ranges
                .iter()
                .map(|(a, b, c)| (*a, *b, c.to_string()))
                .collect(),
        )
    }

    #[test]
    fn a_slot_belongs_to_the_range_holding_it() {
        let m = slot_map(&[
            (10923, 16383, "c:1"),
            (0, 5460, "a:1"),
            (5461, 10922, "b:1"),
        ]);
        assert_eq!(m.owner(0), Some("a:1"));
        assert_eq!(m.owner(5460), Some("a:1"));
        assert_eq!(m.owner(5461), Some("b:1"));
        assert_eq!(m.owner(16383), Some("c:1"));
        assert!(m.names("b:1") && !m.names("d:1"));
    }

    #[test]
    fn a_slot_no_range_covers_has_no_owner() {
        let m = slot_map(&[(0, 99, "a:1"), (200, 16383, "b:1")]);
        assert_eq!(m.owner(100), None);
        assert_eq!(m.owner(199), None);
        assert_eq!(SlotMap::default().owner(0), None);
    }

    #[test]
    fn a_slots_reply_without_ranges_is_no_map() {
        assert_eq!(SlotMap::parse(&Value::Array(Vec::new())), None);
        assert_eq!(SlotMap::parse(&Value::Nil), None);
    }

    /// A READ reply: epoch `e` (or none), Redis's clock, and the stream's newest
    /// trimmed id and entries (or no stream).
    fn reply(epoch: Option<&str>, now_ms: i64, stream: Option<(&str, &[u64])>) -> Value {
        let bulk = |s: String| Value::BulkString(s.into_bytes());
        let env = Envelope {
            target: Target::Uids(vec!["x".into(), "y".into()]),
            types: "t".into(),
            expires: 0,
            seq: 0,
            lane: Lane::Main,
            frame: push_frame("t", "1", "now"),
        };
        let body = Value::BulkString(encode_wire(&[env]));
        let part = stream.map_or(Value::Boolean(false), |(deleted, seqs)| {
            let rows = seqs
                .iter()
                .map(|s| {
                    let id = bulk(format!("{}-{}", s / PER_MS, s % PER_MS));
                    Value::Array(vec![id, Value::Array(vec![bulk("m".into()), body.clone()])])
                })
                .collect();
            Value::Array(vec![bulk(deleted.into()), Value::Array(rows)])
        });
        let epoch = epoch.map_or(Value::Boolean(false), |e| bulk(e.into()));
        Value::Array(vec![epoch, Value::Int(now_ms), part])
    }

    #[test]
    fn a_stream_read_is_complete_only_when_nothing_after_the_position_is_gone() {
        let l = Layout::new("ws", 60, 10, Rules::default());
        let x = Chan::Uid("x".into());
        let now = 100_000_000; // ms
        let seq = |ms: u64| ms * PER_MS;
        let e = Epoch(0x1f);
        let since = StreamSince::After(e, seq(now - 500));
        let read = |r| l.parse_read(&x, since, r, 10).unwrap();
        let entries = [seq(now - 600), seq(now - 400), seq(now - 300)];
        let r = read(reply(Some("1f"), now as i64, Some(("0-0", &entries))));
        assert!(r.complete);
        // Only what follows the position, on its stream, for x alone, named u….
        assert_eq!(r.batch.len(), 2);
        assert_eq!(
            (r.batch[0].lane, &r.batch[0].target),
            (Lane::Main, &Target::Uids(vec!["x".into()]))
        );
        assert!(String::from_utf8_lossy(r.batch[0].push_json()).contains(r#""id":"u1f-"#));
        // A trim removed a message after the position.
        let trimmed = format!("{}-0", now - 450);
        assert!(!read(reply(Some("1f"), now as i64, Some((&trimmed, &entries)))).complete);
        // Another epoch: the stream restarted since the position.
        assert!(!read(reply(Some("2e"), now as i64, Some(("0-0", &entries)))).complete);
        // Gone whole, the position within retention: nothing was written after it.
        assert!(read(reply(None, now as i64, None)).complete);
        let old = StreamSince::After(e, seq(now - 120_000));
        assert!(
            !l.parse_read(&x, old, reply(None, now as i64, None), 10)
                .unwrap()
                .complete
        );
        // The node's own position by time: any epoch.
        let by_time = StreamSince::AfterTime(seq(now - 500));
        let r = l.parse_read(
            &x,
            by_time,
            reply(Some("2e"), now as i64, Some(("0-0", &entries))),
            10,
        );
        assert_eq!(r.unwrap().batch.len(), 2);
    }

    #[test]
    fn slots_are_redis_clusters() {
        // Values from CLUSTER KEYSLOT.
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
        assert_eq!(slot("{}x"), crc16(b"{}x") % SLOTS, "an empty tag is no tag");
        let l = Layout::new("ws", 60, 10, Rules::default());
        let a = Chan::Uid("alice".into());
        assert_eq!(l.slot(&a), slot("ws:{u:alice}:h"));
        assert_eq!(l.slot(&a), slot(&l.channel(&a)));
        assert_eq!(l.chan_of(l.channel(&a).as_bytes()), Some(a.clone()));
        assert_eq!(l.chan_of(b"ws:{all}"), Some(Chan::All));
        assert_eq!(l.chan_of(b"other:{all}"), None);
        assert_eq!(a.id(Epoch(0xab), 7), "uab-7");
        assert_eq!(Chan::All.id(Epoch(0xab), 7), "gab-7");
    }
}
