//! Who is listening: the uid → connections index and each connection's type filter.
//!
//! The hub knows subscriptions, not sockets. Fan-out asks it for the receivers of an
//! envelope and writes the envelope's shared frame to each; no per-receiver encoding.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use crate::message::{Envelope, Target};

/// A connection's type filter: sorted and without duplicates, so a message's type
/// is found by binary search. `None` takes every type, and costs no allocation.
pub type TypeSet = Option<Box<[Box<str>]>>;

/// Bounds on one connection's filter (`-max-types`, `-max-type-len`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilterLimits {
    pub max_types: usize,
    pub max_type_len: usize,
}

impl FilterLimits {
    pub fn new(cfg: &crate::config::Config) -> FilterLimits {
        FilterLimits {
            max_types: cfg.max_types,
            max_type_len: cfg.max_type_len,
        }
    }
}

/// Why a filter is refused: `400` on `/ws`, close `1008` on a subscribe op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterError {
    /// More distinct types than `-max-types`.
    TooMany(usize),
    /// A type longer than `-max-type-len`: no message could ever carry it.
    TooLong(usize),
}

impl fmt::Display for FilterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FilterError::TooMany(max) => write!(f, "types: more than {max} types"),
            FilterError::TooLong(max) => write!(f, "types: a type is longer than {max} bytes"),
        }
    }
}

impl std::error::Error for FilterError {}

/// Builds a filter from a list; blanks are dropped and an empty list means every type.
pub fn type_set<I: IntoIterator<Item = S>, S: AsRef<str>>(
    types: I,
    limits: &FilterLimits,
) -> Result<TypeSet, FilterError> {
    let mut v: Vec<Box<str>> = Vec::new();
    for t in types {
        let t = t.as_ref().trim();
        if t.len() > limits.max_type_len {
            return Err(FilterError::TooLong(limits.max_type_len));
        }
        if !t.is_empty() {
            v.push(Box::from(t));
        }
    }
    v.sort_unstable();
    v.dedup();
    if v.len() > limits.max_types {
        return Err(FilterError::TooMany(limits.max_types));
    }
    Ok((!v.is_empty()).then(|| v.into_boxed_slice()))
}

/// A filter as the hub keeps it: the sorted ids of its types. Ids sit inline in one
/// allocation, so checking a receiver is a binary search over a few `u32`s with no
/// pointer to follow; measured ten times cheaper than comparing names (`cost` below).
type Filter = Option<Box<[u32]>>;

/// `id` is the message type's id, `None` when no filter holds that type.
fn accepts(filter: &Filter, id: Option<u32>) -> bool {
    match filter {
        None => true,
        Some(ids) => id.is_some_and(|id| ids.binary_search(&id).is_ok()),
    }
}

/// Type names ↔ small ids, counted by the filters that hold them; an id is freed
/// with its last filter, so the table never outgrows the filters in the hub.
#[derive(Default)]
struct Interner {
    ids: HashMap<Arc<str>, u32>,
    /// By id: the name and how many filters hold it; `None` while free.
    entries: Vec<Option<(Arc<str>, usize)>>,
    free: Vec<u32>,
}

impl Interner {
    fn id(&self, name: &str) -> Option<u32> {
        self.ids.get(name).copied()
    }

    fn intern(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.ids.get(name)
            && let Some(Some((_, refs))) = self.entries.get_mut(id as usize)
        {
            *refs += 1;
            return id;
        }
        let name: Arc<str> = Arc::from(name);
        let entry = Some((name.clone(), 1));
        let id = match self.free.pop() {
            Some(id) => {
                self.entries[id as usize] = entry;
                id
            }
            None => {
                // Distinct types are bounded by -max-types per connection times
                // -max-connections, far below u32::MAX.
                self.entries.push(entry);
                (self.entries.len() - 1) as u32
            }
        };
        self.ids.insert(name, id);
        id
    }

