//! Each core publishes on its own Redis connection (per-user routing on one Redis): a held ack
//! is answered by the core whose link Redis answered, without a trip through the bus; it still
//! waits for Redis (SIGKILLed, then back), and survives Redis losing its script cache. A link
//! with `--publish-pace` holds a burst into a few writes and loses or reorders none of it.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use switchboard::backplane::Routing;

fn send(c: &mut Client, to: &str, text: &str, ack: u64) {
    c.send_json(&json!({"event": "sendMessage", "args": {"to": to, "text": text}, "ack": ack}));
}

#[test]
fn held_acks_are_answered_by_the_core_without_the_bus() {
    for history in [true, false] {
        let redis = TestRedis::start();
        let server = redis_server_history(
            &redis,
            Routing::PerUser,
            Duration::from_millis(300),
            history,
        );
        let bp = server.handle.backplane().expect("backplane");
        assert!(
            bp.core_links(),
            "per-user routing on one Redis uses the cores' links"
        );
        let mut u1 = server.connect("u1");
        let mut u2 = server.connect("u2");
        wait_live(&mut u1, "u1");
        wait_live(&mut u2, "u2");
        let before = bp.stats.acked_inline.load(Relaxed);
        for n in 1..=5 {
            let result = u1.send_acked("u2", &format!("m{n}"), n);
            assert!(result["id"].is_string(), "history {history}: {result}");
        }
        // Every held ack was answered inline: the counter moves only there.
        assert_eq!(
            bp.stats.acked_inline.load(Relaxed) - before,
            5,
            "history {history}"
        );
        for n in 1..=5 {
            assert_eq!(u2.recv_event("newMessage")["args"]["text"], format!("m{n}"));
        }
        let health = server.health();
        assert_eq!(health["backplane"]["publisher_connected"], true, "{health}");
        assert_eq!(health["backplane"]["queue_depth"], 0, "{health}");
        assert!(bp.stats.published.load(Relaxed) >= 5);
    }
}

#[test]
fn an_ack_waits_for_a_sigkilled_redis_and_survives_a_lost_script_cache() {
    let mut redis = TestRedis::start();
    let server = redis_server(&redis, Routing::PerUser);
    let bp = server.handle.backplane().expect("backplane");
    let mut u1 = server.connect("u1");
    wait_live(&mut u1, "u1");

    // Redis forgets the append script: the link's NOSCRIPT reply reloads it and resends.
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query(&mut redis.connection())
        .unwrap();
    send(&mut u1, "u2", "after flush", 1);
    let v = answer(&mut u1, 1, Instant::now() + DEADLINE).expect("ack after SCRIPT FLUSH");
    assert_eq!(v["event"], "ack", "{v}");

    redis.kill();
    send(&mut u1, "u2", "during", 2);
    let early = answer(&mut u1, 2, Instant::now() + Duration::from_millis(1200));
    assert!(early.is_none(), "acked while Redis was down: {early:?}");
    let health = server.health();
    assert_eq!(
        health["backplane"]["publisher_connected"], false,
        "{health}"
    );
    assert!(
        bp.queue_depth() >= 1,
        "the publication waits in the core's link"
    );
    redis.restart();
    let v = answer(&mut u1, 2, Instant::now() + DEADLINE).expect("ack once Redis is back");
    assert_eq!(v["event"], "ack", "{v}");
    wait_for("the links report up", || bp.publisher_connected());
    assert!(bp.stats.reconnects.load(Relaxed) >= 1);
    assert!(bp.stats.publish_errors.load(Relaxed) >= 1);
    assert_eq!(bp.queue_depth(), 0);
}

#[test]
fn a_paced_link_delivers_stores_and_acks_a_burst_in_order() {
    let redis = TestRedis::start();
    let mut rc = switchboard::backplane::RedisConfig::new(redis.url());
    // Long enough that the burst below is held and written in a few paced writes.
    rc.publish_pace = Duration::from_millis(30);
    let server = TestServer::with_config(switchboard::Config {
        backplane: Some(rc),
        ..test_config()
    });
    let mut u1 = server.connect("u1");
    let mut u2 = server.connect("u2");
    wait_live(&mut u1, "u1");
    wait_live(&mut u2, "u2");
    for n in 1..=20 {
        send(&mut u1, "u2", &format!("m{n}"), n);
    }
    let deadline = Instant::now() + DEADLINE;
    let mut acks = Vec::new();
    while acks.len() < 20 {
        let Some(Ok(tungstenite::Message::Text(t))) = u1.next_message(deadline) else {
            panic!("only acks {acks:?}");
        };
        let v: serde_json::Value = serde_json::from_str(&t).expect("JSON");
        if v["event"] == "ack" || v["event"] == "error" {
            assert_eq!(v["event"], "ack", "{v}");
            acks.push(v["ack"].as_u64().expect("ack number"));
        }
    }
    assert_eq!(acks, (1..=20).collect::<Vec<_>>(), "every ack, in order");
    for n in 1..=20 {
        assert_eq!(u2.recv_event("newMessage")["args"]["text"], format!("m{n}"));
    }
    let stored: Vec<String> = history_texts(&mut u2, 99)
        .into_iter()
        .filter(|t| t != "probe")
        .collect();
    let sent: Vec<String> = (1..=20).map(|n| format!("m{n}")).collect();
    assert_eq!(stored, sent, "stored once each, in order");
}
