//! Rooms, presence and `--max-devices` on a three-node Redis Cluster the test creates: two
//! instances, users whose channels live on all three shards; a room message reaches every member
//! device once, a room is resumed after a disconnect, `presenceChanged` and the `presence` query
//! see members on both instances, a killed instance's users go offline after the TTL, and the
//! device limit holds across instances.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use switchboard::backplane::{cluster, RedisConfig, Routing};
use switchboard::rooms::RoomsConfig;

fn cluster_config(redis_cluster: &TestCluster) -> RedisConfig {
    let mut rc = RedisConfig::new("redis://127.0.0.1:1");
    rc.routing = Routing::PerUser;
    rc.cluster = redis_cluster.seeds();
    rc.reconnect_max = Duration::from_millis(300);
    rc
}

/// An instance on the cluster (history on, the default), with `rooms`' presence settings.
fn server(redis_cluster: &TestCluster, rooms: RoomsConfig) -> TestServer {
    TestServer::with_config(switchboard::Config {
        backplane: Some(cluster_config(redis_cluster)),
        rooms,
        ..test_config()
    })
}

fn rooms_config(ttl: Duration, max_devices: u32) -> RoomsConfig {
    RoomsConfig {
        presence_ttl: ttl,
        max_devices,
        ..RoomsConfig::default()
    }
}

/// The node (primary) owning `key`'s slot.
fn owner<'c>(redis_cluster: &'c TestCluster, map: &cluster::SlotMap, key: &str) -> &'c TestRedis {
    let addr = &map.shards[map.shard_of(key.as_bytes())];
    redis_cluster
        .nodes
        .iter()
        .find(|n| addr.ends_with(&format!(":{}", n.port)))
        .expect("the owner is a node of the cluster")
}

/// `prefix{n}` for the first `n` that `pick` accepts.
fn first_name(prefix: &str, pick: impl Fn(&str) -> bool) -> String {
    (0..)
        .map(|n| format!("{prefix}{n}"))
        .find(|name| pick(name))
        .expect("some name")
}

/// One user whose channel lives on each of the three shards.
fn users_on_every_shard(map: &cluster::SlotMap) -> Vec<String> {
    (0..3)
        .map(|shard| {
            first_name("user", |u| {
                map.shard_of(format!("switchboard:u:{u}").as_bytes()) == shard
            })
        })
        .collect()
}

fn join(c: &mut Client, room: &str, ack: u64) {
    let r = request_ok(c, "joinRoom", json!({ "room": room }), ack);
    assert_eq!(r["room"], room);
}

/// `names`, sorted (as `presence` answers).
fn sorted(names: &[&String]) -> Vec<String> {
    let mut out: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    out.sort();
    out
}

/// Reads until the room's `recovered`; returns the texts of the `newMessage`s before it.
fn read_room_resume(c: &mut Client, room: &str) -> Vec<String> {
    let mut texts = Vec::new();
    loop {
        let v = c.recv_json();
        match v["event"].as_str() {
            Some("newMessage") => texts.push(v["args"]["text"].as_str().unwrap().to_string()),
            Some("recovered") if v["args"]["room"] == room => {
                assert_eq!(v["args"]["complete"], true, "{v}");
                return texts;
            }
            _ => {}
        }
    }
}

