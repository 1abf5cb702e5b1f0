//! `/send` running through a fault: one thread posts numbered messages to a uid as
//! fast as the node answers, another reads them from the uid's client, and the end
//! checks the delivery contract (every message answered 200 arrives exactly once;
//! 503s may or may not arrive). A client sent off with 1012 does what the contract
//! tells it to: it reconnects with `since` (the last id of each stream it has) and
//! goes on, and what the resume replays still has to arrive exactly once.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::json;

use tungstenite::Message;

use super::{Response, WAIT, Ws, wait_until};

/// Opens a new connection of the flood's uid with the given `since`.
pub type Reconnect = Box<dyn Fn(&str) -> Ws + Send>;

/// Pause between two posts, so the flood leaves the reactor time for its clients.
const PACE: Duration = Duration::from_millis(3);

/// Numbers with the instant each was answered 200 (sent) or pushed (delivered).
pub type Timed = Vec<(u64, Instant)>;

/// A flood of one uid in progress.
pub struct Flood {
    got: Arc<Mutex<Timed>>,
    stop_send: Arc<AtomicBool>,
    stop_read: Arc<AtomicBool>,
    sender: JoinHandle<(Timed, u64)>,
    reader: JoinHandle<()>,
}

/// What a finished flood measured.
pub struct Outcome {
    /// The numbers answered 200.
    pub ok: Timed,
    /// How many were answered 503.
    pub refused: u64,
    /// Every push the client got, each number once.
    pub got: Timed,
}

impl Flood {
    /// Posts `{"topic":"uids","topic_ids":[uid],"msg":n}` for n = 0, 1, … with
    /// `send`, and reads what `ws` (a client of `uid`, with nothing pending) gets.
    pub fn start(send: impl Fn(&str) -> Response + Send + 'static, uid: &str, ws: Ws) -> Flood {
        Flood::start_resuming(send, uid, ws, None)
    }

    /// Like [`Flood::start`]; a client closed with 1012 resumes through `reconnect`
    /// (without it, the close fails the flood).
    pub fn start_resuming(
        send: impl Fn(&str) -> Response + Send + 'static,
        uid: &str,
        ws: Ws,
        reconnect: Option<Reconnect>,
    ) -> Flood {
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop_send = Arc::new(AtomicBool::new(false));
        let stop_read = Arc::new(AtomicBool::new(false));
        let reader = collect(ws, got.clone(), stop_read.clone(), reconnect);
        let (uid, stop) = (uid.to_string(), stop_send.clone());
        let sender = thread::spawn(move || {
            let (mut ok, mut refused) = (Vec::new(), 0);
            for n in 0u64.. {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                let body = json!({"topic":"uids","topic_ids":[uid],"msg":n}).to_string();
                let r = send(&body);
                match r.status {
                    200 => ok.push((n, Instant::now())),
                    503 => refused += 1,
                    other => panic!("unexpected {other}: {}", r.text()),
                }
                thread::sleep(PACE);
            }
            (ok, refused)
        });
        Flood {
            got,
            stop_send,
            stop_read,
            sender,
            reader,
        }
    }

    /// How many pushes arrived after `since`.
    pub fn delivered_after(&self, since: Instant) -> usize {
        let got = self.got.lock().unwrap();
        got.iter().filter(|(_, t)| *t > since).count()
    }

    /// Waits until `n` pushes arrived after `since`.
    pub fn await_delivered(&self, n: usize, since: Instant, within: Duration) {
        wait_until(&format!("{n} deliveries"), within, || {
            reading(&self.reader);
            self.delivered_after(since) >= n
        });
    }

