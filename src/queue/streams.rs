//! History in Redis: each accepted message appended to Redis streams and published by
//! one Lua script, so a `200` means the message is in the history, and a resume or a
//! node catching up after a lost subscription reads the same streams.
//!
//! Layout (every key hash-tagged, so Redis Cluster can place a uid's keys together):
//! - `<name>:{u:<uid>}:h` — a stream per uid, `<name>:{all}:h` — broadcasts;
//!   entries `m` = the message's [`encode_wire`] JSON, ids `<ms>-<n>`.
//! - `<name>:{meta}:epoch` — who issued the ids: a Redis that restarted empty gets a
//!   new one, so resumes from before it answer `complete:false`.
//! - `<name>:{meta}:clock` — the last stream id issued, so ids grow across all streams.
//! - `<name>:{meta}:log` — every message once, in order, bounded by `-history-log`: a
//!   node whose subscription was interrupted reads what it missed from here.
//!
//! Channels: `<name>:u:<uid>` per uid and `<name>:all` for broadcasts. The script
//! publishes a message once on each of its targets' channels, so a node subscribes
//! only to the uids it holds; a message for two uids a node holds arrives twice and
//! the subscriber drops the repeat by its id.
//!
//! A delivery id is `<epoch hex>-<seq>` with `seq = ms * 1024 + n`: one number orders
//! a uid's messages and the broadcasts among each other (the script runs serially, so
//! the ids follow the order in which messages were published), and its high part is a
//! time, which lets `-history-ttl` trim with `XTRIM MINID` and lets a resume tell that
//! a stream which has expired away cannot have held anything after a recent id.
//!
//! Completeness comes from Redis itself: `XINFO STREAM`'s `max-deleted-entry-id` is the
//! newest entry any trim removed (Redis ≥ 7.0), so a resume from before it is
//! incomplete.

use std::fmt::Write as _;

use ::redis::{Connection, RedisError, RedisResult, Value};

use crate::history::{Epoch, Since};
use crate::message::{Envelope, Rules, Target, encode_wire};

/// Messages per millisecond before the clock borrows from the next one.
pub(crate) const PER_MS: u64 = 1024;

/// The first sequence number of a millisecond.
pub fn first_seq_at(ms: u64) -> u64 {
    ms.saturating_mul(PER_MS)
}

/// The stream id of a sequence number.
pub fn stream_id(seq: u64) -> String {
    format!("{}-{}", seq / PER_MS, seq % PER_MS)
}

/// The sequence number of a stream id `<ms>-<n>`.
pub fn seq_of(stream_id: &str) -> Option<u64> {
    let (ms, n) = stream_id.split_once('-')?;
    let (ms, n): (u64, u64) = (ms.parse().ok()?, n.parse().ok()?);
    (n < PER_MS).then(|| ms.checked_mul(PER_MS)?.checked_add(n))?
}

/// The place a published message carries before its wire batch: `<epoch hex>` and
/// its stream id, as the append script writes them.
pub fn parse_place(epoch: &[u8], id: &[u8]) -> Result<(Epoch, u64), &'static str> {
    let epoch = std::str::from_utf8(epoch)
        .ok()
        .filter(|e| !e.is_empty() && e.len() <= 8)
        .and_then(|e| u32::from_str_radix(e, 16).ok())
        .map(Epoch)
        .ok_or("bad epoch")?;
    let seq = std::str::from_utf8(id)
        .ok()
        .and_then(seq_of)
        .ok_or("bad id")?;
    Ok((epoch, seq))
}

