//! The default backend: an in-process bounded list drained by one thread.
//!
//! `/send` on this node reaches this node's connections only. The list is bounded
//! by message count; a full list makes `/send` answer 503 instead of growing.
//!
//! The reactor gathers what a poll round accepted and hands it to the drain thread
//! once, at the round's end: one channel send and at most one wake-up per round,
//! not per `/send`.
//!
//! A `/send` for uids is answered after its pushes: the drain thread hands the
//! batch back with the requests' tickets and the reactor replies once the frames
//! are in their receivers' sockets, so a push no longer waits behind the round's
//! replies and a publisher that sends one request at a time sees its message
//! delivered within its own round trip (as nginx-nchan and uWebSockets.js do). A
//! batch with a broadcast is answered at once: its writes to every connection take
//! milliseconds, and publishers that waited for them could no longer have their
//! broadcasts share one write per receiver (BENCHMARKS.md has the figures). The drain thread sleeps in `park` whenever
//! the list is empty. A receive that spins and yields before it sleeps keeps the
//! thread runnable while idle; on a busy machine it then queues behind the reactor
//! for a core, and every message handed over meanwhile waits with it (milliseconds,
//! against microseconds for the wake-up from `park`; BENCHMARKS.md has the figures).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::{self, Thread};

use crossbeam_channel::{Receiver, Sender, TryRecvError};

use super::{Inbound, Notifier, Queue, QueueError, QueueState, Submit, Ticket};
use crate::message::{Envelope, Target};

/// A round's messages and the requests that brought them.
type Batch = (Vec<Envelope>, Vec<Ticket>);

pub struct ListQueue {
    /// What this poll round accepted, handed over at its end, and the requests
    /// to answer once it is delivered.
    round: Vec<Envelope>,
    tickets: Vec<Ticket>,
    /// `None` once closed: dropping the sender lets the drain thread finish. The
    /// channel needs no bound of its own: every batch in it holds at least one
    /// message counted in `queued`, which `capacity` bounds.
    tx: Option<Sender<Batch>>,
    /// The drain thread, to unpark after a hand-off. Unparking a thread that is
    /// not parked costs one atomic swap, no syscall.
    drain: Thread,
    /// Messages accepted and not yet taken by the drain thread (`round` included).
    queued: Arc<AtomicUsize>,
    capacity: usize,
}

impl ListQueue {
    /// Starts the drain thread.
    pub fn start(capacity: usize, notifier: Notifier) -> std::io::Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let queued = Arc::new(AtomicUsize::new(0));
        let counter = queued.clone();
        let drain = thread::Builder::new()
            .name("wspush-list".into())
            .spawn(move || drain(rx, counter, notifier))?
            .thread()
            .clone();
        Ok(ListQueue {
            round: Vec::new(),
            tickets: Vec::new(),
            tx: Some(tx),
            drain,
            queued,
            capacity,
        })
    }

    /// Hands the round's messages to the drain thread and wakes it if it sleeps.
    fn hand_off(&mut self) {
        if self.round.is_empty() {
            return;
        }
        let Some(tx) = &self.tx else {
            return;
        };
        let batch = std::mem::take(&mut self.round);
        let tickets = std::mem::take(&mut self.tickets);
        let n = batch.len();
        if tx.send((batch, tickets)).is_err() {
            // Only a drain thread that died drops the receiver: nothing can deliver
            // these any more, so say so rather than lose them silently.
            self.queued.fetch_sub(n, Ordering::AcqRel);
            warn!("list queue: drain thread gone, {n} accepted messages lost");
            return;
        }
        self.drain.unpark();
    }
}

/// Waits in `park` while the list is empty (spurious wake-ups just look again),
/// then forwards everything waiting as one reactor event.
fn drain(rx: Receiver<Batch>, queued: Arc<AtomicUsize>, notifier: Notifier) {
    loop {
        let (mut batch, mut tickets) = match rx.try_recv() {
            Ok(batch) => batch,
            Err(TryRecvError::Empty) => {
                thread::park();
                continue;
            }
            Err(TryRecvError::Disconnected) => break,
        };
        // Bounded: the list never holds more than its capacity.
        for (more, asked) in rx.try_iter() {
            batch.extend(more);
            tickets.extend(asked);
        }
        queued.fetch_sub(batch.len(), Ordering::AcqRel);
        if notifier
            .send(Inbound::DeliverThenAnswer { batch, tickets })
            .is_err()
        {
            return;
        }
    }
    let _ = notifier.send(Inbound::Drained);
}

