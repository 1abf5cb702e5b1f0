//! Who is listening: the uid → connections index and each connection's type filter.
//!
//! The hub knows subscriptions, not sockets. Fan-out asks it for the receivers of an
//! envelope and writes the envelope's shared frame to each; no per-receiver encoding.

use std::collections::HashMap;
use std::sync::Arc;

use crate::message::{Envelope, Target};

/// A connection's type filter. `None` takes every type.
pub type TypeSet = Option<Box<[Box<str>]>>;

/// Builds a filter from a list; an empty list means every type.
pub fn type_set<I: IntoIterator<Item = S>, S: AsRef<str>>(types: I) -> TypeSet {
    let mut v: Vec<Box<str>> = types
        .into_iter()
        .filter_map(|t| {
            Some(t.as_ref().trim())
                .filter(|t| !t.is_empty())
                .map(Box::from)
        })
        .collect();
    v.sort_unstable();
    v.dedup();
    (!v.is_empty()).then(|| v.into_boxed_slice())
}

fn accepts(set: &TypeSet, types: &str) -> bool {
    match set {
        None => true,
        Some(list) => list.iter().any(|t| &**t == types),
    }
}

struct Member {
    uid: Option<Arc<str>>,
    types: TypeSet,
}

/// Subscriptions keyed by the connection's slab key (its `mio::Token`).
#[derive(Default)]
pub struct Hub {
    /// Indexed by slab key; slab keys are dense, so a vector beats a map here.
    members: Vec<Option<Member>>,
    by_uid: HashMap<Arc<str>, Vec<usize>>,
    count: usize,
}

impl Hub {
    pub fn join(&mut self, key: usize, uid: Option<&str>, types: TypeSet) {
        self.leave(key);
        if self.members.len() <= key {
            self.members.resize_with(key + 1, || None);
        }
        let uid: Option<Arc<str>> = uid.map(|u| match self.by_uid.get_key_value(u) {
            Some((shared, _)) => shared.clone(),
            None => Arc::from(u),
        });
        if let Some(u) = &uid {
            self.by_uid.entry(u.clone()).or_default().push(key);
        }
        self.members[key] = Some(Member { uid, types });
        self.count += 1;
    }

    pub fn leave(&mut self, key: usize) {
        let Some(member) = self.members.get_mut(key).and_then(Option::take) else {
            return;
        };
        self.count -= 1;
        if let Some(uid) = member.uid
            && let Some(keys) = self.by_uid.get_mut(&uid)
        {
            keys.retain(|k| *k != key);
            if keys.is_empty() {
                self.by_uid.remove(&uid);
            }
        }
        // Give memory back once the tail of the table empties (after a burst of connections).
        while matches!(self.members.last(), Some(None)) {
            self.members.pop();
        }
        if self.members.capacity() > 64 && self.members.len() < self.members.capacity() / 4 {
            self.members.shrink_to(self.members.len() * 2);
        }
    }

    pub fn subscribe(&mut self, key: usize, types: TypeSet) {
        if let Some(Some(m)) = self.members.get_mut(key) {
            m.types = types;
        }
    }

    /// Whether the connection's type filter takes `types` (for a replay, which
    /// does not go through `for_each_receiver`).
    pub fn accepts(&self, key: usize, types: &str) -> bool {
        self.members
            .get(key)
            .and_then(Option::as_ref)
            .is_some_and(|m| accepts(&m.types, types))
    }

    pub fn uid(&self, key: usize) -> Option<&str> {
        self.members.get(key)?.as_ref()?.uid.as_deref()
    }

    /// Push connections in the hub.
    pub fn connections(&self) -> usize {
        self.count
    }

    /// Distinct uids online.
    pub fn users(&self) -> usize {
        self.by_uid.len()
    }

    /// Calls `f` with the slab key of every connection that should receive `env`.
    pub fn for_each_receiver(&self, env: &Envelope, mut f: impl FnMut(usize)) {
        match &env.target {
            Target::All => {
                for (key, m) in self.members.iter().enumerate() {
                    if let Some(m) = m
                        && accepts(&m.types, &env.types)
                    {
                        f(key);
                    }
                }
            }
            Target::Uids(uids) => {
                for uid in uids {
                    for &key in self.by_uid.get(&**uid).into_iter().flatten() {
                        if let Some(Some(m)) = self.members.get(key)
                            && accepts(&m.types, &env.types)
                        {
                            f(key);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(target: Target, types: &str) -> Envelope {
        Envelope {
            target,
            types: types.into(),
            expires: 0,
            seq: 0,
            frame: Arc::from(&b"x"[..]),
        }
    }

    fn receivers(hub: &Hub, e: &Envelope) -> Vec<usize> {
        let mut v = vec![];
        hub.for_each_receiver(e, |k| v.push(k));
        v.sort();
        v
    }

    #[test]
    fn uids_types_and_broadcast() {
        let mut hub = Hub::default();
        hub.join(0, Some("1"), None);
        hub.join(1, Some("1"), type_set(["chat"]));
        hub.join(2, Some("2"), type_set(["notice", "chat"]));
        hub.join(5, None, None);
        assert_eq!((hub.connections(), hub.users()), (4, 2));

        assert_eq!(
            receivers(&hub, &env(Target::Uids(vec!["1".into()]), "notice")),
            vec![0]
        );
        assert_eq!(
            receivers(
                &hub,
                &env(Target::Uids(vec!["1".into(), "2".into()]), "chat")
            ),
            vec![0, 1, 2]
        );
        assert_eq!(
            receivers(&hub, &env(Target::Uids(vec!["9".into()]), "chat")),
            Vec::<usize>::new()
        );
        assert_eq!(receivers(&hub, &env(Target::All, "notice")), vec![0, 2, 5]);

        hub.subscribe(1, None);
        assert_eq!(
            receivers(&hub, &env(Target::Uids(vec!["1".into()]), "notice")),
            vec![0, 1]
        );
    }

    #[test]
    fn leaving_cleans_the_index() {
        let mut hub = Hub::default();
        hub.join(3, Some("a"), None);
        hub.join(4, Some("a"), None);
        hub.leave(3);
        assert_eq!(hub.users(), 1);
        hub.leave(4);
        hub.leave(4);
        assert_eq!((hub.connections(), hub.users()), (0, 0));
        assert!(hub.members.is_empty());
        assert_eq!(receivers(&hub, &env(Target::All, "x")), Vec::<usize>::new());
    }

    #[test]
    fn empty_type_list_means_every_type() {
        assert_eq!(type_set(Vec::<String>::new()), None);
        assert_eq!(type_set(["", " "]), None);
        assert_eq!(type_set(["b", "a", "b"]).unwrap().len(), 2);
    }
}
