//! Command-line flags, Go style (`-port=3210 -queue=list`), and every limit the
//! server enforces. Nothing else in the server invents a bound: each one is here.

use std::fmt;
use std::time::Duration;

use getopts::Options;

use crate::auth::IpNet;

/// Where `/send` hands messages to and where pushes come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueueSpec {
    /// In-process list: one node, nothing else needed.
    List,
    /// Redis pub/sub: a `redis://[:PASS@]HOST:PORT[/DB]` URL (`redis/HOST:PORT`
    /// on the command line becomes `redis://HOST:PORT`).
    Redis(String),
    /// Disque job queue at `HOST:PORT`.
    Disque(String),
    /// Redis Cluster: seed nodes as `redis://[USER:PASS@]HOST:PORT` URLs
    /// (`redis-cluster/[USER:PASS@]H:P,H:P` on the command line, the credentials
    /// for every node); the rest of the cluster is learnt from them.
    RedisCluster(Vec<String>),
}

impl QueueSpec {
    fn parse(s: &str) -> Result<Self, ConfigError> {
        let bad = || ConfigError::Invalid("queue", crate::queue::publisher::redact(s));
        if s == "list" {
            Ok(QueueSpec::List)
        } else if let Some(addr) = s.strip_prefix("redis/") {
            (!addr.is_empty())
                .then(|| QueueSpec::Redis(format!("redis://{addr}")))
                .ok_or_else(bad)
        } else if s.len() > "redis://".len() && s.starts_with("redis://") {
            Ok(QueueSpec::Redis(s.to_string()))
        } else if let Some(seeds) = s.strip_prefix("redis-cluster/") {
            // `[USER:PASS@]H:P,H:P…`: the credentials go to every node, seed or not
            // (the last `@`: a password may hold one, an address never does).
            let (creds, seeds) = match seeds.rsplit_once('@') {
                Some((creds, addrs)) => (format!("{creds}@"), addrs),
                None => (String::new(), seeds),
            };
            // Each seed is HOST:PORT; the URL parser checks the rest at start.
            let valid = |a: &str| a.rfind(':').is_some_and(|colon| colon > 0);
            let addrs: Vec<&str> = seeds.split(',').collect();
            (addrs.iter().all(|a| valid(a)) && addrs.len() <= MAX_SEEDS)
                .then(|| {
                    let urls = addrs.iter().map(|a| format!("redis://{creds}{a}"));
                    QueueSpec::RedisCluster(urls.collect())
                })
                .ok_or_else(bad)
        } else if let Some(addr) = s.strip_prefix("disque/") {
            (!addr.is_empty())
                .then(|| QueueSpec::Disque(addr.to_string()))
                .ok_or_else(bad)
        } else {
            Err(bad())
        }
    }
}

/// The most seed nodes `-queue=redis-cluster/…` names (the cluster tells the rest).
pub const MAX_SEEDS: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
}

/// Whether `/ws` negotiates permessage-deflate (RFC 7692) with clients that offer it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deflate {
    Off,
    On,
}

