//! The `/send` schema and the push encoding.
//!
//! A `/send` body is validated whole (one bad element rejects the batch) and turned
//! into [`Envelope`]s. Each envelope carries its WebSocket frame already encoded, so
//! the hub writes the same shared bytes to every receiver and never touches JSON.
//! Between nodes (Redis, Disque) a batch travels as [`encode_wire`] JSON and is
//! turned back into envelopes by [`decode_wire`] on the backend's own thread.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::ws::frame::{self, OpCode};

/// The default bound on one type (`-max-type-len`); types are short labels, not payload.
pub const MAX_TYPES_LEN: usize = 128;
/// The longest uid accepted in `topic_ids` or in a `/ws` query.
pub const MAX_UID_LEN: usize = 256;
/// The longest `time` string.
pub const MAX_TIME_LEN: usize = 64;

/// Who a message is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    All,
    Uids(Vec<Box<str>>),
}

/// Which sequence a message's `seq` belongs to. Every backend but Redis Cluster has
/// one sequence per node or per Redis (`Main`). On a cluster each stream numbers its
/// own messages: a uid's stream is `Main` for that uid's connections, and the
/// broadcasts' stream is `Broadcast`, so a connection keeps a position in each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Lane {
    #[default]
    Main,
    Broadcast,
}

/// One message on its way from `/send` through the queue to the hub.
#[derive(Clone, Debug)]
pub struct Envelope {
    pub target: Target,
    pub types: Box<str>,
    /// Unix seconds after which the message must not be pushed; 0 = never expires.
    pub expires: u64,
    /// Its place in the history, once it has one (0 before): orders a connection's
    /// messages and names the last one it saw.
    pub seq: u64,
    /// Which sequence `seq` counts in (see [`Lane`]).
    pub lane: Lane,
    /// The complete text frame `{"types","msg","time"}`, shared by every receiver.
    pub frame: Arc<[u8]>,
}

impl Envelope {
    pub fn is_expired(&self, now_unix: u64) -> bool {
        self.expires != 0 && now_unix >= self.expires
    }

    /// Gives the message its place in the history and its delivery id in the push
    /// JSON, `{…,"id":"<id>"}`: the frame is rebuilt once, then shared by every
    /// receiver as before.
    pub fn set_id(&mut self, seq: u64, id: &str) {
        self.seq = seq;
        let json = self.push_json();
        let body = json.strip_suffix(b"}").unwrap_or(json);
        if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            let mut push = Vec::with_capacity(body.len() + id.len() + 8);
            push.extend_from_slice(body);
            push.extend_from_slice(b",\"id\":");
            write_json_string(&mut push, id);
            push.push(b'}');
            self.frame = text_frame(&push);
            return;
        }
        // Every id this server makes needs no escaping: the frame is assembled
        // from its parts without a payload vector of its own.
        self.frame = text_frame_of(&[body, b",\"id\":\"", id.as_bytes(), b"\"}"]);
    }

    /// The push JSON inside the frame. The frame is the one stored representation;
    /// the payload is a view of it, so nothing is kept twice.
    pub fn push_json(&self) -> &[u8] {
        &self.frame[frame_header_len(&self.frame)..]
    }
}

/// The delivery id [`Envelope::set_id`] put last in a push JSON: what an event
/// stream names the event by. `None` when the JSON ends otherwise.
pub fn delivery_id(push_json: &[u8]) -> Option<&[u8]> {
    const KEY: &[u8] = br#","id":""#;
    let body = push_json.strip_suffix(br#""}"#)?;
    let start = body.windows(KEY.len()).rposition(|w| w == KEY)? + KEY.len();
    let id = &body[start..];
    // Ids are `<hex>-<digits>`: nothing in one needs escaping.
    id.iter()
        .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
        .then_some(id)
}

/// The payload of a push frame (an unmasked server frame): the push JSON.
pub fn frame_payload(frame: &[u8]) -> &[u8] {
    frame.get(frame_header_len(frame)..).unwrap_or_default()
}

/// The header length of an unmasked server frame built by [`frame::encode_header`].
fn frame_header_len(f: &[u8]) -> usize {
    match f.get(1).map(|b| b & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        Some(_) => 2,
        None => f.len(),
    }
}

/// The bounds a batch keeps, whether it comes from `/send` or from another node:
/// one validator for both, so a peer is trusted no more than a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rules {
    /// `-max-batch`.
    pub max_batch: usize,
    /// `-max-type-len`.
    pub max_type_len: usize,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            max_batch: 1000,
            max_type_len: MAX_TYPES_LEN,
        }
    }
}

