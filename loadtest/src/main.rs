//! `loadgen`: the load generator of wspush's benchmark kit.
//!
//! It speaks WebSocket through `tokio-tungstenite` (not wspush's codec) and HTTP/1.1
//! through a minimal keep-alive client, and drives wspush, the nchan peer
//! (`loadtest/peers/nchan.conf`) or the uWebSockets.js peer (`loadtest/peers/uws.js`),
//! which serve the same URLs:
//!
//! - `GET /ws?uid=U` subscribes to uid U and to broadcasts;
//! - `POST /send` publishes: wspush and the uWebSockets.js peer take wspush's JSON
//!   schema, nchan `?id=all` or `?id=U` with the frame text as the body, so all three
//!   deliver the same bytes.
//!
//! Each phase reports the client's and the server's CPU time over the phase, and
//! from them CPU-µs per delivery and per `/send`: on a box where both share the
//! cores, a rate alone says as much about the client as about the server.
//!
//! Every message carries its phase, a sequence number, its send time in
//! microseconds since the kit started and, for unicast, its uid. Each receiver
//! records (connection, sequence) once: a second sighting is a duplicate, a missing
//! one a loss, a uid that is not the receiver's a misrouted delivery.
//!
//! `loadgen push` runs fan-out at full speed, paced fan-out and unicast over one set
//! of N connections; `loadgen memory` measures the server's RSS before and after N
//! idle connections. Both print one JSON object on stdout; progress goes to stderr.

mod http;
mod recv;
mod stats;
mod sys;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::task::JoinSet;

use http::HttpConn;
use recv::Connected;

const RELAXED: Ordering = Ordering::Relaxed;

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Microseconds since the kit started: the clock of every send and receive time.
fn now_us() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64
}

fn at_us(us: u64) -> tokio::time::Instant {
    tokio::time::Instant::from_std(*EPOCH.get_or_init(Instant::now) + Duration::from_micros(us))
}

const USAGE: &str = "\
usage: loadgen push|memory [flags]

  --target wspush|nchan|uws  the server's publish API (default wspush)
  --addr HOST:PORT        the server (default 127.0.0.1:3210)
  --n N                   push connections (default 10000)
  --broadcasts B          broadcasts at full speed (default 200; 0 skips)
  --paced-rate R          deliveries/s of the paced fan-out (default 100000; 0 skips)
  --paced-broadcasts B    broadcasts of the paced fan-out (default 100)
  --publishers P          publisher connections of the paced fan-out (default 4)
  --full-publishers P     publisher connections of the full-speed fan-out (default 16)
  --repeat R              full-speed fan-out runs; the median is reported (default 3)
  --unicast U             unicast sends to random uids (default 20000; 0 skips)
  --concurrency C         unicast publisher connections (default 64)
  --sources K             spread connections over source addresses 127.0.0.1..K (default 4; 0 = any)
  --connect-concurrency M handshakes in flight (default 256)
  --pids PID,PID          server processes to read CPU and RSS from (/proc)
  --threads T             receiver threads (default 1)
  --quiet SECS            give up waiting after this long without a delivery (default 5)
  --read-buffer BYTES     bytes tungstenite reads at a time per connection (default 4096)
  --no-paced-sleeping     skip the paced fan-out's second run with sleeping receivers
";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    Wspush,
    Nchan,
    /// The uWebSockets.js peer: wspush's API, and `/stats` with "connections".
    Uws,
}

impl Target {
    /// Whether `/stats` reports "connections", so the kit can wait for every handshake.
    fn counts_connections(self) -> bool {
        matches!(self, Target::Wspush | Target::Uws)
    }
}

