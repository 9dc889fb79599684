//! What one account can make the server store (issue 16, finding 1): embedded history has a
//! process-wide bound (`--history-max-total-bytes`), and each sender a budget of bytes stored
//! for others (`--sender-bytes-per-minute`), embedded and with Redis (tested against a
//! `maxmemory` Redis).

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use switchboard::backplane::Routing;
use switchboard::Config;

/// The ack number the flood's last message carries.
const LAST_ACK: u64 = 424_242;

/// Floods as finding 1 did: `count` messages of 60 KB from `attacker` to made-up ids, its own
/// copies read (and dropped) on another thread so it is never a slow consumer; returns once the
/// server answered the last one, a message to itself with an ack.
fn flood_made_up_ids(addr: std::net::SocketAddr, attacker: &str, count: usize) {
    let mut ws = RawWs::connect(addr, attacker);
    let mut reader = ws.stream.try_clone().unwrap();
    let answered = std::thread::spawn(move || {
        let marker = format!("\"ack\":{LAST_ACK}");
        let mut tail = Vec::new();
        let mut chunk = vec![0u8; 1 << 16];
        loop {
            let n = match reader.read(&mut chunk) {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            };
            tail.extend_from_slice(&chunk[..n]);
            if tail.windows(marker.len()).any(|w| w == marker.as_bytes()) {
                return true;
            }
            let keep = tail.len().saturating_sub(marker.len());
            tail.drain(..keep);
        }
    });
    let text = "x".repeat(60_000);
    for n in 0..count {
        let send =
            json!({"event": "sendMessage", "args": {"to": format!("made-up-{n}"), "text": text}});
        ws.send_text_bytes(send.to_string().as_bytes());
    }
    let last =
        json!({"event": "sendMessage", "args": {"to": attacker, "text": "end"}, "ack": LAST_ACK});
    ws.send_text_bytes(last.to_string().as_bytes());
    assert!(
        answered.join().unwrap(),
        "the flood's last message was answered"
    );
}

/// Sends `text` to `to` with an ack number and returns the answer (ack or error).
fn send_answered(c: &mut Client, to: &str, text: &str, ack: u64) -> Value {
    c.send_json(&json!({"event": "sendMessage", "args": {"to": to, "text": text}, "ack": ack}));
    answer(c, ack, Instant::now() + DEADLINE).expect("an answer")
}

#[test]
fn an_embedded_flood_to_made_up_ids_stays_within_the_total_bound() {
    const BOUND: u64 = 32 * 1024 * 1024;
    let server = ChildServer::spawn(&[
        "--history-max-total-bytes",
        &BOUND.to_string(),
        // The bound alone is under test here: no sender budget, no rate limit.
        "--sender-bytes-per-minute",
        "0",
        "--rate-limit",
        "0",
    ]);
    let mut friend = Client::connect(server.addr, "friend");
    let mut victim = Client::connect(server.addr, "victim");
    let mut first = None;
    for n in 0..20 {
        friend.send_acked("victim", &format!("before {n}"), n + 1);
        let event = victim.recv_event("newMessage");
        first.get_or_insert(event["offset"].as_str().expect("an offset").to_string());
    }
    let before_kib = server.rss_kib();

    // 180 MB of 60 KB messages (and as much again for the attacker's own history): over ten
    // times the bound. Without it the server grows by about 250 MiB.
    flood_made_up_ids(server.addr, "attacker", 3000);
    let after_kib = server.rss_kib();
    // The flood's buffers in flight and the allocator's own keep (the same flood with history
    // off grows the server by about 40 MiB; on a loaded machine, where the flood's buffers wait
    // longer, once 97 MiB with the bound). Without the bound the server grows by about 250 MiB.
    let margin_kib = 96 * 1024;
    assert!(
        after_kib <= before_kib + BOUND / 1024 + margin_kib,
        "RSS went from {before_kib} KiB to {after_kib} KiB with a bound of {} KiB",
        BOUND / 1024
    );
    let counted = metric(server.addr, "switchboard_history_bytes");
    assert!(counted <= BOUND, "{counted}");
    assert!(metric(server.addr, "switchboard_history_evicted_total") > 0);

    // A fresh connection: the first one sat unread through the flood (pings unanswered).
    drop(victim);
    let mut victim = Client::connect(server.addr, "victim");
    let texts = history_texts(&mut victim, 100);
    let expected: Vec<String> = (0..20).map(|n| format!("before {n}")).collect();
    assert_eq!(texts, expected, "the victim's history is intact");
    // A resume from before the victim's first event is complete: nothing of it was evicted.
    let (epoch, seq) = first.as_deref().unwrap().split_once('-').unwrap();
    let since = format!("{epoch}-{}", seq.parse::<u64>().unwrap() - 1);
    let url = format!("ws://{}/ws?token=victim&since={since}", server.addr);
    let mut resumed = Client::connect_url(&url, "victim");
    let recovered = resumed.recv_event("recovered");
    assert_eq!(recovered["args"]["complete"], true, "{recovered}");
}