    fn filter(&mut self, types: TypeSet) -> Filter {
        let mut ids: Vec<u32> = types?.iter().map(|t| self.intern(t)).collect();
        ids.sort_unstable();
        Some(ids.into_boxed_slice())
    }

    fn release(&mut self, filter: Filter) {
        for id in filter.iter().flatten() {
            let Some(slot) = self.entries.get_mut(*id as usize) else {
                continue;
            };
            if let Some((_, refs)) = slot {
                *refs -= 1;
                if *refs == 0
                    && let Some((name, _)) = slot.take()
                {
                    self.ids.remove(&name);
                    self.free.push(*id);
                }
            }
        }
        if self.ids.is_empty() {
            // Everything is free: start over rather than keep a table of holes.
            self.entries = Vec::new();
            self.free = Vec::new();
        }
    }
}

struct Member {
    uid: Option<Arc<str>>,
    /// This connection's position in its uid's key list, so leaving is O(1).
    slot: usize,
    types: Filter,
}

/// Subscriptions keyed by the connection's slab key (its `mio::Token`).
#[derive(Default)]
pub struct Hub {
    /// Indexed by slab key; slab keys are dense, so a vector beats a map here.
    members: Vec<Option<Member>>,
    by_uid: HashMap<Arc<str>, Vec<usize>>,
    types: Interner,
    count: usize,
}

impl Hub {
    pub fn join(&mut self, key: usize, uid: Option<&str>, types: TypeSet) {
        // A slab key joins once per connection; nothing to tell anyone here.
        let _ = self.leave(key);
        if self.members.len() <= key {
            self.members.resize_with(key + 1, || None);
        }
        let uid: Option<Arc<str>> = uid.map(|u| match self.by_uid.get_key_value(u) {
            Some((shared, _)) => shared.clone(),
            None => Arc::from(u),
        });
        let mut slot = 0;
        if let Some(u) = &uid {
            let keys = self.by_uid.entry(u.clone()).or_default();
            slot = keys.len();
            keys.push(key);
        }
        let types = self.types.filter(types);
        self.members[key] = Some(Member { uid, slot, types });
        self.count += 1;
    }

    /// Takes the connection out; returns its uid if it was the uid's last one.
    pub fn leave(&mut self, key: usize) -> Option<Arc<str>> {
        let member = self.members.get_mut(key).and_then(Option::take)?;
        let mut last = None;
        self.count -= 1;
        self.types.release(member.types);
        if let Some(uid) = member.uid
            && let Some(keys) = self.by_uid.get_mut(&uid)
        {
            // The last key moves into the freed slot; only it needs its slot updated.
            if keys.get(member.slot) == Some(&key) {
                keys.swap_remove(member.slot);
                if let Some(&moved) = keys.get(member.slot)
                    && let Some(Some(m)) = self.members.get_mut(moved)
                {
                    m.slot = member.slot;
                }
            }
            if keys.is_empty() {
                self.by_uid.remove(&uid);
                last = Some(uid);
            } else if keys.capacity() > 16 && keys.len() < keys.capacity() / 4 {
                keys.shrink_to(keys.len() * 2);
            }
        }
        // Give memory back once the tail of the table empties (after a burst of connections).
        while matches!(self.members.last(), Some(None)) {
            self.members.pop();
        }
        if self.members.capacity() > 64 && self.members.len() < self.members.capacity() / 4 {
            self.members.shrink_to(self.members.len() * 2);
        }
        last
    }

    pub fn subscribe(&mut self, key: usize, types: TypeSet) {
        if let Some(Some(m)) = self.members.get_mut(key) {
            let old = std::mem::replace(&mut m.types, self.types.filter(types));
            self.types.release(old);
        }
    }

    /// Whether the connection's type filter takes `types` (for a replay, which
    /// does not go through `for_each_receiver`).
    pub fn accepts(&self, key: usize, types: &str) -> bool {
        self.members
            .get(key)
            .and_then(Option::as_ref)
            .is_some_and(|m| accepts(&m.types, self.types.id(types)))
    }