impl Rules {
    pub fn new(cfg: &crate::config::Config) -> Rules {
        Rules {
            max_batch: cfg.max_batch,
            max_type_len: cfg.max_type_len,
        }
    }

    /// A batch holds at least one message and at most `max_batch`.
    fn check_batch_len(&self, len: usize) -> Result<(), SendError> {
        match len {
            0 => Err(SendError::Empty),
            n if n > self.max_batch => Err(SendError::TooMany(self.max_batch)),
            _ => Ok(()),
        }
    }

    /// The rule for a message's `types`. Filters are matched trimmed, so a type
    /// with surrounding spaces could never be received: it is refused, not trimmed.
    pub fn check_type(&self, types: &str) -> Result<(), TypeError> {
        if types.is_empty() {
            Err(TypeError::Empty)
        } else if types.len() > self.max_type_len {
            Err(TypeError::TooLong(self.max_type_len))
        } else if types.contains(',') {
            Err(TypeError::Comma)
        } else if types.trim() != types {
            Err(TypeError::Spaces)
        } else {
            Ok(())
        }
    }
}

/// Why a `types` value is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TypeError {
    Empty,
    TooLong(usize),
    Comma,
    Spaces,
}

impl fmt::Display for TypeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TypeError::Empty => f.write_str("must not be empty"),
            TypeError::TooLong(max) => write!(f, "must be at most {max} bytes"),
            TypeError::Comma => f.write_str("must not contain commas"),
            TypeError::Spaces => f.write_str("must not start or end with whitespace"),
        }
    }
}

/// A `/send` body that cannot be accepted; the text names the field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendError {
    Json(String),
    Empty,
    TooMany(usize),
    Field {
        index: Option<usize>,
        field: &'static str,
        problem: &'static str,
    },
    Types {
        index: Option<usize>,
        error: TypeError,
    },
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::Json(e) => write!(f, "body is not valid JSON: {e}"),
            SendError::Empty => write!(f, "batch is empty"),
            SendError::TooMany(max) => write!(f, "batch has more than {max} messages"),
            SendError::Field {
                index: Some(i),
                field,
                problem,
            } => write!(f, "[{i}].{field}: {problem}"),
            SendError::Field {
                index: None,
                field,
                problem,
            } => write!(f, "{field}: {problem}"),
            SendError::Types {
                index: Some(i),
                error,
            } => write!(f, "[{i}].types: {error}"),
            SendError::Types { index: None, error } => write!(f, "types: {error}"),
        }
    }
}

impl std::error::Error for SendError {}

/// The current local time as `YYYY-MM-DD HH:MM:SS`, formatted at most once a second.
#[derive(Default)]
pub struct Clock {
    second: i64,
    text: String,
}

