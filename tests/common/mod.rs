//! Test harness: runs the real `wspush` binary on a free loopback port and talks to
//! it over raw TCP and through an independent WebSocket client (tungstenite).
#![allow(dead_code)]

pub mod raw_ws;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
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
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wspush"));
        cmd.args(["-port=0", "-bind=127.0.0.1", "-log=warn"])
            .args(args);
        Server::spawn(cmd)
    }

    /// Like `start`, with the descriptor limit (soft and hard, so the server cannot
    /// raise it) lowered to `nofile` by the shell that then becomes the server.
    #[cfg(unix)]
    pub fn start_with_nofile(nofile: u32, args: &[&str]) -> Server {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("ulimit -n {nofile} && exec \"$0\" \"$@\""))
            .arg(env!("CARGO_BIN_EXE_wspush"))
            .args(["-port=0", "-bind=127.0.0.1", "-log=warn"])
            .args(args);
        Server::spawn(cmd)
    }

    fn spawn(mut cmd: Command) -> Server {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
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
        let s = TcpStream::connect(self.addr).expect("connect");
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.set_write_timeout(Some(WAIT)).unwrap();
        s
    }

    /// Sends raw bytes on a fresh connection and reads one response.
    pub fn raw(&self, request: &[u8]) -> Response {
        let mut s = self.tcp();
        s.write_all(request).unwrap();
        read_response(&mut s)
    }

    /// `POST /send` with a JSON body.
    pub fn send(&self, body: &str) -> Response {
        self.raw(
            format!(
                "POST /send HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
    }

    /// `POST /send` that must succeed.
    pub fn send_ok(&self, body: &str) {
        let r = self.send(body);
        assert_eq!(r.status, 200, "send failed: {}", r.text());
    }

    pub fn get(&self, path: &str) -> Response {
        self.raw(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
    }

    pub fn stats(&self) -> Value {
        let r = self.get("/stats");
        assert_eq!(r.status, 200);
        r.json()
    }

    /// Opens a push connection with the given query (e.g. `uid=1&types=chat`).
    pub fn ws(&self, query: &str) -> Ws {
        let url = format!("ws://{}/ws?{query}", self.addr);
        let stream = self.tcp();
        let (ws, resp) =
            tungstenite::client(url.into_client_request().unwrap(), stream).expect("handshake");
        assert_eq!(resp.status(), 101);
        ws
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

/// The next text message, as JSON. Pings and pongs are skipped.
pub fn recv_json(ws: &mut Ws) -> Value {
    loop {
        match ws.read().expect("read push") {
            Message::Text(t) => {
                return serde_json::from_str(&t).unwrap_or_else(|e| panic!("{e}: {t}"));
            }
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text message, got {other:?}"),
        }
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
