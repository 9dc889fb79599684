//! Across instances through Redis: every device of a user, on any instance and core, gets each
//! event exactly once; per-user routing keeps other users' traffic away; Redis outages and
//! garbage on the channels are survived.

mod common;

use std::time::Duration;

use common::*;
use switchboard::backplane::Routing;

#[test]
fn devices_on_two_instances_each_get_the_event_once() {
    let redis = TestRedis::start();
    let a = redis_server(&redis, Routing::PerUser);
    let b = redis_server(&redis, Routing::PerUser);
    assert_ne!(a.handle.node_id(), b.handle.node_id());
    // u1: four devices, two per instance (spread over cores by the kernel), u2 on A.
    let mut u1: Vec<Client> = (0..4)
        .map(|i| {
            if i % 2 == 0 {
                a.connect("u1")
            } else {
                b.connect("u1")
            }
        })
        .collect();
    let mut u2 = a.connect("u2");
    a.wait_channels(2);
    b.wait_channels(1);

    for n in 0..20 {
        u2.send_message("u1", &format!("m{n}"));
    }
    for dev in u1.iter_mut() {
        for n in 0..20 {
            let m = dev.recv_event("newMessage");
            assert_eq!(m["args"]["text"], format!("m{n}"), "in order, once");
            assert_eq!(m["args"]["from"], "u2");
        }
        dev.expect_silence(Duration::from_millis(200));
    }
    for n in 0..20 {
        assert_eq!(u2.recv_event("newMessage")["args"]["text"], format!("m{n}"));
    }
    u2.expect_silence(Duration::from_millis(100));
    // With history on, every device gets its frames through Redis (so that all agree on the
    // offsets), A's own devices included.
    assert!(b.bp_stat(|s| &s.delivered) >= 20);
    assert!(a.bp_stat(|s| &s.delivered) >= 40, "u1 and u2 on A");
    assert_eq!(a.bp_stat(|s| &s.ignored_own), 0);
}

#[test]
fn without_history_own_publications_are_skipped() {
    let redis = TestRedis::start();
    let a = redis_server_history(&redis, Routing::PerUser, Duration::from_millis(300), false);
    let b = redis_server_history(&redis, Routing::PerUser, Duration::from_millis(300), false);
    let mut u1_a = a.connect("u1");
    let mut u1_b = b.connect("u1");
    let mut u2 = a.connect("u2");
    a.wait_channels(2);
    b.wait_channels(1);
    for n in 0..20 {
        u2.send_message("u1", &format!("m{n}"));
    }
    for dev in [&mut u1_a, &mut u1_b] {
        for n in 0..20 {
            let m = dev.recv_event("newMessage");
            assert_eq!(m["args"]["text"], format!("m{n}"), "in order, once");
            assert!(m.get("offset").is_none(), "no history, no offsets: {m}");
        }
        dev.expect_silence(Duration::from_millis(200));
    }
    // B got u1's traffic from Redis; A's own publications came back and were skipped.
    assert!(b.bp_stat(|s| &s.delivered) >= 20);
    wait_for("A to see its own 40 publications", || {
        a.bp_stat(|s| &s.ignored_own) >= 40
    });
    assert_eq!(
        a.bp_stat(|s| &s.delivered),
        0,
        "A hosts u1 itself: nothing from Redis to deliver"
    );
}

#[test]
fn per_user_routing_keeps_unrelated_instances_quiet() {
    let redis = TestRedis::start();
    let a = redis_server(&redis, Routing::PerUser);
    let b = redis_server(&redis, Routing::PerUser);
    let c = redis_server(&redis, Routing::PerUser);
    let mut u1 = b.connect("u1");
    let mut u2 = a.connect("u2");
    let _u3 = c.connect("u3");
    a.wait_channels(1);
    b.wait_channels(1);
    c.wait_channels(1);
    for n in 0..50 {
        u2.send_message("u1", &format!("{n}"));
    }
    for _ in 0..50 {
        u1.recv_event("newMessage");
    }
    assert_eq!(b.bp_stat(|s| &s.received), 50);
    assert_eq!(
        c.bp_stat(|s| &s.received),
        0,
        "C hosts neither u1 nor u2: it receives none of it"
    );

    // When u1 leaves B, B unsubscribes.
    u1.close();
    b.wait_channels(0);
}