impl Clock {
    pub fn local_time(&mut self) -> &str {
        // The zone lookup behind `Local::now` costs more than the rest of a small
        // `/send`: only a new second pays for it.
        let second = unix_now() as i64;
        if second != self.second || self.text.is_empty() {
            let now = chrono::Local::now();
            self.second = now.timestamp();
            self.text = now.format("%Y-%m-%d %H:%M:%S").to_string();
        }
        &self.text
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Parses and validates a `/send` body: one object or an array of them.
pub fn parse_send(
    body: &[u8],
    rules: &Rules,
    clock: &mut Clock,
) -> Result<Vec<Envelope>, SendError> {
    let root: &RawValue =
        serde_json::from_slice(body).map_err(|e| SendError::Json(e.to_string()))?;
    let text = root.get();
    if text.starts_with('[') {
        let items: Vec<&RawValue> =
            serde_json::from_str(text).map_err(|e| SendError::Json(e.to_string()))?;
        rules.check_batch_len(items.len())?;
        items
            .iter()
            .enumerate()
            .map(|(i, item)| parse_one(item, Some(i), rules, clock))
            .collect()
    } else {
        Ok(vec![parse_one(root, None, rules, clock)?])
    }
}

/// The fields of one message, each as raw JSON text borrowed from the body; a key
/// given twice keeps its last value, unknown keys are skipped.
#[derive(Default)]
struct Fields<'a> {
    topic: Option<&'a RawValue>,
    topic_ids: Option<&'a RawValue>,
    types: Option<&'a RawValue>,
    msg: Option<&'a RawValue>,
    timeout: Option<&'a RawValue>,
    time: Option<&'a RawValue>,
}

/// A key of a message object, recognised without allocating.
enum Key {
    Topic,
    TopicIds,
    Types,
    Msg,
    Timeout,
    Time,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<Key, E> {
                Ok(match key {
                    "topic" => Key::Topic,
                    "topic_ids" => Key::TopicIds,
                    "types" => Key::Types,
                    "msg" => Key::Msg,
                    "timeout" => Key::Timeout,
                    "time" => Key::Time,
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'de>, A::Error> {
                let mut f = Fields::default();
                while let Some(key) = map.next_key::<Key>()? {
                    let value: &'de RawValue = map.next_value()?;
                    let slot = match key {
                        Key::Topic => &mut f.topic,
                        Key::TopicIds => &mut f.topic_ids,
                        Key::Types => &mut f.types,
                        Key::Msg => &mut f.msg,
                        Key::Timeout => &mut f.timeout,
                        Key::Time => &mut f.time,
                        Key::Other => continue,
                    };
                    *slot = Some(value);
                }
                Ok(f)
            }
        }
        d.deserialize_map(FieldsVisitor)
    }
}

/// A JSON string's value: borrowed when it has no escapes. Err if not a string.
fn json_str(v: &RawValue) -> Result<Cow<'_, str>, serde_json::Error> {
    match serde_json::from_str::<&str>(v.get()) {
        Ok(s) => Ok(Cow::Borrowed(s)),
        Err(_) => serde_json::from_str::<String>(v.get()).map(Cow::Owned),
    }
}

fn parse_one<'a>(
    item: &'a RawValue,
    index: Option<usize>,
    rules: &Rules,
    clock: &mut Clock,
) -> Result<Envelope, SendError> {
    let err = |field, problem| SendError::Field {
        index,
        field,
        problem,
    };
    // Fields stay raw so `msg` keeps its exact bytes and `null` stays distinct from absent.
    let fields: Fields = serde_json::from_str(item.get())
        .map_err(|_| err("body", "each message must be a JSON object"))?;
    let field = |v: Option<&'a RawValue>| v.filter(|v| v.get() != "null");

    let target = match field(fields.topic).map(json_str) {
        None => return Err(err("topic", "is required")),
        Some(Ok(t)) if t == "all" => Target::All,
        Some(Ok(t)) if t == "uids" => Target::Uids(parse_uids(field(fields.topic_ids), &err)?),
        Some(_) => return Err(err("topic", "must be \"uids\" or \"all\"")),
    };

    let types = match field(fields.types) {
        None => Cow::Borrowed("notice"),
        Some(v) => json_str(v).map_err(|_| err("types", "must be a string"))?,
    };
    rules
        .check_type(&types)
        .map_err(|error| SendError::Types { index, error })?;

    // `msg` may legitimately be `null`, so it is taken without the null filter.
    let msg = fields.msg.ok_or_else(|| err("msg", "is required"))?;

    let expires = match field(fields.timeout) {
        None => 0,
        Some(v) => v
            .get()
            .parse::<u64>()
            .map_err(|_| err("timeout", "must be a non-negative integer (Unix seconds)"))?,
    };

    let time = match field(fields.time) {
        None => Cow::Borrowed(clock.local_time()),
        Some(v) => json_str(v).map_err(|_| err("time", "must be a string"))?,
    };
    if time.len() > MAX_TIME_LEN {
        return Err(err("time", "must be at most 64 bytes"));
    }

    Ok(Envelope {
        target,
        frame: push_frame(&types, msg.get(), &time),
        types: Box::from(&*types),
        expires,
        seq: 0,
        lane: Lane::Main,
    })
}

