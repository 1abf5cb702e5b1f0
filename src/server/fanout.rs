//! Fan-out: the queue's events in, pushes out to every matching receiver. Shared
//! frames (one `Arc` per message for all receivers), slices of 64 with one
//! vectored write per receiver, and back-pressure: a receiver that does not read
//! what it was given is evicted, never held against the others.
//!
//! Receivers are whatever phase `Phase::receives_pushes` names (a WebSocket, with
//! or without permessage-deflate, or an event stream) and the hub holds; each gets
//! its message in the encoding it takes, built once per message and shared
//! ([`Encodings`]); delivery only queues shared chunks on their connections.

use std::sync::Arc;

use super::conn::Wants;
use super::session::Action;
use super::session::{CloseCode, Then};
use super::stats::Limit;
use super::{Liveness, Reason, Server};
use crate::http::sse;
use crate::message::{self, Envelope, unix_now};
use crate::queue::{Inbound, Ticket};
use crate::ws::deflate::{Compressor, Window};
use crate::ws::frame::OpCode;

/// Scratch space reused across deliveries, and the delivery turn.
#[derive(Default)]
pub(super) struct FanOut {
    /// Receivers of the slice being delivered.
    receivers: Vec<usize>,
    /// Per slab key, which messages of the slice it receives.
    masks: Vec<u64>,
    /// The other encodings of each message of the slice, built when first needed.
    encodings: Vec<Encodings>,
    /// Counts the wakes that drain the queue's events. A burst delivered in one
    /// turn may take a receiver past `-max-backlog`; only what it still holds
    /// from an earlier turn counts against it, so the server's own batching
    /// never evicts a client that reads.
    turn: u64,
}

/// A message's encodings beside its plain WebSocket frame, each built at most
/// once per delivery and only when some receiver needs it; then shared by every
/// receiver that needs it, as the plain frame is.
#[derive(Default)]
pub(super) struct Encodings {
    /// `None`: not tried yet; `Some(None)`: below `-deflate-min` or does not shrink.
    deflated: Option<Option<Arc<[u8]>>>,
    /// The same for clients that narrowed the server's window ([`Window::Narrow`]).
    deflated_narrow: Option<Option<Arc<[u8]>>>,
    /// The event-stream event, for `/sse` receivers.
    sse: Option<Arc<[u8]>>,
}

impl Encodings {
    /// Builds what `wants` needs of `env`, if it is not built yet.
    fn prepare(&mut self, env: &Envelope, wants: Wants, compressor: &mut Compressor) {
        match wants {
            Wants::Plain => {}
            Wants::Deflate(params) => {
                let window = params.window();
                let slot = match window {
                    Window::Full => &mut self.deflated,
                    Window::Narrow => &mut self.deflated_narrow,
                };
                slot.get_or_insert_with(|| {
                    compressor
                        .frame_for(window, OpCode::Text, env.push_json())
                        .map(Arc::from)
                });
            }
            Wants::Sse => {
                self.sse.get_or_insert_with(|| sse_event(env.push_json()));
            }
        }
    }

    /// The frame for a receiver that `wants` this, once [`prepare`](Self::prepare)d.
    fn pick<'a>(&'a self, env: &'a Envelope, wants: Wants) -> &'a Arc<[u8]> {
        let deflated = match wants {
            Wants::Deflate(p) if p.window() == Window::Full => &self.deflated,
            Wants::Deflate(_) => &self.deflated_narrow,
            Wants::Plain => return &env.frame,
            Wants::Sse => return self.sse.as_ref().unwrap_or(&env.frame),
        };
        match deflated {
            Some(Some(f)) => f,
            _ => &env.frame,
        }
    }
}

/// A WebSocket frame sent compressed (RFC 7692 §6: RSV1 on its first frame).
pub(super) fn is_compressed(frame: &[u8]) -> bool {
    frame.first().is_some_and(|b| b & 0x40 != 0)
}

/// A push as an event-stream event: named by its delivery id, so a browser's
/// automatic reconnect (`Last-Event-ID`) resumes after it.
pub(super) fn sse_event(push_json: &[u8]) -> Arc<[u8]> {
    sse::event(message::delivery_id(push_json), None, push_json).into()
}