/// Every device of every member gets a room message once, the room's keys live on the shard
/// owning the room's slot only, and a member resumes the room on the other instance.
#[test]
fn rooms_deliver_once_and_resume_across_a_cluster() {
    let redis_cluster = TestCluster::start();
    let a = server(&redis_cluster, RoomsConfig::default());
    let b = server(&redis_cluster, RoomsConfig::default());
    let map = cluster::SlotMap::fetch(&cluster_config(&redis_cluster)).unwrap();
    let users = users_on_every_shard(&map);
    // The room's slot on the shard of users[1]'s channel (and not of users[0]'s).
    let room_shard = map.shard_of(format!("switchboard:u:{}", users[1]).as_bytes());
    let room = first_name("team", |r| {
        map.shard_of(format!("{{switchboard:r:{r}}}").as_bytes()) == room_shard
    });
    let mut on_a: Vec<Client> = users.iter().map(|u| a.connect(u)).collect();
    let mut on_b: Vec<Client> = users.iter().map(|u| b.connect(u)).collect();
    a.wait_channels(3);
    b.wait_channels(3);
    for (i, dev) in on_a.iter_mut().enumerate() {
        join(dev, &room, 1 + i as u64);
    }
    // Each instance routes the room to its three local members, the room's channel confirmed
    // on its shard (three users' channels and the room's).
    wait_room_routes(&a, 4, 3);
    wait_room_routes(&b, 4, 3);

    let sent = request_ok(
        &mut on_a[0],
        "sendRoomMessage",
        json!({"room": &room, "text": "m1"}),
        10,
    );
    assert!(sent["id"].is_string(), "{sent}");
    let mut since = String::new();
    for dev in on_a.iter_mut().chain(on_b.iter_mut()) {
        let m = recv_room_message(dev);
        assert_eq!(
            (&m["args"]["text"], &m["room"]),
            (&json!("m1"), &json!(room))
        );
        since = m["offset"].as_str().expect("an offset").to_string();
        dev.expect_silence(Duration::from_millis(100));
    }

    // Stored once, beside the members, on the shard owning the room's slot.
    let tag = format!("{{switchboard:r:{room}}}");
    let node = owner(&redis_cluster, &map, &tag);
    let mut c = node.connection();
    let len: usize = redis::cmd("XLEN")
        .arg(format!("{tag}:h"))
        .query(&mut c)
        .unwrap();
    assert_eq!(len, 1);
    let mut members: Vec<String> = redis::cmd("SMEMBERS")
        .arg(format!("{tag}:m"))
        .query(&mut c)
        .unwrap();
    members.sort();
    let mut sorted = users.clone();
    sorted.sort();
    assert_eq!(members, sorted);
    // Each user's rooms in the user's own slot.
    for user in &users {
        let key = format!("{{switchboard:u:{user}}}:ur");
        let rooms: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&key)
            .query(&mut owner(&redis_cluster, &map, &key).connection())
            .unwrap();
        assert_eq!(rooms, std::slice::from_ref(&room), "{user}");
    }

    // users[2] is away on B while two more are sent, then resumes the room there.
    let away = on_b.pop().unwrap();
    away.close();
    for (n, text) in ["m2", "m3"].iter().enumerate() {
        let args = json!({"room": &room, "text": text});
        request_ok(&mut on_a[0], "sendRoomMessage", args, 20 + n as u64);
    }
    let url = format!("ws://{}/ws?token={}&rooms={room}@{since}", b.addr, users[2]);
    let mut back = Client::connect_url(&url, &users[2]);
    assert_eq!(read_room_resume(&mut back, &room), ["m2", "m3"]);
    let (status, body) = b.get(&format!("/api/history?token={}&room={room}", users[2]));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("m3") && body.contains("m1"), "{body}");

    // The other devices (the sender's own copies went by while it waited for its acks).
    for dev in on_a.iter_mut().skip(1).chain(on_b.iter_mut()) {
        for text in ["m2", "m3"] {
            assert_eq!(recv_room_message(dev)["args"]["text"], text, "{}", dev.user);
        }
    }

    // A leave stops delivery on both instances; a non-member cannot send.
    request_ok(&mut on_a[1], "leaveRoom", json!({ "room": &room }), 30);
    request_ok(
        &mut on_a[0],
        "sendRoomMessage",
        json!({"room": &room, "text": "m4"}),
        31,
    );
    assert_eq!(recv_room_message(&mut on_a[2])["args"]["text"], "m4");
    assert_eq!(recv_room_message(&mut back)["args"]["text"], "m4");
    on_a[1].expect_silence(Duration::from_millis(300));
    on_b[1].expect_silence(Duration::from_millis(100));
    let code = request_err(
        &mut on_b[1],
        "sendRoomMessage",
        json!({"room": &room, "text": "no"}),
        32,
    );
    assert_eq!(code, "not_member");
}

