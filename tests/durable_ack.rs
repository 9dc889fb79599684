//! Acknowledged means stored: with Redis, a `sendMessage` ack waits until Redis has taken the
//! message (appended it to the history), and a resend of an unacknowledged message with the same
//! `clientId` is stored and delivered once — embedded and through Redis.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use switchboard::backplane::Routing;
use switchboard::Config;

/// Sends `text` to `to` with `clientId` and an ack number (no waiting).
fn send_with_id(c: &mut Client, to: &str, text: &str, client_id: &str, ack: u64) {
    c.send_json(&json!({
        "event": "sendMessage",
        "args": {"to": to, "text": text, "clientId": client_id},
        "ack": ack,
    }));
}

#[test]
fn redis_ack_waits_for_redis_and_a_resend_is_stored_once() {
    let mut redis = TestRedis::start();
    let server = redis_server(&redis, Routing::PerUser);
    let mut u1 = server.connect("u1");
    let mut u2 = server.connect("u2");
    wait_live(&mut u1, "u1");
    wait_live(&mut u2, "u2");

    send_with_id(&mut u1, "u2", "before", "m-0", 1);
    let v = answer(&mut u1, 1, Instant::now() + DEADLINE).expect("ack with Redis up");
    assert_eq!(v["event"], "ack", "{v}");

    // Redis down: the message cannot be stored, so it is not acknowledged...
    redis.kill();
    send_with_id(&mut u1, "u2", "during", "m-1", 2);
    let early = answer(&mut u1, 2, Instant::now() + Duration::from_millis(1500));
    assert!(early.is_none(), "acked while Redis was down: {early:?}");
    // ...until Redis is back and the publisher's retry stored it.
    redis.restart();
    let v = answer(&mut u1, 2, Instant::now() + DEADLINE).expect("ack once Redis is back");
    assert_eq!(v["event"], "ack", "{v}");

    // The client never saw that ack (say its connection dropped): it sends again, same clientId.
    send_with_id(&mut u1, "u2", "during", "m-1", 3);
    let v = answer(&mut u1, 3, Instant::now() + DEADLINE).expect("ack of the resend");
    assert_eq!(v["event"], "ack", "{v}");
    // A new clientId is a new message.
    send_with_id(&mut u1, "u2", "after", "m-2", 4);
    assert_eq!(
        answer(&mut u1, 4, Instant::now() + DEADLINE).unwrap()["event"],
        "ack"
    );

    // Delivered live once: u2's device sees "during" exactly once before "after".
    let mut seen = Vec::new();
    loop {
        let m = u2.recv_event("newMessage");
        let text = m["args"]["text"].as_str().unwrap_or_default().to_string();
        if text == "after" {
            break;
        }
        seen.push(text);
    }
    assert_eq!(
        seen.iter().filter(|t| *t == "during").count(),
        1,
        "live: {seen:?}"
    );
    // And stored once for each of the two users (the restarted Redis kept nothing from before).
    assert_eq!(history_texts(&mut u2, 10), ["during", "after"]);
    assert_eq!(history_texts(&mut u1, 11), ["during", "after"]);
}

#[test]
fn embedded_resend_with_the_same_client_id_is_delivered_once() {
    let server = TestServer::with_config(Config { ..test_config() });
    let mut u1 = server.connect("u1");
    let mut u2 = server.connect("u2");
    for ack in [1, 2] {
        send_with_id(&mut u1, "u2", "hello", "same-id", ack);
        let v = answer(&mut u1, ack, Instant::now() + DEADLINE).expect("ack");
        assert_eq!(v["event"], "ack", "{v}");
    }
    send_with_id(&mut u1, "u2", "next", "other-id", 3);
    answer(&mut u1, 3, Instant::now() + DEADLINE).expect("ack");
    assert_eq!(u2.recv_event("newMessage")["args"]["text"], "hello");
    assert_eq!(u2.recv_event("newMessage")["args"]["text"], "next");
    assert_eq!(history_texts(&mut u2, 4), ["hello", "next"]);
}

