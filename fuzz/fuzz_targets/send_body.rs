//! The `/send` body parser on arbitrary bytes.
//!
//! Input: 1 header byte (the batch limit, 1..=8), then the body.
//!
//! Invariants for an accepted body:
//! - the batch has 1..=limit messages, one per element;
//! - each frame is one final, unmasked text frame whose length field matches;
//! - its payload is valid JSON `{"types","msg","time"}` whose `msg` is the body's
//!   `msg` copied byte for byte;
//! - uid targets are non-empty, sorted, without duplicates;
//! - types have no surrounding whitespace;
//! - the batch crosses the wire: another node with the same rules accepts it whole.
#![no_main]

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;
use wspush::message::{
    Clock, Envelope, MAX_TYPES_LEN, MAX_UID_LEN, Rules, Target, decode_wire, encode_wire,
    parse_send,
};

static CLOCK: LazyLock<Mutex<Clock>> = LazyLock::new(|| Mutex::new(Clock::default()));

fuzz_target!(|data: &[u8]| {
    let Some((&head, body)) = data.split_first() else {
        return;
    };
    let max_batch = usize::from(head % 8) + 1;
    let mut clock = CLOCK.lock().unwrap();
    let rules = Rules {
        max_batch,
        ..Rules::default()
    };
    let Ok(batch) = parse_send(body, &rules, &mut clock) else {
        return;
    };
    assert!(!batch.is_empty() && batch.len() <= max_batch);
    let back = decode_wire(&encode_wire(&batch), &rules).expect("the wire takes what /send took");
    assert_eq!(back.len(), batch.len());

    let root: &RawValue = serde_json::from_slice(body).expect("accepted body is JSON");
    let items: Vec<&RawValue> = if root.get().starts_with('[') {
        serde_json::from_str(root.get()).expect("accepted batch is an array")
    } else {
        vec![root]
    };
    assert_eq!(items.len(), batch.len());
    for (env, item) in batch.iter().zip(items) {
        let fields: HashMap<String, &RawValue> =
            serde_json::from_str(item.get()).expect("accepted element is an object");
        check(env, fields["msg"].get());
    }
});

fn check(env: &Envelope, msg: &str) {
    let frame = &env.frame[..];
    assert_eq!(frame[0], 0x81, "FIN + text");
    let (len, start) = match frame[1] {
        126 => (usize::from(u16::from_be_bytes([frame[2], frame[3]])), 4),
        127 => (
            usize::try_from(u64::from_be_bytes(frame[2..10].try_into().unwrap())).unwrap(),
            10,
        ),
        short => (usize::from(short), 2),
    };
    assert!(frame[1] & 0x80 == 0, "server frames are not masked");
    let payload = &frame[start..];
    assert_eq!(payload.len(), len, "length field");

    // Fields stay raw: numbers out of f64 range are still JSON and passed through.
    let fields: HashMap<String, &RawValue> =
        serde_json::from_slice(payload).expect("push payload is a JSON object");
    assert_eq!(fields.len(), 3);
    assert_eq!(fields["msg"].get(), msg, "msg not copied verbatim");
    let types: String = serde_json::from_str(fields["types"].get()).expect("types is a string");
    assert_eq!(types, &*env.types);
    let _: String = serde_json::from_str(fields["time"].get()).expect("time is a string");
    let needle = format!(",\"msg\":{msg},\"time\":");
    assert!(
        payload
            .windows(needle.len())
            .any(|w| w == needle.as_bytes()),
        "msg not in place"
    );

    assert!(!env.types.is_empty() && env.types.len() <= MAX_TYPES_LEN);
    assert!(!env.types.contains(','));
    assert_eq!(env.types.trim(), &*env.types);
    if let Target::Uids(uids) = &env.target {
        assert!(!uids.is_empty());
        assert!(
            uids.windows(2).all(|w| w[0] < w[1]),
            "sorted, no duplicates"
        );
        assert!(uids.iter().all(|u| !u.is_empty() && u.len() <= MAX_UID_LEN));
    }
}