fn parse_uids(
    ids: Option<&RawValue>,
    err: &dyn Fn(&'static str, &'static str) -> SendError,
) -> Result<Vec<Box<str>>, SendError> {
    const PROBLEM: &str = "must be a non-empty array of uids (non-empty strings or integers)";
    let ids = ids.ok_or_else(|| err("topic_ids", "is required when topic is \"uids\""))?;
    let raw: Vec<&RawValue> =
        serde_json::from_str(ids.get()).map_err(|_| err("topic_ids", PROBLEM))?;
    let mut uids = Vec::with_capacity(raw.len());
    for id in raw {
        let text = id.get();
        let uid: String = if text.starts_with('"') {
            serde_json::from_str(text).map_err(|_| err("topic_ids", PROBLEM))?
        } else if text.parse::<i64>().is_ok() || text.parse::<u64>().is_ok() {
            text.to_string()
        } else {
            return Err(err("topic_ids", PROBLEM));
        };
        uids.push(uid.into_boxed_str());
    }
    uid_list(uids).ok_or_else(|| err("topic_ids", PROBLEM))
}

/// The rule for a target's uids, on both paths: at least one, each non-empty and
/// at most [`MAX_UID_LEN`] bytes; a uid named twice still gets the message once.
fn uid_list(mut uids: Vec<Box<str>>) -> Option<Vec<Box<str>>> {
    if uids.is_empty() || uids.iter().any(|u| u.is_empty() || u.len() > MAX_UID_LEN) {
        return None;
    }
    uids.sort_unstable();
    uids.dedup();
    Some(uids)
}

/// The push JSON `{"types":…,"msg":…,"time":…}` with `msg` copied verbatim.
pub fn push_json(types: &str, msg: &str, time: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len() + types.len() + time.len() + 32);
    out.extend_from_slice(b"{\"types\":");
    write_json_string(&mut out, types);
    out.extend_from_slice(b",\"msg\":");
    out.extend_from_slice(msg.as_bytes());
    out.extend_from_slice(b",\"time\":");
    write_json_string(&mut out, time);
    out.push(b'}');
    out
}

/// The push JSON wrapped in one WebSocket text frame, encoded once for every receiver.
pub fn push_frame(types: &str, msg: &str, time: &str) -> Arc<[u8]> {
    text_frame(&push_json(types, msg, time))
}

/// One unmasked, final text frame around `payload`.
fn text_frame(payload: &[u8]) -> Arc<[u8]> {
    text_frame_of(&[payload])
}

/// A text frame whose payload is `parts` one after the other, in one allocation:
/// the frame is put together in a reused buffer and copied into its `Arc` once.
fn text_frame_of(parts: &[&[u8]]) -> Arc<[u8]> {
    // Kept between calls up to this size; a larger message's buffer is let go.
    const KEEP: usize = 64 * 1024;
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let len = parts.iter().map(|p| p.len()).sum();
    SCRATCH.with_borrow_mut(|buf| {
        buf.clear();
        buf.extend_from_slice(frame::header(true, OpCode::Text, len).as_slice());
        for part in parts {
            buf.extend_from_slice(part);
        }
        let frame = Arc::from(&buf[..]);
        if buf.capacity() > KEEP {
            *buf = Vec::new();
        }
        frame
    })
}

// ---- between nodes --------------------------------------------------------------

