//! Test harness: runs the real `wspush` binary on a free loopback port and talks to
//! it over raw TCP and through an independent WebSocket client (tungstenite).
#![allow(dead_code)]

pub mod cluster;
pub mod flood;
pub mod raw_ws;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tungstenite::protocol::WebSocket;
use tungstenite::{Message, client::IntoClientRequest};

/// How long any single wait in a test may take before it counts as a failure.
pub const WAIT: Duration = Duration::from_secs(10);

pub type Ws = WebSocket<TcpStream>;

pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    _stdout: BufReader<ChildStdout>,
}

impl Server {
    /// Starts wspush with `-port=0 -bind=127.0.0.1` plus `args`, and waits for the
    /// line in which it reports its address.
    pub fn start(args: &[&str]) -> Server {
        Server::start_with(args, &[], None)
    }

    /// Like `start`, with extra environment variables, and stderr (the log) written
    /// to `log` when given. The log level is `warn` unless `args` has a `-log=`.
    pub fn start_with(args: &[&str], env: &[(&str, &str)], log: Option<&Path>) -> Server {
        let mut cmd = Command::new(binary());
        cmd.args(Server::default_args(args))
            .args(args)
            .envs(env.iter().copied());
        Server::spawn(cmd, log)
    }

    /// Like `start`, with the descriptor limit (soft and hard, so the server cannot
    /// raise it) lowered to `nofile` by the shell that then becomes the server.
    #[cfg(unix)]
    pub fn start_with_nofile(nofile: u32, args: &[&str]) -> Server {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("ulimit -n {nofile} && exec \"$0\" \"$@\""))
            .arg(binary())
            .args(Server::default_args(args))
            .args(args);
        Server::spawn(cmd, None)
    }

    /// A loopback address on a free port, and `warn` logging unless `args` set a level.
    fn default_args(args: &[&str]) -> Vec<&'static str> {
        let mut v = vec!["-port=0", "-bind=127.0.0.1"];
        if !args.iter().any(|a| a.starts_with("-log=")) {
            v.push("-log=warn");
        }
        v
    }

    fn spawn(mut cmd: Command, log: Option<&Path>) -> Server {
        let stderr = match log {
            Some(path) => Stdio::from(std::fs::File::create(path).expect("create log file")),
            None => Stdio::inherit(),
        };
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start wspush");

        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .expect("read the listening line");
        let addr = line
            .split_whitespace()
            .find_map(|w| w.parse::<SocketAddr>().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        Server {
            child,
            addr,
            _stdout: stdout,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A raw TCP connection with read/write timeouts.
    pub fn tcp(&self) -> TcpStream {
        tcp_to(self.addr)
    }

    /// Sends raw bytes on a fresh connection and reads one response.
    pub fn raw(&self, request: &[u8]) -> Response {
        raw_to(self.addr, request)
    }

    /// `POST /send` with a JSON body.
    pub fn send(&self, body: &str) -> Response {
        send_to(self.addr, body)
    }

    /// `POST /send` that must succeed.
    pub fn send_ok(&self, body: &str) {
        let r = self.send(body);
        assert_eq!(r.status, 200, "send failed: {}", r.text());
    }

    pub fn get(&self, path: &str) -> Response {
        get_from(self.addr, path)
    }

    pub fn stats(&self) -> Value {
        let r = self.get("/stats");
        assert_eq!(r.status, 200);
        r.json()
    }

    /// Opens a push connection with the given query (e.g. `uid=1&types=chat`).
    pub fn ws(&self, query: &str) -> Ws {
        ws_to(self.addr, query).expect("handshake")
    }

    /// Kills the process at once (SIGKILL): no graceful shutdown.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and returns at once: the shutdown is under way.
    pub fn request_shutdown(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        self.wait_exit()
    }

    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "wspush did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The binary under test: this build's, or `WSPUSH_TEST_BIN` (to run a test
/// against another build, e.g. to see it fail before a fix).
pub fn binary() -> std::ffi::OsString {
    std::env::var_os("WSPUSH_TEST_BIN")
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_wspush").into())
}

/// A raw TCP connection with read/write timeouts.
pub fn tcp_to(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_write_timeout(Some(WAIT)).unwrap();
    s
}

/// Sends raw bytes on a fresh connection and reads one response.
pub fn raw_to(addr: SocketAddr, request: &[u8]) -> Response {
    let mut s = tcp_to(addr);
    s.write_all(request).unwrap();
    read_response(&mut s)
}

/// `POST /send` with a JSON body to any HTTP server (a node, or nginx in front).
pub fn send_to(addr: SocketAddr, body: &str) -> Response {
    raw_to(addr, send_request(body).as_bytes())
}

/// The bytes of a `POST /send` with a JSON body, on a connection of its own.
pub fn send_request(body: &str) -> String {
    format!(
        "POST /send HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

pub fn get_from(addr: SocketAddr, path: &str) -> Response {
    raw_to(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

/// Opens a push connection; Err when the connection or the handshake fails.
pub fn ws_to(addr: SocketAddr, query: &str) -> Result<Ws, String> {
    let url = format!("ws://{addr}/ws?{query}");
    let stream = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.set_write_timeout(Some(WAIT)).unwrap();
    let (ws, resp) = tungstenite::client(url.into_client_request().unwrap(), stream)
        .map_err(|e| e.to_string())?;
    if resp.status() != 101 {
        return Err(format!("handshake answered {}", resp.status()));
    }
    Ok(ws)
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.text()))
    }
    /// The `error` text of a JSON error body.
    pub fn error(&self) -> String {
        let v = self.json();
        assert_eq!(v["ok"], false, "not an error body: {}", self.text());
        v["error"].as_str().expect("error text").to_string()
    }
}

/// Reads one HTTP response (head and Content-Length body) from the stream.
pub fn read_response(s: &mut impl Read) -> Response {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).expect("read response head");
        assert!(
            n == 1,
            "connection closed inside a response head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let text = String::from_utf8(head).unwrap();
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap();
    let status: u16 = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_string(), v.trim().to_string())
        })
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.parse().unwrap())
        .unwrap_or(0);
    let mut body = vec![0; len];
    s.read_exact(&mut body).expect("read response body");
    Response {
        status,
        headers,
        body,
    }
}