#[derive(Clone, Debug)]
struct Opts {
    target: Target,
    addr: SocketAddr,
    n: usize,
    broadcasts: usize,
    paced_rate: f64,
    paced_broadcasts: usize,
    publishers: usize,
    full_publishers: usize,
    repeat: usize,
    unicast: usize,
    concurrency: usize,
    sources: usize,
    connect_concurrency: usize,
    pids: Vec<u32>,
    threads: usize,
    quiet: Duration,
    read_buffer: usize,
    paced_sleeping: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            target: Target::Wspush,
            addr: "127.0.0.1:3210".parse().expect("literal"),
            n: 10_000,
            broadcasts: 200,
            paced_rate: 100_000.0,
            paced_broadcasts: 100,
            publishers: 4,
            full_publishers: 16,
            repeat: 3,
            unicast: 20_000,
            concurrency: 64,
            sources: 4,
            connect_concurrency: 256,
            pids: Vec::new(),
            threads: 1,
            quiet: Duration::from_secs(5),
            read_buffer: 4096,
            paced_sleeping: true,
        }
    }
}

fn parse_args(args: &[String]) -> Result<(String, Opts), String> {
    let mut it = args.iter();
    let cmd = it.next().ok_or("missing command")?.clone();
    if cmd != "push" && cmd != "memory" {
        return Err(format!("unknown command {cmd}"));
    }
    let mut o = Opts::default();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (arg.as_str(), None),
        };
        let mut value = || -> Result<String, String> {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or(format!("{name} needs a value"))
        };
        let num = |v: String| {
            v.parse::<usize>()
                .map_err(|_| format!("{name}: not a number"))
        };
        match name {
            "--target" => {
                o.target = match value()?.as_str() {
                    "wspush" => Target::Wspush,
                    "nchan" => Target::Nchan,
                    "uws" => Target::Uws,
                    t => return Err(format!("unknown target {t}")),
                }
            }
            "--addr" => o.addr = value()?.parse().map_err(|_| "--addr: want HOST:PORT")?,
            "--n" => o.n = num(value()?)?,
            "--broadcasts" => o.broadcasts = num(value()?)?,
            "--paced-rate" => o.paced_rate = num(value()?)? as f64,
            "--paced-broadcasts" => o.paced_broadcasts = num(value()?)?,
            "--publishers" => o.publishers = num(value()?)?.max(1),
            "--full-publishers" => o.full_publishers = num(value()?)?.max(1),
            "--repeat" => o.repeat = num(value()?)?.max(1),
            "--unicast" => o.unicast = num(value()?)?,
            "--concurrency" => o.concurrency = num(value()?)?.max(1),
            "--sources" => o.sources = num(value()?)?.min(254),
            "--connect-concurrency" => o.connect_concurrency = num(value()?)?.max(1),
            "--threads" => o.threads = num(value()?)?.max(1),
            "--read-buffer" => o.read_buffer = num(value()?)?.max(64),
            "--quiet" => o.quiet = Duration::from_secs(num(value()?)? as u64),
            "--pids" => {
                o.pids = value()?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| s.parse().map_err(|_| "--pids: want PID,PID".to_string()))
                    .collect::<Result<_, _>>()?
            }
            "--no-paced-sleeping" => o.paced_sleeping = false,
            "-h" | "--help" => return Err(String::new()),
            _ => return Err(format!("unknown flag {name}")),
        }
    }
    Ok((cmd, o))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, opts) = match parse_args(&args) {
        Ok(x) => x,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("loadgen: {e}");
            }
            eprint!("{USAGE}");
            std::process::exit(2);
        }
    };
    now_us();
    let nofile = sys::raise_nofile();
    if (nofile as usize) < opts.n + 64 {
        eprintln!(
            "loadgen: descriptor limit {nofile} is too low for --n {}",
            opts.n
        );
        std::process::exit(1);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(async {
        match cmd.as_str() {
            "push" => push(opts).await,
            _ => memory(opts).await,
        }
    });
    match result {
        Ok(v) => println!("{}", serde_json::to_string_pretty(&v).expect("json")),
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(1);
        }
    }
    // The receiver threads run until the process ends.
    std::process::exit(0);
}

// ---- what receivers record --------------------------------------------------------

enum Kind {
    /// Every connection should get each of `b` broadcasts once.
    Broadcast { b: usize },
    /// Each send goes to one uid; the slot is the sequence number.
    Unicast,
}

/// One phase's ledger: a delivery count and a latency per expected delivery.
struct Phase {
    id: u64,
    kind: Kind,
    counts: Vec<AtomicU8>,
    lat_us: Vec<AtomicU32>,
    delivered: AtomicU64,
    duplicated: AtomicU64,
    misrouted: AtomicU64,
    last_us: AtomicU64,
}

