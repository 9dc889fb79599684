//! Presence and the device limit: `presence` lists the members with a live connection anywhere;
//! members hear `presenceChanged` when a member's first device connects and last disconnects,
//! across instances, also when an instance is killed with SIGKILL (its heartbeat expires); at
//! `--max-devices` the newest connection wins, cluster-wide: the oldest is closed with 4009,
//! or simply dropped when its instance is dead.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use switchboard::backplane::RedisConfig;
use switchboard::rooms::RoomsConfig;
use switchboard::Config;

fn rooms_config(ttl: Duration, max_devices: u32) -> RoomsConfig {
    RoomsConfig {
        presence_ttl: ttl,
        max_devices,
        ..RoomsConfig::default()
    }
}

fn presence_server(redis: &TestRedis, ttl: Duration, max_devices: u32) -> TestServer {
    let mut rc = RedisConfig::new(redis.url());
    rc.reconnect_max = Duration::from_millis(300);
    TestServer::with_config(Config {
        backplane: Some(rc),
        rooms: rooms_config(ttl, max_devices),
        ..test_config()
    })
}

/// The binary as a child process on `redis` (so a test can SIGKILL it), with `extra` flags.
fn child_on(redis: &TestRedis, extra: &[&str]) -> ChildServer {
    let url = redis.url();
    let mut args = vec!["--backplane", "redis", "--redis-url", &url];
    args.extend_from_slice(extra);
    ChildServer::spawn(&args)
}

fn join(c: &mut Client, room: &str) {
    request_ok(c, "joinRoom", json!({ "room": room }), 1);
}

/// No `presenceChanged` within `wait`.
fn expect_no_presence(c: &mut Client, wait: Duration) {
    let deadline = Instant::now() + wait;
    while let Some(m) = c.next_message(deadline) {
        if let Ok(tungstenite::Message::Text(t)) = m {
            let v: Value = serde_json::from_str(&t).unwrap();
            assert_ne!(v["event"], "presenceChanged", "{}: unexpected {v}", c.user);
        }
    }
}

/// The user's counted connections, per Redis.
fn counted(redis: &TestRedis, user: &str) -> i64 {
    let mut r = redis.connection();
    let counts: Vec<i64> = redis::cmd("HVALS")
        .arg(format!("{{switchboard:u:{user}}}:p"))
        .query(&mut r)
        .unwrap();
    counts.iter().sum()
}

#[test]
fn embedded_presence_and_changes() {
    let server = TestServer::with_config(Config {
        rooms: rooms_config(Duration::from_secs(30), 0),
        ..test_config()
    });
    let mut a = server.connect("a");
    let mut b = server.connect("b");
    join(&mut a, "x");
    join(&mut b, "x");
    assert_eq!(presence_online(&mut a, "x"), ["a", "b"]);
    let b2 = server.connect("b");
    expect_no_presence(&mut a, Duration::from_millis(200));
    b.close();
    expect_no_presence(&mut a, Duration::from_millis(200));
    b2.close();
    expect_presence(&mut a, "x", "b", false);
    assert_eq!(presence_online(&mut a, "x"), ["a"]);
    let _b = server.connect("b");
    expect_presence(&mut a, "x", "b", true);
    assert_eq!(presence_online(&mut a, "x"), ["a", "b"]);
}

#[test]
fn embedded_device_limit() {
    let server = TestServer::with_config(Config {
        rooms: rooms_config(Duration::from_secs(30), 2),
        ..test_config()
    });
    // A round trip on each device proves its core finished the upgrade, counting included
    // (the 101 is written just before): the third device then finds two counted.
    let mut d1 = server.connect("u1");
    let mut d2 = server.connect("u1");
    for d in [&mut d1, &mut d2] {
        let answer = request(d, "roundTrip", json!(null), 1);
        assert_eq!(answer["args"]["code"], "unknown_event");
    }
    let mut d3 = server.connect("u1");
    assert_eq!(d3.expect_close(), 4009);
    let _other = server.connect("u2");
    d2.close();
    let mut d4 = server.connect("u1");
    d4.send_message("u1", "still open");
    assert_eq!(d4.recv_event("newMessage")["args"]["text"], "still open");
}

