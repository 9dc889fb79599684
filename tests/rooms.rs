//! Rooms: every device of every member gets a room message exactly once, on any core and any
//! instance, non-members nothing; membership survives reconnects and instance restarts; leave
//! stops delivery; the bounds; a room message is stored once, in the room's history, and the
//! per-room resume (`?rooms=`, `resume {rooms}`, `joinRoom {since}`) and pages cover it.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use switchboard::backplane::Routing;
use switchboard::Config;

fn join(c: &mut Client, room: &str, ack: u64) {
    let r = request_ok(c, "joinRoom", json!({ "room": room }), ack);
    assert_eq!(r["room"], room);
}

fn say(c: &mut Client, room: &str, text: &str, ack: u64) -> serde_json::Value {
    request_ok(
        c,
        "sendRoomMessage",
        json!({ "room": room, "text": text }),
        ack,
    )
}

/// Sends without an ack, so the sender's own copies are left for the test to read.
fn post(c: &mut Client, room: &str, text: &str) {
    c.send_json(&json!({"event": "sendRoomMessage", "args": {"room": room, "text": text}}));
}

/// Every device gets `texts` from `room`, in order, once each, and nothing more.
fn expect_room_messages(devices: &mut [&mut Client], room: &str, from: &str, texts: &[String]) {
    for dev in devices.iter_mut() {
        for text in texts {
            let m = recv_room_message(dev);
            assert_eq!(m["args"]["room"], room, "{}: {m}", dev.user);
            assert_eq!(m["args"]["from"], from);
            assert_eq!(
                &m["args"]["text"],
                text.as_str(),
                "{}: in order, once",
                dev.user
            );
            assert!(m["args"]["to"].is_null(), "a room message has no `to`");
        }
    }
    for dev in devices.iter_mut() {
        expect_no_message(dev, Duration::from_millis(300));
    }
}

/// No `newMessage` within `wait` (other events, e.g. `presenceChanged`, are fine).
fn expect_no_message(dev: &mut Client, wait: Duration) {
    let deadline = std::time::Instant::now() + wait;
    while let Some(m) = dev.next_message(deadline) {
        if let Ok(tungstenite::Message::Text(t)) = m {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            assert_ne!(v["event"], "newMessage", "{}: unexpected {v}", dev.user);
        }
    }
}

#[test]
fn embedded_every_member_device_on_every_core_gets_it_once() {
    let server = TestServer::start();
    let mut a: Vec<Client> = connect_spread(&server, "a", 2)
        .into_iter()
        .map(|(_, c)| c)
        .collect();
    let mut b = server.connect("b");
    let mut outsider = server.connect("c");
    join(&mut a[0], "general", 1);
    join(&mut b, "general", 1);

    let texts: Vec<String> = (0..5).map(|n| format!("m{n}")).collect();
    let mut acks = Vec::new();
    for (n, text) in texts.iter().enumerate() {
        acks.push(say(&mut b, "general", text, 10 + n as u64));
    }
    let (a0, a1) = a.split_at_mut(1);
    let mut devices = vec![&mut a0[0], &mut a1[0]];
    expect_room_messages(&mut devices, "general", "b", &texts);
    // The sender's own device got them too (before each ack: skip-reading found them).
    b.close();
    expect_no_message(&mut outsider, Duration::from_millis(200));
    assert!(acks
        .iter()
        .all(|a| a["id"].as_str().is_some_and(|id| id.len() == 32)));
}

#[test]
fn the_sender_gets_its_own_room_message_with_the_same_id() {
    let server = TestServer::start();
    let mut a = server.connect("a");
    join(&mut a, "r", 1);
    a.send_json(
        &json!({"event": "sendRoomMessage", "args": {"room": "r", "text": "hi"}, "ack": 2}),
    );
    let m = a.recv_json();
    assert_eq!(
        m["event"], "newMessage",
        "embedded: the copy comes before the ack"
    );
    assert!(m["offset"].is_string(), "history on: an offset");
    assert_eq!(m["room"], "r", "the offset is one in room r's history");
    let ack = a.recv_json();
    assert_eq!(ack["args"]["id"], m["args"]["id"]);
    assert_eq!(ack["args"]["ts"], m["args"]["ts"]);
}