impl Phase {
    fn new(id: u64, kind: Kind, slots: usize) -> Self {
        Phase {
            id,
            kind,
            counts: (0..slots).map(|_| AtomicU8::new(0)).collect(),
            lat_us: (0..slots).map(|_| AtomicU32::new(0)).collect(),
            delivered: AtomicU64::new(0),
            duplicated: AtomicU64::new(0),
            misrouted: AtomicU64::new(0),
            last_us: AtomicU64::new(0),
        }
    }
}

#[derive(Default)]
struct Shared {
    phase: RwLock<Option<Arc<Phase>>>,
    /// Messages that belong to no running phase (e.g. a late one from an earlier phase).
    stray: AtomicU64,
    ws_errors: AtomicU64,
    closed: AtomicU64,
    /// Receivers busy-poll instead of sleeping in epoll_wait.
    spin: AtomicBool,
}

/// The numbers a message carries in its `msg` object.
#[derive(Debug, PartialEq)]
struct Fields {
    p: u64,
    s: u64,
    t: u64,
    u: Option<u64>,
}

fn number_after(b: &[u8], key: &[u8]) -> Option<u64> {
    let at = http::find(b, key)? + key.len();
    let digits = b[at..].iter().take_while(|c| c.is_ascii_digit()).count();
    std::str::from_utf8(&b[at..at + digits]).ok()?.parse().ok()
}

fn parse_fields(frame: &[u8]) -> Option<Fields> {
    let msg = &frame[http::find(frame, b"\"msg\":{")? + 6..];
    Some(Fields {
        p: number_after(msg, b"\"p\":")?,
        s: number_after(msg, b"\"s\":")?,
        t: number_after(msg, b"\"t\":")?,
        u: number_after(msg, b"\"u\":"),
    })
}

fn record(shared: &Shared, cur: &mut Option<Arc<Phase>>, slot: usize, data: &[u8]) {
    let now = now_us();
    let Some(f) = parse_fields(data) else {
        shared.stray.fetch_add(1, RELAXED);
        return;
    };
    if cur.as_ref().map(|p| p.id) != Some(f.p) {
        *cur = shared
            .phase
            .read()
            .expect("phase lock")
            .clone()
            .filter(|p| p.id == f.p);
    }
    let Some(ph) = cur.as_ref() else {
        shared.stray.fetch_add(1, RELAXED);
        return;
    };
    let idx = match ph.kind {
        Kind::Broadcast { b } => {
            if f.s as usize >= b {
                shared.stray.fetch_add(1, RELAXED);
                return;
            }
            slot * b + f.s as usize
        }
        Kind::Unicast => {
            if f.u != Some(slot as u64) {
                ph.misrouted.fetch_add(1, RELAXED);
                return;
            }
            f.s as usize
        }
    };
    let Some(count) = ph.counts.get(idx) else {
        shared.stray.fetch_add(1, RELAXED);
        return;
    };
    if count.fetch_add(1, RELAXED) == 0 {
        let lat = now.saturating_sub(f.t).min(u32::MAX as u64) as u32;
        ph.lat_us[idx].store(lat, RELAXED);
        ph.delivered.fetch_add(1, RELAXED);
        ph.last_us.fetch_max(now, RELAXED);
    } else {
        ph.duplicated.fetch_add(1, RELAXED);
    }
}

// ---- publishing ------------------------------------------------------------------

const TIME: &str = "2019-12-12 12:12:12";