/// A batch as it travels through Redis or Disque: a JSON array of
/// `{"target":"all"|["uid",…],"types":"…","expires":N,"push":<push JSON>}`.
/// `push` is the exact payload clients receive, so `msg` stays byte for byte.
pub fn encode_wire(batch: &[Envelope]) -> Vec<u8> {
    let size: usize = batch.iter().map(|e| e.frame.len() + 64).sum();
    let mut out = Vec::with_capacity(size + 2);
    out.push(b'[');
    for (i, env) in batch.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"target\":");
        match &env.target {
            Target::All => out.extend_from_slice(b"\"all\""),
            Target::Uids(uids) => {
                out.push(b'[');
                for (j, uid) in uids.iter().enumerate() {
                    if j > 0 {
                        out.push(b',');
                    }
                    write_json_string(&mut out, uid);
                }
                out.push(b']');
            }
        }
        out.extend_from_slice(b",\"types\":");
        write_json_string(&mut out, &env.types);
        out.extend_from_slice(format!(",\"expires\":{},\"push\":", env.expires).as_bytes());
        out.extend_from_slice(env.push_json());
        out.push(b'}');
    }
    out.push(b']');
    out
}

/// A wire message that is not a batch this server encodes; it is logged and skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireError(pub String);

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed batch from the queue backend: {}", self.0)
    }
}

impl std::error::Error for WireError {}

/// Parses an [`encode_wire`] batch and builds each frame once. Other nodes are
/// trusted no more than `/send`: the same [`Rules`] apply to the batch size, the
/// uids and the types.
pub fn decode_wire(bytes: &[u8], rules: &Rules) -> Result<Vec<Envelope>, WireError> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum WireTarget {
        All(String),
        Uids(Vec<String>),
    }
    #[derive(serde::Deserialize)]
    struct WireEnvelope<'a> {
        target: WireTarget,
        types: String,
        expires: u64,
        #[serde(borrow)]
        push: &'a RawValue,
    }
    let items: Vec<WireEnvelope> =
        serde_json::from_slice(bytes).map_err(|e| WireError(e.to_string()))?;
    let bad = |what: &str| Err(WireError(what.to_string()));
    rules
        .check_batch_len(items.len())
        .map_err(|e| WireError(e.to_string()))?;
    let mut batch = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let target = match item.target {
            WireTarget::All(s) if s == "all" => Target::All,
            WireTarget::All(_) => return bad("target must be \"all\" or a list of uids"),
            WireTarget::Uids(uids) => {
                let uids = uids.into_iter().map(String::into_boxed_str).collect();
                match uid_list(uids) {
                    Some(uids) => Target::Uids(uids),
                    None => return bad("bad uid list"),
                }
            }
        };
        if let Err(error) = rules.check_type(&item.types) {
            let e = SendError::Types {
                index: Some(i),
                error,
            };
            return Err(WireError(e.to_string()));
        }
        if !item.push.get().starts_with('{') {
            return bad("push must be a JSON object");
        }
        batch.push(Envelope {
            target,
            types: item.types.into(),
            expires: item.expires,
            seq: 0,
            lane: Lane::Main,
            frame: text_frame(item.push.get().as_bytes()),
        });
    }
    Ok(batch)
}