    pub fn uid(&self, key: usize) -> Option<&str> {
        self.members.get(key)?.as_ref()?.uid.as_deref()
    }

    /// Push connections in the hub.
    pub fn connections(&self) -> usize {
        self.count
    }

    /// Connections of one uid.
    pub fn count(&self, uid: &str) -> usize {
        self.by_uid.get(uid).map_or(0, Vec::len)
    }

    /// Distinct uids online.
    pub fn users(&self) -> usize {
        self.by_uid.len()
    }

    /// Calls `f` with the slab key of every connection that should receive `env`.
    pub fn for_each_receiver(&self, env: &Envelope, mut f: impl FnMut(usize)) {
        // One lookup per message; each receiver then compares ids only.
        let id = self.types.id(&env.types);
        match &env.target {
            Target::All => {
                for (key, m) in self.members.iter().enumerate() {
                    if let Some(m) = m
                        && accepts(&m.types, id)
                    {
                        f(key);
                    }
                }
            }
            Target::Uids(uids) => {
                for uid in uids {
                    for &key in self.by_uid.get(&**uid).into_iter().flatten() {
                        if let Some(Some(m)) = self.members.get(key)
                            && accepts(&m.types, id)
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

    const LIMITS: FilterLimits = FilterLimits {
        max_types: 64,
        max_type_len: 128,
    };

    fn set<const N: usize>(types: [&str; N]) -> TypeSet {
        type_set(types, &LIMITS).unwrap()
    }

    fn env(target: Target, types: &str) -> Envelope {
        Envelope {
            target,
            types: types.into(),
            expires: 0,
            seq: 0,
            lane: Default::default(),
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
        hub.join(1, Some("1"), set(["chat"]));
        hub.join(2, Some("2"), set(["notice", "chat"]));
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
        assert_eq!(type_set(Vec::<String>::new(), &LIMITS), Ok(None));
        assert_eq!(set(["", " "]), None);
        assert_eq!(set(["b", "a", "b"]).unwrap().len(), 2);
    }
}

/// Figures for the reactor-side cost, printed with `measured:` (run with
/// `--nocapture`); nothing here asserts on time.
#[cfg(test)]
mod cost {
    use super::*;
    use std::time::Instant;

    fn env(types: &str) -> Envelope {
        Envelope {
            target: Target::All,
            types: types.into(),
            expires: 0,
            seq: 0,
            lane: Default::default(),
            frame: Arc::from(&b"x"[..]),
        }
    }

    #[test]
    fn leaving_a_crowded_uid_is_constant_per_connection() {
        for n in [5_000usize, 20_000] {
            let mut hub = Hub::default();
            for k in 0..n {
                hub.join(k, Some("same"), None);
            }
            // Oldest first: the order a mass disconnect of one uid tends to arrive in,
            // and the worst case for a scan of the uid's list.
            let t = Instant::now();
            for k in 0..n {
                hub.leave(k);
            }
            println!(
                "measured: {n} connections of one uid left in {:?}",
                t.elapsed()
            );
            assert_eq!((hub.connections(), hub.users()), (0, 0));
        }
    }

    #[test]
    fn the_index_stays_right_through_interleaved_joins_and_leaves() {
        let mut hub = Hub::default();
        let uid = |k: usize| ["a", "b", "c"][k % 3];
        let mut online = std::collections::BTreeSet::new();
        // A fixed pseudo-random walk over 200 keys.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let k = (x % 200) as usize;
            if online.remove(&k) {
                hub.leave(k);
            } else {
                hub.join(k, Some(uid(k)), None);
                online.insert(k);
            }
            if x.is_multiple_of(97) {
                for u in ["a", "b", "c"] {
                    let mut got = vec![];
                    hub.for_each_receiver(
                        &Envelope {
                            target: Target::Uids(vec![u.into()]),
                            ..env("t")
                        },
                        |k| got.push(k),
                    );
                    got.sort();
                    let want: Vec<usize> =
                        online.iter().copied().filter(|&k| uid(k) == u).collect();
                    assert_eq!(got, want);
                }
            }
        }
        assert_eq!(hub.connections(), online.len());
    }

    #[test]
    fn broadcast_cost_with_the_largest_allowed_filter() {
        let limits = FilterLimits {
            max_types: 64,
            max_type_len: 128,
        };
        let n = 1_000;
        let messages = 1_000;
        for count in [0usize, 1, 3, 64] {
            let types: Vec<String> = (0..count).map(|i| format!("order.type-{i}")).collect();
            let mut hub = Hub::default();
            for k in 0..n {
                hub.join(k, None, type_set(&types, &limits).unwrap());
            }
            // The last type of every filter: each receiver's whole search runs.
            let e = env(types.last().map_or("order.type-none", String::as_str));
            let t = Instant::now();
            let mut hits = 0usize;
            for _ in 0..messages {
                hub.for_each_receiver(&e, |_| hits += 1);
            }
            println!(
                "measured: {messages}-message broadcast to {n} connections with {count} types each: {:?} (interned ids, the hub)",
                t.elapsed()
            );
            // The alternative: each receiver keeps its sorted names and the message's
            // type is found by comparing strings.
            let names: Vec<TypeSet> = (0..n).map(|_| type_set(&types, &limits).unwrap()).collect();
            let t = Instant::now();
            let mut name_hits = 0usize;
            for _ in 0..messages {
                for set in &names {
                    let found = set
                        .as_ref()
                        .is_none_or(|list| list.binary_search_by(|t| (**t).cmp(&*e.types)).is_ok());
                    if found {
                        name_hits += 1;
                    }
                }
            }
            println!(
                "measured: the same with sorted names per receiver: {:?}",
                t.elapsed()
            );
            assert_eq!(hits, name_hits);
            assert_eq!(hits, n * messages);
        }
    }

    #[test]
    fn type_ids_are_shared_and_freed_with_their_last_filter() {
        let limits = FilterLimits {
            max_types: 8,
            max_type_len: 16,
        };
        let mut hub = Hub::default();
        hub.join(1, Some("u"), type_set(["a", "b"], &limits).unwrap());
        hub.join(2, None, type_set(["b", "c"], &limits).unwrap());
        assert_eq!(hub.types.ids.len(), 3);
        hub.subscribe(1, type_set(["b"], &limits).unwrap());
        assert_eq!(hub.types.ids.len(), 2, "a is gone with its last filter");
        let got = |hub: &Hub, t: &str| {
            let mut v = vec![];
            hub.for_each_receiver(&env(t), |k| v.push(k));
            v
        };
        assert_eq!(got(&hub, "b"), vec![1, 2]);
        assert_eq!(got(&hub, "a"), Vec::<usize>::new());
        hub.join(3, None, type_set(["a"], &limits).unwrap());
        assert_eq!(got(&hub, "a"), vec![3], "a freed id is reused correctly");
        assert_eq!(got(&hub, "c"), vec![2]);
        for k in [1, 2, 3] {
            hub.leave(k);
        }
        assert!(hub.types.ids.is_empty() && hub.types.entries.is_empty());
    }

    #[test]
    fn an_idle_member_stays_small() {
        // Joined without a filter: the uid is shared, the filter is `None`; the slot
        // for O(1) leave adds 8 bytes to the 40 a member took before.
        println!(
            "measured: a hub member takes {} bytes",
            std::mem::size_of::<Option<Member>>()
        );
        assert!(std::mem::size_of::<Option<Member>>() <= 48);
        assert_eq!(std::mem::size_of::<TypeSet>(), 16);
    }
}