/// The next text frame exactly as it came over the wire. Pings and pongs are skipped.
pub fn recv_text(ws: &mut Ws) -> String {
    loop {
        match ws.read().expect("read push") {
            Message::Text(t) => return t.as_str().to_owned(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

/// The next text message, as JSON. Pings and pongs are skipped.
pub fn recv_json(ws: &mut Ws) -> Value {
    let t = recv_text(ws);
    serde_json::from_str(&t).unwrap_or_else(|e| panic!("{e}: {t}"))
}

/// The next text message within `within`, or None when none came (the connection
/// stays usable). Pings and pongs are skipped.
pub fn recv_json_within(ws: &mut Ws, within: Duration) -> Option<Value> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        ws.get_ref().set_read_timeout(Some(left)).unwrap();
        let got = ws.read();
        ws.get_ref().set_read_timeout(Some(WAIT)).unwrap();
        match got {
            Ok(Message::Text(t)) => {
                return Some(serde_json::from_str(&t).unwrap_or_else(|e| panic!("{e}: {t}")));
            }
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(other) => panic!("expected a text message, got {other:?}"),
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None;
            }
            Err(e) => panic!("read push: {e}"),
        }
    }
}

/// Polls `cond` every 20 ms until it holds; panics after `within`.
pub fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A loopback port that was free a moment ago.
/// Never the same port twice in one test process: a server restarted on its port
/// (Redis, Disque) must not find it taken by another test's new server meanwhile.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A program named by `env` or found on PATH (or in the sbin directories, where
/// Debian puts daemons). None when it is nowhere.
pub fn find_program(name: &str, env: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A program the test cannot run without: its absence fails the test.
pub fn require_program(name: &str, env: &str, package: &str) -> PathBuf {
    find_program(name, env).unwrap_or_else(|| {
        panic!("{name} not found on PATH (nor ${env}): install it, e.g. apt-get install {package}")
    })
}

/// A fresh directory for one test's files, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "wspush-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A RESP value, as far as the tests need to read replies.
#[derive(Debug, Clone, PartialEq)]
pub enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    Nil,
    Array(Vec<Resp>),
}

impl Resp {
    pub fn text(&self) -> String {
        match self {
            Resp::Simple(s) | Resp::Error(s) => s.clone(),
            Resp::Bulk(b) => String::from_utf8_lossy(b).into_owned(),
            Resp::Int(i) => i.to_string(),
            other => panic!("not a text reply: {other:?}"),
        }
    }
    pub fn array(&self) -> &[Resp] {
        match self {
            Resp::Array(a) => a,
            other => panic!("not an array reply: {other:?}"),
        }
    }
    /// The value after `key` in a flat `[key, value, …]` reply (Disque's SHOW).
    pub fn field(&self, key: &str) -> Option<&Resp> {
        let a = self.array();
        a.chunks(2)
            .find(|kv| kv[0].text() == key)
            .and_then(|kv| kv.get(1))
    }
}

/// A minimal RESP client written for the tests, independent of the server's own.
pub struct RespClient {
    reader: BufReader<TcpStream>,
}

impl RespClient {
    pub fn connect(port: u16) -> std::io::Result<RespClient> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(WAIT))?;
        s.set_write_timeout(Some(WAIT))?;
        Ok(RespClient::over(s))
    }

    /// A client on a connection made elsewhere (from another network namespace).
    pub fn over(stream: TcpStream) -> RespClient {
        RespClient {
            reader: BufReader::new(stream),
        }
    }

    pub fn call(&mut self, args: &[&[u8]]) -> Resp {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        self.reader
            .get_mut()
            .write_all(&out)
            .expect("send RESP command");
        self.read()
    }

    /// Shorthand for commands whose arguments are all text.
    pub fn cmd(&mut self, args: &[&str]) -> Resp {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.call(&args)
    }

    fn read(&mut self) -> Resp {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read RESP reply");
        assert!(line.ends_with("\r\n"), "truncated RESP line {line:?}");
        let (kind, rest) = line.trim_end().split_at(1);
        match kind {
            "+" => Resp::Simple(rest.into()),
            "-" => Resp::Error(rest.into()),
            ":" => Resp::Int(rest.parse().unwrap()),
            "$" => {
                let n: i64 = rest.parse().unwrap();
                if n < 0 {
                    return Resp::Nil;
                }
                let mut b = vec![0; n as usize + 2];
                self.reader.read_exact(&mut b).unwrap();
                b.truncate(n as usize);
                Resp::Bulk(b)
            }
            "*" => {
                let n: i64 = rest.parse().unwrap();
                if n < 0 {
                    return Resp::Nil;
                }
                Resp::Array((0..n).map(|_| self.read()).collect())
            }
            _ => panic!("bad RESP line {line:?}"),
        }
    }
}