#[test]
fn without_history_a_redis_outage_keeps_local_delivery_and_resumes_with_the_backlog() {
    let mut redis = TestRedis::start();
    // A holds its backlog for 2 s after reconnecting; B re-subscribes within 300 ms of Redis
    // being back, even on a loaded machine. Local-first delivery is a history-off property:
    // with history on, offsets come from Redis (see the next test).
    let a = redis_server_history(&redis, Routing::PerUser, Duration::from_secs(2), false);
    let b = redis_server_history(&redis, Routing::PerUser, Duration::from_millis(300), false);
    let mut u1_a = a.connect("u1");
    let mut u1_b = b.connect("u1");
    let mut u2 = a.connect("u2");
    a.wait_channels(2);
    b.wait_channels(1);

    redis.kill();
    wait_for("A to notice the outage", || {
        a.bp_stat(|s| &s.subscriber_connected) == 0
    });
    // Same-instance delivery does not depend on Redis.
    for n in 0..5 {
        u2.send_message("u1", &format!("during {n}"));
    }
    for n in 0..5 {
        assert_eq!(
            u1_a.recv_event("newMessage")["args"]["text"],
            format!("during {n}")
        );
        assert_eq!(
            u2.recv_event("newMessage")["args"]["text"],
            format!("during {n}")
        );
    }
    u1_b.expect_silence(Duration::from_millis(300));
    assert!(a.handle.backplane().unwrap().queue_depth() + 5 > 0);

    redis.restart();
    wait_for("A and B to reconnect", || {
        a.bp_stat(|s| &s.subscriber_connected) == 1 && b.bp_stat(|s| &s.subscriber_connected) == 1
    });
    // What was queued during the outage reaches B, in order, then live traffic flows again.
    for n in 0..5 {
        assert_eq!(
            u1_b.recv_event("newMessage")["args"]["text"],
            format!("during {n}")
        );
    }
    b.wait_channels(1);
    u2.send_message("u1", "after");
    assert_eq!(u1_b.recv_event("newMessage")["args"]["text"], "after");
    assert_eq!(u1_a.recv_event("newMessage")["args"]["text"], "after");
    assert!(a.bp_stat(|s| &s.reconnects) >= 1);
}

#[test]
fn with_history_a_redis_outage_delays_delivery_and_loses_nothing() {
    let mut redis = TestRedis::start();
    let a = redis_server_with(&redis, Routing::PerUser, Duration::from_secs(1));
    let b = redis_server(&redis, Routing::PerUser);
    let mut u1_a = a.connect("u1");
    let mut u1_b = b.connect("u1");
    let mut u2 = a.connect("u2");
    a.wait_channels(2);
    b.wait_channels(1);

    redis.kill();
    wait_for("A to notice the outage", || {
        a.bp_stat(|s| &s.subscriber_connected) == 0
    });
    for n in 0..5 {
        u2.send_message("u1", &format!("during {n}"));
    }
    // No offset without Redis: nobody gets the events yet, not even on A.
    u1_a.expect_silence(Duration::from_millis(300));

    redis.restart();
    // Then every device gets them, in order, with the same offsets everywhere.
    let mut offsets = Vec::new();
    for dev in [&mut u1_a, &mut u1_b] {
        let mut seen = Vec::new();
        for n in 0..5 {
            let m = dev.recv_event("newMessage");
            assert_eq!(m["args"]["text"], format!("during {n}"));
            seen.push(m["offset"].as_str().unwrap().to_string());
        }
        offsets.push(seen);
    }
    assert_eq!(offsets[0], offsets[1]);
}