/// Appends a batch to the streams of its targets and publishes each message on its
/// targets' channels, in one atomic step. Returns the epoch, the ids given, and the
/// fewest receivers any message reached.
///
/// Per message: ARGV holds the number of targets, each target's key index, each
/// target's channel, then the payload.
const APPEND: &str = r#"
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  redis.call('SET', KEYS[1], ARGV[3])
  epoch = ARGV[3]
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local clock = redis.call('HMGET', KEYS[2], 'ms', 'n')
local ms = tonumber(clock[1]) or 0
local n = tonumber(clock[2]) or -1
local ttl = tonumber(ARGV[1])
local maxlen = tonumber(ARGV[2])
local loglen = tonumber(ARGV[4])
local out = {epoch}
local fewest = -1
local i = 5
while i <= #ARGV do
  if now > ms then ms = now; n = 0 else n = n + 1 end
  if n >= 1024 then ms = ms + 1; n = 0 end
  local id = string.format('%d-%d', ms, n)
  local count = tonumber(ARGV[i])
  local payload = ARGV[i + 2 * count + 1]
  for k = 1, count do
    local key = KEYS[tonumber(ARGV[i + k])]
    redis.call('XADD', key, id, 'm', payload)
    -- Trim by hand, remembering the newest entry removed: XINFO's
    -- max-deleted-entry-id then names it (XADD's own trimming leaves it unset).
    local lost = nil
    local excess = redis.call('XLEN', key) - maxlen
    if excess > 0 then
      local old = redis.call('XRANGE', key, '-', '+', 'COUNT', excess)
      lost = old[#old][1]
      redis.call('XTRIM', key, 'MAXLEN', maxlen)
    end
    local minid = string.format('%d-0', ms - ttl)
    local aged = redis.call('XREVRANGE', key, '(' .. minid, '-', 'COUNT', 1)
    if #aged > 0 then
      lost = aged[1][1]
      redis.call('XTRIM', key, 'MINID', minid)
    end
    if lost then redis.call('XSETID', key, id, 'MAXDELETEDID', lost) end
    redis.call('PEXPIRE', key, ttl)
  end
  redis.call('XADD', KEYS[3], 'MAXLEN', loglen, id, 'm', payload)
  redis.call('XTRIM', KEYS[3], 'MINID', string.format('%d-0', ms - ttl))
  local wire = epoch .. ' ' .. id .. ' ' .. payload
  local got = 0
  for k = 1, count do
    got = got + redis.call('PUBLISH', ARGV[i + count + k], wire)
  end
  if fewest < 0 or got < fewest then fewest = got end
  out[#out + 1] = id
  i = i + 2 * count + 2
end
redis.call('HSET', KEYS[2], 'ms', string.format('%d', ms), 'n', n)
out[#out + 1] = fewest
return out
"#;

/// Reads the epoch, and for each stream whether it exists, its newest trimmed id and
/// its entries after a stream id, in one atomic step.
const READ: &str = r#"
local epoch = redis.call('GET', KEYS[1])
local t = redis.call('TIME')
local out = {epoch or false, tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), false}
-- The newest id issued (ARGV[5] names the clock key): every message up to it was
-- published before this read.
if ARGV[5] then
  local clock = redis.call('HMGET', ARGV[5], 'ms', 'n')
  if clock[1] then out[3] = clock[1] .. '-' .. clock[2] end
end
-- An id of another epoch says nothing about these streams: read them whole.
local start = ARGV[1]
if epoch ~= ARGV[3] then start = '-' end
-- A connection that just joined: what came in the last ARGV[4] ms (its caller
-- narrows that to the moment it joined, by Redis's clock in the reply).
if ARGV[4] then
  local floor = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[4])
  start = string.format('%d-0', math.max(floor, 0))
end
for k = 2, #KEYS do
  if redis.call('EXISTS', KEYS[k]) == 1 then
    local info = redis.call('XINFO', 'STREAM', KEYS[k])
    local deleted = '0-0'
    for j = 1, #info, 2 do
      if info[j] == 'max-deleted-entry-id' then deleted = info[j + 1] end
    end
    out[#out + 1] = {deleted, redis.call('XRANGE', KEYS[k], start, '+', 'COUNT', ARGV[2])}
  else
    out[#out + 1] = false
  end
end
return out
"#;

/// A Lua script run by `EVALSHA`, loaded on first use or after a Redis restart.
pub(crate) struct Script {
    src: &'static str,
    sha: String,
}

impl Script {
    pub(crate) fn new(src: &'static str) -> Self {
        use sha1::Digest;
        let digest = sha1::Sha1::digest(src.as_bytes());
        let mut sha = String::with_capacity(40);
        for b in digest {
            let _ = write!(sha, "{b:02x}");
        }
        Script { src, sha }
    }

    fn run(
        &self,
        con: &mut impl ::redis::ConnectionLike,
        keys: &[String],
        args: &[Vec<u8>],
    ) -> RedisResult<Value> {
        match self.call(true, keys, args).query(con) {
            Err(e) if is_no_script(&e) => self.call(false, keys, args).query(con),
            other => other,
        }
    }

    /// `EVALSHA` (`by_sha`) or `EVAL` of the script on `keys` and `args`.
    pub(crate) fn call(&self, by_sha: bool, keys: &[String], args: &[Vec<u8>]) -> ::redis::Cmd {
        let mut c = ::redis::cmd(if by_sha { "EVALSHA" } else { "EVAL" });
        c.arg(if by_sha { self.sha.as_str() } else { self.src })
            .arg(keys.len())
            .arg(keys)
            .arg(args);
        c
    }
}

/// The server does not have the script (restarted, or a replica just promoted).
pub(crate) fn is_no_script(e: &RedisError) -> bool {
    e.kind() == ::redis::ErrorKind::Server(::redis::ServerErrorKind::NoScript)
}

/// Where history lives and how long it is kept.
pub struct Streams {
    name: String,
    /// `-history-ttl` in milliseconds.
    ttl_ms: u64,
    /// `-history-size`: entries per stream.
    size: usize,
    /// `-history-log`: entries of the node-wide log.
    log: usize,
    append: Script,
    read: Script,
    /// What another node's message must satisfy, as on the wire.
    rules: Rules,
}

/// What the append script gave each message of a batch.
#[derive(Debug, PartialEq, Eq)]
pub struct Appended {
    pub epoch: Epoch,
    pub seqs: Vec<u64>,
    /// The fewest subscribers any of the batch's publishes reached.
    pub receivers: i64,
}

/// A resume's read: the messages after `since` for a uid and `all`, in order.
#[derive(Debug)]
pub struct Fetched {
    /// Nothing after `since` is missing.
    pub complete: bool,
    /// Each message with its sequence number, oldest first, frames built with their ids.
    pub batch: Vec<Envelope>,
    /// Redis's clock when it read them (ms since the epoch).
    pub redis_ms: u64,
    /// A stream had more than the read's limit: what follows is not in `batch`.
    pub cut: bool,
    /// The newest sequence number a trim removed from any stream read.
    pub trimmed: u64,
    /// The epoch of Redis's history, if it has one.
    pub epoch: Option<Epoch>,
    /// The newest sequence number issued when it read (joins' reads only).
    pub clock: Option<u64>,
}

impl Streams {
    pub fn new(name: &str, ttl_secs: u64, size: usize, log: usize, rules: Rules) -> Self {
        Streams {
            name: name.to_string(),
            ttl_ms: ttl_secs.saturating_mul(1000).max(1),
            size: size.max(1),
            log: log.max(1),
            append: Script::new(APPEND),
            read: Script::new(READ),
            rules,
        }
    }

    fn meta(&self, what: &str) -> String {
        format!("{}:{{meta}}:{what}", self.name)
    }

    /// The stream of one uid, or of the broadcasts.
    pub fn key(&self, uid: Option<&str>) -> String {
        match uid {
            Some(u) => format!("{}:{{u:{u}}}:h", self.name),
            None => format!("{}:{{all}}:h", self.name),
        }
    }

    /// The pub/sub channel of one uid, or of the broadcasts.
    pub fn channel(&self, uid: Option<&str>) -> String {
        match uid {
            Some(u) => format!("{}:u:{u}", self.name),
            None => format!("{}:all", self.name),
        }
    }

    /// Appends a batch and publishes each message on its targets' channels; `fresh`
    /// is the epoch a Redis without one takes.
    pub fn append(
        &self,
        con: &mut Connection,
        batch: &[Envelope],
        fresh: Epoch,
    ) -> RedisResult<Appended> {
        let mut keys = vec![self.meta("epoch"), self.meta("clock"), self.meta("log")];
        let mut args: Vec<Vec<u8>> = vec![
            self.ttl_ms.to_string().into_bytes(),
            self.size.to_string().into_bytes(),
            format!("{:x}", fresh.0).into_bytes(),
            self.log.to_string().into_bytes(),
        ];
        for env in batch {
            let targets: Vec<Option<&str>> = match &env.target {
                Target::All => vec![None],
                Target::Uids(uids) => uids.iter().map(|u| Some(&**u)).collect(),
            };
            args.push(targets.len().to_string().into_bytes());
            for &t in &targets {
                let s = self.key(t);
                let at = keys.iter().position(|k| *k == s).unwrap_or_else(|| {
                    keys.push(s);
                    keys.len() - 1
                });
                args.push((at + 1).to_string().into_bytes());
            }
            for &t in &targets {
                args.push(self.channel(t).into_bytes());
            }
            args.push(encode_wire(std::slice::from_ref(env)));
        }
        parse_appended(self.append.run(con, &keys, &args)?, batch.len())
    }

    /// The epoch and the newest sequence number issued, if Redis has a history.
    pub fn clock(&self, con: &mut Connection) -> RedisResult<Option<(Epoch, u64)>> {
        let (epoch, ms, n): (Option<String>, Option<u64>, Option<u64>) = ::redis::pipe()
            .atomic()
            .get(self.meta("epoch"))
            .hget(self.meta("clock"), "ms")
            .hget(self.meta("clock"), "n")
            .query(con)?;
        let epoch = epoch.and_then(|e| epoch_of(&Value::SimpleString(e)));
        Ok(epoch.map(|e| (e, ms.unwrap_or(0) * PER_MS + n.unwrap_or(0))))
    }

    /// What a node missed while it was not subscribed: the log after `after`, at most
    /// `limit` messages, and whether that is all of it (nothing trimmed in between,
    /// same epoch, not cut by `limit`).
    pub fn fill(
        &self,
        con: &mut Connection,
        epoch: Epoch,
        after: u64,
        limit: usize,
        now_ms: u64,
    ) -> RedisResult<Fetched> {
        let keys = vec![self.meta("epoch"), self.meta("log")];
        let since = epoch.id(after);
        let args = vec![
            format!("({}", stream_id(after)).into_bytes(),
            limit.max(1).to_string().into_bytes(),
            format!("{:x}", epoch.0).into_bytes(),
        ];
        let reply = self.read.run(con, &keys, &args)?;
        parse_fetched(reply, &since, limit, now_ms, u64::MAX, &self.rules)
    }

    /// Reads what `uid` got in the last `ago` (by Redis's clock), at most `limit`:
    /// for a connection that joined then. The caller cuts the batch at the moment it
    /// joined ([`Fetched::redis_ms`]).
    pub fn read_recent(
        &self,
        con: &mut Connection,
        uid: &str,
        ago: std::time::Duration,
        limit: usize,
    ) -> RedisResult<Fetched> {
        let keys = vec![self.meta("epoch"), self.key(Some(uid))];
        let args = vec![
            b"-".to_vec(),
            limit.max(1).to_string().into_bytes(),
            Vec::new(),
            (ago.as_millis() + 1).to_string().into_bytes(),
            self.meta("clock").into_bytes(),
        ];
        let reply = self.read.run(con, &keys, &args)?;
        parse_fetched(reply, "0", limit, 0, self.ttl_ms, &self.rules)
    }

    /// Reads what `uid` and `all` got after `since`, at most `limit` per stream.
    pub fn read(
        &self,
        con: &mut Connection,
        uid: Option<&str>,
        since: &str,
        limit: usize,
        now_ms: u64,
    ) -> RedisResult<Fetched> {
        let mut keys = vec![self.meta("epoch"), self.key(None)];
        keys.extend(uid.map(|u| self.key(Some(u))));
        // The script compares the epoch: a foreign id reads the streams whole.
        let (since_epoch, after) = since
            .split_once('-')
            .and_then(|(e, s)| Some((e, s.parse::<u64>().ok()?)))
            .unwrap_or(("", 0));
        let start = if after == 0 {
            "-".to_string()
        } else {
            format!("({}", stream_id(after))
        };
        let args = vec![
            start.into_bytes(),
            limit.max(1).to_string().into_bytes(),
            since_epoch.as_bytes().to_vec(),
        ];
        let reply = self.read.run(con, &keys, &args)?;
        parse_fetched(reply, since, limit, now_ms, self.ttl_ms, &self.rules)
    }
}

pub(crate) fn bad(what: &str) -> RedisError {
    RedisError::from((
        ::redis::ErrorKind::Parse,
        "unexpected reply from the history script",
        what.to_string(),
    ))
}

pub(crate) fn text(v: &Value) -> Option<&str> {
    match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

pub(crate) fn epoch_of(v: &Value) -> Option<Epoch> {
    let s = text(v)?;
    (!s.is_empty() && s.len() <= 8)
        .then(|| u32::from_str_radix(s, 16).ok().map(Epoch))
        .flatten()
}

fn parse_appended(reply: Value, n: usize) -> RedisResult<Appended> {
    let Value::Array(items) = reply else {
        return Err(bad("append: not an array"));
    };
    if items.len() != n + 2 {
        return Err(bad("append: wrong length"));
    }
    let epoch = epoch_of(&items[0]).ok_or_else(|| bad("append: epoch"))?;
    let seqs = items[1..=n]
        .iter()
        .map(|v| text(v).and_then(seq_of))
        .collect::<Option<Vec<u64>>>()
        .ok_or_else(|| bad("append: id"))?;
    let receivers = match items[n + 1] {
        Value::Int(i) => i,
        _ => return Err(bad("append: receivers")),
    };
    Ok(Appended {
        epoch,
        seqs,
        receivers,
    })
}

/// One stream's part of a read: its newest trimmed id and its entries.
pub(crate) struct Part {
    pub deleted: u64,
    pub entries: Vec<(u64, Envelope)>,
    /// The read stopped at `limit`: more may follow.
    pub cut: bool,
}

fn parse_part(v: &Value, epoch: Epoch, limit: usize, rules: &Rules) -> RedisResult<Option<Part>> {
    parse_entries(v, limit, rules, |seq| epoch.id(seq))
}

/// A stream's `{deleted, entries}` pair (or nothing: the stream does not exist),
/// each message given its id by `id`.
pub(crate) fn parse_entries(
    v: &Value,
    limit: usize,
    rules: &Rules,
    name: impl Fn(u64) -> String,
) -> RedisResult<Option<Part>> {
    let Value::Array(pair) = v else {
        return match v {
            Value::Nil | Value::Boolean(false) => Ok(None),
            _ => Err(bad("read: stream")),
        };
    };
    let [deleted, Value::Array(rows)] = &pair[..] else {
        return Err(bad("read: stream shape"));
    };
    let deleted = text(deleted).and_then(seq_of).unwrap_or(0);
    let mut entries = Vec::with_capacity(rows.len());
    for row in rows {
        let Value::Array(row) = row else {
            return Err(bad("read: entry"));
        };
        let [id, Value::Array(fields)] = &row[..] else {
            return Err(bad("read: entry shape"));
        };
        let seq = text(id)
            .and_then(seq_of)
            .ok_or_else(|| bad("read: entry id"))?;
        let Some(body) = fields.get(1).and_then(|v| match v {
            Value::BulkString(b) => Some(b.as_slice()),
            _ => None,
        }) else {
            return Err(bad("read: entry field"));
        };
        // A malformed entry is skipped, as a malformed publish would be.
        if let Ok(batch) = crate::message::decode_wire(body, rules) {
            for mut env in batch {
                env.set_id(seq, &name(seq));
                entries.push((seq, env));
            }
        }
    }
    Ok(Some(Part {
        deleted,
        cut: rows.len() >= limit,
        entries,
    }))
}

fn parse_fetched(
    reply: Value,
    since: &str,
    limit: usize,
    now_ms: u64,
    ttl_ms: u64,
    rules: &Rules,
) -> RedisResult<Fetched> {
    let Value::Array(items) = reply else {
        return Err(bad("read: not an array"));
    };
    let (Some(epoch), Some(Value::Int(redis_now))) = (items.first().map(epoch_of), items.get(1))
    else {
        return Err(bad("read: head"));
    };
    // Redis's clock decides what left retention; a later `now_ms` (a test's) wins.
    let now_ms = now_ms.max(u64::try_from(*redis_now).unwrap_or(0));
    // No epoch: Redis holds no history at all (restarted empty, or nothing sent yet).
    let redis_ms = u64::try_from(*redis_now).unwrap_or(0);
    let Some(epoch) = epoch else {
        return Ok(Fetched {
            complete: since == "0",
            batch: Vec::new(),
            redis_ms,
            cut: false,
            trimmed: 0,
            epoch: None,
            clock: None,
        });
    };
    let since = epoch.parse_since(since).unwrap_or(Since::Foreign);
    let after = match since {
        Since::After(seq) => seq,
        _ => 0,
    };
    let window_start = now_ms.saturating_sub(ttl_ms) * PER_MS;
    let mut complete = since != Since::Foreign;
    let mut merged: Vec<(u64, Envelope)> = Vec::new();
    let mut cut = false;
    let mut trimmed = 0;
    let clock = items.get(2).and_then(text).and_then(seq_of);
    for v in items.get(3..).unwrap_or_default() {
        match parse_part(v, epoch, limit, rules)? {
            Some(part) => {
                cut |= part.cut;
                trimmed = trimmed.max(part.deleted);
                complete &= !part.cut
                    && match since {
                        // Only a bound that cut a message still within retention.
                        Since::Start => part.deleted < window_start,
                        _ => part.deleted <= after,
                    };
                merged.extend(part.entries);
            }
            // A stream that expired whole was last written over a ttl ago, so it
            // could hold something after `since` only if `since` is that old.
            None => complete &= since == Since::Start || after >= window_start,
        }
    }
    merged.sort_by_key(|(seq, _)| *seq);
    // A message for several uids sits in each of their streams: once is enough.
    merged.dedup_by_key(|(seq, _)| *seq);
    let now = now_ms / 1000;
    let batch = merged
        .into_iter()
        .filter(|(seq, env)| *seq > after && !env.is_expired(now))
        .map(|(_, env)| env)
        .collect();
    Ok(Fetched {
        complete,
        batch,
        redis_ms,
        cut,
        trimmed,
        epoch: Some(epoch),
        clock,
    })
}