    /// Stops posting, waits until every 200 was delivered, and checks that none
    /// was delivered twice.
    pub fn finish(self) -> Outcome {
        let Flood {
            got,
            stop_send,
            stop_read,
            sender,
            reader,
        } = self;
        stop_send.store(true, Ordering::Release);
        let (ok, refused) = sender.join().unwrap();
        let accepted: HashSet<u64> = ok.iter().map(|(n, _)| *n).collect();
        let missing = || {
            let got = got.lock().unwrap();
            let have: HashSet<u64> = got.iter().map(|(n, _)| *n).collect();
            let mut lost: Vec<u64> = accepted.difference(&have).copied().collect();
            lost.sort_unstable();
            lost
        };
        let deadline = Instant::now() + WAIT;
        loop {
            reading(&reader);
            let lost = missing();
            if lost.is_empty() {
                break;
            }
            // Say which 200s never came, with when each was answered and what the
            // client got around them, so a loss can be traced in the node's log.
            if Instant::now() >= deadline {
                let (count, last) = {
                    let got = got.lock().unwrap();
                    (got.len(), got.last().map(|(n, _)| *n))
                };
                let when: Vec<Duration> = ok
                    .iter()
                    .filter(|(n, _)| lost.contains(n))
                    .take(5)
                    .map(|(_, t)| t.duration_since(ok[0].1))
                    .collect();
                panic!(
                    "{} answered 200 never delivered: {:?} (answered {when:?} after the first \
                     200); the client got {count} pushes, the last {last:?}",
                    lost.len(),
                    &lost[..lost.len().min(20)],
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        stop_read.store(true, Ordering::Release);
        reader.join().unwrap();
        let got = std::mem::take(&mut *got.lock().unwrap());
        let mut seen = HashSet::new();
        for (n, _) in &got {
            assert!(seen.insert(*n), "message {n} delivered twice");
        }
        Outcome { ok, refused, got }
    }
}

/// Fails at once when the reader has stopped (the node closed the client, and the
/// reader's panic says with which code), rather than when a wait for deliveries
/// that cannot come times out.
fn reading(reader: &JoinHandle<()>) {
    assert!(
        !reader.is_finished(),
        "the client's connection ended during the flood (see the reader's panic)"
    );
}

/// Reads pushes on `ws` into `got` until `stop` and a quiet second.
fn collect(
    mut ws: Ws,
    got: Arc<Mutex<Timed>>,
    stop: Arc<AtomicBool>,
    reconnect: Option<Reconnect>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        // The last id of each stream (`u…`/`g…` on a cluster; one plain id else).
        let mut last: HashMap<char, String> = HashMap::new();
        ws.get_ref()
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        loop {
            match ws.read() {
                Ok(Message::Text(t)) => {
                    let m: serde_json::Value = serde_json::from_str(&t).unwrap();
                    if m["op"] == "resumed" {
                        // The floods size retention (-history-size) to cover the
                        // fault, so a resume that says something may be missing is
                        // a loss of what was promised.
                        assert_eq!(m["complete"], true, "a resume within retention: {t}");
                        continue;
                    }
                    let n = m["msg"].as_u64().expect("a flood number");
                    got.lock().unwrap().push((n, Instant::now()));
                    if let Some(id) = m["id"].as_str() {
                        let stream = id.chars().next().filter(|c| matches!(c, 'u' | 'g'));
                        last.insert(stream.unwrap_or('-'), id.to_string());
                    }
                }
                Ok(Message::Ping(_) | Message::Pong(_)) => {}
                Ok(Message::Close(Some(f))) if u16::from(f.code) == 1012 && reconnect.is_some() => {
                    let since = since_of(&last);
                    ws = reconnect.as_ref().expect("checked")(&since);
                    ws.get_ref()
                        .set_read_timeout(Some(Duration::from_secs(1)))
                        .unwrap();
                }
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if stop.load(Ordering::Acquire) {
                        return;
                    }
                }
                other => panic!("the flood's client got {other:?}"),
            }
        }
    })
}

/// What a client that was sent off resumes from: its last id, or on a cluster
/// the last of each stream (`0` for one it has none of).
fn since_of(last: &HashMap<char, String>) -> String {
    if let Some(plain) = last.get(&'-') {
        return plain.clone();
    }
    let part = |k: char| last.get(&k).cloned().unwrap_or_else(|| "0".into());
    format!("{},{}", part('u'), part('g'))
}

/// The longest pause between two consecutive instants, and the instant it ended.
pub fn longest_gap(times: &Timed) -> (Duration, Option<Instant>) {
    times
        .windows(2)
        .map(|w| (w[1].1.duration_since(w[0].1), Some(w[1].1)))
        .max()
        .unwrap_or_default()
}
