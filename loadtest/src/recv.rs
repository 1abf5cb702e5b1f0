//! The push connections: handshakes on a few threads, then receiver threads that
//! each run one epoll loop over their share of the connections.
//!
//! Frames are decoded by `tungstenite` (not wspush's codec). The loop is lean so the
//! client costs less per frame than the server it measures: readiness is
//! edge-triggered, and a read that does not fill tungstenite's buffer is taken as
//! having emptied the socket (new data raises a new edge), so each burst of frames
//! costs one `recv`, not one plus a `WouldBlock` one.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, Socket, Type};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

use crate::{Opts, RELAXED, Shared, record};

/// A socket whose reads report `WouldBlock` once a read came back short, until
/// the next readiness event opens it again.
pub struct Gate {
    sock: TcpStream,
    open: bool,
}

impl Read for Gate {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.open {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let r = self.sock.read(buf);
        match &r {
            Ok(n) if *n < buf.len() => self.open = false,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.open = false,
            _ => {}
        }
        r
    }
}

impl Write for Gate {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sock.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.sock.flush()
    }
}

type Ws = WebSocket<Gate>;

/// Opens one push connection (blocking), bound to a source address of its own
/// when `--sources` asks for it.
fn open(opts: &Opts, slot: usize) -> Result<Ws, String> {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).map_err(|e| e.to_string())?;
    if opts.sources > 0 {
        // Each source address has its own ephemeral port range, so N can pass ~28k.
        let src = Ipv4Addr::new(127, 0, 0, 1 + (slot % opts.sources) as u8);
        sock.bind(&SocketAddr::new(IpAddr::V4(src), 0).into())
            .map_err(|e| format!("bind {src}: {e}"))?;
    }
    sock.connect_timeout(&opts.addr.into(), Duration::from_secs(10))
        .map_err(|e| format!("connect: {e}"))?;
    let sock: TcpStream = sock.into();
    sock.set_nodelay(true).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let url = format!("ws://{}/ws?uid={slot}", opts.addr);
    // tungstenite zero-fills this much before every read: small keeps it cheap.
    let cfg = WebSocketConfig::default().read_buffer_size(opts.read_buffer);
    let gate = Gate { sock, open: true };
    let (mut ws, _) = tungstenite::client::client_with_config(url, gate, Some(cfg))
        .map_err(|e| format!("handshake: {e}"))?;
    let sock = &ws.get_ref().sock;
    sock.set_read_timeout(None).map_err(|e| e.to_string())?;
    sock.set_nonblocking(true).map_err(|e| e.to_string())?;
    ws.get_mut().open = false;
    Ok(ws)
}

pub struct Connected {
    pub slots: Vec<usize>,
    pub failures: usize,
    pub first_error: Option<String>,
    pub seconds: f64,
}

/// Opens `opts.n` connections and starts `opts.threads` receiver threads over them.
/// The receivers run until the process ends.
pub fn connect_all(opts: &Opts, shared: &Arc<Shared>) -> Connected {
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let opened: Arc<Mutex<Vec<(usize, Ws)>>> = Arc::new(Mutex::new(Vec::with_capacity(opts.n)));
    let errors: Arc<Mutex<(usize, Option<String>)>> = Arc::default();
    let handshakers: Vec<JoinHandle<()>> = (0..opts.connect_concurrency.min(32))
        .map(|_| {
            let (opts, next, opened, errors) =
                (opts.clone(), next.clone(), opened.clone(), errors.clone());
            thread::spawn(move || {
                loop {
                    let slot = next.fetch_add(1, RELAXED);
                    if slot >= opts.n {
                        return;
                    }
                    match open(&opts, slot) {
                        Ok(ws) => {
                            let mut v = opened.lock().expect("opened");
                            v.push((slot, ws));
                            if v.len().is_multiple_of(5000) {
                                eprintln!("loadgen: {}/{} connections", v.len(), opts.n);
                            }
                        }
                        Err(e) => {
                            let mut er = errors.lock().expect("errors");
                            er.0 += 1;
                            er.1.get_or_insert(e);
                        }
                    }
                }
            })
        })
        .collect();
    for h in handshakers {
        h.join().expect("handshake thread");
    }
    let mut opened = std::mem::take(&mut *opened.lock().expect("opened"));
    opened.sort_unstable_by_key(|(slot, _)| *slot);
    let slots: Vec<usize> = opened.iter().map(|(s, _)| *s).collect();
    let threads = opts.threads.max(1);
    let mut shares: Vec<Vec<(usize, Ws)>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, c) in opened.into_iter().enumerate() {
        shares[i % threads].push(c);
    }
    for share in shares {
        let shared = shared.clone();
        thread::Builder::new()
            .name("receiver".into())
            .spawn(move || receive(share, shared))
            .expect("receiver thread");
    }
    let (failures, first_error) = std::mem::take(&mut *errors.lock().expect("errors"));
    Connected {
        slots,
        failures,
        first_error,
        seconds: started.elapsed().as_secs_f64(),
    }
}

/// One receiver thread: reads every frame of its connections and records it.
fn receive(conns: Vec<(usize, Ws)>, shared: Arc<Shared>) {
    let mut poll = Poll::new().expect("poll");
    let mut table: Vec<Option<(usize, Ws)>> = Vec::with_capacity(conns.len());
    for (i, (slot, ws)) in conns.into_iter().enumerate() {
        let fd = ws.get_ref().sock.as_raw_fd();
        poll.registry()
            .register(&mut SourceFd(&fd), Token(i), Interest::READABLE)
            .expect("register");
        table.push(Some((slot, ws)));
    }
    let mut events = Events::with_capacity(1024);
    let mut cur = None;
    loop {
        // Busy-polling keeps the thread awake, so waking it is not charged to the
        // server's send() (on loopback the sender runs the receiver's wake-up).
        let timeout = shared
            .spin
            .load(RELAXED)
            .then_some(Duration::from_millis(0));
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            panic!("poll: {e}");
        }
        for ev in events.iter() {
            let i = ev.token().0;
            let Some((slot, ws)) = table[i].as_mut() else {
                continue;
            };
            ws.get_mut().open = true;
            let done = loop {
                match ws.read() {
                    Ok(Message::Text(t)) => record(&shared, &mut cur, *slot, t.as_bytes()),
                    Ok(Message::Binary(b)) => record(&shared, &mut cur, *slot, &b),
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                        break false;
                    }
                    Err(tungstenite::Error::ConnectionClosed) => break true,
                    Err(_) => {
                        shared.ws_errors.fetch_add(1, RELAXED);
                        break true;
                    }
                }
            };
            if done {
                let fd = ws.get_ref().sock.as_raw_fd();
                let _ = poll.registry().deregister(&mut SourceFd(&fd));
                table[i] = None;
                shared.closed.fetch_add(1, RELAXED);
            }
        }
    }
}