/// Waits until a RESP server on `port` answers PING.
pub fn wait_for_ping(port: u16, child: &mut Child, name: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(mut c) = RespClient::connect(port)
            && c.cmd(&["PING"]) == Resp::Simple("PONG".into())
        {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{name} exited at start: {status}");
        }
        assert!(Instant::now() < deadline, "{name} did not answer PING");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until something listens on the loopback `port`.
pub fn wait_for_port(port: u16, child: &mut Child, name: &str) {
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{name} exited at start: {status}");
        }
        assert!(Instant::now() < deadline, "{name} did not start listening");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A line for the test log that is shown even when the test passes (measured
/// figures, skips): written to stderr directly, past the harness's capture.
pub fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// A real `redis-server` on a free loopback port, without persistence.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    bin: PathBuf,
    args: Vec<String>,
    dir: TempDir,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// On a given port (one a node is already trying to reach).
    pub fn start_on(port: u16) -> RedisServer {
        let mut r = RedisServer {
            child: None,
            port,
            bin: require_program("redis-server", "REDIS_SERVER", "redis-server"),
            args: Vec::new(),
            dir: TempDir::new("redis"),
        };
        r.spawn();
        r
    }

    /// With extra `redis-server` arguments, e.g. `["--requirepass", "pw"]`.
    pub fn start_with(args: &[&str]) -> RedisServer {
        let mut r = RedisServer {
            child: None,
            port: free_port(),
            bin: require_program("redis-server", "REDIS_SERVER", "redis-server"),
            args: args.iter().map(|a| a.to_string()).collect(),
            dir: TempDir::new("redis"),
        };
        r.spawn();
        r
    }

    /// The `-queue=` value for wspush.
    pub fn queue_flag(&self) -> String {
        format!("-queue=redis/127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let port = self.port.to_string();
        let mut child = Command::new(&self.bin)
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "no", "--dir"])
            .arg(&self.dir.0)
            .args(&self.args)
            .stdout(Stdio::null())
            .spawn()
            .expect("start redis-server");
        if self.args.iter().any(|a| a == "--requirepass") {
            wait_for_port(self.port, &mut child, "redis-server");
        } else {
            wait_for_ping(self.port, &mut child, "redis-server");
        }
        self.child = Some(child);
    }

    /// SIGKILL: the server vanishes without closing anything gracefully.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("redis-server running").id()
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn client(&self) -> RespClient {
        RespClient::connect(self.port).expect("connect to redis-server")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A unique channel or queue name, so tests sharing a server never see each other.
pub fn unique_name(tag: &str) -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    format!(
        "wspush-test-{tag}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Two wspush nodes on one Redis, on a channel of their own (named after `tag`),
/// both healthy.
pub fn two_redis_nodes(redis: &RedisServer, tag: &str, extra: &[&str]) -> (Server, Server) {
    let channel = format!("-queue-name={}", unique_name(tag));
    let flag = redis.queue_flag();
    let mut args = vec![flag.as_str(), channel.as_str()];
    args.extend_from_slice(extra);
    let (a, b) = (Server::start(&args), Server::start(&args));
    wait_health(&a, 200);
    wait_health(&b, 200);
    (a, b)
}

/// Waits until the node's `/healthz` answers `status`.
pub fn wait_health(server: &Server, status: u16) {
    let deadline = Instant::now() + WAIT;
    loop {
        let r = server.get("/healthz");
        if r.status == status {
            return;
        }
        let last = format!("{} {}", r.status, r.text());
        assert!(
            Instant::now() < deadline,
            "timed out waiting for /healthz {status} on {}: last answer {last}",
            server.addr
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until everything sent on `ws` before this call has been processed by the
/// server: frames on one connection are handled in order, so a pong answers for them.
pub fn sync(ws: &mut Ws) {
    ws.send(Message::Ping(b"sync".to_vec().into())).unwrap();
    loop {
        match ws.read().expect("read pong") {
            Message::Pong(p) if &p[..] == b"sync" => return,
            Message::Text(t) => panic!("unexpected push while syncing: {t}"),
            _ => continue,
        }
    }
}

/// Polls `/stats` until `pred` holds (the server's own counters are the event).
pub fn wait_stats(server: &Server, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = server.stats();
        if pred(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {s}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A real `disque-server` (from `DISQUE_SERVER` or PATH) on a free loopback port.
/// No package registry ships one, so tests that need it skip when it is absent,
/// and say so loudly.
pub struct DisqueServer {
    child: Option<Child>,
    pub port: u16,
    bin: PathBuf,
    dir: TempDir,
}

impl DisqueServer {
    /// None (after a SKIPPED line on stderr) when no disque-server is available.
    pub fn start_or_skip(test: &str) -> Option<DisqueServer> {
        let Some(bin) = find_program("disque-server", "DISQUE_SERVER") else {
            report(&format!(
                "SKIPPED: no disque-server on PATH and DISQUE_SERVER unset: Disque test `{test}` did not run"
            ));
            return None;
        };
        let mut d = DisqueServer {
            child: None,
            port: free_port(),
            bin,
            dir: TempDir::new("disque"),
        };
        d.spawn();
        Some(d)
    }

    pub fn queue_flag(&self) -> String {
        format!("-queue=disque/127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let port = self.port.to_string();
        // Disque writes its cluster config into the working directory.
        let mut child = Command::new(&self.bin)
            .args(["--port", &port, "--bind", "127.0.0.1", "--appendonly", "no"])
            .current_dir(&self.dir.0)
            .stdout(Stdio::null())
            .spawn()
            .expect("start disque-server");
        wait_for_ping(self.port, &mut child, "disque-server");
        self.child = Some(child);
    }

    /// SIGKILL; jobs it held are gone with it (no AOF).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir.0);
        std::fs::create_dir_all(&self.dir.0).unwrap();
        self.spawn();
    }

    pub fn client(&self) -> RespClient {
        RespClient::connect(self.port).expect("connect to disque-server")
    }
}

impl Drop for DisqueServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends a signal by name (`STOP`, `CONT`, `KILL`) to a process.
pub fn signal(pid: u32, name: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success(), "kill -{name} {pid}");
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A real nginx running `deploy/nginx.conf` with the node addresses and its own
/// port substituted, as a foreground child process with every path under a temp dir.
pub struct Nginx {
    child: Child,
    pub addr: SocketAddr,
    dir: TempDir,
}

impl Nginx {
    /// `edits` are further (from, to) replacements in the site config.
    pub fn start(primary: SocketAddr, backup: SocketAddr, edits: &[(&str, &str)]) -> Nginx {
        let bin = require_program("nginx", "NGINX", "nginx");
        let dir = TempDir::new("nginx");
        let port = free_port();
        let mut site =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nginx.conf"))
                .expect("read deploy/nginx.conf");
        let listen = format!("listen 127.0.0.1:{port};");
        let (primary, backup) = (primary.to_string(), backup.to_string());
        let mut all = vec![
            ("server 127.0.0.1:3210 ", primary.as_str()),
            ("server 127.0.0.1:3211 ", backup.as_str()),
            ("listen 3220;", listen.as_str()),
        ];
        all.extend_from_slice(edits);
        for (from, to) in all {
            assert!(site.contains(from), "deploy/nginx.conf has no {from:?}");
            // Keep the separator after an upstream address.
            let to = if from.ends_with(' ') {
                format!("server {to} ")
            } else {
                to.to_string()
            };
            site = site.replace(from, &to);
        }
        let d = dir.0.display();
        std::fs::write(dir.0.join("wspush.conf"), site).unwrap();
        // One process in the foreground, every file under the temp dir: no root
        // paths touched, nothing left behind.
        let main = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\nevents {{ worker_connections 256; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             include {d}/wspush.conf;\n}}\n"
        );
        std::fs::write(dir.0.join("nginx.conf"), main).unwrap();
        let mut child = Command::new(bin)
            .arg("-p")
            .arg(&dir.0)
            .arg("-e")
            .arg(dir.0.join("error.log"))
            .arg("-c")
            .arg(dir.0.join("nginx.conf"))
            .stdout(Stdio::null())
            .spawn()
            .expect("start nginx");
        wait_for_port(port, &mut child, "nginx");
        Nginx {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
        }
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One `GET` on a fresh connection that tolerates being refused: the status, or None
/// if the connection failed before a complete status line arrived.
pub fn try_get_status(server: &Server, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(server.addr).ok()?;
    s.set_read_timeout(Some(WAIT)).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .ok()?;
    let mut all = Vec::new();
    s.read_to_end(&mut all).ok()?;
    let text = String::from_utf8_lossy(&all);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}