#[test]
fn not_a_member_and_bad_input_get_error_codes() {
    let config = Config {
        rooms: switchboard::rooms::RoomsConfig {
            max_rooms_per_user: 2,
            max_room_members: 2,
            max_room_name_bytes: 8,
            ..Default::default()
        },
        ..test_config()
    };
    let server = TestServer::with_config(config);
    let mut a = server.connect("a");
    let mut b = server.connect("b");
    let mut c = server.connect("c");
    let msg = |room: &str| json!({ "room": room, "text": "x" });
    assert_eq!(
        request_err(&mut c, "sendRoomMessage", msg("r"), 1),
        "not_member"
    );
    assert_eq!(
        request_err(&mut c, "leaveRoom", json!({"room": "r"}), 2),
        "not_member"
    );
    assert_eq!(
        request_err(&mut c, "presence", json!({"room": "r"}), 3),
        "not_member"
    );
    for bad in ["", "a b", "123456789", "ü", "a/b"] {
        let code = request_err(&mut a, "joinRoom", json!({ "room": bad }), 4);
        assert_eq!(code, "bad_room", "{bad:?}");
        let code = request_err(&mut a, "sendRoomMessage", msg(bad), 5);
        assert_eq!(code, "bad_room", "{bad:?}");
    }
    assert_eq!(
        request_err(&mut a, "joinRoom", json!({"room": 5}), 6),
        "bad_args"
    );
    assert_eq!(
        request_err(&mut a, "sendRoomMessage", json!({"room": "r"}), 7),
        "bad_args"
    );
    assert_eq!(request_err(&mut a, "joinRoom", json!(null), 8), "bad_args");
    // presence answers through its ack: without one it is refused.
    a.send_json(&json!({"event": "presence", "args": {"room": "r"}}));
    let e = a.recv_event("error");
    assert_eq!(e["args"]["code"], "bad_args");
    // Bounds: two rooms per user, two members per room.
    join(&mut a, "r1", 10);
    join(&mut a, "r2", 11);
    join(&mut a, "r2", 12); // already in: fine
    assert_eq!(
        request_err(&mut a, "joinRoom", json!({"room": "r3"}), 13),
        "room_limit"
    );
    join(&mut b, "r1", 14);
    assert_eq!(
        request_err(&mut c, "joinRoom", json!({"room": "r1"}), 15),
        "room_full"
    );
    // Leaving makes room.
    request_ok(&mut a, "leaveRoom", json!({"room": "r1"}), 16);
    join(&mut c, "r1", 17);
    join(&mut a, "r3", 18);
    // Everything above was an answered request; the connections are all still open.
    say(&mut c, "r1", "still here", 19);
    assert_eq!(recv_room_message(&mut b)["args"]["text"], "still here");
}

#[test]
fn embedded_leave_stops_delivery() {
    let server = TestServer::start();
    let mut a = server.connect("a");
    let mut a2 = server.connect("a");
    let mut b = server.connect("b");
    join(&mut a, "r", 1);
    join(&mut b, "r", 1);
    say(&mut b, "r", "before", 2);
    for dev in [&mut a, &mut a2] {
        assert_eq!(recv_room_message(dev)["args"]["text"], "before");
    }
    request_ok(&mut a2, "leaveRoom", json!({"room": "r"}), 3);
    say(&mut b, "r", "after", 4);
    expect_no_message(&mut a, Duration::from_millis(300));
    expect_no_message(&mut a2, Duration::from_millis(100));
    assert_eq!(
        request_err(
            &mut a,
            "sendRoomMessage",
            json!({"room": "r", "text": "x"}),
            5
        ),
        "not_member"
    );
}

/// Reads until `recovered` events arrived for the user's own stream (when `own`) and for each
/// room of `rooms`, each complete; returns the texts of the `newMessage` events before, in
/// order.
fn read_resume(c: &mut Client, own: bool, rooms: &[&str]) -> Vec<String> {
    let (mut texts, mut recovered) = (Vec::new(), Vec::<serde_json::Value>::new());
    let want = rooms.len() + usize::from(own);
    while recovered.len() < want {
        let v = c.recv_json();
        match v["event"].as_str() {
            Some("newMessage") => texts.push(v["args"]["text"].as_str().unwrap().to_string()),
            Some("recovered") => recovered.push(v),
            _ => {}
        }
    }
    for room in rooms {
        let r = recovered.iter().find(|r| r["args"]["room"] == *room);
        let r = r.expect("a recovered per room");
        assert_eq!(r["args"]["complete"], true, "{recovered:?}");
    }
    if own {
        let r = recovered.iter().find(|r| r["args"].get("room").is_none());
        assert_eq!(r.expect("the user's recovered")["args"]["complete"], true);
    }
    texts
}

