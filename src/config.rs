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
}

impl QueueSpec {
    fn parse(s: &str) -> Result<Self, ConfigError> {
        let bad = || ConfigError::Invalid("queue", s.to_string());
        if s == "list" {
            Ok(QueueSpec::List)
        } else if let Some(addr) = s.strip_prefix("redis/") {
            (!addr.is_empty())
                .then(|| QueueSpec::Redis(format!("redis://{addr}")))
                .ok_or_else(bad)
        } else if s.len() > "redis://".len() && s.starts_with("redis://") {
            Ok(QueueSpec::Redis(s.to_string()))
        } else if let Some(addr) = s.strip_prefix("disque/") {
            (!addr.is_empty())
                .then(|| QueueSpec::Disque(addr.to_string()))
                .ok_or_else(bad)
        } else {
            Err(bad())
        }
    }
}

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

#[derive(Clone, Debug)]
pub struct Config {
    pub bind: String,
    pub port: u16,
    pub queue: QueueSpec,
    /// Messages the in-process list holds before `/send` answers 503; with Redis or
    /// Disque, the batches that may wait for the publisher thread.
    pub queue_size: usize,
    /// The Redis channel or Disque queue every node shares.
    pub queue_name: String,
    /// Bound on one Redis/Disque operation (connect, PUBLISH, ADDJOB, a health
    /// PING): `/send` gets its 503 within about this long when the server is gone.
    pub queue_timeout: Duration,
    /// Longest wait between reconnect attempts (the backoff doubles up to it).
    pub queue_backoff: Duration,
    /// Disque job TTL for messages without `timeout`.
    pub queue_ttl: Duration,
    /// Disque RETRY: a job taken but not acknowledged is queued again after this.
    pub queue_retry: Duration,
    /// Disque jobs taken by one GETJOB, i.e. delivered but not yet acknowledged.
    pub queue_prefetch: usize,
    pub echo: bool,
    pub deflate: Deflate,
    /// Pushes shorter than this are sent uncompressed even to deflate clients.
    pub deflate_min: usize,
    pub log: LogLevel,
    /// Open TCP connections of every kind (push and HTTP).
    pub max_connections: usize,
    pub max_frame: usize,
    pub max_message: usize,
    pub max_header: usize,
    pub max_body: usize,
    /// Messages in one `/send` batch.
    pub max_batch: usize,
    /// Unsent bytes a connection may hold before it is dropped as too slow.
    pub max_backlog: usize,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    pub request_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub close_timeout: Duration,
    pub shutdown_timeout: Duration,
    /// `/send`, `/stats` and `/metrics` need `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// `/ws` needs a token signed with this secret.
    pub secret: Option<String>,
    /// Allowed `Origin`s for `/ws`; empty allows any.
    pub origins: Vec<String>,
    /// Connections per client address; 0 means no limit.
    pub max_per_ip: usize,
    /// Peers whose `X-Forwarded-For` / `X-Real-IP` name the client.
    pub trusted_proxies: Vec<IpNet>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bind: "0.0.0.0".into(),
            port: 3210,
            queue: QueueSpec::List,
            queue_size: 100_000,
            queue_name: "wspush".into(),
            queue_timeout: Duration::from_secs(2),
            queue_backoff: Duration::from_secs(2),
            queue_ttl: Duration::from_secs(3600),
            queue_retry: Duration::from_secs(10),
            queue_prefetch: 64,
            echo: false,
            // Off: compression that mixes attacker-chosen and secret bytes in one
            // message leaks through its size (CRIME/BREACH), and what a push carries
            // is the deployment's to judge; pushes are also small, so it saves little.
            deflate: Deflate::Off,
            deflate_min: 256,
            log: LogLevel::Info,
            max_connections: 100_000,
            max_frame: 64 * 1024,
            max_message: 64 * 1024,
            max_header: 8 * 1024,
            max_body: 1024 * 1024,
            max_batch: 1000,
            max_backlog: 1024 * 1024,
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(75),
            request_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(60),
            close_timeout: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(10),
            api_key: None,
            secret: None,
            origins: Vec::new(),
            max_per_ip: 1000,
            trusted_proxies: vec![LOOPBACK_V4, LOOPBACK_V6],
        }
    }
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
    let secs = |v: Duration| format!("{}s", v.as_secs());
    let mut o = Options::new();
    // Go's flag package takes `-name=value`; getopts does too in long-only mode.
    o.long_only(true);
    o.optopt(
        "",
        "port",
        &format!("TCP port (default {})", d.port),
        "PORT",
    );
    o.optopt(
        "",
        "bind",
        &format!("address to listen on (default {})", d.bind),
        "ADDR",
    );
    o.optopt(
        "",
        "queue",
        "queue backend: list | redis/HOST:PORT | redis://[:PASS@]HOST:PORT[/DB] | disque/HOST:PORT (default list)",
        "SPEC",
    );
    o.optopt(
        "",
        "queue-size",
        &format!(
            "messages the list queue holds; batches waiting to be published to Redis/Disque (default {})",
            d.queue_size
        ),
        "N",
    );
    o.optopt(
        "",
        "queue-name",
        &format!(
            "Redis channel / Disque queue shared by the nodes (default {})",
            d.queue_name
        ),
        "NAME",
    );
    o.optopt(
        "",
        "queue-timeout",
        &format!(
            "bound on a Redis/Disque connect, publish or health check; /send answers 503 after it (default {})",
            secs(d.queue_timeout)
        ),
        "DUR",
    );
    o.optopt(
        "",
        "queue-backoff",
        &format!(
            "longest wait between reconnect attempts to Redis/Disque (default {})",
            secs(d.queue_backoff)
        ),
        "DUR",
    );
    o.optopt(
        "",
        "queue-ttl",
        &format!(
            "Disque job TTL for messages without timeout (default {})",
            secs(d.queue_ttl)
        ),
        "DUR",
    );
    o.optopt(
        "",
        "queue-retry",
        &format!(
            "Disque redelivers a job not acknowledged within (default {})",
            secs(d.queue_retry)
        ),
        "DUR",
    );
    o.optopt(
        "",
        "queue-prefetch",
        &format!(
            "Disque jobs taken per GETJOB (default {})",
            d.queue_prefetch
        ),
        "N",
    );
    o.optflag(
        "",
        "echo",
        "echo client text/binary messages (WebSocket conformance testing)",
    );
    o.optopt(
        "",
        "deflate",
        "permessage-deflate for clients that offer it: off | on (default off)",
        "off|on",
    );
    o.optopt(
        "",
        "deflate-min",
        &format!(
            "pushes shorter than this many bytes are sent uncompressed (default {})",
            d.deflate_min
        ),
        "N",
    );
    o.optopt(
        "",
        "log",
        "log level: debug | info | warn (default info)",
        "LEVEL",
    );
    o.optopt(
        "",
        "max-connections",
        &format!("open connections (default {})", d.max_connections),
        "N",
    );
    o.optopt(
        "",
        "max-frame",
        &format!("bytes in one client frame (default {})", d.max_frame),
        "BYTES",
    );
    o.optopt(
        "",
        "max-message",
        &format!("bytes in one client message (default {})", d.max_message),
        "BYTES",
    );
    o.optopt(
        "",
        "max-header",
        &format!("bytes of HTTP request headers (default {})", d.max_header),
        "BYTES",
    );
    o.optopt(
        "",
        "max-body",
        &format!("bytes of a /send body (default {})", d.max_body),
        "BYTES",
    );
    o.optopt(
        "",
        "max-batch",
        &format!("messages in one /send batch (default {})", d.max_batch),
        "N",
    );
    o.optopt(
        "",
        "max-backlog",
        &format!(
            "unsent bytes per connection before it is dropped as slow (default {})",
            d.max_backlog
        ),
        "BYTES",
    );
    o.optopt(
        "",
        "ping-interval",
        &format!(
            "ping a silent connection after (default {})",
            secs(d.ping_interval)
        ),
        "DUR",
    );
    o.optopt(
        "",
        "idle-timeout",
        &format!(
            "drop a silent connection after (default {})",
            secs(d.idle_timeout)
        ),
        "DUR",
    );
    o.optopt(
        "",
        "request-timeout",
        &format!(
            "time to receive a whole HTTP request (default {})",
            secs(d.request_timeout)
        ),
        "DUR",
    );
    o.optopt(
        "",
        "keepalive-timeout",
        &format!(
            "idle HTTP keep-alive connection lifetime (default {})",
            secs(d.keepalive_timeout)
        ),
        "DUR",
    );
    o.optopt(
        "",
        "close-timeout",
        &format!(
            "wait for the peer's close frame and final writes (default {})",
            secs(d.close_timeout)
        ),
        "DUR",
    );
    o.optopt(
        "",
        "shutdown-timeout",
        &format!(
            "longest graceful shutdown on SIGINT/SIGTERM (default {})",
            secs(d.shutdown_timeout)
        ),
        "DUR",
    );
    o.optopt(
        "",
        "api-key",
        "key that /send, /stats and /metrics require as `Authorization: Bearer KEY` (or env WSPUSH_API_KEY)",
        "KEY",
    );
    o.optopt(
        "",
        "secret",
        "require /ws tokens: hex HMAC-SHA256(SECRET, \"uid:expires\") (or env WSPUSH_SECRET)",
        "SECRET",
    );
    o.optopt(
        "",
        "origins",
        "comma list of Origins allowed on /ws (default any)",
        "LIST",
    );
    o.optopt(
        "",
        "max-per-ip",
        &format!(
            "connections per client address, 0 = no limit (default {})",
            d.max_per_ip
        ),
        "N",
    );
    o.optopt(
        "",
        "trusted-proxies",
        "comma list of proxy addresses/CIDRs whose X-Forwarded-For / X-Real-IP are believed (default 127.0.0.0/8,::1; empty = none)",
        "LIST",
    );
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
    let num = |name: &'static str, v: &mut usize| -> Result<(), ConfigError> {
        if let Some(s) = m.opt_str(name) {
            *v = s
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .ok_or(ConfigError::Invalid(name, s))?;
        }
        Ok(())
    };
    num("queue-size", &mut c.queue_size)?;
    num("queue-prefetch", &mut c.queue_prefetch)?;
    num("max-connections", &mut c.max_connections)?;
    num("max-frame", &mut c.max_frame)?;
    num("max-message", &mut c.max_message)?;
    num("max-header", &mut c.max_header)?;
    num("max-body", &mut c.max_body)?;
    num("max-batch", &mut c.max_batch)?;
    num("max-backlog", &mut c.max_backlog)?;
    num("deflate-min", &mut c.deflate_min)?;
    let dur = |name: &'static str, v: &mut Duration| -> Result<(), ConfigError> {
        if let Some(s) = m.opt_str(name) {
            *v = parse_duration(&s)
                .filter(|d| !d.is_zero())
                .ok_or(ConfigError::Invalid(name, s))?;
        }
        Ok(())
    };
    dur("ping-interval", &mut c.ping_interval)?;
    dur("idle-timeout", &mut c.idle_timeout)?;
    dur("request-timeout", &mut c.request_timeout)?;
    dur("keepalive-timeout", &mut c.keepalive_timeout)?;
    dur("close-timeout", &mut c.close_timeout)?;
    dur("shutdown-timeout", &mut c.shutdown_timeout)?;
    dur("queue-timeout", &mut c.queue_timeout)?;
    dur("queue-backoff", &mut c.queue_backoff)?;
    dur("queue-ttl", &mut c.queue_ttl)?;
    dur("queue-retry", &mut c.queue_retry)?;
    if let Some(s) = m.opt_str("queue-name") {
        if s.is_empty() {
            return Err(ConfigError::Invalid("queue-name", s));
        }
        c.queue_name = s;
    }
    if let Some(s) = m.opt_str("port") {
        c.port = s.parse().map_err(|_| ConfigError::Invalid("port", s))?;
    }
    if let Some(s) = m.opt_str("bind") {
        c.bind = s;
    }
    if let Some(s) = m.opt_str("queue") {
        c.queue = QueueSpec::parse(&s)?;
    }
    if let Some(s) = m.opt_str("log") {
        c.log = match s.as_str() {
            "debug" => LogLevel::Debug,
            "info" => LogLevel::Info,
            "warn" => LogLevel::Warn,
            _ => return Err(ConfigError::Invalid("log", s)),
        };
    }
    c.echo = m.opt_present("echo");
    if let Some(s) = m.opt_str("deflate") {
        c.deflate = match s.as_str() {
            "off" => Deflate::Off,
            "on" => Deflate::On,
            _ => return Err(ConfigError::Invalid("deflate", s)),
        };
    }
    let secret = |flag: &'static str, var: &str| -> Result<Option<String>, ConfigError> {
        match m.opt_str(flag).or_else(|| env(var)) {
            Some(s) if s.is_empty() => Err(ConfigError::Invalid(flag, "(empty)".into())),
            other => Ok(other),
        }
    };
    c.api_key = secret("api-key", "WSPUSH_API_KEY")?;
    c.secret = secret("secret", "WSPUSH_SECRET")?;
    if let Some(s) = m.opt_str("origins") {
        c.origins = list(&s).map(str::to_string).collect();
    }
    if let Some(s) = m.opt_str("max-per-ip") {
        c.max_per_ip = s
            .parse()
            .map_err(|_| ConfigError::Invalid("max-per-ip", s))?;
    }
    if let Some(s) = m.opt_str("trusted-proxies") {
        c.trusted_proxies = list(&s)
            .map(|p| {
                IpNet::parse(p).ok_or_else(|| ConfigError::Invalid("trusted-proxies", p.into()))
            })
            .collect::<Result<_, _>>()?;
    }

    if c.idle_timeout <= c.ping_interval {
        return Err(ConfigError::Conflict(
            "-idle-timeout must be longer than -ping-interval".into(),
        ));
    }
    // The reactor gives up on a pending /send after -request-timeout; a publish
    // still under way then could succeed after its 503 was sent. The list queue
    // answers at once and has no such timeout.
    if c.queue != QueueSpec::List && c.queue_timeout >= c.request_timeout {
        return Err(ConfigError::Conflict(
            "-queue-timeout must be shorter than -request-timeout".into(),
        ));
    }
    // Disque counts TTL and RETRY in whole seconds and refuses a TTL of 0.
    if c.queue_ttl < Duration::from_secs(1) || c.queue_retry < Duration::from_secs(1) {
        return Err(ConfigError::Conflict(
            "-queue-ttl and -queue-retry must be at least 1s".into(),
        ));
    }
    if c.max_message < c.max_frame {
        return Err(ConfigError::Conflict(
            "-max-message must be at least -max-frame".into(),
        ));
    }
    Ok(Command::Run(Box::new(c)))
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
    }

    #[test]
    fn help_lists_every_flag() {
        let Ok(Command::Help(h)) = parse(&["-h"]) else {
            panic!("no help")
        };
        for flag in [
            "-port",
            "-queue",
            "-queue-name",
            "-queue-timeout",
            "-queue-ttl",
            "-max-backlog",
            "-idle-timeout",
            "-echo",
            "-deflate",
            "-deflate-min",
        ] {
            assert!(h.contains(flag), "{flag} missing from help");
        }
    }
}
