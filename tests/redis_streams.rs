//! The Redis history scripts (`src/queue/streams.rs`) against a real `redis-server`:
//! appends are published and kept in order, resumes read them back, and every way a
//! message can be missing answers `complete: false`.

mod common;
use common::*;

use wspush::history::Epoch;
use wspush::message::{Envelope, Rules, Target};
use wspush::queue::streams::{Streams, seq_of, stream_id};

fn connect(redis: &RedisServer) -> ::redis::Connection {
    ::redis::Client::open(format!("redis://127.0.0.1:{}", redis.port))
        .and_then(|c| c.get_connection())
        .expect("connect to redis-server")
}

fn env(target: Target, types: &str, expires: u64, msg: &str) -> Envelope {
    let frame = wspush::message::push_frame(types, &format!("{msg:?}"), "2019-12-12 12:12:12");
    Envelope {
        target,
        types: types.into(),
        expires,
        seq: 0,
        lane: Default::default(),
        frame,
    }
}

fn uids(list: &[&str]) -> Target {
    Target::Uids(list.iter().map(|u| Box::from(*u)).collect())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The `msg` of each replayed frame, and each frame's id.
fn msgs(batch: &[Envelope]) -> Vec<String> {
    batch
        .iter()
        .map(|e| {
            let v: serde_json::Value = serde_json::from_slice(e.push_json()).unwrap();
            assert_eq!(v["id"], format!("{}-{}", epoch_of(&v), e.seq));
            v["msg"].as_str().unwrap().to_string()
        })
        .collect()
}

fn epoch_of(v: &serde_json::Value) -> String {
    v["id"]
        .as_str()
        .unwrap()
        .split('-')
        .next()
        .unwrap()
        .to_string()
}

fn id(a: &wspush::queue::streams::Appended, i: usize) -> String {
    a.epoch.id(a.seqs[i])
}

#[test]
fn stream_ids_and_sequence_numbers_convert_both_ways() {
    for seq in [0, 1, 1023, 1024, 1_733_112_345_678 * 1024 + 5] {
        assert_eq!(seq_of(&stream_id(seq)), Some(seq));
    }
    assert_eq!(seq_of("5-1024"), None);
    assert_eq!(seq_of("x-1"), None);
}

#[test]
fn appends_publish_in_order_and_a_resume_merges_uid_and_all() {
    let redis = RedisServer::start();
    let mut con = connect(&redis);
    let mut sub = connect(&redis);
    let mut pubsub = sub.as_pubsub();
    pubsub.subscribe(&["t:all", "t:u:1", "t:u:2"]).unwrap();
    let s = Streams::new("t", 300, 100, 1000, Rules::default());
    let a = s
        .append(
            &mut con,
            &[
                env(uids(&["1"]), "notice", 0, "one"),
                env(Target::All, "notice", 0, "all"),
                env(uids(&["1", "2"]), "chat", 0, "both"),
                env(uids(&["2"]), "notice", 0, "two"),
            ],
            Epoch(0xbeef),
        )
        .unwrap();
    assert_eq!(a.epoch, Epoch(0xbeef));
    assert!(a.seqs.windows(2).all(|w| w[0] < w[1]), "{:?}", a.seqs);
    assert_eq!(a.receivers, 1);
    // Each message on its targets' channels: "both" once per uid.
    let on = [
        ("t:u:1", 0),
        ("t:all", 1),
        ("t:u:1", 2),
        ("t:u:2", 2),
        ("t:u:2", 3),
    ];
    for (channel, i) in on {
        let m = pubsub.get_message().unwrap();
        let payload: String = m.get_payload().unwrap();
        let want = format!("beef {} ", stream_id(a.seqs[i]));
        assert_eq!(m.get_channel_name(), channel);
        assert!(payload.starts_with(&want), "{payload} / {want}");
    }
    let r = s.read(&mut con, Some("1"), "0", 1000, now_ms()).unwrap();
    assert!(r.complete);
    assert_eq!(msgs(&r.batch), ["one", "all", "both"]);
    let r = s
        .read(&mut con, Some("1"), &id(&a, 0), 1000, now_ms())
        .unwrap();
    assert!(r.complete);
    assert_eq!(msgs(&r.batch), ["all", "both"]);
    let r = s.read(&mut con, None, "0", 1000, now_ms()).unwrap();
    assert_eq!(msgs(&r.batch), ["all"]);
    // A second append keeps the epoch Redis has, whatever the node proposes.
    let b = s
        .append(
            &mut con,
            &[env(uids(&["1"]), "notice", 0, "later")],
            Epoch(7),
        )
        .unwrap();
    assert_eq!(b.epoch, Epoch(0xbeef));
    assert!(b.seqs[0] > a.seqs[3]);
}

#[test]
fn expired_messages_are_not_replayed_and_are_not_missing() {
    let redis = RedisServer::start();
    let mut con = connect(&redis);
    let s = Streams::new("t", 300, 100, 1000, Rules::default());
    let past = now_ms() / 1000 - 1;
    let a = s
        .append(
            &mut con,
            &[
                env(uids(&["1"]), "notice", past, "gone"),
                env(uids(&["1"]), "notice", 0, "kept"),
            ],
            Epoch(1),
        )
        .unwrap();
    let r = s.read(&mut con, Some("1"), "0", 1000, now_ms()).unwrap();
    assert!(r.complete);
    assert_eq!(msgs(&r.batch), ["kept"]);
    let r = s
        .read(&mut con, Some("1"), &id(&a, 0), 1000, now_ms())
        .unwrap();
    assert!(r.complete);
}

#[test]
fn a_size_trim_makes_older_resumes_incomplete() {
    let redis = RedisServer::start();
    let mut con = connect(&redis);
    let s = Streams::new("t", 300, 2, 1000, Rules::default());
    let batch: Vec<Envelope> = (0..4)
        .map(|i| env(uids(&["1"]), "notice", 0, &format!("m{i}")))
        .collect();
    let a = s.append(&mut con, &batch, Epoch(1)).unwrap();
    let r = s
        .read(&mut con, Some("1"), &id(&a, 0), 1000, now_ms())
        .unwrap();
    assert!(!r.complete, "m1 was trimmed");
    assert_eq!(msgs(&r.batch), ["m2", "m3"]);
    let r = s
        .read(&mut con, Some("1"), &id(&a, 1), 1000, now_ms())
        .unwrap();
    assert!(r.complete);
    let r = s.read(&mut con, Some("1"), "0", 1000, now_ms()).unwrap();
    assert!(!r.complete, "trimmed while still within retention");
    let r = s.read(&mut con, Some("2"), "0", 1000, now_ms()).unwrap();
    assert!(r.complete);
    assert!(r.batch.is_empty());
}

#[test]
fn a_redis_that_lost_its_data_never_answers_complete_for_an_old_id() {
    let redis = RedisServer::start();
    let mut con = connect(&redis);
    let s = Streams::new("t", 300, 100, 1000, Rules::default());
    let a = s
        .append(&mut con, &[env(uids(&["1"]), "notice", 0, "m")], Epoch(1))
        .unwrap();
    let old = id(&a, 0);
    let _: () = ::redis::cmd("FLUSHALL").query(&mut con).unwrap();
    let r = s.read(&mut con, Some("1"), &old, 1000, now_ms()).unwrap();
    assert!(!r.complete, "no epoch: nothing known");
    s.append(&mut con, &[env(uids(&["1"]), "notice", 0, "new")], Epoch(2))
        .unwrap();
    let r = s.read(&mut con, Some("1"), &old, 1000, now_ms()).unwrap();
    assert!(!r.complete, "another epoch");
    assert_eq!(
        msgs(&r.batch),
        ["new"],
        "a foreign id replays everything retained"
    );
    // The script is loaded again after the flush (NOSCRIPT is handled).
    let _: () = ::redis::cmd("SCRIPT").arg("FLUSH").query(&mut con).unwrap();
    s.append(
        &mut con,
        &[env(uids(&["1"]), "notice", 0, "again")],
        Epoch(2),
    )
    .unwrap();
}

#[test]
fn an_expired_stream_is_complete_only_for_a_recent_id() {
    let redis = RedisServer::start();
    let mut con = connect(&redis);
    let s = Streams::new("t", 300, 100, 1000, Rules::default());
    let a = s
        .append(&mut con, &[env(uids(&["9"]), "notice", 0, "m")], Epoch(1))
        .unwrap();
    let _: () = ::redis::cmd("DEL")
        .arg(s.key(Some("9")))
        .query(&mut con)
        .unwrap();
    let recent = id(&a, 0);
    let r = s
        .read(&mut con, Some("9"), &recent, 1000, now_ms())
        .unwrap();
    assert!(
        r.complete,
        "a stream written after this id would still exist"
    );
    let r = s
        .read(&mut con, Some("9"), &recent, 1000, now_ms() + 301_000)
        .unwrap();
    assert!(
        !r.complete,
        "an id older than the retention may predate what expired"
    );
}

#[test]
fn a_read_cut_by_its_limit_is_incomplete() {
    let redis = RedisServer::start();
    let mut con = connect(&redis);
    let s = Streams::new("t", 300, 100, 1000, Rules::default());
    let batch: Vec<Envelope> = (0..5)
        .map(|i| env(uids(&["1"]), "notice", 0, &format!("m{i}")))
        .collect();
    s.append(&mut con, &batch, Epoch(1)).unwrap();
    let r = s.read(&mut con, Some("1"), "0", 3, now_ms()).unwrap();
    assert!(!r.complete);
    assert_eq!(r.batch.len(), 3);
}
