//! The default backend: an in-process bounded list drained by one thread.
//!
//! `/send` on this node reaches this node's connections only. The list is bounded
//! by message count; a full list makes `/send` answer 503 instead of growing.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;

use crossbeam_channel::{Receiver, Sender, TrySendError};

use super::{Inbound, Notifier, Queue, QueueError, QueueState, Submit, Ticket};
use crate::message::Envelope;

/// How many queued batches the drain thread merges into one reactor wake-up.
const MERGE: usize = 256;

pub struct ListQueue {
    /// `None` once closed: dropping the sender lets the drain thread finish.
    tx: Option<Sender<Vec<Envelope>>>,
    queued: Arc<AtomicUsize>,
    capacity: usize,
}

impl ListQueue {
    /// Starts the drain thread.
    pub fn start(capacity: usize, notifier: Notifier) -> std::io::Result<Self> {
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        let queued = Arc::new(AtomicUsize::new(0));
        let counter = queued.clone();
        thread::Builder::new()
            .name("wspush-list".into())
            .spawn(move || drain(rx, counter, notifier))?;
        Ok(ListQueue {
            tx: Some(tx),
            queued,
            capacity,
        })
    }
}

fn drain(rx: Receiver<Vec<Envelope>>, queued: Arc<AtomicUsize>, notifier: Notifier) {
    while let Ok(mut batch) = rx.recv() {
        for more in rx.try_iter().take(MERGE) {
            batch.extend(more);
        }
        queued.fetch_sub(batch.len(), Ordering::AcqRel);
        if notifier.send(Inbound::Deliver(batch)).is_err() {
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

    fn publish(&mut self, _ticket: Ticket, batch: Vec<Envelope>) -> Submit {
        let n = batch.len();
        let Some(tx) = &self.tx else {
            return Submit::Done(Err(QueueError::Closed));
        };
        if self.queued.fetch_add(n, Ordering::AcqRel) + n > self.capacity {
            self.queued.fetch_sub(n, Ordering::AcqRel);
            return Submit::Done(Err(QueueError::Full));
        }
        match tx.try_send(batch) {
            Ok(()) => Submit::Done(Ok(())),
            Err(e) => {
                self.queued.fetch_sub(n, Ordering::AcqRel);
                Submit::Done(Err(match e {
                    TrySendError::Full(_) => QueueError::Full,
                    TrySendError::Disconnected(_) => QueueError::Closed,
                }))
            }
        }
    }

    fn close(&mut self) {
        self.tx = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Target;

    fn env(n: u8) -> Envelope {
        Envelope {
            target: Target::All,
            types: "notice".into(),
            expires: 0,
            seq: 0,
            frame: Arc::from(&[n][..]),
        }
    }

    #[test]
    fn delivers_in_order_and_refuses_when_full() {
        let poll = mio::Poll::new().unwrap();
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).unwrap());
        let (tx, rx) = crossbeam_channel::bounded(1);
        let notifier = Notifier::new(tx, waker);
        let mut q = ListQueue::start(3, notifier.clone()).unwrap();
        let t = Ticket { key: 0, serial: 0 };
        assert!(matches!(
            q.publish(t, vec![env(1), env(2)]),
            Submit::Done(Ok(()))
        ));
        // The drain thread may hold the first batch while the reactor channel is full,
        // so fill the list up to its bound of three messages and expect a refusal.
        let mut refused = false;
        for i in 3..10 {
            if let Submit::Done(Err(QueueError::Full)) = q.publish(t, vec![env(i)]) {
                refused = true;
                break;
            }
        }
        assert!(refused, "a bounded list must refuse");
        let mut seen = vec![];
        while seen.len() < 3 {
            match rx.recv().unwrap() {
                Inbound::Deliver(b) => seen.extend(b.iter().map(|e| e.frame[0])),
                other => panic!("{other:?}"),
            }
            notifier.clear();
        }
        assert_eq!(&seen[..3], &[1, 2, 3]);
        q.close();
        assert!(matches!(
            q.publish(t, vec![env(0)]),
            Submit::Done(Err(QueueError::Closed))
        ));
        let mut drained = false;
        while let Ok(ev) = rx.recv() {
            if matches!(ev, Inbound::Drained) {
                drained = true;
                break;
            }
        }
        assert!(drained, "closing must end with Drained");
    }
}