#[test]
fn a_publication_dropped_from_a_full_queue_is_answered_unavailable() {
    let mut redis = TestRedis::start();
    let mut rc = switchboard::backplane::RedisConfig::new(redis.url());
    rc.reconnect_max = Duration::from_millis(300);
    rc.publish_queue = 2;
    let server = TestServer::with_config(Config {
        backplane: Some(rc),
        ..test_config()
    });
    let mut u1 = server.connect("u1");
    wait_live(&mut u1, "u1");
    redis.kill();
    // Each message to u2 is two publications (u2 and u1); the publisher holds what it took for
    // a retry and the queue holds two more: of six messages, some must be pushed out.
    for i in 0..6u64 {
        send_with_id(&mut u1, "u2", &format!("m{i}"), &format!("id-{i}"), 10 + i);
    }
    redis.restart();
    // Answers come in any order (a refusal at once, acks after the restart).
    let mut answers = std::collections::BTreeMap::new();
    let deadline = Instant::now() + DEADLINE;
    while answers.len() < 6 {
        let v = match u1.next_message(deadline) {
            Some(Ok(tungstenite::Message::Text(t))) => serde_json::from_str::<Value>(&t).unwrap(),
            Some(Ok(_)) => continue,
            other => panic!("only {answers:?} answered: {other:?}"),
        };
        if let Some(n) = v["ack"].as_u64().filter(|n| (10..16).contains(n)) {
            answers.insert(n, v);
        }
    }
    let (mut stored, mut refused) = (Vec::new(), 0);
    for (n, v) in answers {
        let i = n - 10;
        match v["event"].as_str() {
            Some("ack") => stored.push(format!("m{i}")),
            _ => {
                assert_eq!(v["args"]["code"], "unavailable", "{v}");
                refused += 1;
            }
        }
    }
    assert!(refused > 0, "six messages fit a queue of two");
    // What was acknowledged is exactly what Redis kept; what was refused is not there.
    let kept: Vec<String> = history_texts(&mut u1, 20)
        .into_iter()
        .filter(|t| t != "probe")
        .collect();
    assert_eq!(kept, stored);
}

/// Redis out of memory (`maxmemory` with `noeviction`) answers the append with `OOM`: the
/// sender hears `unavailable` at once (no retry loop, nothing acknowledged), `/readyz` says the
/// backplane cannot write; once Redis takes writes again, the next send is acked and delivered
/// and `/readyz` is 200.
#[test]
fn redis_out_of_memory_refuses_sends_promptly_and_readiness_says_so() {
    let redis = TestRedis::start();
    let server = redis_server(&redis, Routing::PerUser);
    let mut u1 = server.connect("u1");
    let mut u2 = server.connect("u2");
    wait_live(&mut u1, "u1");
    wait_live(&mut u2, "u2");
    assert_eq!(http_get(server.addr, "/readyz").0, 200);

    let mut conn = redis.connection();
    set_maxmemory(&mut conn, 1);
    let sent = Instant::now();
    send_with_id(&mut u1, "u2", "refused", "oom-1", 1);
    let v = answer(&mut u1, 1, Instant::now() + DEADLINE).expect("an answer while OOM");
    assert_eq!(v["event"], "error", "{v}");
    assert_eq!(v["args"]["code"], "unavailable", "{v}");
    assert!(
        sent.elapsed() < Duration::from_secs(3),
        "{:?}",
        sent.elapsed()
    );
    let (status, body) = http_get(server.addr, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("refuses writes"), "{body}");

    set_maxmemory(&mut conn, 0);
    send_with_id(&mut u1, "u2", "taken", "oom-2", 2);
    let v = answer(&mut u1, 2, Instant::now() + DEADLINE).expect("ack once Redis takes writes");
    assert_eq!(v["event"], "ack", "{v}");
    assert_eq!(u2.recv_event("newMessage")["args"]["text"], "taken");
    // Each core's link reports after its turn: ready again within a deadline.
    let deadline = Instant::now() + DEADLINE;
    while http_get(server.addr, "/readyz").0 != 200 {
        assert!(
            Instant::now() < deadline,
            "still not ready after a taken write"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let stored = history_texts(&mut u2, 3);
    assert!(!stored.iter().any(|t| t == "refused"), "{stored:?}");
    assert_eq!(
        stored.last().map(String::as_str),
        Some("taken"),
        "{stored:?}"
    );
}