#[test]
fn presence_changes_across_instances() {
    let redis = TestRedis::start();
    let a = presence_server(&redis, Duration::from_secs(30), 0);
    let b = presence_server(&redis, Duration::from_secs(30), 0);
    let mut alice = a.connect("alice");
    let mut bob_b = b.connect("bob");
    join(&mut alice, "x");
    join(&mut bob_b, "x");
    assert_eq!(presence_online(&mut alice, "x"), ["alice", "bob"]);
    // A second device on the other instance: bob stays online when one of them goes.
    let bob_a = a.connect("bob");
    wait_for("bob's two devices to count", || counted(&redis, "bob") == 2);
    bob_b.close();
    expect_no_presence(&mut alice, Duration::from_millis(300));
    bob_a.close();
    expect_presence(&mut alice, "x", "bob", false);
    assert_eq!(presence_online(&mut alice, "x"), ["alice"]);
    let mut bob_b = b.connect("bob");
    expect_presence(&mut alice, "x", "bob", true);
    assert_eq!(presence_online(&mut bob_b, "x"), ["alice", "bob"]);
}

#[test]
fn a_stopped_instance_says_goodbye() {
    let redis = TestRedis::start();
    let a = presence_server(&redis, Duration::from_secs(30), 0);
    let b = presence_server(&redis, Duration::from_secs(30), 0);
    let mut alice = a.connect("alice");
    let mut bob = b.connect("bob");
    join(&mut alice, "x");
    join(&mut bob, "x");
    assert_eq!(presence_online(&mut alice, "x"), ["alice", "bob"]);
    let started = Instant::now();
    drop(bob);
    drop(b);
    // Not after the 30 s TTL: at once.
    expect_presence(&mut alice, "x", "bob", false);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(counted(&redis, "bob"), 0);
}

#[test]
fn users_of_an_instance_killed_with_sigkill_go_offline_after_the_ttl() {
    let redis = TestRedis::start();
    let a = presence_server(&redis, Duration::from_secs(2), 0);
    let doomed = child_on(&redis, &["--presence-ttl", "2s"]);
    let mut alice = a.connect("alice");
    let mut bob = Client::connect(doomed.addr, "bob");
    join(&mut alice, "x");
    join(&mut bob, "x");
    assert_eq!(presence_online(&mut alice, "x"), ["alice", "bob"]);
    let killed = Instant::now();
    doomed.signal(9);
    expect_presence(&mut alice, "x", "bob", false);
    let after = killed.elapsed();
    assert!(
        after >= Duration::from_millis(1500),
        "offline only once the heartbeat expired, not {after:?} after the kill"
    );
    assert_eq!(presence_online(&mut alice, "x"), ["alice"]);
    assert_eq!(
        counted(&redis, "bob"),
        0,
        "the dead instance's count is gone"
    );
    drop(doomed);
}

/// The user's devices under `--max-devices`, per Redis, oldest first.
fn devices(redis: &TestRedis, user: &str) -> Vec<String> {
    let mut r = redis.connection();
    redis::cmd("ZRANGE")
        .arg(format!("{{switchboard:u:{user}}}:dev"))
        .arg(0)
        .arg(-1)
        .query(&mut r)
        .unwrap()
}

/// A round trip through Redis: the device is open and admitted. (Messages another device of
/// the user sent to the user before are skipped.)
fn round_trip(d: &mut Client, text: &str) {
    let user = d.user.clone();
    d.send_message(&user, text);
    while d.recv_event("newMessage")["args"]["text"] != text {}
}

#[test]
fn device_limit_across_instances() {
    let redis = TestRedis::start();
    let a = presence_server(&redis, Duration::from_secs(30), 2);
    let b = presence_server(&redis, Duration::from_secs(30), 2);
    let mut d1 = a.connect("u1");
    wait_for("the first device to count", || {
        devices(&redis, "u1").len() == 1
    });
    let mut d2 = b.connect("u1");
    wait_for("the second device to count", || {
        devices(&redis, "u1").len() == 2
    });
    let (first, second) = {
        let set = devices(&redis, "u1");
        (set[0].clone(), set[1].clone())
    };
    // Newest wins: a third device is admitted and the oldest closes, on the other instance.
    let mut d3 = b.connect("u1");
    assert_eq!(d1.expect_close(), 4009, "the oldest device makes room");
    wait_for("the third device to count", || {
        let set = devices(&redis, "u1");
        set.len() == 2 && set[0] == second && set[1] != first
    });
    round_trip(&mut d3, "third");
    let mut d4 = a.connect("u1");
    assert_eq!(d2.expect_close(), 4009);
    wait_for("u1's devices: the third and the fourth", || {
        counted(&redis, "u1") == 2 && devices(&redis, "u1").len() == 2
    });
    round_trip(&mut d4, "fourth");
    round_trip(&mut d3, "third again");
    // Other users are not affected.
    let mut u2 = a.connect("u2");
    wait_for("u2 to count", || counted(&redis, "u2") == 1);
    round_trip(&mut u2, "other");
    // A device leaving makes room for another: nobody is closed.
    d3.close();
    wait_for("the third device to be uncounted", || {
        devices(&redis, "u1").len() == 1 && counted(&redis, "u1") == 1
    });
    let mut d5 = b.connect("u1");
    wait_for("the new device to count", || {
        devices(&redis, "u1").len() == 2
    });
    round_trip(&mut d5, "fifth");
    round_trip(&mut d4, "fourth again");
    for (server, name) in [(&a, "A"), (&b, "B")] {
        assert_eq!(
            metric(server.addr, &closed_metric("device_limit")),
            1,
            "one device displaced on {name}"
        );
    }
}