#[test]
fn garbage_on_the_channels_is_counted_and_skipped() {
    let redis = TestRedis::start();
    let a = redis_server(&redis, Routing::PerUser);
    let mut u1 = a.connect("u1");
    a.wait_channels(1);
    let mut r = redis.connection();
    let channel = "switchboard:u:u1";
    for garbage in [
        &b"not a payload"[..],
        b"zzzzzzzzzzzzzzzz {}",
        b"0000000000000001 [1]",
        b"0000000000000001 {\"event\":\xff}",
        b"",
    ] {
        let _: i64 = redis::cmd("PUBLISH")
            .arg(channel)
            .arg(garbage)
            .query(&mut r)
            .unwrap();
    }
    wait_for("5 invalid payloads", || a.bp_stat(|s| &s.invalid) == 5);
    u1.expect_silence(Duration::from_millis(200));
    // A well-formed foreign publication still arrives, and u1 is still connected.
    // (History on: the payload carries the offset, see backplane::wire.)
    let _: i64 = redis::cmd("PUBLISH")
        .arg(channel)
        .arg(r#"00000000000000ff 5-1 {"event":"notice","args":{"x":1},"offset":"5-1"}"#)
        .query(&mut r)
        .unwrap();
    assert_eq!(
        u1.recv_json(),
        serde_json::json!({"event": "notice", "args": {"x": 1}, "offset": "5-1"})
    );
    // So does one from an instance without history (a rolling upgrade): as sent, no offset.
    let _: i64 = redis::cmd("PUBLISH")
        .arg(channel)
        .arg(r#"00000000000000fe {"event":"old","args":2}"#)
        .query(&mut r)
        .unwrap();
    assert_eq!(
        u1.recv_json(),
        serde_json::json!({"event": "old", "args": 2})
    );
}

#[test]
fn seed_mode_speaks_the_original_wire_format() {
    let redis = TestRedis::start();
    let a = redis_server(&redis, Routing::Seed);
    let b = redis_server(&redis, Routing::Seed);
    let mut u1 = b.connect("u1");
    let mut u2 = a.connect("u2");
    a.wait_channels(1);
    b.wait_channels(1);

    // A listener with a plain Redis client sees exactly the seed's payload, one per target user.
    let mut listener = redis.connection();
    let mut pubsub = listener.as_pubsub();
    pubsub
        .psubscribe("message:outgoing_socket_message")
        .unwrap();
    pubsub.set_read_timeout(Some(DEADLINE)).unwrap();

    u2.send_message("u1", "hello seed");
    let m = u1.recv_event("newMessage");
    assert_eq!(m["args"]["text"], "hello seed");
    let mut seen = Vec::new();
    for _ in 0..2 {
        let msg = pubsub.get_message().unwrap();
        assert_eq!(msg.get_channel_name(), "message:outgoing_socket_message");
        let payload: String = msg.get_payload().unwrap();
        let v: serde_json::Value = serde_json::from_str(&payload).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            ["args", "event", "id"],
            "exactly event, id, args: {payload}"
        );
        assert!(
            payload.starts_with(r#"{"event":"newMessage","id":""#),
            "{payload}"
        );
        assert_eq!(v["args"], m["args"]);
        seen.push(v["id"].as_str().unwrap().to_string());
    }
    seen.sort();
    assert_eq!(seen, ["u1", "u2"]);

    // A plain client publishing the seed payload reaches u1's sockets (and nobody else's).
    let mut r = redis.connection();
    let _: i64 = redis::cmd("PUBLISH")
        .arg("message:outgoing_socket_message")
        .arg(r#"{"event":"newMessage","id":"u1","args":{"text":"from node"}}"#)
        .query(&mut r)
        .unwrap();
    assert_eq!(
        u1.recv_json(),
        serde_json::json!({"event": "newMessage", "args": {"text": "from node"}})
    );
    u2.recv_event("newMessage"); // u2's own copy of the first message
    u2.expect_silence(Duration::from_millis(200));
    u1.expect_silence(Duration::from_millis(100));
    assert_eq!(
        a.bp_stat(|s| &s.ignored_own) + b.bp_stat(|s| &s.ignored_own),
        2
    );
}

#[test]
fn a_subscriber_dropped_by_redis_for_its_output_buffer_recovers() {
    let redis = TestRedis::start();
    let a = redis_server(&redis, Routing::PerUser);
    let b = redis_server(&redis, Routing::PerUser);
    let mut u1 = b.connect("u1");
    let mut u2 = a.connect("u2");
    a.wait_channels(1);
    b.wait_channels(1);
    let mut r = redis.connection();
    // Redis disconnects any subscriber with more than 4 KiB waiting in its output buffer.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("client-output-buffer-limit")
        .arg("pubsub 4kb 4kb 0")
        .query(&mut r)
        .unwrap();
    let big = format!(
        r#"00000000000000ff {{"event":"big","args":"{}"}}"#,
        "x".repeat(64 * 1024)
    );
    let _: i64 = redis::cmd("PUBLISH")
        .arg("switchboard:u:u1")
        .arg(&big)
        .query(&mut r)
        .unwrap();
    wait_for("B to reconnect after being dropped", || {
        b.bp_stat(|s| &s.reconnects) >= 1
    });
    b.wait_channels(1);
    wait_for("B's subscriber to be ready", || {
        b.bp_stat(|s| &s.subscriber_connected) == 1
    });
    u2.send_message("u1", "after the drop");
    let m = u1.recv_event("newMessage");
    assert_eq!(m["args"]["text"], "after the drop");
}

#[test]
fn a_fresh_instance_is_ready_at_once_and_stays_connected() {
    let redis = TestRedis::start();
    let a = redis_server(&redis, Routing::PerUser);
    let start = std::time::Instant::now();
    wait_for("the subscriber to be ready", || {
        a.handle.backplane().unwrap().subscriber_ready()
    });
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "ready takes one PING round trip, not a keepalive period"
    );
    let health = a.health();
    assert_eq!(health["backplane"]["state"], "connected");
    assert_eq!(health["backplane"]["subscriber_ready"], true);
}