impl Queue for ListQueue {
    fn name(&self) -> &'static str {
        "list"
    }

    fn state(&self) -> QueueState {
        QueueState::Up
    }

    fn publish(&mut self, ticket: Ticket, batch: Vec<Envelope>) -> Submit {
        let n = batch.len();
        if self.tx.is_none() {
            return Submit::Done(Err(QueueError::Closed));
        }
        if self.queued.fetch_add(n, Ordering::AcqRel) + n > self.capacity {
            self.queued.fetch_sub(n, Ordering::AcqRel);
            return Submit::Done(Err(QueueError::Full));
        }
        let broadcast = batch.iter().any(|e| matches!(e.target, Target::All));
        if self.round.is_empty() {
            self.round = batch;
        } else {
            self.round.extend(batch);
        }
        if broadcast {
            return Submit::Done(Ok(()));
        }
        self.tickets.push(ticket);
        Submit::Pending
    }

    fn end_round(&mut self) {
        self.hand_off();
    }

    fn close(&mut self) {
        // What this round accepted was promised: it goes before the end.
        self.hand_off();
        self.tx = None;
        self.drain.unpark();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message for uid `n`; `broadcast(n)` one for everyone.
    fn env(n: u8) -> Envelope {
        Envelope {
            target: Target::Uids(vec![n.to_string().into()]),
            types: "notice".into(),
            expires: 0,
            seq: 0,
            lane: Default::default(),
            frame: Arc::from(&[n][..]),
        }
    }

    fn start(capacity: usize) -> (ListQueue, Notifier, Receiver<Inbound>) {
        let poll = mio::Poll::new().unwrap();
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).unwrap());
        let (tx, rx) = crossbeam_channel::bounded(4);
        let notifier = Notifier::new(tx, waker);
        (
            ListQueue::start(capacity, notifier.clone()).unwrap(),
            notifier,
            rx,
        )
    }

    fn broadcast(n: u8) -> Envelope {
        Envelope {
            target: Target::All,
            ..env(n)
        }
    }

    /// The frames of a handed-back batch and the serials of the requests to answer.
    fn frames(event: Inbound) -> (Vec<u8>, Vec<u64>) {
        match event {
            Inbound::DeliverThenAnswer { batch, tickets } => (
                batch.iter().map(|e| e.frame[0]).collect(),
                tickets.iter().map(|t| t.serial).collect(),
            ),
            other => panic!("{other:?}"),
        }
    }

    const fn t(serial: u64) -> Ticket {
        Ticket { key: 0, serial }
    }
    const T: Ticket = t(0);

    #[test]
    fn a_round_is_handed_over_whole_in_order_and_the_bound_holds() {
        let (mut q, notifier, rx) = start(3);
        assert!(matches!(
            q.publish(t(1), vec![env(1), env(2)]),
            Submit::Pending
        ));
        assert!(matches!(q.publish(t(2), vec![env(3)]), Submit::Pending));
        assert!(matches!(
            q.publish(t(3), vec![env(4)]),
            Submit::Done(Err(QueueError::Full))
        ));
        assert!(
            rx.try_recv().is_err(),
            "nothing leaves before the round ends"
        );
        q.end_round();
        // Answered after delivery: the refused request is not among them.
        assert_eq!(frames(rx.recv().unwrap()), (vec![1, 2, 3], vec![1, 2]));
        notifier.clear();
        // Taken by the drain thread: room again.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while q.queued.load(Ordering::Acquire) != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the list never emptied"
            );
            thread::yield_now();
        }
        assert!(matches!(q.publish(t(4), vec![env(5)]), Submit::Pending));
        q.end_round();
        assert_eq!(frames(rx.recv().unwrap()), (vec![5], vec![4]));
    }

    #[test]
    fn closing_delivers_what_the_round_accepted_then_drains() {
        let (mut q, _notifier, rx) = start(8);
        assert!(matches!(q.publish(t(7), vec![env(7)]), Submit::Pending));
        q.close();
        assert!(matches!(
            q.publish(T, vec![env(0)]),
            Submit::Done(Err(QueueError::Closed))
        ));
        assert_eq!(frames(rx.recv().unwrap()), (vec![7], vec![7]));
        assert!(matches!(rx.recv().unwrap(), Inbound::Drained));
    }

    #[test]
    fn a_broadcast_is_answered_at_once_and_a_uid_batch_after_its_pushes() {
        let (mut q, _notifier, rx) = start(8);
        assert!(matches!(
            q.publish(t(1), vec![env(1), broadcast(2)]),
            Submit::Done(Ok(()))
        ));
        assert!(matches!(q.publish(t(3), vec![env(3)]), Submit::Pending));
        q.end_round();
        assert_eq!(frames(rx.recv().unwrap()), (vec![1, 2, 3], vec![3]));
    }
}