/// Issue 16 (7): a device on an instance killed with SIGKILL does not hold its user's slot
/// until the instance's heartbeat expires (30 s here): the next device is admitted at once.
#[test]
fn a_device_on_a_killed_instance_does_not_lock_its_user_out() {
    let redis = TestRedis::start();
    let doomed = child_on(&redis, &["--max-devices", "1"]);
    let survivor = presence_server(&redis, Duration::from_secs(30), 1);
    let _lost = Client::connect(doomed.addr, "u1");
    wait_for("the device on the doomed instance to count", || {
        counted(&redis, "u1") == 1
    });
    let on_doomed = devices(&redis, "u1");
    doomed.signal(9);
    let killed = Instant::now();
    let mut device = survivor.connect("u1");
    // The dead instance's count stays until the sweep; refused, the new device is not counted.
    wait_for("the new device to be admitted and counted", || {
        counted(&redis, "u1") == 2
    });
    let set = devices(&redis, "u1");
    assert!(
        set.len() == 1 && set != on_doomed,
        "{set:?} after {on_doomed:?}"
    );
    // Its admission reached its core before this message comes back through Redis.
    round_trip(&mut device, "admitted");
    let after = killed.elapsed();
    assert!(
        after < Duration::from_secs(10),
        "admitted {after:?} after the kill, well before the 30 s heartbeat TTL"
    );
    assert_eq!(
        metric(survivor.addr, &closed_metric("device_limit")),
        0,
        "nobody was closed on the survivor"
    );
    drop(doomed);
}

/// A `presence` answer larger than half the outbound bound comes in pages (`next`, then
/// `after`), never as one frame that closes its requester with 4008: embedded and with Redis.
fn presence_is_paged(server: &TestServer) {
    let ids: Vec<String> = (0..20)
        .map(|n| format!("{n:02}{}", "m".repeat(200)))
        .collect();
    let mut asker = server.connect("a");
    join(&mut asker, "big");
    let mut members: Vec<Client> = ids.iter().map(|id| server.connect(id)).collect();
    for m in &mut members {
        join(m, "big");
    }
    let mut expected: Vec<String> = ids.clone();
    expected.push("a".into());
    expected.sort();
    let mut seen: Vec<String> = Vec::new();
    let mut after: Option<String> = None;
    for ack in 10.. {
        let args = match &after {
            Some(a) => json!({"room": "big", "after": a}),
            None => json!({"room": "big"}),
        };
        let page = request_ok(&mut asker, "presence", args, ack);
        let online = page["online"].as_array().expect("online");
        assert!(
            !online.is_empty() && online.len() < expected.len(),
            "{page}"
        );
        seen.extend(online.iter().map(|u| u.as_str().unwrap().to_string()));
        match page.get("next") {
            Some(next) => after = Some(next.as_str().unwrap().to_string()),
            None => break,
        }
    }
    assert_eq!(seen, expected, "every member once, in order");
    // The requester is still open.
    asker.send_message("a", "still here");
    assert_eq!(asker.recv_event("newMessage")["args"]["text"], "still here");
}

fn small_outbound(mut config: Config) -> Config {
    config.max_message_bytes = 1024;
    config.max_outbound_bytes = 4096;
    config
}

#[test]
fn presence_answers_over_the_outbound_bound_are_paged() {
    presence_is_paged(&TestServer::with_config(small_outbound(test_config())));
    let redis = TestRedis::start();
    let mut rc = RedisConfig::new(redis.url());
    rc.reconnect_max = Duration::from_millis(300);
    presence_is_paged(&TestServer::with_config(small_outbound(Config {
        backplane: Some(rc),
        ..test_config()
    })));
}