/// `presenceChanged` and `presence` see members on both instances; a stopped instance says
/// goodbye at once, a killed one is swept after the TTL.
#[test]
fn presence_across_a_cluster() {
    let redis_cluster = TestCluster::start();
    let ttl = Duration::from_secs(2);
    let a = server(&redis_cluster, rooms_config(ttl, 0));
    let b = server(&redis_cluster, rooms_config(ttl, 0));
    let map = cluster::SlotMap::fetch(&cluster_config(&redis_cluster)).unwrap();
    let users = users_on_every_shard(&map);
    let (alice, bob, carol) = (&users[0], &users[1], &users[2]);
    let room = "lobby";
    let mut alice_a = a.connect(alice);
    let mut bob_b = b.connect(bob);
    join(&mut alice_a, room, 1);
    join(&mut bob_b, room, 1);
    assert_eq!(presence_online(&mut alice_a, room), sorted(&[alice, bob]));
    let (status, body) = a.get(&format!("/api/history?token={alice}&room={room}"));
    assert_eq!(status, 200, "{body}");

    // A second device on the other instance: bob stays online while one remains.
    let bob_a = a.connect(bob);
    wait_for("bob's second device to count", || {
        let mut c = owner(&redis_cluster, &map, &format!("switchboard:u:{bob}")).connection();
        let counts: Vec<i64> = redis::cmd("HVALS")
            .arg(format!("{{switchboard:u:{bob}}}:p"))
            .query(&mut c)
            .unwrap_or_default();
        counts.iter().sum::<i64>() == 2
    });
    bob_b.close();
    bob_a.close();
    expect_presence(&mut alice_a, room, bob, false);
    assert_eq!(presence_online(&mut alice_a, room), sorted(&[alice]));
    let mut bob_b = b.connect(bob);
    expect_presence(&mut alice_a, room, bob, true);
    assert_eq!(presence_online(&mut bob_b, room), sorted(&[alice, bob]));

    // An instance stopped (its goodbye) or killed (the sweep): its users go offline.
    let carol_child = {
        let seeds = redis_cluster.seeds().join(",");
        ChildServer::spawn(&[
            "--backplane",
            "redis",
            "--redis-cluster",
            &seeds,
            "--presence-ttl",
            "2s",
        ])
    };
    let mut carol_dev = Client::connect(carol_child.addr, carol);
    // Joining is no presence change: `presence` lists her.
    join(&mut carol_dev, room, 1);
    assert_eq!(
        presence_online(&mut bob_b, room),
        sorted(&[alice, bob, carol])
    );
    drop(bob_b);
    drop(b);
    expect_presence(&mut alice_a, room, bob, false);

    // Killed: offline once its heartbeat expired and a sweep found it.
    let killed = Instant::now();
    carol_child.signal(9);
    expect_presence(&mut alice_a, room, carol, false);
    assert!(
        killed.elapsed() >= ttl / 2,
        "offline only once the heartbeat expired, not {:?} after the kill",
        killed.elapsed()
    );
    assert_eq!(presence_online(&mut alice_a, room), sorted(&[alice]));
    drop(carol_child);
}

/// `--max-devices 2` counts a user's connections on both instances: newest wins, so a third
/// device, on either instance, is admitted and the oldest one (wherever it is) closes with 4009.
#[test]
fn device_limit_across_a_cluster() {
    let redis_cluster = TestCluster::start();
    let a = server(&redis_cluster, rooms_config(Duration::from_secs(30), 2));
    let b = server(&redis_cluster, rooms_config(Duration::from_secs(30), 2));
    let map = cluster::SlotMap::fetch(&cluster_config(&redis_cluster)).unwrap();
    let devices = |user: &str| -> usize {
        let key = format!("{{switchboard:u:{user}}}:dev");
        let mut c = owner(&redis_cluster, &map, &key).connection();
        redis::cmd("ZCARD").arg(&key).query(&mut c).unwrap()
    };
    for user in users_on_every_shard(&map) {
        let mut d1 = a.connect(&user);
        wait_for("the first device to count", || devices(&user) == 1);
        let mut d2 = b.connect(&user);
        wait_for("the second device to count", || devices(&user) == 2);
        let mut d3 = b.connect(&user);
        assert_eq!(
            d1.expect_close(),
            4009,
            "{user}: the oldest, on the other instance"
        );
        let mut d4 = a.connect(&user);
        assert_eq!(d2.expect_close(), 4009, "{user}: the next oldest");
        wait_for("two devices counted", || devices(&user) == 2);
        for (dev, text) in [(&mut d3, "third"), (&mut d4, "fourth")] {
            dev.send_message(&user, text);
            while dev.recv_event("newMessage")["args"]["text"] != text {}
        }
        d3.close();
        d4.close();
        wait_for("no device counted", || devices(&user) == 0);
    }
}

const API_KEY: &str = "0123456789abcdef-api";

/// A server API call with the API key: the status and the JSON body.
fn api(addr: std::net::SocketAddr, method: &str, path: &str, body: &str) -> (u16, Value) {
    api_call(addr, method, path, API_KEY, body)
}