fn write_json_string(out: &mut Vec<u8>, s: &str) {
    // Serializing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(out, s);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(max_batch: usize) -> Rules {
        Rules {
            max_batch,
            ..Rules::default()
        }
    }

    fn parse(body: &str) -> Result<Vec<Envelope>, SendError> {
        parse_send(body.as_bytes(), &Rules::default(), &mut Clock::default())
    }

    #[test]
    fn the_delivery_id_is_read_back_from_the_push() {
        let mut env = parse(r#"{"topic":"all","msg":{"id":"not this one"}}"#)
            .unwrap()
            .remove(0);
        assert_eq!(delivery_id(env.push_json()), None);
        env.set_id(7, "1f-7");
        assert_eq!(delivery_id(env.push_json()), Some(&b"1f-7"[..]));
        assert_eq!(frame_payload(&env.frame), env.push_json());
        assert_eq!(delivery_id(br#"{"id":"a"b"}"#), None);
    }

    /// The JSON payload of an encoded frame (server frames are unmasked).
    fn payload(env: &Envelope) -> String {
        let f = &env.frame[..];
        let start = match f[1] {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        String::from_utf8(f[start..].to_vec()).unwrap()
    }

    #[test]
    fn one_message_with_every_field() {
        let envs = parse(
            r#"{"topic":"uids","topic_ids":["1",2],"types":"chat","msg":{"a": [1, 2.50]},"timeout":1893456000,"time":"2019-12-12 12:12:12"}"#,
        )
        .unwrap();
        assert_eq!(envs.len(), 1);
        let e = &envs[0];
        assert_eq!(e.target, Target::Uids(vec!["1".into(), "2".into()]));
        assert_eq!(&*e.types, "chat");
        assert_eq!(e.expires, 1893456000);
        // msg is passed through byte for byte, spacing and number format included.
        assert_eq!(
            payload(e),
            r#"{"types":"chat","msg":{"a": [1, 2.50]},"time":"2019-12-12 12:12:12"}"#
        );
        assert_eq!(e.frame[0], 0x81, "FIN + text opcode");
    }

    #[test]
    fn defaults_for_types_timeout_and_time() {
        let e = &parse(r#"{"topic":"all","msg":"hi"}"#).unwrap()[0];
        assert_eq!(e.target, Target::All);
        assert_eq!(&*e.types, "notice");
        assert_eq!(e.expires, 0);
        let p: serde_json::Value = serde_json::from_str(&payload(e)).unwrap();
        assert_eq!(p["msg"], "hi");
        let time = p["time"].as_str().unwrap();
        assert!(
            chrono::NaiveDateTime::parse_from_str(time, "%Y-%m-%d %H:%M:%S").is_ok(),
            "{time}"
        );
    }

    #[test]
    fn msg_null_is_a_value_but_absent_is_an_error() {
        assert!(
            payload(&parse(r#"{"topic":"all","msg":null}"#).unwrap()[0]).contains(r#""msg":null"#)
        );
        let e = parse(r#"{"topic":"all"}"#).unwrap_err();
        assert!(e.to_string().starts_with("msg"), "{e}");
    }

    #[test]
    fn batch_is_checked_whole() {
        assert_eq!(
            parse(r#"[{"topic":"all","msg":1},{"topic":"all","msg":2}]"#)
                .unwrap()
                .len(),
            2
        );
        let e = parse(r#"[{"topic":"all","msg":1},{"topic":"some","msg":2}]"#).unwrap_err();
        assert_eq!(e.to_string(), r#"[1].topic: must be "uids" or "all""#);
        assert_eq!(parse("[]").unwrap_err(), SendError::Empty);
        let many = format!("[{}]", [r#"{"topic":"all","msg":1}"#; 3].join(","));
        assert_eq!(
            parse_send(many.as_bytes(), &rules(2), &mut Clock::default()).unwrap_err(),
            SendError::TooMany(2)
        );
    }

    #[test]
    fn every_bad_field_is_named() {
        for (body, field) in [
            ("not json", "JSON"),
            ("42", "body"),
            (r#"{"msg":1}"#, "topic"),
            (r#"{"topic":7,"msg":1}"#, "topic"),
            (r#"{"topic":"uids","msg":1}"#, "topic_ids"),
            (r#"{"topic":"uids","topic_ids":[],"msg":1}"#, "topic_ids"),
            (r#"{"topic":"uids","topic_ids":"1","msg":1}"#, "topic_ids"),
            (r#"{"topic":"uids","topic_ids":[1.5],"msg":1}"#, "topic_ids"),
            (r#"{"topic":"uids","topic_ids":[""],"msg":1}"#, "topic_ids"),
            (
                r#"{"topic":"uids","topic_ids":[true],"msg":1}"#,
                "topic_ids",
            ),
            (r#"{"topic":"all","types":"","msg":1}"#, "types"),
            (r#"{"topic":"all","types":"a,b","msg":1}"#, "types"),
            (r#"{"topic":"all","types":3,"msg":1}"#, "types"),
            (r#"{"topic":"all","types":" chat","msg":1}"#, "types"),
            (r#"{"topic":"all","types":"chat\t","msg":1}"#, "types"),
            (r#"{"topic":"all","types":"\u00a0chat","msg":1}"#, "types"),
            (r#"{"topic":"all","msg":1,"timeout":-1}"#, "timeout"),
            (r#"{"topic":"all","msg":1,"timeout":"soon"}"#, "timeout"),
            (r#"{"topic":"all","msg":1,"timeout":1.5}"#, "timeout"),
            (r#"{"topic":"all","msg":1,"time":5}"#, "time"),
        ] {
            let e = parse(body).unwrap_err().to_string();
            assert!(e.contains(field), "{body}: {e}");
        }
    }

    #[test]
    fn uids_are_deduplicated_and_integers_kept_as_text() {
        let e = &parse(r#"{"topic":"uids","topic_ids":["7",7,"8",-3],"msg":1}"#).unwrap()[0];
        assert_eq!(
            e.target,
            Target::Uids(vec!["-3".into(), "7".into(), "8".into()])
        );
    }

    #[test]
    fn timeout_zero_never_expires_and_past_expires() {
        let e = &parse(r#"{"topic":"all","msg":1,"timeout":0}"#).unwrap()[0];
        assert!(!e.is_expired(u64::MAX));
        let e = &parse(r#"{"topic":"all","msg":1,"timeout":100}"#).unwrap()[0];
        assert!(!e.is_expired(99));
        assert!(e.is_expired(100));
    }

    #[test]
    fn strings_are_escaped_in_the_push() {
        let e = &parse(r#"{"topic":"all","types":"a\"b","msg":"x","time":"t\n"}"#).unwrap()[0];
        let p: serde_json::Value = serde_json::from_str(&payload(e)).unwrap();
        assert_eq!(
            (p["types"].as_str(), p["time"].as_str()),
            (Some("a\"b"), Some("t\n"))
        );
    }

    #[test]
    fn wire_round_trip_keeps_everything() {
        let body = r#"[{"topic":"uids","topic_ids":["u\"1",2],"types":"chat","msg":{"a": [1, 2.50]},"timeout":1893456000,"time":"t"},{"topic":"all","msg":"x"}]"#;
        let batch = parse(body).unwrap();
        let wire = encode_wire(&batch);
        let back = decode_wire(&wire, &Rules::default()).unwrap();
        assert_eq!(back.len(), 2);
        for (a, b) in batch.iter().zip(&back) {
            assert_eq!(a.target, b.target);
            assert_eq!(a.types, b.types);
            assert_eq!(a.expires, b.expires);
            assert_eq!(a.frame, b.frame, "the frame is rebuilt byte for byte");
        }
        assert_eq!(
            std::str::from_utf8(back[0].push_json()).unwrap(),
            r#"{"types":"chat","msg":{"a": [1, 2.50]},"time":"t"}"#
        );
        let v: serde_json::Value = serde_json::from_slice(&wire).unwrap();
        assert_eq!(v[0]["target"], serde_json::json!(["2", "u\"1"]));
        assert_eq!(v[1]["target"], "all");
    }

    #[test]
    fn wire_keeps_large_frames_intact() {
        let big = format!(r#"{{"topic":"all","msg":"{}"}}"#, "x".repeat(70_000));
        let batch = parse(&big).unwrap();
        let back = decode_wire(&encode_wire(&batch), &Rules::default()).unwrap();
        assert_eq!(batch[0].frame, back[0].frame);
        let mid = format!(r#"{{"topic":"all","msg":"{}"}}"#, "x".repeat(300));
        let batch = parse(&mid).unwrap();
        assert_eq!(
            batch[0].frame,
            decode_wire(&encode_wire(&batch), &Rules::default()).unwrap()[0].frame
        );
    }

    #[test]
    fn malformed_wire_is_an_error_not_a_panic() {
        for bad in [
            &b""[..],
            b"not json",
            b"{}",
            b"[]",
            b"[{\"target\":\"some\",\"types\":\"t\",\"expires\":0,\"push\":{}}]",
            b"[{\"target\":[],\"types\":\"t\",\"expires\":0,\"push\":{}}]",
            b"[{\"target\":\"all\",\"types\":\"\",\"expires\":0,\"push\":{}}]",
            b"[{\"target\":\"all\",\"types\":\"t\",\"expires\":-1,\"push\":{}}]",
            b"[{\"target\":\"all\",\"types\":\"t\",\"expires\":0,\"push\":5}]",
            b"[{\"target\":\"all\",\"types\":\"t\",\"expires\":0}]",
            b"\xff\xfe",
        ] {
            assert!(
                decode_wire(bad, &Rules::default()).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// One wire item with the given target JSON and types.
    fn wire_item(target: &str, types: &str) -> String {
        format!(
            r#"{{"target":{target},"types":{},"expires":0,"push":{{"msg":1}}}}"#,
            serde_json::to_string(types).unwrap()
        )
    }

    #[test]
    fn the_wire_path_keeps_the_send_rules() {
        let r = rules(2);
        let wire = |items: &[String]| format!("[{}]", items.join(","));
        let all = |t: &str| wire_item(r#""all""#, t);
        // Batch size.
        let three = wire(&[all("a"), all("a"), all("a")]);
        let e = decode_wire(three.as_bytes(), &r).unwrap_err();
        assert!(e.0.contains("more than 2"), "{e}");
        assert!(decode_wire(wire(&[all("a"), all("a")]).as_bytes(), &r).is_ok());
        // The types rule: what /send refuses, the wire refuses, with the same words.
        for types in [" chat", "chat ", "a,b", "", &"x".repeat(129)] {
            let sent = parse(&format!(
                r#"{{"topic":"all","types":{},"msg":1}}"#,
                serde_json::to_string(types).unwrap()
            ))
            .unwrap_err()
            .to_string();
            let got = decode_wire(wire(&[all(types)]).as_bytes(), &r).unwrap_err();
            assert!(sent.starts_with("types: "), "{sent}");
            assert!(got.0.ends_with(&sent["types: ".len()..]), "{got} vs {sent}");
        }
        let tight = Rules {
            max_type_len: 4,
            ..r
        };
        assert!(decode_wire(wire(&[all("abcde")]).as_bytes(), &tight).is_err());
        assert!(decode_wire(wire(&[all("abcd")]).as_bytes(), &tight).is_ok());
        // Uids are deduplicated, as /send does, so nobody gets a message twice.
        let dup = wire(&[wire_item(r#"["7","7","3"]"#, "a")]);
        let batch = decode_wire(dup.as_bytes(), &r).unwrap();
        assert_eq!(batch[0].target, Target::Uids(vec!["3".into(), "7".into()]));
        let long = format!("[\"{}\"]", "u".repeat(MAX_UID_LEN + 1));
        assert!(decode_wire(wire(&[wire_item(&long, "a")]).as_bytes(), &r).is_err());
    }

    #[test]
    fn escaped_keys_and_values_repeated_and_unknown_keys() {
        // Escapes in keys and values mean the same as the plain text.
        let e = &parse(
            r#"{"\u0074opic":"\u0061ll","types":"n\u006ftice","msg":1,"extra":[{"topic":"uids"}]}"#,
        )
        .unwrap()[0];
        assert_eq!((&e.target, &*e.types), (&Target::All, "notice"));
        // A key given twice keeps its last value.
        let e = &parse(r#"{"topic":"uids","topic":"all","msg":1,"msg":2}"#).unwrap()[0];
        assert_eq!(e.target, Target::All);
        assert!(payload(e).contains(r#""msg":2"#));
        // A non-string topic or types is refused and named.
        let err = parse(r#"{"topic":1,"msg":1}"#).unwrap_err().to_string();
        assert!(err.starts_with("topic:"), "{err}");
        let err = parse(r#"{"topic":"all","types":["a"],"msg":1}"#)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("types:"), "{err}");
    }

    #[test]
    fn large_messages_get_extended_length_frames() {
        let big = format!(r#"{{"topic":"all","msg":"{}"}}"#, "x".repeat(70_000));
        let e = &parse(&big).unwrap()[0];
        assert_eq!(e.frame[1], 127);
        assert!(payload(e).len() > 70_000);
    }
}
