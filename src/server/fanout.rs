//! Fan-out: the queue's events in, pushes out to every matching receiver. Shared
//! frames (one `Arc` per message for all receivers), slices of 64 with one
//! vectored write per receiver, and back-pressure: a receiver that does not read
//! what it was given is evicted, never held against the others.
//!
//! Receivers are whatever phase [`Phase::receives_pushes`] names and the hub
//! holds; delivery only queues shared frames on their connections.

use std::sync::Arc;

use super::conn::Phase;
use super::stats::Limit;
use super::ws_conn::{CloseCode, Then};
use super::{Liveness, Reason, Server};
use crate::message::{Envelope, unix_now};
use crate::queue::Inbound;

/// Scratch space reused across deliveries, and the delivery turn.
#[derive(Default)]
pub(super) struct FanOut {
    /// Receivers of the slice being delivered.
    receivers: Vec<usize>,
    /// Per slab key, which messages of the slice it receives.
    masks: Vec<u64>,
    /// Counts the wakes that drain the queue's events. A burst delivered in one
    /// turn may take a receiver past `-max-backlog`; only what it still holds
    /// from an earlier turn counts against it, so the server's own batching
    /// never evicts a client that reads.
    turn: u64,
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
        let mut taken = 0;
        self.inbound_left = false;
        while let Ok(event) = self.inbound.try_recv() {
            match event {
                Inbound::Deliver(batch) if merged.is_empty() => merged = batch,
                Inbound::Deliver(batch) => merged.extend(batch),
                other => {
                    // Whatever else arrived comes after the merged batches, in order.
                    if !merged.is_empty() {
                        self.deliver(std::mem::take(&mut merged));
                    }
                    self.on_inbound(other);
                }
            }
            taken += 1;
            if taken >= self.cfg.inbound_budget {
                self.inbound_left = !self.inbound.is_empty();
                break;
            }
        }
        if !merged.is_empty() {
            self.deliver(merged);
        }
        if self.shutdown.queue_drained() {
            self.close_push_connections();
        }
    }

    fn on_inbound(&mut self, event: Inbound) {
        match event {
            Inbound::Deliver(batch) => self.deliver(batch),
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
        let live: Vec<&Envelope> = batch.iter().filter(|e| !e.is_expired(now)).collect();
        self.counters.expired += (batch.len() - live.len()) as u64;
        let mut receivers = std::mem::take(&mut self.fanout.receivers);
        if let [env] = live[..] {
            receivers.clear();
            self.hub.for_each_receiver(env, |k| receivers.push(k));
            for &key in &receivers {
                let _ = self.push(key, env);
            }
        } else {
            let mut masks = std::mem::take(&mut self.fanout.masks);
            for slice in live.chunks(u64::BITS as usize) {
                receivers.clear();
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
                    let _ = self.push_many(key, slice, mask);
                }
            }
            self.fanout.masks = masks;
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
    fn push(&mut self, key: usize, env: &Envelope) -> Liveness {
        self.push_many(key, &[env], 1)
    }

    /// Hands a receiver the frames of `slice` whose bits are set in `mask`, in
    /// order: those it does not have yet, or holds them while it is resuming.
    fn push_many(&mut self, key: usize, slice: &[&Envelope], mask: u64) -> Liveness {
        self.begin_turn(key);
        let max_held = self.cfg.max_backlog;
        let Some(conn) = self.conns.get_mut(key) else {
            return Liveness::Closed;
        };
        let picked = slice
            .iter()
            .enumerate()
            .filter(move |&(i, _)| mask >> i & 1 == 1)
            .map(|(_, e)| (e.seq, &e.frame));
        // At most one slice (64) of frames: no allocation per receiver.
        let mut now: [Option<&Arc<[u8]>>; u64::BITS as usize] = [None; u64::BITS as usize];
        let mut n = 0;
        let held_ok = match &mut conn.phase {
            Phase::Ws(ws) => ws.admit(picked, max_held, |f| {
                now[n] = Some(f);
                n += 1;
            }),
            _ => {
                for (_, f) in picked {
                    now[n] = Some(f);
                    n += 1;
                }
                true
            }
        };
        if !held_ok {
            return self.evict(key);
        }
        self.counters.messages_out += n as u64;
        if n == 0 {
            return Liveness::Alive;
        }
        let frames = now[..n].iter().map(|f| f.expect("filled up to n"));
        if let Err(e) = conn.send_shared(frames) {
            return self.remove(key, Reason::Io(e.0));
        }
        self.check_backlog(key)
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
        self.end_ws(key, Some(CloseCode::Policy), "too slow", Then::Drain)
    }

    /// Shutdown, once the queue handed over everything: 1001 to every receiver.
    pub(super) fn close_push_connections(&mut self) {
        for key in self.keys_where(|c| matches!(c.phase, Phase::Ws(_))) {
            let _ = self.end_ws(
                key,
                Some(CloseCode::Away),
                "server shutting down",
                Then::AwaitPeer,
            );
        }
    }
}