/// One line per flag: the `Config` field with its type and default, then the flag's
/// name, value hint, parser (which also enforces the flag's own bound) and help.
/// The struct, its `Default`, `-h` and parsing all come from this one table, so
/// adding a flag is adding a line; rules between flags live in [`check`].
macro_rules! flags {
    ($(
        $(#[$doc:meta])*
        $field:ident: $ty:ty = $default:expr,
            $name:literal $hint:literal $parse:ident $(env $env:literal)? $(shown $shown:literal)?,
            $help:literal;
    )*) => {
        #[derive(Clone, Debug)]
        pub struct Config {
            $( $(#[$doc])* pub $field: $ty, )*
        }

        impl Default for Config {
            fn default() -> Self {
                Config { $( $field: $default, )* }
            }
        }

        const FLAGS: &[Flag] = &[$(
            Flag {
                name: $name,
                hint: $hint,
                help: $help,
                env: flags!(@opt $($env)?),
                shown: |_c| flags!(@opt $($shown.to_string())?).or_else(|| Show::show(&_c.$field)),
                set: |c, s| {
                    c.$field = $parse(s)?;
                    Ok(())
                },
            },
        )*];
    };
    (@opt) => { None };
    (@opt $v:expr) => { Some($v) };
}

flags! {
    port: u16 = 3210,
        "port" "PORT" port, "TCP port";
    bind: String = "0.0.0.0".into(),
        "bind" "ADDR" text, "address to listen on";
    queue: QueueSpec = QueueSpec::List,
        "queue" "SPEC" queue_spec,
        "queue backend: list | redis/HOST:PORT | redis://[:PASS@]HOST:PORT[/DB] | redis-cluster/[:PASS@]HOST:PORT[,HOST:PORT…] | disque/HOST:PORT";
    /// Messages the in-process list holds before `/send` answers 503; with Redis or
    /// Disque, the batches that may wait for the publisher thread.
    queue_size: usize = 100_000,
        "queue-size" "N" positive,
        "messages the list queue holds; batches waiting to be published to Redis/Disque";
    /// The Redis channel or Disque queue every node shares.
    queue_name: String = "wspush".into(),
        "queue-name" "NAME" nonempty, "Redis channel / Disque queue shared by the nodes";
    /// Bound on one Redis/Disque operation (connect, PUBLISH, ADDJOB, a health
    /// PING): `/send` gets its 503 within about this long when the server is gone.
    queue_timeout: Duration = Duration::from_secs(2),
        "queue-timeout" "DUR" duration,
        "bound on a Redis/Disque connect, publish or health check; /send answers 503 after it";
    /// Longest wait between reconnect attempts (the backoff doubles up to it).
    queue_backoff: Duration = Duration::from_secs(2),
        "queue-backoff" "DUR" duration, "longest wait between reconnect attempts to Redis/Disque";
    /// Disque job TTL for messages without `timeout`.
    queue_ttl: Duration = Duration::from_secs(3600),
        "queue-ttl" "DUR" duration, "Disque job TTL for messages without timeout";
    /// Disque RETRY: a job taken but not acknowledged is queued again after this.
    queue_retry: Duration = Duration::from_secs(10),
        "queue-retry" "DUR" duration, "Disque redelivers a job not acknowledged within";
    /// Disque jobs taken by one GETJOB, i.e. delivered but not yet acknowledged.
    queue_prefetch: usize = 64,
        "queue-prefetch" "N" positive, "Disque jobs taken per GETJOB";
    /// The most Disque nodes a publisher adds each job for.
    queue_nodes: usize = 64,
        "queue-nodes" "N" positive, "most Disque nodes each job is added for";
    /// This node's Disque queue id; empty: a fresh one at each start.
    queue_node: String = String::new(),
        "queue-node" "ID" node_id shown "a fresh one at each start",
        "this node's Disque queue id, kept across restarts";
    /// Bytes of received Redis messages the subscriber holds while the reactor is
    /// behind; past half of it `/send` on this node answers 503.
    queue_backlog: usize = 32 << 20,
        "queue-backlog" "BYTES" positive,
        "bytes of Redis messages held while delivery is behind; /send answers 503 past half";
    /// Subscription changes (a uid's first connection, its last leaving) waiting
    /// for the Redis subscriber, which takes them all in one SUBSCRIBE per turn.
    queue_interest: usize = 65_536,
        "queue-interest" "N" positive,
        "Redis subscription changes waiting; past it a connection of a uid new to the node is closed with 1013";
    /// Redis Cluster: after a batch's writes, `WAIT 1` for this long on each primary
    /// written to, and 503 unless a replica has them, so a 200 survives a failover.
    /// 0: no WAIT (a failover may lose the last writes a 200 answered).
    queue_wait: Duration = Duration::ZERO,
        "queue-wait" "DUR" duration_or_zero,
        "Redis Cluster: a 200 waits this long for a replica to have the batch (WAIT 1); 0 = off";
    /// With Redis: a node's presence heartbeat lives this long, so a dead node's
    /// connections stop counting in `/presence` within it.
    presence_ttl: Duration = Duration::from_secs(3),
        "presence-ttl" "DUR" duration,
        "Redis: a dead node's connections drop out of /presence within this";
    /// The most uids one `/presence` request may ask for.
    presence_max: usize = 100,
        "presence-max" "N" positive, "most uids one /presence request asks for";
    /// Events the queue threads may have in flight towards the reactor.
    inbound_size: usize = 1024,
        "inbound-size" "N" positive, "queue events waiting for the reactor";
    echo: bool = false,
        "echo" "" switch, "echo client text/binary messages (WebSocket conformance testing)";
    /// Off by default: compression that mixes attacker-chosen and secret bytes in one
    /// message leaks through its size (CRIME/BREACH), and what a push carries is the
    /// deployment's to judge; pushes are also small, so it saves little.
    deflate: Deflate = Deflate::Off,
        "deflate" "off|on" deflate_mode, "permessage-deflate for clients that offer it: off | on";
    /// Pushes shorter than this are sent uncompressed even to deflate clients.
    deflate_min: usize = 256,
        "deflate-min" "BYTES" positive, "pushes shorter than this are sent uncompressed";
    log: LogLevel = LogLevel::Info,
        "log" "LEVEL" log_level, "log level: debug | info | warn";
    /// Open TCP connections of every kind (push and HTTP).
    max_connections: usize = 100_000,
        "max-connections" "N" positive, "open connections";
    /// Connections the kernel completes and queues until the reactor accepts them (the
    /// system caps it, e.g. Linux's net.core.somaxconn). The usual 128 overflows when
    /// hundreds of clients connect at once, as after a restart, and each overflow costs
    /// a client a SYN retransmission: a second or more.
    listen_backlog: usize = 1024,
        "listen-backlog" "N" positive, "connections the kernel queues until they are accepted";
    /// Connections beyond `-max-connections` (or `-max-per-ip`) that are kept just
    /// long enough to receive their 503/429; past this many more, new connections
    /// are dropped outright.
    refusal_slots: usize = 64,
        "refusal-slots" "N" positive, "refused connections kept open to receive their answer";
    /// Readiness events taken from one poll.
    poll_events: usize = 1024,
        "poll-events" "N" positive, "socket events taken per poll";
    /// Bytes read from a socket at a time, into one buffer every connection shares.
    read_buffer: usize = 64 * 1024,
        "read-buffer" "BYTES" positive, "bytes read from a socket at a time";
    /// Bytes read from one connection per wake before the others get their turn.
    read_budget: usize = 256 * 1024,
        "read-budget" "BYTES" positive, "bytes read from one connection before the others get a turn";
    /// Queue events handled per wake before sockets get their turn.
    inbound_budget: usize = 256,
        "inbound-budget" "N" positive, "queue events handled before sockets get a turn";
    max_frame: usize = 64 * 1024,
        "max-frame" "BYTES" positive, "bytes in one client frame";
    max_message: usize = 64 * 1024,
        "max-message" "BYTES" positive, "bytes in one client message";
    max_header: usize = 8 * 1024,
        "max-header" "BYTES" positive, "bytes of HTTP request headers";
    max_body: usize = 1024 * 1024,
        "max-body" "BYTES" positive, "bytes of a /send body";
    /// Messages in one `/send` batch.
    max_batch: usize = 1000,
        "max-batch" "N" positive, "messages in one /send batch";
    /// Types in one connection's filter (`?types=` or a subscribe op).
    max_types: usize = 64,
        "max-types" "N" positive, "types in one connection's filter (?types= or subscribe)";
    /// Bytes of one type, in `/send` and in a filter alike.
    max_type_len: usize = 128,
        "max-type-len" "BYTES" positive, "bytes of one type, in /send and in filters";
    /// Unsent bytes a connection may hold before it is dropped as too slow.
    max_backlog: usize = 2 * 1024 * 1024,
        "max-backlog" "BYTES" positive, "unsent bytes per connection before it is dropped as slow";
    /// How long a message is kept for resume and offline delivery at most (a message
    /// with an earlier `timeout` leaves then); 0 keeps nothing.
    history_ttl: Duration = Duration::from_secs(300),
        "history-ttl" "DUR" duration_or_zero,
        "keep messages for resume (?since=) this long at most, 0 = no retention";
    /// Messages kept per uid, and for `all`.
    history_size: usize = 100,
        "history-size" "N" positive, "messages kept for resume per uid (and for all)";
    /// Bytes of retained messages on this node (list and Disque; with Redis, Redis holds them).
    history_bytes: usize = 32 * 1024 * 1024,
        "history-bytes" "BYTES" positive, "bytes of messages this node keeps for resume, oldest dropped first";
    /// Messages Redis keeps in the node-wide log a node reads after a lost
    /// subscription (a gap longer than this sends its connections off to resume).
    history_log: usize = 100_000,
        "history-log" "N" positive, "messages Redis keeps for nodes catching up after a lost subscription";
    ping_interval: Duration = Duration::from_secs(30),
        "ping-interval" "DUR" duration, "ping a silent connection after";
    idle_timeout: Duration = Duration::from_secs(75),
        "idle-timeout" "DUR" duration, "drop a silent connection after";
    request_timeout: Duration = Duration::from_secs(10),
        "request-timeout" "DUR" duration, "time to receive a whole HTTP request";
    keepalive_timeout: Duration = Duration::from_secs(60),
        "keepalive-timeout" "DUR" duration, "idle HTTP keep-alive connection lifetime";
    close_timeout: Duration = Duration::from_secs(5),
        "close-timeout" "DUR" duration, "wait for the peer's close frame and final writes";
    shutdown_timeout: Duration = Duration::from_secs(10),
        "shutdown-timeout" "DUR" duration, "longest graceful shutdown on SIGINT/SIGTERM";
    /// `/send`, `/stats` and `/metrics` need `Authorization: Bearer <key>`.
    api_key: Option<String> = None,
        "api-key" "KEY" secret env "WSPUSH_API_KEY",
        "key that /send, /stats and /metrics require as `Authorization: Bearer KEY` (or env WSPUSH_API_KEY)";
    /// `/ws` needs a token signed with this secret.
    secret: Option<String> = None,
        "secret" "SECRET" secret env "WSPUSH_SECRET",
        "require /ws tokens: hex HMAC-SHA256(SECRET, \"uid:expires\") (or env WSPUSH_SECRET)";
    /// Allowed `Origin`s for `/ws`; empty allows any.
    origins: Vec<String> = Vec::new(),
        "origins" "LIST" origin_list shown "any", "comma list of Origins allowed on /ws";
    /// Connections per client address; 0 means no limit.
    max_per_ip: usize = 1000,
        "max-per-ip" "N" count, "connections per client address, 0 = no limit";
    /// Peers whose `X-Forwarded-For` / `X-Real-IP` name the client.
    trusted_proxies: Vec<IpNet> = vec![LOOPBACK_V4, LOOPBACK_V6],
        "trusted-proxies" "LIST" proxy_list shown "127.0.0.0/8,::1",
        "comma list of proxy addresses/CIDRs whose X-Forwarded-For / X-Real-IP are believed (empty = none)";
}

/// What the queue backends read from the flags.
#[derive(Clone, Debug)]
pub struct QueueSettings {
    pub name: String,
    pub size: usize,
    pub timeout: Duration,
    pub backoff: Duration,
    pub ttl: Duration,
    pub retry: Duration,
    pub prefetch: usize,
}

impl Config {
    pub fn history_limits(&self) -> crate::history::Limits {
        crate::history::Limits {
            ttl: self.history_ttl.as_secs(),
            size: self.history_size,
            bytes: self.history_bytes,
        }
    }

    pub fn queue_settings(&self) -> QueueSettings {
        QueueSettings {
            name: self.queue_name.clone(),
            size: self.queue_size,
            timeout: self.queue_timeout,
            backoff: self.queue_backoff,
            ttl: self.queue_ttl,
            retry: self.queue_retry,
            prefetch: self.queue_prefetch,
        }
    }
}

/// One command-line flag, from the [`flags!`] table.
struct Flag {
    name: &'static str,
    /// The value's placeholder in `-h`; empty for a switch, which takes none.
    hint: &'static str,
    help: &'static str,
    /// An environment variable read when the flag is absent.
    env: Option<&'static str>,
    /// The default as `-h` shows it, if it has one worth showing.
    shown: fn(&Config) -> Option<String>,
    /// Parses a value and stores it; `Err` means the value is invalid.
    set: fn(&mut Config, &str) -> Result<(), Bad>,
}

/// A flag's value failed its parser or its bound.
struct Bad;

/// How a default reads in `-h`.
trait Show {
    fn show(&self) -> Option<String>;
}

impl Show for usize {
    fn show(&self) -> Option<String> {
        Some(self.to_string())
    }
}

impl Show for u16 {
    fn show(&self) -> Option<String> {
        Some(self.to_string())
    }
}

impl Show for String {
    fn show(&self) -> Option<String> {
        Some(self.clone())
    }
}

impl Show for Duration {
    fn show(&self) -> Option<String> {
        Some(if self.subsec_millis() == 0 {
            format!("{}s", self.as_secs())
        } else {
            format!("{}ms", self.as_millis())
        })
    }
}

impl Show for QueueSpec {
    fn show(&self) -> Option<String> {
        (*self == QueueSpec::List).then(|| "list".into())
    }
}

impl Show for LogLevel {
    fn show(&self) -> Option<String> {
        Some(format!("{self:?}").to_lowercase())
    }
}

impl Show for Deflate {
    fn show(&self) -> Option<String> {
        Some(format!("{self:?}").to_lowercase())
    }
}

impl<T> Show for Option<T> {
    fn show(&self) -> Option<String> {
        None
    }
}

impl<T> Show for Vec<T> {
    fn show(&self) -> Option<String> {
        None
    }
}

impl Show for bool {
    fn show(&self) -> Option<String> {
        None
    }
}

// The parsers of the table. Each enforces the bound of its kind of value.

/// A count that must be at least 1.
fn positive(s: &str) -> Result<usize, Bad> {
    s.parse().ok().filter(|n| *n > 0).ok_or(Bad)
}

/// A count where 0 means "no limit".
fn count(s: &str) -> Result<usize, Bad> {
    s.parse().map_err(|_| Bad)
}

fn port(s: &str) -> Result<u16, Bad> {
    s.parse().map_err(|_| Bad)
}

/// A duration above zero: `30`, `30s`, `500ms`, `2m`.
fn duration(s: &str) -> Result<Duration, Bad> {
    parse_duration(s).filter(|d| !d.is_zero()).ok_or(Bad)
}

/// A duration where 0 turns the feature off.
fn duration_or_zero(s: &str) -> Result<Duration, Bad> {
    parse_duration(s).ok_or(Bad)
}

/// A Disque node id: letters, digits, `-`, `_` and `.`.
fn node_id(s: &str) -> Result<String, Bad> {
    let ok = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    ok.then(|| s.to_string()).ok_or(Bad)
}

fn text(s: &str) -> Result<String, Bad> {
    Ok(s.to_string())
}

fn nonempty(s: &str) -> Result<String, Bad> {
    (!s.is_empty()).then(|| s.to_string()).ok_or(Bad)
}

fn secret(s: &str) -> Result<Option<String>, Bad> {
    nonempty(s).map(Some)
}

fn switch(_: &str) -> Result<bool, Bad> {
    Ok(true)
}

fn queue_spec(s: &str) -> Result<QueueSpec, Bad> {
    QueueSpec::parse(s).map_err(|_| Bad)
}

fn log_level(s: &str) -> Result<LogLevel, Bad> {
    match s {
        "debug" => Ok(LogLevel::Debug),
        "info" => Ok(LogLevel::Info),
        "warn" => Ok(LogLevel::Warn),
        _ => Err(Bad),
    }
}

fn deflate_mode(s: &str) -> Result<Deflate, Bad> {
    match s {
        "off" => Ok(Deflate::Off),
        "on" => Ok(Deflate::On),
        _ => Err(Bad),
    }
}

fn origin_list(s: &str) -> Result<Vec<String>, Bad> {
    Ok(list(s).map(str::to_string).collect())
}

fn proxy_list(s: &str) -> Result<Vec<IpNet>, Bad> {
    list(s).map(|p| IpNet::parse(p).ok_or(Bad)).collect()
}

#[derive(Debug, PartialEq, Eq)]
pub enum ConfigError {
    Getopts(String),
    Invalid(&'static str, String),
    Conflict(String),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Getopts(e) => write!(f, "{e}"),
            ConfigError::Invalid(flag, v) => write!(f, "invalid value for -{flag}: {v:?}"),
            ConfigError::Conflict(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// What the command line asked for.
pub enum Command {
    // Boxed: the config is large and built once.
    Run(Box<Config>),
    Help(String),
    Version,
}

fn options() -> Options {
    let d = Config::default();
    let mut o = Options::new();
    // Go's flag package takes `-name=value`; getopts does too in long-only mode.
    o.long_only(true);
    for f in FLAGS {
        let help = match (f.shown)(&d) {
            Some(v) => format!("{} (default {v})", f.help),
            None => f.help.to_string(),
        };
        if f.hint.is_empty() {
            o.optflag("", f.name, &help);
        } else {
            o.optopt("", f.name, &help, f.hint);
        }
    }
    o.optflag("h", "help", "print this help");
    o.optflag("", "version", "print the version");
    o
}

const LOOPBACK_V4: IpNet = IpNet::new_v4([127, 0, 0, 0], 8);
const LOOPBACK_V6: IpNet = IpNet::new_v6_host([0, 0, 0, 0, 0, 0, 0, 1]);

/// Parses the arguments after the program name; secrets may also come from the
/// environment (`WSPUSH_API_KEY`, `WSPUSH_SECRET`) so they stay out of `ps`.
pub fn parse<S: AsRef<str>>(args: &[S]) -> Result<Command, ConfigError> {
    parse_with_env(args, |name| std::env::var(name).ok())
}

pub fn parse_with_env<S: AsRef<str>>(
    args: &[S],
    env: impl Fn(&str) -> Option<String>,
) -> Result<Command, ConfigError> {
    let opts = options();
    let m = opts
        .parse(args.iter().map(|a| a.as_ref()))
        .map_err(|e| ConfigError::Getopts(e.to_string()))?;
    if m.opt_present("help") {
        return Ok(Command::Help(
            opts.usage("Usage: wspush [-port=3210] [-queue=list] [flags]"),
        ));
    }
    if m.opt_present("version") {
        return Ok(Command::Version);
    }
    if let Some(extra) = m.free.first() {
        return Err(ConfigError::Getopts(format!(
            "unexpected argument {extra:?}"
        )));
    }
    let mut c = Config::default();
    for f in FLAGS {
        let value = if f.hint.is_empty() {
            m.opt_present(f.name).then(String::new)
        } else {
            m.opt_str(f.name).or_else(|| f.env.and_then(&env))
        };
        if let Some(v) = value {
            (f.set)(&mut c, &v).map_err(|Bad| {
                // A secret's value is never repeated back, not even in an error.
                // A queue URL may carry a password: shown redacted.
                let shown = if f.env.is_some() {
                    "(empty)".into()
                } else if f.name == "queue" {
                    crate::queue::publisher::redact(&v)
                } else {
                    v
                };
                ConfigError::Invalid(f.name, shown)
            })?;
        }
    }
    check(&c)?;
    Ok(Command::Run(Box::new(c)))
}

/// What a push frame adds around a message's bytes: the WebSocket header (at most
/// 10 bytes), `{"types":…,"msg":…,"time":…}` and the time (at most 64 bytes).
pub const PUSH_FRAMING: usize = 256;

/// The rules between flags, which no single flag's parser can see.
fn check(c: &Config) -> Result<(), ConfigError> {
    let conflict = |e: &str| Err(ConfigError::Conflict(e.into()));
    if c.idle_timeout <= c.ping_interval {
        return conflict("-idle-timeout must be longer than -ping-interval");
    }
    // WAIT runs within the publish's own deadline.
    if c.queue_wait >= c.queue_timeout {
        return conflict("-queue-wait must be shorter than -queue-timeout");
    }
    // The reactor gives up on a pending /send after -request-timeout; a publish
    // still under way then could succeed after its 503 was sent. The list queue
    // answers at once and has no such timeout.
    if c.queue != QueueSpec::List && c.queue_timeout >= c.request_timeout {
        return conflict("-queue-timeout must be shorter than -request-timeout");
    }
    // Disque counts TTL and RETRY in whole seconds and refuses a TTL of 0.
    if c.queue_ttl < Duration::from_secs(1) || c.queue_retry < Duration::from_secs(1) {
        return conflict("-queue-ttl and -queue-retry must be at least 1s");
    }
    // Retention counts in whole seconds: a fraction would silently turn it off.
    if !c.history_ttl.is_zero() && c.history_ttl < Duration::from_secs(1) {
        return conflict("-history-ttl must be 0 (off) or at least 1s");
    }
    if c.max_message < c.max_frame {
        return conflict("-max-message must be at least -max-frame");
    }
    // One message as large as /send takes must fit in a receiver's backlog with
    // its framing, or the server would evict a client for a message it accepted.
    if c.max_backlog < c.max_body.saturating_add(PUSH_FRAMING) {
        return Err(ConfigError::Conflict(format!(
            "-max-backlog must be at least -max-body + {PUSH_FRAMING} (a push frame's framing)"
        )));
    }
    Ok(())
}

fn list(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|p| !p.is_empty())
}

/// `30`, `30s`, `500ms`, `2m`: a bare number means seconds, as the timeouts are mostly seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    match unit {
        "" | "s" => Some(Duration::from_secs(n)),
        "ms" => Some(Duration::from_millis(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Config {
        match parse(args) {
            Ok(Command::Run(c)) => *c,
            Ok(_) => panic!("not a run command"),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn go_style_flags() {
        let c = run(&[
            "-port=4000",
            "-queue=redis/localhost:6379",
            "-echo",
            "-ping-interval=500ms",
        ]);
        assert_eq!(c.port, 4000);
        assert_eq!(c.queue, QueueSpec::Redis("redis://localhost:6379".into()));
        assert!(c.echo);
        assert_eq!(c.ping_interval, Duration::from_millis(500));
        let c = run(&["--port", "4001", "-queue", "disque/127.0.0.1:7711"]);
        assert_eq!(c.port, 4001);
        assert_eq!(c.queue, QueueSpec::Disque("127.0.0.1:7711".into()));
    }

    #[test]
    fn queue_flags() {
        let c = run(&[
            "-queue=redis://:pw@10.0.0.1:6380/2",
            "-queue-name=push",
            "-queue-timeout=500ms",
            "-queue-backoff=1s",
            "-queue-ttl=2m",
            "-queue-retry=5",
            "-queue-prefetch=8",
        ]);
        assert_eq!(
            c.queue,
            QueueSpec::Redis("redis://:pw@10.0.0.1:6380/2".into())
        );
        assert_eq!(c.queue_name, "push");
        assert_eq!(c.queue_timeout, Duration::from_millis(500));
        assert_eq!(c.queue_backoff, Duration::from_secs(1));
        assert_eq!(c.queue_ttl, Duration::from_secs(120));
        assert_eq!(c.queue_retry, Duration::from_secs(5));
        assert_eq!(c.queue_prefetch, 8);
        let d = run(&[]);
        assert_eq!(
            (d.queue_name.as_str(), d.queue_timeout),
            ("wspush", Duration::from_secs(2))
        );
        assert!(parse(&["-queue=redis://"]).is_err());
        let c = run(&["-queue=redis-cluster/10.0.0.1:7000,h2:7001"]);
        assert_eq!(
            c.queue,
            QueueSpec::RedisCluster(vec![
                "redis://10.0.0.1:7000".into(),
                "redis://h2:7001".into()
            ])
        );
        // Credentials before the addresses are every node's.
        let c = run(&["-queue=redis-cluster/:p@ss@10.0.0.1:7000,h2:7001"]);
        assert_eq!(
            c.queue,
            QueueSpec::RedisCluster(vec![
                "redis://:p@ss@10.0.0.1:7000".into(),
                "redis://:p@ss@h2:7001".into()
            ])
        );
        assert!(parse(&["-queue=redis-cluster/"]).is_err());
        assert!(parse(&["-queue=redis-cluster/:pw@"]).is_err());
        assert!(parse(&["-queue=redis-cluster/h:1,"]).is_err());
        assert!(parse(&["-queue=redis-cluster/h:1", "-queue-wait=5s"]).is_err());
        assert!(parse(&["-queue=redis/"]).is_err());
        assert!(parse(&["-queue-name="]).is_err());
        assert!(parse(&["-queue-ttl=500ms"]).is_err());
        assert!(
            parse(&["-queue=redis/h:1", "-queue-timeout=10s"]).is_err(),
            "not below -request-timeout"
        );
        assert!(
            parse(&["-request-timeout=1s"]).is_ok(),
            "the list has no queue timeout"
        );
    }

    #[test]
    fn deflate_flags() {
        let c = run(&[]);
        assert_eq!((c.deflate, c.deflate_min), (Deflate::Off, 256));
        let c = run(&["-deflate=on", "-deflate-min=1024"]);
        assert_eq!((c.deflate, c.deflate_min), (Deflate::On, 1024));
    }

    #[test]
    fn defaults_follow_the_protocol() {
        let c = run(&[]);
        assert_eq!((c.port, c.queue.clone()), (3210, QueueSpec::List));
        assert_eq!(
            (c.max_frame, c.max_header, c.max_body),
            (65536, 8192, 1 << 20)
        );
    }

    #[test]
    fn bad_values_name_the_flag() {
        for (args, flag) in [
            (&["-port=x"][..], "port"),
            (&["-queue=kafka"][..], "queue"),
            (&["-max-body=0"][..], "max-body"),
            (&["-idle-timeout=5y"][..], "idle-timeout"),
            (&["-deflate=yes"][..], "deflate"),
            (&["-deflate-min=0"][..], "deflate-min"),
        ] {
            let err = parse(args).err().expect("must fail").to_string();
            assert!(err.contains(flag), "{err}");
        }
        assert!(parse(&["-nope=1"]).is_err());
        assert!(parse(&["stray"]).is_err());
        assert!(parse(&["-ping-interval=80", "-idle-timeout=60"]).is_err());
        let err = parse(&["-max-backlog=65536"]).err().unwrap().to_string();
        assert!(
            err.contains("-max-backlog must be at least -max-body"),
            "{err}"
        );
        assert!(parse(&["-max-backlog=65536", "-max-body=65280"]).is_ok());
    }

    #[test]
    fn every_flag_takes_its_own_default() {
        let d = Config::default();
        for f in FLAGS {
            let arg = match (f.hint.is_empty(), (f.shown)(&d)) {
                (true, _) => format!("-{}", f.name),
                // "any" and worded defaults describe a value rather than give one.
                (false, Some(v)) if v != "any" && !v.contains(' ') => format!("-{}={v}", f.name),
                _ => continue,
            };
            assert!(parse(&[arg.as_str()]).is_ok(), "{arg}");
        }
        let names: std::collections::HashSet<_> = FLAGS.iter().map(|f| f.name).collect();
        assert_eq!(names.len(), FLAGS.len(), "a flag is declared twice");
    }

    #[test]
    fn secrets_come_from_the_environment_and_are_never_echoed() {
        let env =
            |v: &'static str| move |name: &str| (name == "WSPUSH_API_KEY").then(|| v.to_string());
        let Ok(Command::Run(c)) = parse_with_env(&[] as &[&str], env("k1")) else {
            panic!("no run")
        };
        assert_eq!(c.api_key.as_deref(), Some("k1"));
        let err = parse_with_env(&["-api-key="], env("k1")).err().unwrap();
        assert_eq!(err, ConfigError::Invalid("api-key", "(empty)".into()));
    }

    #[test]
    fn help_lists_every_flag() {
        let Ok(Command::Help(h)) = parse(&["-h"]) else {
            panic!("no help")
        };
        for f in FLAGS {
            assert!(
                h.contains(&format!("-{} ", f.name)),
                "{} missing from help",
                f.name
            );
        }
    }
}