/// The request that publishes message (p, s, t[, u]): (path, body).
fn publish_request(
    target: Target,
    p: u64,
    s: u64,
    t: u64,
    uid: Option<usize>,
) -> (String, Vec<u8>) {
    let msg = match uid {
        None => format!(r#"{{"p":{p},"s":{s},"t":{t}}}"#),
        Some(u) => format!(r#"{{"p":{p},"s":{s},"t":{t},"u":{u}}}"#),
    };
    match (target, uid) {
        (Target::Wspush | Target::Uws, None) => (
            "/send".into(),
            format!(r#"{{"topic":"all","types":"notice","msg":{msg}}}"#).into_bytes(),
        ),
        (Target::Wspush | Target::Uws, Some(u)) => (
            "/send".into(),
            format!(r#"{{"topic":"uids","topic_ids":["{u}"],"types":"notice","msg":{msg}}}"#)
                .into_bytes(),
        ),
        // nchan delivers the body as it is: send it the frame wspush would build.
        (Target::Nchan, _) => (
            match uid {
                None => "/send?id=all".into(),
                Some(u) => format!("/send?id={u}"),
            },
            format!(r#"{{"types":"notice","msg":{msg},"time":"{TIME}"}}"#).into_bytes(),
        ),
    }
}

struct Publisher {
    addr: SocketAddr,
    conn: Option<HttpConn>,
    errors: u64,
    first_error: Option<String>,
}

impl Publisher {
    fn new(addr: SocketAddr) -> Self {
        Publisher {
            addr,
            conn: None,
            errors: 0,
            first_error: None,
        }
    }

    /// POSTs once; true on a 2xx. A broken connection is reopened on the next call.
    async fn post(&mut self, path: &str, body: &[u8]) -> bool {
        let res = async {
            if self.conn.is_none() {
                self.conn = Some(
                    HttpConn::connect(self.addr)
                        .await
                        .map_err(|e| e.to_string())?,
                );
            }
            let conn = self.conn.as_mut().expect("connected");
            let (status, reply) = conn
                .request("POST", path, body)
                .await
                .map_err(|e| e.to_string())?;
            if (200..300).contains(&status) {
                Ok(())
            } else {
                Err(format!("{status} {}", String::from_utf8_lossy(&reply)))
            }
        }
        .await;
        match res {
            Ok(()) => true,
            Err(e) => {
                self.conn = None;
                self.errors += 1;
                self.first_error.get_or_insert(e);
                false
            }
        }
    }
}

/// Runs the publishers on a thread of their own, so a publish never waits behind
/// the receivers' work on the client runtime.
async fn on_publisher_thread<F, T>(work: F) -> T
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("publisher".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("publisher runtime");
            let _ = tx.send(rt.block_on(work));
        })
        .expect("publisher thread");
    rx.await.expect("publisher thread ended")
}

type PublisherResult = (u64, Option<String>);

async fn join_publishers(mut set: JoinSet<PublisherResult>) -> PublisherResult {
    let mut errors = 0;
    let mut first = None;
    while let Some(r) = set.join_next().await {
        let (e, fe) = r.expect("publisher");
        errors += e;
        if first.is_none() {
            first = fe;
        }
    }
    (errors, first)
}

// ---- phases ----------------------------------------------------------------------

struct Meter {
    wall: Instant,
    client: f64,
    server: Option<f64>,
}

impl Meter {
    fn start(pids: &[u32]) -> Self {
        Meter {
            wall: Instant::now(),
            client: sys::self_cpu(),
            server: sys::procs_cpu(pids),
        }
    }

    /// CPU use since `start`: in percent of one core, in seconds, and in µs per
    /// delivery and per publish (`/send`) of the phase.
    fn stop(&self, pids: &[u32], deliveries: u64, sends: u64) -> Value {
        let wall = self.wall.elapsed().as_secs_f64();
        let client = sys::self_cpu() - self.client;
        let server = match (self.server, sys::procs_cpu(pids)) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        cpu_json(wall, client, server, deliveries, sends)
    }
}

/// The CPU figures of one run. The server's comes from /proc in clock ticks (10 ms
/// here), so a run should last a second or more for its µs figures to mean much.
fn cpu_json(wall: f64, client: f64, server: Option<f64>, deliveries: u64, sends: u64) -> Value {
    let pct = |cpu: f64| (cpu / wall * 1000.0).round() / 10.0;
    let per = |cpu: f64, n: u64| {
        if n == 0 {
            Value::Null
        } else {
            json!((cpu * 1e6 / n as f64 * 100.0).round() / 100.0)
        }
    };
    json!({
        "wall_s": round3(wall),
        "client_cpu_pct": pct(client),
        "server_cpu_pct": server.map(pct),
        "client_cpu_s": round3(client),
        "server_cpu_s": server.map(round3),
        "client_us_per_delivery": per(client, deliveries),
        "server_us_per_delivery": server.map_or(Value::Null, |s| per(s, deliveries)),
        "client_us_per_send": per(client, sends),
        "server_us_per_send": server.map_or(Value::Null, |s| per(s, sends)),
    })
}

/// Waits until `expected` deliveries arrived or none arrived for `quiet`.
async fn wait_for(ph: &Phase, expected: u64, quiet: Duration) {
    let mut last = ph.delivered.load(RELAXED);
    let mut since = Instant::now();
    loop {
        let now = ph.delivered.load(RELAXED);
        if now >= expected {
            return;
        }
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn begin(shared: &Shared, ph: &Arc<Phase>) {
    *shared.phase.write().expect("phase lock") = Some(ph.clone());
}

/// Latencies of every delivery in the given slots and the number of misses.
fn tally(ph: &Phase, slots: impl Iterator<Item = usize>) -> (Vec<u32>, u64) {
    let mut lat = Vec::new();
    let mut lost = 0;
    for i in slots {
        if ph.counts[i].load(RELAXED) == 0 {
            lost += 1;
        } else {
            lat.push(ph.lat_us[i].load(RELAXED));
        }
    }
    (lat, lost)
}

/// B broadcasts to every connection: at full speed (P publishers, back to back) or
/// paced (one every N/rate seconds, spread over several publisher connections; the
/// send time is the scheduled one, so a publisher held up by the server still
/// counts the wait as latency).
async fn broadcast_phase(
    opts: &Opts,
    shared: &Arc<Shared>,
    conns: &Connected,
    id: u64,
    b: usize,
    rate: Option<f64>,
    publishers: usize,
) -> Value {
    let ph = Arc::new(Phase::new(id, Kind::Broadcast { b }, opts.n * b));
    begin(shared, &ph);
    let published: Arc<Vec<AtomicBool>> =
        Arc::new((0..b).map(|_| AtomicBool::new(false)).collect());
    let n = conns.slots.len();
    let interval_us = rate.map(|r| (n as f64 / r * 1e6) as u64);
    let meter = Meter::start(&opts.pids);
    let first_us = now_us() + 10_000;
    let (target, addr) = (opts.target, opts.addr);
    let pub_published = published.clone();
    let (publish_errors, first_error) = on_publisher_thread(async move {
        let mut set = JoinSet::new();
        for k in 0..publishers {
            let published = pub_published.clone();
            set.spawn(async move {
                let mut publ = Publisher::new(addr);
                tokio::time::sleep_until(at_us(first_us)).await;
                for s in (k..b).step_by(publishers) {
                    let t = match interval_us {
                        Some(iv) => {
                            let due = first_us + s as u64 * iv;
                            tokio::time::sleep_until(at_us(due)).await;
                            due
                        }
                        None => now_us(),
                    };
                    let (path, body) = publish_request(target, id, s as u64, t, None);
                    if publ.post(&path, &body).await {
                        published[s].store(true, RELAXED);
                    }
                }
                (publ.errors, publ.first_error)
            });
        }
        join_publishers(set).await
    })
    .await;
    let publish_s = (now_us() - first_us) as f64 / 1e6;
    let ok: Vec<usize> = (0..b).filter(|&s| published[s].load(RELAXED)).collect();
    let expected = (n * ok.len()) as u64;
    wait_for(&ph, expected, opts.quiet).await;
    let cpu = meter.stop(&opts.pids, ph.delivered.load(RELAXED), ok.len() as u64);
    let (lat, lost) = tally(
        &ph,
        conns
            .slots
            .iter()
            .flat_map(|&slot| ok.iter().map(move |&s| slot * b + s)),
    );
    let delivered = ph.delivered.load(RELAXED);
    let span_s = ph.last_us.load(RELAXED).saturating_sub(first_us) as f64 / 1e6;
    json!({
        "connections": n,
        "broadcasts": b,
        "paced_deliveries_per_s": rate,
        "publishers": publishers,
        "publish_errors": publish_errors,
        "first_publish_error": first_error,
        "expected": expected,
        "delivered": delivered,
        "lost": lost,
        "duplicated": ph.duplicated.load(RELAXED),
        "publish_s": round3(publish_s),
        "span_s": round3(span_s),
        "deliveries_per_s": if span_s > 0.0 { (delivered as f64 / span_s).round() } else { 0.0 },
        "latency_ms": stats::summarize(lat),
        "cpu": cpu,
    })
}

/// U sends, each to one random connected uid, from C publisher connections. Each
/// send's `/send` reply time is kept beside its delivery time, which splits the
/// latency into the HTTP round trip and what the push takes after the reply.
async fn unicast_phase(opts: &Opts, shared: &Arc<Shared>, conns: &Connected, id: u64) -> Value {
    let u = opts.unicast;
    let ph = Arc::new(Phase::new(id, Kind::Unicast, u));
    begin(shared, &ph);
    let published: Arc<Vec<AtomicBool>> =
        Arc::new((0..u).map(|_| AtomicBool::new(false)).collect());
    let reply_us: Arc<Vec<AtomicU32>> = Arc::new((0..u).map(|_| AtomicU32::new(0)).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let slots = Arc::new(conns.slots.clone());
    let meter = Meter::start(&opts.pids);
    let first_us = now_us();
    let (target, addr, concurrency) = (opts.target, opts.addr, opts.concurrency);
    let (pub_published, pub_reply) = (published.clone(), reply_us.clone());
    let (publish_errors, first_error) = on_publisher_thread(async move {
        let mut set = JoinSet::new();
        for k in 0..concurrency {
            let (published, next, slots) = (pub_published.clone(), next.clone(), slots.clone());
            let reply_us = pub_reply.clone();
            set.spawn(async move {
                let mut publ = Publisher::new(addr);
                let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ ((k as u64 + 1) << 17);
                loop {
                    let s = next.fetch_add(1, RELAXED);
                    if s >= u {
                        break;
                    }
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let uid = slots[(rng % slots.len() as u64) as usize];
                    let t = now_us();
                    let (path, body) = publish_request(target, id, s as u64, t, Some(uid));
                    if publ.post(&path, &body).await {
                        let rtt = now_us().saturating_sub(t).min(u32::MAX as u64) as u32;
                        reply_us[s].store(rtt, RELAXED);
                        published[s].store(true, RELAXED);
                    }
                }
                (publ.errors, publ.first_error)
            });
        }
        join_publishers(set).await
    })
    .await;
    let publish_s = (now_us() - first_us) as f64 / 1e6;
    let ok: Vec<usize> = (0..u).filter(|&s| published[s].load(RELAXED)).collect();
    wait_for(&ph, ok.len() as u64, opts.quiet).await;
    let cpu = meter.stop(&opts.pids, ph.delivered.load(RELAXED), ok.len() as u64);
    let (lat, lost) = tally(&ph, ok.iter().copied());
    let replies: Vec<u32> = ok.iter().map(|&s| reply_us[s].load(RELAXED)).collect();
    // Delivery time minus reply time, for the sends that were delivered: a server
    // that pushes before it answers shows a count here, not a negative latency.
    let mut before_reply = 0u64;
    let after_reply: Vec<u32> = ok
        .iter()
        .filter(|&&s| ph.counts[s].load(RELAXED) > 0)
        .map(|&s| {
            let d = ph.lat_us[s].load(RELAXED) as i64 - reply_us[s].load(RELAXED) as i64;
            if d < 0 {
                before_reply += 1;
            }
            d.max(0) as u32
        })
        .collect();
    let delivered = ph.delivered.load(RELAXED);
    let span_s = ph.last_us.load(RELAXED).saturating_sub(first_us) as f64 / 1e6;
    json!({
        "connections": conns.slots.len(),
        "sends": u,
        "concurrency": opts.concurrency,
        "publish_errors": publish_errors,
        "first_publish_error": first_error,
        "delivered": delivered,
        "lost": lost,
        "duplicated": ph.duplicated.load(RELAXED),
        "misrouted": ph.misrouted.load(RELAXED),
        "publish_s": round3(publish_s),
        "span_s": round3(span_s),
        "sends_per_s": if span_s > 0.0 { (delivered as f64 / span_s).round() } else { 0.0 },
        "latency_ms": stats::summarize(lat),
        "reply_latency_ms": stats::summarize(replies),
        "after_reply_ms": stats::summarize(after_reply),
        "delivered_before_reply": before_reply,
        "cpu": cpu,
    })
}

/// The run with the median deliveries/s, with every run's rate and the losses and
/// duplicates of all runs together.
fn median_run(runs: Vec<Value>) -> Value {
    let rate = |v: &Value| v["deliveries_per_s"].as_f64().unwrap_or(0.0);
    let mut order: Vec<usize> = (0..runs.len()).collect();
    order.sort_by(|&a, &b| rate(&runs[a]).total_cmp(&rate(&runs[b])));
    let sum = |k: &str| runs.iter().map(|r| r[k].as_u64().unwrap_or(0)).sum::<u64>();
    let mut out = runs[order[runs.len() / 2]].clone();
    out["runs_deliveries_per_s"] = json!(runs.iter().map(rate).collect::<Vec<_>>());
    out["lost"] = json!(sum("lost"));
    out["duplicated"] = json!(sum("duplicated"));
    out["publish_errors"] = json!(sum("publish_errors"));
    out["expected_all_runs"] = json!(sum("expected"));
    out["delivered_all_runs"] = json!(sum("delivered"));
    out
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn header(opts: &Opts, conns: &Connected) -> Value {
    json!({
        "target": format!("{:?}", opts.target).to_lowercase(),
        "addr": opts.addr.to_string(),
        "cores": cores(),
        "client_threads": opts.threads,
        "sources": opts.sources,
        "n": opts.n,
        "connected": conns.slots.len(),
        "connect_failures": conns.failures,
        "first_connect_error": conns.first_error,
        "connect_s": round3(conns.seconds),
    })
}

/// Asks wspush how many push connections it holds (`/stats` "connections").
async fn server_connections(addr: SocketAddr) -> Option<u64> {
    let mut c = HttpConn::connect(addr).await.ok()?;
    let (status, body) = c.request("GET", "/stats", b"").await.ok()?;
    if status != 200 {
        return None;
    }
    let v: Value = serde_json::from_slice(&body).ok()?;
    v.get("connections")?.as_u64()
}

/// Waits until the server reports `n` push connections (nchan has no such count:
/// the completed handshakes are the signal there).
async fn settle(opts: &Opts, n: usize) {
    if opts.target.counts_connections() {
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            if server_connections(opts.addr).await == Some(n as u64) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
}

async fn push(opts: Opts) -> Result<Value, String> {
    let shared = Arc::new(Shared::default());
    eprintln!("loadgen: opening {} connections to {}", opts.n, opts.addr);
    let conns = recv::connect_all(&opts, &shared);
    if conns.slots.is_empty() {
        return Err(format!(
            "no connection succeeded: {}",
            conns.first_error.unwrap_or_default()
        ));
    }
    settle(&opts, conns.slots.len()).await;
    let mut out = header(&opts, &conns);
    if opts.broadcasts > 0 {
        eprintln!(
            "loadgen: fan-out, {} broadcasts at full speed from {} publishers, {} runs",
            opts.broadcasts, opts.full_publishers, opts.repeat
        );
        let mut runs = Vec::new();
        for r in 0..opts.repeat {
            let id = 10 + r as u64;
            let b = opts.broadcasts;
            runs.push(
                broadcast_phase(&opts, &shared, &conns, id, b, None, opts.full_publishers).await,
            );
        }
        out["fanout_full"] = median_run(runs);
    }
    if opts.paced_rate > 0.0 && opts.paced_broadcasts > 0 {
        eprintln!(
            "loadgen: fan-out, {} broadcasts paced at {} deliveries/s",
            opts.paced_broadcasts, opts.paced_rate
        );
        // Receivers busy-poll: a sleeping receiver's wake-up runs inside the server's
        // send() on loopback, and its wake-up latency would count as the server's.
        shared.spin.store(true, RELAXED);
        out["fanout_paced"] = broadcast_phase(
            &opts,
            &shared,
            &conns,
            2,
            opts.paced_broadcasts,
            Some(opts.paced_rate),
            opts.publishers,
        )
        .await;
        out["fanout_paced"]["receivers"] = json!("busy-polling");
        shared.spin.store(false, RELAXED);
        if opts.paced_sleeping {
            eprintln!("loadgen: the same with receivers sleeping in epoll_wait");
            out["fanout_paced_sleeping"] = broadcast_phase(
                &opts,
                &shared,
                &conns,
                4,
                opts.paced_broadcasts,
                Some(opts.paced_rate),
                opts.publishers,
            )
            .await;
            out["fanout_paced_sleeping"]["receivers"] = json!("sleeping in epoll_wait");
        }
    }
    if opts.unicast > 0 {
        eprintln!(
            "loadgen: unicast, {} sends at concurrency {}",
            opts.unicast, opts.concurrency
        );
        out["unicast"] = unicast_phase(&opts, &shared, &conns, 3).await;
    }
    out["stray"] = json!(shared.stray.load(RELAXED));
    out["ws_errors"] = json!(shared.ws_errors.load(RELAXED));
    out["closed_early"] = json!(shared.closed.load(RELAXED));
    Ok(out)
}

async fn memory(opts: Opts) -> Result<Value, String> {
    if opts.pids.is_empty() {
        return Err("memory needs --pids".into());
    }
    let rss = |pids: &[u32]| sys::procs_rss(pids).ok_or("cannot read the server's RSS");
    let before = rss(&opts.pids)?;
    eprintln!(
        "loadgen: server RSS {} KiB; opening {} idle connections",
        before / 1024,
        opts.n
    );
    let shared = Arc::new(Shared::default());
    let conns = recv::connect_all(&opts, &shared);
    settle(&opts, conns.slots.len()).await;
    let seen = if opts.target.counts_connections() {
        server_connections(opts.addr).await
    } else {
        None
    };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let after = rss(&opts.pids)?;
    let n = conns.slots.len().max(1);
    let mut out = header(&opts, &conns);
    out["memory"] = json!({
        "connections": conns.slots.len(),
        "server_reports": seen,
        "rss_before": before,
        "rss_after": after,
        "bytes_per_connection": (after.saturating_sub(before) as f64 / n as f64).round(),
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_from_both_servers_frames() {
        let w =
            br#"{"types":"notice","msg":{"p":1,"s":42,"t":123456},"time":"2019-12-12 12:12:12"}"#;
        assert_eq!(
            parse_fields(w),
            Some(Fields {
                p: 1,
                s: 42,
                t: 123456,
                u: None
            })
        );
        let (_, body) = publish_request(Target::Nchan, 3, 7, 99, Some(5));
        assert_eq!(
            parse_fields(&body),
            Some(Fields {
                p: 3,
                s: 7,
                t: 99,
                u: Some(5)
            })
        );
        assert_eq!(parse_fields(b"hello"), None);
    }

    #[test]
    fn records_once_and_counts_duplicates_and_misroutes() {
        let shared = Shared::default();
        let ph = Arc::new(Phase::new(1, Kind::Broadcast { b: 2 }, 4));
        begin(&shared, &ph);
        let mut cur = None;
        let (_, m) = publish_request(Target::Nchan, 1, 1, 0, None);
        record(&shared, &mut cur, 1, &m);
        record(&shared, &mut cur, 1, &m);
        assert_eq!(ph.delivered.load(RELAXED), 1);
        assert_eq!(ph.duplicated.load(RELAXED), 1);
        assert_eq!(ph.counts[3].load(RELAXED), 2);
        let (_, stale) = publish_request(Target::Nchan, 9, 0, 0, None);
        record(&shared, &mut cur, 0, &stale);
        assert_eq!(shared.stray.load(RELAXED), 1);

        let uni = Arc::new(Phase::new(2, Kind::Unicast, 3));
        begin(&shared, &uni);
        let (_, m) = publish_request(Target::Nchan, 2, 0, 0, Some(4));
        record(&shared, &mut cur, 3, &m);
        record(&shared, &mut cur, 4, &m);
        assert_eq!(uni.misrouted.load(RELAXED), 1);
        assert_eq!(uni.delivered.load(RELAXED), 1);
    }
}
