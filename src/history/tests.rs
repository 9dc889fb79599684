//! Unit tests of `history`, beside it (moved out to keep the module under 800 lines).

use super::*;

#[test]
fn offsets_parse_print_and_order_as_tuples() {
    let a: Offset = "1700000000000-2".parse().unwrap();
    assert_eq!(a, Offset(1_700_000_000_000, 2));
    assert_eq!(a.to_string(), "1700000000000-2");
    assert!(Offset(1, 10) > Offset(1, 9), "numeric, not lexical");
    assert!(Offset(2, 0) > Offset(1, 99));
    for bad in [
        "",
        "1",
        "1-",
        "-1",
        "a-1",
        "1-2-3",
        "1--2",
        "+1-2",
        "99999999999999999999-1",
    ] {
        assert_eq!(bad.parse::<Offset>(), Err(BadOffset), "{bad}");
    }
}

#[test]
fn offset_is_spliced_into_the_frame() {
    let f = with_offset(r#"{"event":"e","args":{"a":1}}"#, Offset(5, 7));
    let v: serde_json::Value = serde_json::from_str(f.as_str()).unwrap();
    assert_eq!(v["offset"], "5-7");
    assert_eq!(v["args"]["a"], 1);
}

fn store(max_len: usize) -> MemoryHistory {
    let cfg = HistoryConfig {
        max_len,
        max_age: Duration::from_secs(10),
        ..HistoryConfig::default()
    };
    MemoryHistory::new(&cfg, 42)
}

fn add(h: &MemoryHistory, user: &UserId, n: u64, now: u64) -> Offset {
    let mut got = None;
    h.append(
        user,
        &format!(r#"{{"event":"e","args":{n}}}"#),
        None,
        now,
        |d| got = Some(d.offset),
    );
    got.unwrap()
}

#[test]
fn a_resent_idempotency_key_is_stored_once_within_the_window() {
    let cfg = HistoryConfig {
        dedupe_window: Duration::from_secs(5),
        ..HistoryConfig::default()
    };
    let h = MemoryHistory::new(&cfg, 42);
    let (u, v): (UserId, UserId) = ("u".into(), "v".into());
    let mut delivered = 0;
    let frame = r#"{"event":"e","args":1}"#;
    let first = h.append(&u, frame, Some("a:1"), 1_000, |_| delivered += 1);
    let again = h.append(&u, frame, Some("a:1"), 2_000, |_| delivered += 1);
    assert_eq!((first, delivered), (again, 1), "the resend is recognised");
    // Another key, another user, or the same key past the window: stored anew.
    h.append(&u, frame, Some("a:2"), 2_000, |_| delivered += 1);
    h.append(&v, frame, Some("a:1"), 2_000, |_| delivered += 1);
    let late = h.append(&u, frame, Some("a:1"), 7_000, |_| delivered += 1);
    assert_eq!(delivered, 4);
    assert!(late > first);
    let replay = h.replay(&u, Some(Offset(42, 0)), 7_000);
    assert_eq!(replay.entries.len(), 3);
}

#[test]
fn ring_replays_after_since_and_knows_when_it_lost_some() {
    let h = store(3);
    let u: UserId = "u".into();
    let offs: Vec<Offset> = (0..5).map(|n| add(&h, &u, n, 1000)).collect();
    assert!(offs.windows(2).all(|w| w[0] < w[1]));
    let r = h.replay(&u, Some(offs[2]), 1000);
    assert!(r.complete);
    assert_eq!(r.entries.len(), 2);
    assert_eq!(r.entries[0].0, offs[3]);
    let r = h.replay(&u, Some(offs[0]), 1000);
    assert!(!r.complete, "offsets 2 was trimmed");
    assert_eq!(r.entries.len(), 3);
    assert!(!h.replay(&u, Some(Offset(41, 1)), 1000).complete, "epoch");
    assert!(!h.replay(&u, Some(Offset(42, 99)), 1000).complete, "future");
    assert!(h.replay(&u, Some(offs[4]), 1000).entries.is_empty());
    // Age: everything older than 10 s goes; only a client that had it all is complete.
    let r = h.replay(&u, Some(offs[3]), 20_000);
    assert!(!r.complete && r.entries.is_empty());
    assert!(h.replay(&u, Some(offs[4]), 20_000).complete);
    // Purged, the user is forgotten; later events continue the sequence (no old offset
    // names a new event), and only what the new ring cannot vouch for is incomplete.
    h.purge(20_000);
    assert!(h.shard(&u).rings.is_empty());
    let next = add(&h, &u, 9, 20_000);
    assert!(next > offs[4]);
    let r = h.replay(&u, Some(offs[4]), 20_000);
    assert!(r.complete && r.entries.len() == 1 && r.entries[0].0 == next);
    assert!(!h.replay(&u, Some(offs[3]), 20_000).complete);
}

#[test]
fn a_room_ring_keeps_one_copy_within_its_byte_bound() {
    let rooms = crate::config::rooms::RoomHistoryConfig {
        max_len: 100,
        max_age: Duration::from_secs(10),
        max_bytes: 200,
    };
    let h = MemoryHistory::for_rooms(&rooms, &HistoryConfig::default(), 42);
    let room: UserId = "general".into();
    let frame = format!(r#"{{"event":"e","args":"{}"}}"#, "x".repeat(40));
    let offs: Vec<Offset> = (0..5)
        .map(|_| h.append(&room, &frame, None, 1000, |_| {}))
        .collect();
    let kept = h.page(&room, None, 100, 1000);
    let bytes: usize = kept.iter().map(|(_, f)| f.len()).sum();
    assert!(
        bytes <= 200 && kept.len() == 2,
        "{} kept, {bytes} bytes",
        kept.len()
    );
    let v: serde_json::Value = serde_json::from_str(kept[0].1.as_str()).unwrap();
    assert_eq!(
        (&v["room"], &v["offset"]),
        (&"general".into(), &offs[4].to_string().into())
    );
    assert!(
        !h.replay(&room, Some(offs[1]), 1000).complete,
        "trimmed by bytes"
    );
    assert!(h.replay(&room, Some(offs[2]), 1000).complete);
    // A message bigger than the bound still stays (alone).
    let big = format!(r#"{{"event":"e","args":"{}"}}"#, "x".repeat(400));
    h.append(&room, &big, None, 1000, |_| {});
    assert_eq!(h.page(&room, None, 100, 1000).len(), 1);
}

#[test]
fn one_append_call_carries_every_users_keys() {
    let args = |cmd: &redis::Cmd| -> Vec<String> {
        cmd.args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => String::from_utf8_lossy(b).into_owned(),
                _ => "<other>".into(),
            })
            .collect()
    };
    let cfg = HistoryConfig {
        max_len: 7,
        max_age: Duration::from_secs(3),
        dedupe_window: Duration::from_secs(2),
        ..HistoryConfig::default()
    };
    let users = [("a", "p:u:a"), ("bb", "p:u:bb")];
    let plain = append_call("SHA", "p", 0xab, &cfg, "{}", None, &users);
    assert_eq!(
        args(&plain),
        [
            "EVALSHA",
            "SHA",
            "4",
            "p:h:a",
            "p:u:a",
            "p:h:bb",
            "p:u:bb",
            "00000000000000ab",
            "{}",
            "7",
            "3000"
        ]
    );
    let keyed = append_call("SHA", "p", 0xab, &cfg, "{}", Some("k"), &users);
    assert_eq!(
        args(&keyed),
        [
            "EVALSHA",
            "SHA",
            "6",
            "p:h:a",
            "p:u:a",
            "p:d:1:a:k",
            "p:h:bb",
            "p:u:bb",
            "p:d:2:bb:k",
            "00000000000000ab",
            "{}",
            "7",
            "3000",
            "2000"
        ]
    );
}

#[test]
fn the_sharded_script_publishes_on_the_shard() {
    let script = sharded_append_script();
    assert!(script.contains("redis.call('SPUBLISH',"));
    assert!(!script.contains("redis.call('PUBLISH',"));
}

#[test]
fn page_json_is_json() {
    let frames = [with_offset(r#"{"event":"e","args":1}"#, Offset(1, 2))];
    let v: serde_json::Value = serde_json::from_str(&page_json(&frames)).unwrap();
    assert_eq!(v["events"][0]["offset"], "1-2");
    let v: serde_json::Value =
        serde_json::from_str(encode_page_ack(Some(7), &frames, 4096).as_str()).unwrap();
    assert_eq!(v["ack"], 7);
    assert_eq!(v["args"]["events"][0]["args"], 1);
    assert_eq!(v["args"].get("more"), None);
    assert_eq!(page_json(&[]), r#"{"events":[]}"#);
    let v: serde_json::Value =
        serde_json::from_str(encode_page_ack(Some(7), &[], 10).as_str()).unwrap();
    assert_eq!(v["args"]["events"], serde_json::json!([]));
}

#[test]
fn a_page_over_the_bound_is_cut_newest_first_and_says_more() {
    let frames: Vec<Utf8Bytes> = (0..10)
        .map(|n| {
            with_offset(
                &format!(r#"{{"event":"e","args":"{}"}}"#, "x".repeat(100)),
                Offset(1, 10 - n),
            )
        })
        .collect();
    let whole = encode_page_ack(Some(1), &frames, 1 << 20);
    let cut = encode_page_ack(Some(1), &frames, whole.len() / 2);
    assert!(
        cut.len() <= whole.len() / 2,
        "{} > {}",
        cut.len(),
        whole.len() / 2
    );
    let v: serde_json::Value = serde_json::from_str(cut.as_str()).unwrap();
    let events = v["args"]["events"].as_array().unwrap();
    assert!(events.len() >= 3 && events.len() < 10, "{}", events.len());
    assert_eq!(events[0]["offset"], "1-10", "the newest first");
    assert_eq!(v["args"]["more"], true);
    // One event too large for the bound still goes out alone: the client can move on.
    let v: serde_json::Value =
        serde_json::from_str(encode_page_ack(None, &frames, 10).as_str()).unwrap();
    assert_eq!(v["args"]["events"].as_array().unwrap().len(), 1);
    assert_eq!(v["args"]["more"], true);
}

#[test]
fn pages_are_newest_first() {
    let h = store(10);
    let u: UserId = "u".into();
    let offs: Vec<Offset> = (0..5).map(|n| add(&h, &u, n, 1000)).collect();
    let p = h.page(&u, None, 2, 1000);
    assert_eq!(
        p.iter().map(|e| e.0).collect::<Vec<_>>(),
        [offs[4], offs[3]]
    );
    let p = h.page(&u, Some(offs[3]), 10, 1000);
    assert_eq!(p.len(), 3);
    assert_eq!(p[0].0, offs[2]);
}

#[test]
fn recovery_seam_has_no_gap_and_no_duplicate() {
    let o = |n| Offset(1, n);
    let f = |n: u64| Utf8Bytes::from(n.to_string());
    let rec = Recovering {
        since: Some(o(2)),
        buffered: vec![(o(4), f(4)), (o(5), f(5)), (o(6), f(6))],
        overflow: false,
        deadline: std::time::Instant::now(),
        again: false,
    };
    let replay = Replay {
        entries: vec![(o(3), f(3)), (o(4), f(4)), (o(5), f(5))],
        complete: true,
    };
    let (out, last) = finish_recovery(rec, replay, None, encode_recovered);
    let texts: Vec<&str> = out.iter().map(|t| t.as_str()).collect();
    assert_eq!(&texts[..4], ["3", "4", "5", "6"]);
    assert!(texts[4].contains(r#""complete":true,"offset":"1-6""#));
    assert_eq!(last, Some(o(6)));

    // A bogus `since` (far ahead) is incomplete and hides nothing that arrived live.
    let rec = Recovering {
        since: Some(o(99)),
        buffered: vec![(o(7), f(7))],
        overflow: false,
        deadline: std::time::Instant::now(),
        again: false,
    };
    let (out, last) = finish_recovery(rec, Replay::default(), None, encode_recovered);
    assert_eq!(out[0].as_str(), "7");
    assert!(out[1].contains(r#""complete":false,"offset":"1-7""#));
    assert_eq!(last, Some(o(7)));
}

fn bounded_store(max_total_bytes: usize) -> MemoryHistory {
    let cfg = HistoryConfig {
        max_total_bytes,
        ..HistoryConfig::default()
    };
    MemoryHistory::new(&cfg, 42)
}

fn add_big(h: &MemoryHistory, user: &UserId, bytes: usize) -> Offset {
    let frame = format!(r#"{{"event":"e","args":"{}"}}"#, "x".repeat(bytes));
    h.append(user, &frame, None, 1000, |_| {})
}

#[test]
fn the_total_bound_evicts_the_largest_rings_first_and_keeps_a_quiet_user() {
    let h = bounded_store(1024 * 1024);
    let quiet: UserId = "quiet".into();
    let first = add(&h, &quiet, 0, 1000);
    for n in 1..10 {
        add(&h, &quiet, n, 1000);
    }
    // 60 KB to made-up ids, 10 MB in all: ten times the bound.
    let flooded: Vec<UserId> = (0..40).map(|n| UserId::from(format!("u{n}"))).collect();
    let mut early = Vec::new();
    for round in 0..4 {
        for user in &flooded {
            let offset = add_big(&h, user, 60_000);
            if round == 0 {
                early.push((user.clone(), offset));
            }
            assert!(h.total_bytes() <= 1024 * 1024, "{}", h.total_bytes());
        }
    }
    assert!(h.evicted() > 0);
    let since = Offset(42, first.1 - 1);
    let replay = h.replay(&quiet, Some(since), 1000);
    assert!(replay.complete, "the quiet user's history is intact");
    assert_eq!(replay.entries.len(), 10);
    // The flood's first events went: a resume from before them says so, as a trim would.
    let evicted = early
        .iter()
        .filter(|(user, offset)| {
            !h.replay(user, Some(Offset(42, offset.1 - 1)), 1000)
                .complete
        })
        .count();
    assert!(evicted >= 30, "{evicted} of 40 early resumes incomplete");
    let (user, offset) = &early[0];
    let replay = h.replay(user, Some(Offset(42, offset.1 - 1)), 1000);
    assert!(replay.entries.iter().all(|(o, _)| o > offset));
}

#[test]
fn the_total_counts_what_trims_and_purges_free() {
    let cfg = HistoryConfig {
        max_len: 2,
        max_age: Duration::from_secs(10),
        ..HistoryConfig::default()
    };
    let h = MemoryHistory::new(&cfg, 42);
    let a: UserId = "a".into();
    add(&h, &a, 1, 1000);
    let one = h.total_bytes();
    assert!(one > 0);
    add(&h, &a, 2, 1000);
    add(&h, &a, 3, 1000);
    let two = h.total_bytes();
    assert!(
        two > one && two < 3 * one,
        "the length trim released the first"
    );
    h.purge(1000 + 20_000);
    assert_eq!(h.total_bytes(), 0, "an expired ring releases all it cost");
    assert_eq!(h.evicted(), 0, "trims are not evictions");
}

#[test]
fn a_flood_of_tiny_events_to_made_up_ids_is_bounded_too() {
    let h = bounded_store(1024 * 1024);
    for n in 0..20_000 {
        add(&h, &UserId::from(format!("made-up-{n}")), n, 1000);
    }
    assert!(h.total_bytes() <= 1024 * 1024);
    let rings: usize = h.shards.iter().map(|s| s.lock().unwrap().rings.len()).sum();
    assert!(rings < 20_000, "emptied rings are forgotten: {rings} left");
}