/// A user reconnecting in a loop: the members hear at most one `presenceChanged` per
/// `--presence-interval` (the first at once, then the state at the interval's end), not one per
/// connect and disconnect.
#[test]
fn presence_changes_are_coalesced_per_user() {
    let server = TestServer::with_config(Config {
        rooms: RoomsConfig {
            // Long enough that the reconnects below surely fall within one interval.
            presence_interval: Duration::from_secs(5),
            ..rooms_config(Duration::from_secs(30), 0)
        },
        ..test_config()
    });
    let mut member = server.connect("m");
    join(&mut member, "x");
    let mut flapper = server.connect("f");
    join(&mut flapper, "x");
    flapper.close();
    expect_presence(&mut member, "x", "f", false);
    // Ten reconnects right after an announcement: all within the interval.
    for _ in 0..10 {
        let mut f = server.connect("f");
        request(&mut f, "noSuchEvent", json!(null), 1);
        f.close();
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut heard = Vec::new();
    while let Some(m) = member.next_message(deadline) {
        if let Ok(tungstenite::Message::Text(t)) = m {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["event"] == "presenceChanged" {
                heard.push(v["args"]["online"].as_bool().unwrap());
            }
        }
    }
    // f was offline when announced last and is offline again: nothing changed to announce.
    assert!(
        heard.is_empty(),
        "twenty changes within the interval were announced: {heard:?}"
    );
    assert_eq!(presence_online(&mut member, "x"), ["m"]);
    // A change that stands is announced at the interval's end.
    let _f = server.connect("f");
    expect_presence(&mut member, "x", "f", true);
}

/// The `presenceChanged` events `c` hears about `user` until `deadline`, with when each came.
fn heard_changes(c: &mut Client, user: &str, deadline: Instant) -> Vec<(Instant, bool)> {
    let mut heard = Vec::new();
    while let Some(m) = c.next_message(deadline) {
        if let Ok(tungstenite::Message::Text(t)) = m {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["event"] == "presenceChanged" && v["args"]["user"] == user {
                heard.push((Instant::now(), v["args"]["online"].as_bool().unwrap()));
            }
        }
    }
    heard
}

/// Issue 16 (4) with Redis: a user reconnecting in a loop, on two instances, costs its rooms'
/// members at most one `presenceChanged` per `--presence-interval`, each a real change, and the
/// final state is always announced: online while a device stays, offline once the last left.
#[test]
fn presence_changes_are_coalesced_per_user_across_instances() {
    let interval = Duration::from_secs(2);
    let redis = TestRedis::start();
    let mut rc = RedisConfig::new(redis.url());
    rc.reconnect_max = Duration::from_millis(300);
    let a = TestServer::with_config(Config {
        backplane: Some(rc),
        rooms: RoomsConfig {
            presence_interval: interval,
            ..rooms_config(Duration::from_secs(30), 0)
        },
        ..test_config()
    });
    // The flag, accepted with Redis.
    let b = child_on(&redis, &["--presence-interval", "2s"]);
    let mut member = a.connect("m");
    join(&mut member, "x");
    let mut flapper = Client::connect(b.addr, "f");
    join(&mut flapper, "x");
    flapper.close();
    expect_presence(&mut member, "x", "f", false);
    // Twenty changes right after an announcement, on both instances; the last device stays.
    let started = Instant::now();
    for round in 0..10 {
        let addr = if round % 2 == 0 { a.addr } else { b.addr };
        let mut f = Client::connect(addr, "f");
        request(&mut f, "noSuchEvent", json!(null), 1);
        f.close();
    }
    let mut last = a.connect("f");
    request(&mut last, "noSuchEvent", json!(null), 1);
    let flapped = started.elapsed();
    let heard = heard_changes(&mut member, "f", Instant::now() + interval * 2);
    assert!(
        heard.len() <= 2 + (flapped.as_millis() / interval.as_millis()) as usize,
        "{} changes announced in {flapped:?} of flapping: {heard:?}",
        heard.len()
    );
    for pair in heard.windows(2) {
        assert_ne!(
            pair[0].1, pair[1].1,
            "only changes are announced: {heard:?}"
        );
        let gap = pair[1].0 - pair[0].0;
        // The announcements are at least an interval apart in Redis; their arrival here may
        // bunch up by the delivery's jitter.
        assert!(
            gap >= interval - Duration::from_millis(500),
            "two announcements {gap:?} apart: {heard:?}"
        );
    }
    assert_eq!(heard.last().map(|h| h.1), Some(true), "f stayed online");
    assert_eq!(presence_online(&mut member, "x"), ["f", "m"]);
    // The last device leaves within the interval after that announcement: announced anyway.
    last.close();
    expect_presence(&mut member, "x", "f", false);
    assert_eq!(presence_online(&mut member, "x"), ["m"]);
    drop(b);
}