impl Server {
    /// Takes the queue's events, at most `-inbound-budget` per wake so the
    /// sockets get their turn while backend threads keep the channel full.
    pub(super) fn drain_inbound(&mut self) {
        self.notifier.clear();
        // Before the queued events: from now on /send is refused, while what was
        // accepted (these events included) is still delivered.
        if self.notifier.shutdown_requested() {
            self.begin_shutdown();
        }
        self.fanout.turn += 1;
        // Batches waiting one behind the other are delivered as one, so that each
        // receiver gets all of them in as few writes as possible.
        let mut merged: Vec<Envelope> = Vec::new();
        // `/send` requests answered once the merged batches are written.
        let mut answers: Vec<Ticket> = Vec::new();
        let mut taken = 0;
        self.inbound_left = false;
        while let Ok(event) = self.inbound.try_recv() {
            match event {
                Inbound::Deliver(batch) if merged.is_empty() => merged = batch,
                Inbound::Deliver(batch) => merged.extend(batch),
                Inbound::DeliverThenAnswer { batch, tickets } => {
                    if merged.is_empty() {
                        merged = batch;
                    } else {
                        merged.extend(batch);
                    }
                    answers.extend(tickets);
                }
                other => {
                    // Whatever else arrived comes after the merged batches, in order.
                    self.deliver_and_answer(&mut merged, &mut answers);
                    self.on_inbound(other);
                }
            }
            taken += 1;
            if taken >= self.cfg.inbound_budget {
                self.inbound_left = !self.inbound.is_empty();
                break;
            }
        }
        self.deliver_and_answer(&mut merged, &mut answers);
        if self.shutdown.queue_drained() {
            self.close_push_connections();
        }
    }

    /// Pushes what was merged, then answers the `/send` requests it came from.
    fn deliver_and_answer(&mut self, merged: &mut Vec<Envelope>, answers: &mut Vec<Ticket>) {
        if !merged.is_empty() {
            self.deliver(std::mem::take(merged));
        }
        for ticket in answers.drain(..) {
            self.on_published(ticket, Ok(()));
        }
    }

    fn on_inbound(&mut self, event: Inbound) {
        match event {
            Inbound::Deliver(batch) => self.deliver(batch),
            Inbound::DeliverThenAnswer {
                mut batch,
                mut tickets,
            } => self.deliver_and_answer(&mut batch, &mut tickets),
            Inbound::DeliverJob { batch, job } => {
                // Acknowledged only once every frame sits in its receivers' queues.
                self.deliver(batch);
                self.queue.ack(job);
            }
            Inbound::Published { ticket, result } => self.on_published(ticket, result),
            Inbound::Drained => self.shutdown.set_queue_drained(),
            // The backend catches up from history before its next live message.
            Inbound::Resubscribed => {}
            Inbound::Unfilled => self.restart_push_connections(),
            Inbound::UnfilledFor(uids) => self.restart_uids(&uids),
            Inbound::History { ticket, fetched } => self.on_history(ticket, fetched),
            Inbound::Presence { ticket, result } => self.on_presence(ticket, result),
        }
    }

    /// Pushes a batch. A lone message is written to each receiver at once. Several
    /// are taken in slices of up to 64: each receiver gets its frames of a slice in
    /// one vectored write, so the syscalls are per receiver and slice rather than
    /// per message, and nothing is allocated per receiver.
    fn deliver(&mut self, mut batch: Vec<Envelope>) {
        self.sequence(&mut batch);
        self.counters.messages_routed += batch.len() as u64;
        let now = unix_now();
        // In place: a second vector of the live ones would be allocated (and grown)
        // on every turn.
        let all = batch.len();
        batch.retain(|e| !e.is_expired(now));
        self.counters.expired += (all - batch.len()) as u64;
        let live = &batch[..];
        let mut receivers = std::mem::take(&mut self.fanout.receivers);
        if let [env] = live {
            receivers.clear();
            self.hub.for_each_receiver(env, |k| receivers.push(k));
            let mut enc = Encodings::default();
            for &key in &receivers {
                let _ = self.push(key, env, &mut enc);
            }
            self.count_deflated(std::slice::from_ref(&enc));
        } else {
            let mut masks = std::mem::take(&mut self.fanout.masks);
            let mut encodings = std::mem::take(&mut self.fanout.encodings);
            for slice in live.chunks(u64::BITS as usize) {
                receivers.clear();
                encodings.clear();
                encodings.resize_with(slice.len(), Encodings::default);
                for (i, env) in slice.iter().enumerate() {
                    self.hub.for_each_receiver(env, |k| {
                        if k >= masks.len() {
                            masks.resize(k + 1, 0);
                        }
                        if masks[k] == 0 {
                            receivers.push(k);
                        }
                        masks[k] |= 1 << i;
                    });
                }
                for &key in &receivers {
                    let mask = masks.get_mut(key).map_or(0, std::mem::take);
                    let _ = self.push_many(key, slice, &mut encodings, mask);
                }
                self.count_deflated(&encodings);
            }
            self.fanout.masks = masks;
            encodings.clear();
            self.fanout.encodings = encodings;
        }
        receivers.clear();
        self.fanout.receivers = receivers;
    }