/// The server API's presence and connections queries, a room publish and the cluster-wide
/// disconnect, with the users' and the room's keys on different shards.
#[test]
fn server_api_across_a_cluster() {
    let redis_cluster = TestCluster::start();
    let with_key = || {
        let mut config = switchboard::Config {
            backplane: Some(cluster_config(&redis_cluster)),
            ..test_config()
        };
        config.history.api_key = Some(API_KEY.into());
        TestServer::with_config(config)
    };
    let (a, b) = (with_key(), with_key());
    let map = cluster::SlotMap::fetch(&cluster_config(&redis_cluster)).unwrap();
    let users = users_on_every_shard(&map);
    let (u1, u2) = (&users[0], &users[1]);
    let mut on_a = a.connect(u1);
    let mut on_b = b.connect(u1);
    let mut other = b.connect(u2);
    a.wait_channels(1);
    b.wait_channels(2);
    join(&mut on_a, "r", 1);
    join(&mut other, "r", 1);

    let (_, count) = api(a.addr, "GET", &format!("/api/connections?user={u1}"), "");
    assert_eq!(count, json!({"user": u1, "connections": 2}));
    let (_, presence) = api(a.addr, "GET", "/api/presence?room=r", "");
    assert_eq!(presence["online"], json!(sorted(&[u1, u2])));

    let notice = r#"{"room":"r","event":"notice","args":{"n":1}}"#;
    let (status, answer) = api(a.addr, "POST", "/api/publish", notice);
    assert_eq!(status, 200, "{answer}");
    for c in [&mut on_a, &mut on_b, &mut other] {
        assert_eq!(c.recv_event("notice")["args"]["n"], 1);
    }

    let (status, answer) = api(
        a.addr,
        "POST",
        "/api/disconnect",
        &json!({"user": u1}).to_string(),
    );
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["instances"], 2, "{answer}");
    assert_eq!(on_a.expect_close(), 4011);
    assert_eq!(on_b.expect_close(), 4011);
    other.send_acked(u2, "still here", 1);
}

/// A join or leave is two steps in two slots (the room's members, then the user's rooms; a
/// leave the other way round): a crash in between leaves the user a member that is not routed
/// the room, and the next join or leave completes it; a join refused at the user's room limit
/// leaves no member entry behind.
#[test]
fn a_half_done_join_or_leave_is_completed_by_the_next_one() {
    let redis_cluster = TestCluster::start();
    let one_room = RoomsConfig {
        max_rooms_per_user: 1,
        ..RoomsConfig::default()
    };
    let a = server(&redis_cluster, one_room);
    let map = cluster::SlotMap::fetch(&cluster_config(&redis_cluster)).unwrap();
    let user = users_on_every_shard(&map).swap_remove(1);
    let members_of = |room: &str| -> Vec<String> {
        let key = format!("{{switchboard:r:{room}}}:m");
        let mut c = owner(&redis_cluster, &map, &key).connection();
        redis::cmd("SMEMBERS").arg(&key).query(&mut c).unwrap()
    };
    let add_member = |room: &str| {
        let key = format!("{{switchboard:r:{room}}}:m");
        let mut c = owner(&redis_cluster, &map, &key).connection();
        let _: i64 = redis::cmd("SADD")
            .arg(&key)
            .arg(&user)
            .query(&mut c)
            .unwrap();
    };
    let mut dev = a.connect(&user);
    a.wait_channels(1);

    // The first step of a join done, the second not: a member, not routed.
    add_member("half");
    let args = json!({"room": "half", "text": "unrouted"});
    request_ok(&mut dev, "sendRoomMessage", args, 1);
    dev.expect_silence(Duration::from_millis(300));
    join(&mut dev, "half", 2);
    wait_room_routes(&a, 2, 1);
    dev.send_json(&json!({"event": "sendRoomMessage", "args": {"room": "half", "text": "routed"}}));
    assert_eq!(recv_room_message(&mut dev)["args"]["text"], "routed");

    // At the limit of one room: refused, and the room gets no member entry.
    let code = request_err(&mut dev, "joinRoom", json!({"room": "other"}), 3);
    assert_eq!(code, "room_limit");
    assert!(
        members_of("other").is_empty(),
        "the member entry was undone"
    );

    // The first step of a leave done, the second not: the next leave completes it.
    add_member("gone");
    request_ok(&mut dev, "leaveRoom", json!({"room": "gone"}), 4);
    assert!(members_of("gone").is_empty());
    let code = request_err(&mut dev, "leaveRoom", json!({"room": "gone"}), 5);
    assert_eq!(code, "not_member");
}