/// A non-member's `resume` of room `r`: acked, then an empty, incomplete `recovered`.
fn expect_refused_room_resume(c: &mut Client, since: &str) {
    let r = request_ok(c, "resume", json!({"rooms": {"r": since}}), 9);
    assert!(r.is_null());
    let rec = c.recv_event("recovered");
    assert_eq!(
        rec["args"],
        json!({"room": "r", "complete": false, "offset": null})
    );
}

fn texts_of(page: &serde_json::Value) -> Vec<String> {
    page["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["args"]["text"].as_str().map(String::from))
        .collect()
}

/// Users a and b, each with one device, both in room `r`.
fn members_of_r(server: &TestServer) -> (Client, Client) {
    let mut a = server.connect("a");
    let mut b = server.connect("b");
    join(&mut a, "r", 1);
    join(&mut b, "r", 1);
    (a, b)
}

#[test]
fn embedded_resume_covers_room_messages_per_room() {
    let server = TestServer::start();
    let (mut a, mut b) = members_of_r(&server);
    b.send_message("a", "d0");
    let direct = a.recv_event("newMessage")["offset"]
        .as_str()
        .unwrap()
        .to_string();
    say(&mut b, "r", "m1", 2);
    let first = recv_room_message(&mut a);
    assert_eq!(first["room"], "r");
    let since = first["offset"].as_str().unwrap().to_string();
    a.close();
    say(&mut b, "r", "m2", 3);
    b.send_message("a", "direct");
    say(&mut b, "r", "m3", 4);
    // The user's stream alone: the direct message, no room message.
    let url = format!("ws://{}/ws?token=a&since={direct}", server.addr);
    let mut own = Client::connect_url(&url, "a");
    assert_eq!(read_resume(&mut own, true, &[]), ["direct"]);
    // Both: each stream once, in order within each.
    let url = format!(
        "ws://{}/ws?token=a&since={direct}&rooms=r@{since}",
        server.addr
    );
    let mut back = Client::connect_url(&url, "a");
    let texts = read_resume(&mut back, true, &["r"]);
    let rooms: Vec<&String> = texts.iter().filter(|t| t.starts_with('m')).collect();
    assert_eq!(rooms, ["m2", "m3"]);
    assert_eq!(texts.len(), 3, "{texts:?}");
    // The `resume` event does the same, and a non-member gets nothing from the room.
    let mut c = server.connect("c");
    expect_refused_room_resume(&mut c, &since);
    expect_no_message(&mut c, Duration::from_millis(200));
}

#[test]
fn embedded_join_with_since_resumes_the_room_and_pages_are_for_members() {
    let server = TestServer::start();
    let (mut a, mut b) = members_of_r(&server);
    say(&mut b, "r", "m1", 2);
    let since = recv_room_message(&mut a)["offset"]
        .as_str()
        .unwrap()
        .to_string();
    say(&mut b, "r", "m2", 3);
    say(&mut b, "r", "m3", 4);
    let mut other = server.connect("a");
    let args = json!({"room": "r", "since": since});
    assert_eq!(request_ok(&mut other, "joinRoom", args, 5)["room"], "r");
    assert_eq!(read_resume(&mut other, false, &["r"]), ["m2", "m3"]);
    // Pages of the room: members only.
    let (status, body) = server.get("/api/history?token=a&room=r&limit=2");
    assert_eq!(status, 200, "{body}");
    let page: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(texts_of(&page), ["m3", "m2"]);
    assert_eq!(server.get("/api/history?token=x&room=r").0, 403);
    assert_eq!(server.get("/api/history?token=a&room=bad%20room").0, 400);
    let mut x = server.connect("x");
    assert_eq!(
        request_err(&mut x, "history", json!({"room": "r"}), 6),
        "not_member"
    );
}

// ---- across instances (Redis) --------------------------------------------------------------

#[test]
fn room_delivery_across_two_instances_and_several_cores() {
    let redis = TestRedis::start();
    let a = redis_server(&redis, Routing::PerUser);
    let b = redis_server(&redis, Routing::PerUser);
    // u1: two devices on A (one per core) and one on B; u2: one on B; u3 (not a member) on A
    // and B.
    let mut u1_a: Vec<Client> = connect_spread(&a, "u1", 2)
        .into_iter()
        .map(|(_, c)| c)
        .collect();
    let mut u1_b = b.connect("u1");
    let mut u2 = b.connect("u2");
    let mut u3_a = a.connect("u3");
    let mut u3_b = b.connect("u3");
    a.wait_channels(2);
    b.wait_channels(3);
    join(&mut u1_a[0], "general", 1);
    join(&mut u2, "general", 1);
    wait_room_routes(&a, 3, 1);
    wait_room_routes(&b, 4, 2);

    let texts: Vec<String> = (0..10).map(|n| format!("m{n}")).collect();
    for text in &texts {
        post(&mut u2, "general", text);
    }
    {
        let (x, y) = u1_a.split_at_mut(1);
        let mut devices = vec![&mut x[0], &mut y[0], &mut u1_b];
        expect_room_messages(&mut devices, "general", "u2", &texts);
    }
    // The sender's own device, once each.
    let mut offsets = Vec::new();
    for text in &texts {
        let m = recv_room_message(&mut u2);
        assert_eq!(&m["args"]["text"], text.as_str());
        offsets.push(m["offset"].as_str().unwrap().to_string());
    }
    expect_no_message(&mut u2, Duration::from_millis(100));
    expect_no_message(&mut u3_a, Duration::from_millis(100));
    expect_no_message(&mut u3_b, Duration::from_millis(100));
    // One publication per message on the room channel, not one per member: B, hosting two
    // members, received ten room publications and the two membership changes, not twenty.
    assert_eq!(b.bp_stat(|s| &s.received), 12);
    assert_eq!(a.bp_stat(|s| &s.received), 11);
    // Stored once, in the room's stream; nothing in the members' own histories.
    let mut r = redis.connection();
    for user in ["u1", "u2"] {
        let len: usize = redis::cmd("XLEN")
            .arg(format!("switchboard:h:{user}"))
            .query(&mut r)
            .unwrap();
        assert_eq!(len, 0, "{user}'s history");
    }
    let ids: Vec<String> = {
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg("{switchboard:r:general}:h")
            .arg("-")
            .arg("+")
            .query(&mut r)
            .unwrap();
        reply.ids.into_iter().map(|e| e.id).collect()
    };
    assert_eq!(ids, offsets, "one entry per message, its offset the room's");
}

#[test]
fn bounds_hold_with_redis() {
    let redis = TestRedis::start();
    let mut rc = switchboard::backplane::RedisConfig::new(redis.url());
    rc.reconnect_max = Duration::from_millis(300);
    let config = Config {
        backplane: Some(rc),
        rooms: switchboard::rooms::RoomsConfig {
            max_rooms_per_user: 1,
            max_room_members: 2,
            ..Default::default()
        },
        ..test_config()
    };
    let a = TestServer::with_config(config);
    let mut u1 = a.connect("u1");
    let mut u2 = a.connect("u2");
    let mut u3 = a.connect("u3");
    join(&mut u1, "r", 1);
    join(&mut u2, "r", 1);
    assert_eq!(
        request_err(&mut u3, "joinRoom", json!({"room": "r"}), 2),
        "room_full"
    );
    assert_eq!(
        request_err(&mut u1, "joinRoom", json!({"room": "s"}), 3),
        "room_limit"
    );
    assert_eq!(
        request_err(
            &mut u3,
            "sendRoomMessage",
            json!({"room": "r", "text": "x"}),
            4
        ),
        "not_member"
    );
    assert_eq!(
        request_err(&mut u3, "leaveRoom", json!({"room": "r"}), 5),
        "not_member"
    );
    assert_eq!(
        request_err(&mut u3, "presence", json!({"room": "r"}), 6),
        "not_member"
    );
    assert_eq!(
        request_err(&mut u3, "joinRoom", json!({"room": "no way"}), 7),
        "bad_room"
    );
    let mut r = redis.connection();
    let members: Vec<String> = redis::cmd("SMEMBERS")
        .arg("{switchboard:r:r}:m")
        .query(&mut r)
        .unwrap();
    assert_eq!(members.len(), 2, "nothing was added past a bound");
}

#[test]
fn leave_stops_delivery_across_instances() {
    let redis = TestRedis::start();
    let a = redis_server(&redis, Routing::PerUser);
    let b = redis_server(&redis, Routing::PerUser);
    let mut u1_a = a.connect("u1");
    let mut u1_b = b.connect("u1");
    let mut u2 = a.connect("u2");
    a.wait_channels(2);
    b.wait_channels(1);
    join(&mut u1_b, "r", 1);
    join(&mut u2, "r", 1);
    wait_room_routes(&a, 3, 2);
    wait_room_routes(&b, 2, 1);
    post(&mut u2, "r", "before");
    for dev in [&mut u1_a, &mut u1_b] {
        assert_eq!(recv_room_message(dev)["args"]["text"], "before");
    }
    request_ok(&mut u1_a, "leaveRoom", json!({"room": "r"}), 3);
    post(&mut u2, "r", "after");
    assert_eq!(recv_room_message(&mut u2)["args"]["text"], "before");
    assert_eq!(recv_room_message(&mut u2)["args"]["text"], "after");
    expect_no_message(&mut u1_a, Duration::from_millis(300));
    expect_no_message(&mut u1_b, Duration::from_millis(100));
    // B hosts no member any more: it dropped the room's channel.
    wait_room_routes(&b, 1, 0);
}

#[test]
fn membership_survives_reconnects_and_instance_restarts() {
    let redis = TestRedis::start();
    let a = redis_server(&redis, Routing::PerUser);
    let mut u1 = a.connect("u1");
    let mut u2 = a.connect("u2");
    join(&mut u1, "r", 1);
    join(&mut u2, "r", 1);
    u1.close();
    drop(u2);
    drop(a);
    // A new instance (another node id) on the same Redis: the memberships are still there.
    let a2 = redis_server(&redis, Routing::PerUser);
    let mut u1 = a2.connect("u1");
    let mut u2 = a2.connect("u2");
    wait_room_routes(&a2, 3, 2);
    post(&mut u2, "r", "welcome back");
    assert_eq!(recv_room_message(&mut u1)["args"]["text"], "welcome back");
    assert_eq!(recv_room_message(&mut u2)["args"]["text"], "welcome back");
}

#[test]
fn a_device_that_joins_gets_the_next_message_at_once() {
    // The join's ack comes only once this instance routes the room: a message sent right
    // after it reaches the joining user's devices here, both of them.
    let redis = TestRedis::start();
    let a = redis_server(&redis, Routing::PerUser);
    let mut u1 = a.connect("u1");
    let mut u1_again = a.connect("u1");
    a.wait_channels(1);
    join(&mut u1, "fresh", 1);
    post(&mut u1, "fresh", "first");
    assert_eq!(recv_room_message(&mut u1)["args"]["text"], "first");
    assert_eq!(recv_room_message(&mut u1_again)["args"]["text"], "first");
}

#[test]
fn resume_on_another_instance_covers_each_stream_once() {
    let redis = TestRedis::start();
    let a = redis_server(&redis, Routing::PerUser);
    let b = redis_server(&redis, Routing::PerUser);
    let mut u1 = a.connect("u1");
    let mut u2 = a.connect("u2");
    a.wait_channels(2);
    join(&mut u1, "r", 1);
    join(&mut u2, "r", 1);
    u2.send_message("u1", "d0");
    let direct = u1.recv_event("newMessage")["offset"]
        .as_str()
        .unwrap()
        .to_string();
    say(&mut u2, "r", "m1", 2);
    let since = recv_room_message(&mut u1)["offset"]
        .as_str()
        .unwrap()
        .to_string();
    u1.close();
    say(&mut u2, "r", "m2", 3);
    u2.send_message("u1", "direct");
    say(&mut u2, "r", "m3", 4);
    let url = format!("ws://{}/ws?token=u1&since={direct}&rooms=r@{since}", b.addr);
    let mut back = Client::connect_url(&url, "u1");
    let texts = read_resume(&mut back, true, &["r"]);
    // Room messages keep their order, and so do direct ones; with Redis, a direct message and
    // a room message from one connection take different paths (publisher, rooms worker) and
    // may swap (docs/PROTOCOL.md §5).
    let rooms: Vec<&String> = texts.iter().filter(|t| t.starts_with('m')).collect();
    assert_eq!(rooms, ["m2", "m3"]);
    assert_eq!(texts.len(), 3, "{texts:?}");
    assert!(texts.iter().any(|t| t == "direct"));
    // And live room messages follow on B.
    wait_room_routes(&b, 2, 1);
    say(&mut u2, "r", "m4", 5);
    assert_eq!(recv_room_message(&mut back)["args"]["text"], "m4");
    // `joinRoom` with `since` on B: the ack, then the replay, then `recovered`.
    let mut third = b.connect("u1");
    let args = json!({"room": "r", "since": since});
    assert_eq!(request_ok(&mut third, "joinRoom", args, 6)["room"], "r");
    assert_eq!(read_resume(&mut third, false, &["r"]), ["m2", "m3", "m4"]);
    // Pages: members only.
    let (status, body) = b.get("/api/history?token=u1&room=r&limit=2");
    assert_eq!(status, 200, "{body}");
    let page: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(texts_of(&page), ["m4", "m3"]);
    assert_eq!(b.get("/api/history?token=u9&room=r").0, 403);
    expect_refused_room_resume(&mut b.connect("u9"), &since);
}

#[test]
fn a_room_stream_keeps_its_bounds_exactly() {
    let redis = TestRedis::start();
    let mut rc = switchboard::backplane::RedisConfig::new(redis.url());
    rc.routing = Routing::PerUser;
    let mut config = Config {
        backplane: Some(rc),
        ..test_config()
    };
    config.rooms.history.max_len = 5;
    config.rooms.history.max_bytes = 2048;
    let a = TestServer::with_config(config);
    let mut u1 = a.connect("u1");
    a.wait_channels(1);
    join(&mut u1, "r", 1);
    let mut offsets = Vec::new();
    for n in 0..8 {
        post(&mut u1, "r", &format!("m{n}"));
        let m = recv_room_message(&mut u1);
        offsets.push(m["offset"].as_str().unwrap().to_string());
    }
    let mut r = redis.connection();
    let len = |r: &mut redis::Connection| -> usize {
        redis::cmd("XLEN")
            .arg("{switchboard:r:r}:h")
            .query(r)
            .unwrap()
    };
    assert_eq!(len(&mut r), 5, "exactly the max length");
    let low: String = redis::cmd("HGET")
        .arg("{switchboard:r:r}:t")
        .arg("low")
        .query(&mut r)
        .unwrap();
    assert_eq!(low, offsets[2], "the newest offset dropped");
    // Bytes: frames of about 630 bytes (a 500-byte text), 2 KiB kept: three.
    let big = "x".repeat(500);
    for _ in 0..4 {
        post(&mut u1, "r", &big);
        recv_room_message(&mut u1);
    }
    assert_eq!(len(&mut r), 3, "the byte bound");
    // A resume from a dropped offset is incomplete; from the newest one complete.
    let url = format!("ws://{}/ws?token=u1&rooms=r@{}", a.addr, offsets[4]);
    let mut again = Client::connect_url(&url, "u1");
    assert_eq!(again.recv_event("recovered")["args"]["complete"], false);
    let (status, body) = a.get("/api/history?token=u1&room=r");
    assert_eq!(status, 200, "{body}");
    let page: serde_json::Value = serde_json::from_str(&body).unwrap();
    let newest = page["events"][0]["offset"].as_str().unwrap().to_string();
    let url = format!("ws://{}/ws?token=u1&rooms=r@{newest}", a.addr);
    let mut fine = Client::connect_url(&url, "u1");
    assert!(read_resume(&mut fine, false, &["r"]).is_empty());
}

#[test]
fn without_history_room_messages_cross_instances_without_offsets() {
    let redis = TestRedis::start();
    let a = redis_server_history(&redis, Routing::PerUser, Duration::from_millis(300), false);
    let b = redis_server_history(&redis, Routing::PerUser, Duration::from_millis(300), false);
    let mut u1 = a.connect("u1");
    let mut u2 = b.connect("u2");
    join(&mut u1, "r", 1);
    join(&mut u2, "r", 1);
    wait_room_routes(&a, 2, 1);
    post(&mut u2, "r", "hi");
    for dev in [&mut u1, &mut u2] {
        let m = recv_room_message(dev);
        assert_eq!(m["args"]["text"], "hi");
        assert!(m.get("offset").is_none(), "{m}");
    }
    expect_no_message(&mut u1, Duration::from_millis(200));
}

/// `sendRoomMessage` with a `clientId` used twice (a resend after a lost ack): both acked, every
/// member device gets it once, and it is in history once; another `clientId` is a new message.
fn resend_is_delivered_once(sender: &mut Client, other: &mut Client) {
    for ack in [20, 21] {
        request_ok(
            sender,
            "sendRoomMessage",
            json!({"room": "r", "text": "once", "clientId": "c-1"}),
            ack,
        );
    }
    request_ok(
        sender,
        "sendRoomMessage",
        json!({"room": "r", "text": "next", "clientId": "c-2"}),
        22,
    );
    let bad = json!({"room": "r", "text": "x", "clientId": "no spaces"});
    assert_eq!(request_err(sender, "sendRoomMessage", bad, 23), "bad_args");
    // `request_ok` skipped the sender's own copies; the other member reads its own.
    for text in ["once", "next"] {
        assert_eq!(recv_room_message(other)["args"]["text"], text);
    }
    expect_no_message(other, Duration::from_millis(300));
    let page = request_ok(other, "history", json!({"limit": 10}), 24);
    let texts = texts_of(&page);
    assert!(
        texts.is_empty(),
        "room messages are not in the user's history: {texts:?}"
    );
    let page = request_ok(other, "history", json!({"limit": 10, "room": "r"}), 25);
    assert_eq!(
        texts_of(&page),
        ["next", "once"],
        "newest first, each once, in the room's history"
    );
}

#[test]
fn embedded_room_resend_with_the_same_client_id_is_delivered_once() {
    let server = TestServer::start();
    let mut a = server.connect("a");
    let mut b = server.connect("b");
    join(&mut a, "r", 1);
    join(&mut b, "r", 1);
    resend_is_delivered_once(&mut a, &mut b);
}

#[test]
fn room_resend_with_the_same_client_id_is_delivered_once_across_instances() {
    let redis = TestRedis::start();
    let a = redis_server(&redis, Routing::PerUser);
    let b = redis_server(&redis, Routing::PerUser);
    let mut u1 = a.connect("u1");
    let mut u2 = b.connect("u2");
    a.wait_channels(1);
    b.wait_channels(1);
    join(&mut u1, "r", 1);
    join(&mut u2, "r", 1);
    wait_room_routes(&a, 2, 1);
    wait_room_routes(&b, 2, 1);
    resend_is_delivered_once(&mut u1, &mut u2);
}

/// With Redis, the rooms worker's queue of client requests is bounded (`--max-room-queue`):
/// while Redis stalls, requests past it get an error at once instead of queueing without end
/// behind a flood; those queued are answered once Redis is back.
#[test]
fn the_rooms_queue_is_bounded() {
    let redis = TestRedis::start();
    let mut rc = switchboard::backplane::RedisConfig::new(redis.url());
    rc.reconnect_max = Duration::from_millis(300);
    let mut config = Config {
        backplane: Some(rc),
        ..test_config()
    };
    config.rooms.max_room_queue = 2;
    let server = TestServer::with_config(config);
    let mut a = server.connect("a");
    join(&mut a, "warm", 1);
    let pid = redis.pid().unwrap().to_string();
    let signal = |sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap();
        assert!(status.success());
    };
    signal("-STOP");
    for ack in 10..16 {
        a.send_json(&json!({"event": "joinRoom", "args": {"room": format!("r{ack}")}, "ack": ack}));
    }
    // One request in the worker's hands, two queued: the other three are refused at once.
    let started = std::time::Instant::now();
    let mut busy = 0;
    let mut answered = 0;
    while busy < 3 {
        let v = a.recv_json();
        if v["ack"].is_u64() {
            answered += 1;
        }
        if v["event"] == "error" && v["args"]["message"].as_str().unwrap_or("").contains("busy") {
            busy += 1;
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    signal("-CONT");
    // The rest are answered (acks or Redis errors, but answers); once they are, the queue is
    // empty again (a join sent before then may still find it full) and the rooms work again.
    while answered < 6 {
        if a.recv_json()["ack"].is_u64() {
            answered += 1;
        }
    }
    join(&mut a, "after", 20);
}