    /// Notes the receiver's backlog when this turn first reaches it.
    fn begin_turn(&mut self, key: usize) {
        let turn = self.fanout.turn;
        if let Some(conn) = self.conns.get_mut(key)
            && conn.turn != turn
        {
            conn.turn = turn;
            conn.turn_base = conn.out.bytes();
        }
    }

    /// Hands a push frame to a receiver.
    fn push(&mut self, key: usize, env: &Envelope, enc: &mut Encodings) -> Liveness {
        self.push_many(key, std::slice::from_ref(env), std::slice::from_mut(enc), 1)
    }

    /// Hands a receiver the frames of `slice` whose bits are set in `mask`, in
    /// order, each in the encoding the receiver takes: those it does not have yet,
    /// or holds them (so encoded) while it is resuming.
    fn push_many(
        &mut self,
        key: usize,
        slice: &[Envelope],
        encodings: &mut [Encodings],
        mask: u64,
    ) -> Liveness {
        let Some(wants) = self.conns.get(key).and_then(|c| c.phase.wants()) else {
            return self.liveness(key);
        };
        let chosen = move |i: usize| mask >> i & 1 == 1;
        for (_, (env, enc)) in slice
            .iter()
            .zip(encodings.iter_mut())
            .enumerate()
            .filter(|(i, _)| chosen(*i))
        {
            enc.prepare(env, wants, &mut self.compressor);
        }
        self.begin_turn(key);
        let max_held = self.cfg.max_backlog;
        let Some(conn) = self.conns.get_mut(key) else {
            return Liveness::Closed;
        };
        let encodings = &*encodings;
        let picked = slice
            .iter()
            .zip(encodings)
            .enumerate()
            .filter(move |(i, _)| chosen(*i))
            .map(move |(_, (env, enc))| (env.lane, env.seq, enc.pick(env, wants)));
        // At most one slice (64) of frames: no allocation per receiver.
        let mut now: [Option<&Arc<[u8]>>; u64::BITS as usize] = [None; u64::BITS as usize];
        let mut n = 0;
        let Some(delivery) = conn.phase.delivery_mut() else {
            return Liveness::Alive;
        };
        let held_ok = delivery.admit(picked, max_held, |f| {
            now[n] = Some(f);
            n += 1;
        });
        if !held_ok {
            return self.evict(key);
        }
        self.counters.messages_out += n as u64;
        if n == 0 {
            return Liveness::Alive;
        }
        let frames = now[..n].iter().map(|f| f.expect("filled up to n"));
        if matches!(wants, Wants::Deflate(_)) {
            self.counters.deflated_out +=
                frames.clone().filter(|f| is_compressed(f)).count() as u64;
        }
        if let Err(e) = conn.send_shared(frames) {
            return self.apply(key, Action::Remove(Reason::Io(e.0)));
        }
        self.check_backlog(key)
    }

    /// Counts the messages compressed for this delivery (once each, however many
    /// receivers got the compressed frame).
    fn count_deflated(&mut self, encodings: &[Encodings]) {
        let n: usize = encodings
            .iter()
            .map(|e| {
                usize::from(matches!(e.deflated, Some(Some(_))))
                    + usize::from(matches!(e.deflated_narrow, Some(Some(_))))
            })
            .sum();
        self.counters.deflated += n as u64;
    }

    /// Evicts a push receiver whose unsent bytes from before this delivery turn
    /// are over `-max-backlog`: it does not read what it was given.
    pub(super) fn check_backlog(&mut self, key: usize) -> Liveness {
        let Some(conn) = self.conns.get(key) else {
            return Liveness::Closed;
        };
        let bytes = conn.out.bytes();
        if bytes <= self.cfg.max_backlog || !conn.phase.receives_pushes() {
            return Liveness::Alive;
        }
        let before = if conn.turn == self.fanout.turn {
            conn.turn_base
        } else {
            bytes
        };
        if before > self.cfg.max_backlog {
            self.evict(key)
        } else {
            Liveness::Alive
        }
    }

    /// A receiver that does not keep up is cut off so it never holds back the others.
    pub(super) fn evict(&mut self, key: usize) -> Liveness {
        let Some(conn) = self.conns.get_mut(key) else {
            return Liveness::Closed;
        };
        self.counters.evicted_slow += 1;
        self.counters.limited[Limit::Backlog.index()] += 1;
        self.counters.dropped += conn.out.discard_unstarted();
        info!(
            "{}: evicted, backlog over {} bytes",
            conn.peer, self.cfg.max_backlog
        );
        self.apply(key, Action::end(CloseCode::Policy, "too slow", Then::Drain))
    }

    /// Shutdown, once the queue handed over everything: 1001 to every WebSocket;
    /// event streams end (their clients would reconnect, and are refused).
    pub(super) fn close_push_connections(&mut self) {
        self.apply_where(|c| c.phase.receives_pushes(), |c| c.on_queue_drained());
    }
}