fn budget_config(per_minute: u64) -> Config {
    let mut config = test_config();
    config.history.sender_bytes_per_minute = per_minute;
    config
}

#[test]
fn a_sender_past_its_budget_gets_quota_exceeded_and_nothing_is_stored() {
    let server = TestServer::with_config(budget_config(256 * 1024));
    let mut attacker = server.connect("attacker");
    let text = "x".repeat(60_000);
    // Four copies of about 60 KB fit in 256 KiB; the fifth does not.
    for n in 0..4 {
        let v = send_answered(&mut attacker, &format!("made-up-{n}"), &text, n + 1);
        assert_eq!(v["event"], "ack", "{v}");
    }
    let v = send_answered(&mut attacker, "made-up-4", &text, 5);
    assert_eq!(v["event"], "error", "{v}");
    assert_eq!(v["args"]["code"], "quota_exceeded", "{v}");

    let mut refused = server.connect("made-up-4");
    assert!(
        history_texts(&mut refused, 1).is_empty(),
        "nothing stored for the refused send"
    );
    let mut stored = server.connect("made-up-3");
    assert_eq!(history_texts(&mut stored, 1).len(), 1);
    // Its own history costs the sender nothing; other senders have their own budget.
    let v = send_answered(&mut attacker, "attacker", "note to self", 6);
    assert_eq!(v["event"], "ack", "{v}");
    let mut bob = server.connect("bob");
    let v = send_answered(&mut bob, "made-up-4", "hello", 1);
    assert_eq!(v["event"], "ack", "{v}");
    assert!(metric(server.addr, "switchboard_sends_over_budget_total") >= 1);
}

/// Redis's `used_memory` in bytes.
fn used_memory(redis: &TestRedis) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query(&mut redis.connection())
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

#[test]
fn with_redis_the_budget_stops_the_flood_before_maxmemory_and_others_are_served() {
    const MAXMEMORY: u64 = 24 * 1024 * 1024;
    let redis = TestRedis::start_with(&[
        "--maxmemory",
        &MAXMEMORY.to_string(),
        "--maxmemory-policy",
        "noeviction",
    ]);
    let mut rc = switchboard::backplane::RedisConfig::new(redis.url());
    rc.routing = Routing::PerUser;
    let mut config = budget_config(4 * 1024 * 1024);
    config.backplane = Some(rc);
    let server = TestServer::with_config(config);
    let mut attacker = server.connect("attacker");
    let mut alice = server.connect("alice");
    let mut bob = server.connect("bob");
    for (c, user) in [
        (&mut attacker, "attacker"),
        (&mut alice, "alice"),
        (&mut bob, "bob"),
    ] {
        wait_live(c, user);
    }

    // 400 messages of 60 KB (and the sender's own copies) would be twice Redis's maxmemory.
    let text = "x".repeat(60_000);
    let mut acked = 0;
    let refusal = (1..=400u64).find_map(|n| {
        let v = send_answered(&mut attacker, &format!("made-up-{n}"), &text, n);
        if v["event"] == "ack" {
            acked += 1;
            return None;
        }
        Some(v)
    });
    let refusal = refusal.expect("the budget refuses before 400 messages");
    assert_eq!(refusal["args"]["code"], "quota_exceeded", "{refusal}");
    assert!(
        acked >= 60,
        "4 MiB holds about 69 copies of 60 KB: {acked} acked"
    );
    let used = used_memory(&redis);
    assert!(used < MAXMEMORY, "Redis used {used} of {MAXMEMORY}");

    // Another user is unaffected: acknowledged, delivered, stored.
    let v = send_answered(&mut alice, "bob", "still served", 1);
    assert_eq!(v["event"], "ack", "{v}");
    assert_eq!(bob.recv_event("newMessage")["args"]["text"], "still served");

    // Redis full anyway (many senders, or other data): a prompt `unavailable`, not silence.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("1")
        .query(&mut redis.connection())
        .unwrap();
    let sent = Instant::now();
    let v = send_answered(&mut alice, "bob", "refused", 2);
    assert_eq!(v["args"]["code"], "unavailable", "{v}");
    assert!(
        sent.elapsed() < Duration::from_secs(3),
        "{:?}",
        sent.elapsed()
    );
}
