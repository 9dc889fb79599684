//! A three-node Redis Cluster: two instances deliver across it with sharded pub/sub, each user's
//! channel subscribed on the shard that owns its slot; with history on, each user's stream
//! hash-tagged into that slot: offsets, held acks, `clientId` deduplication, resume and pages.

mod common;

use std::time::Duration;

use common::*;
use switchboard::backplane::{cluster, RedisConfig, Routing};

#[test]
fn two_instances_deliver_across_a_cluster_with_sharded_pubsub() {
    let redis_cluster = TestCluster::start();
    let a = cluster_server(&redis_cluster);
    let b = cluster_server(&redis_cluster);

    // Users whose channels live on all three shards.
    let map = cluster::SlotMap::fetch(&cluster_config(&redis_cluster)).unwrap();
    assert_eq!(map.shards.len(), 3);
    let users = users_on_every_shard(&map);
    let mut on_a: Vec<Client> = users.iter().map(|u| a.connect(u)).collect();
    let mut on_b: Vec<Client> = users.iter().map(|u| b.connect(u)).collect();
    let mut sender = a.connect("sender");
    a.wait_channels(4);
    b.wait_channels(3);

    // Each shard holds the sharded subscriptions of its users, from both instances.
    for user in &users {
        let channel = format!("switchboard:u:{user}");
        let (owner, node) = owner_of(&redis_cluster, &map, &channel);
        let mut c = node.connection();
        let counts: Vec<redis::Value> = redis::cmd("PUBSUB")
            .arg("SHARDNUMSUB")
            .arg(&channel)
            .query(&mut c)
            .unwrap();
        assert_eq!(
            counts.get(1),
            Some(&redis::Value::Int(2)),
            "{channel} on {owner}"
        );
    }

    for user in &users {
        sender.send_message(user, &format!("to {user}"));
    }
    for (i, user) in users.iter().enumerate() {
        for dev in [&mut on_a[i], &mut on_b[i]] {
            let m = dev.recv_event("newMessage");
            assert_eq!(m["args"]["text"], format!("to {user}"));
            dev.expect_silence(Duration::from_millis(100));
        }
    }
    assert!(b.bp_stat(|s| &s.delivered) >= 3);
}

/// Per-user routing on the cluster.
fn cluster_config(redis_cluster: &TestCluster) -> RedisConfig {
    let mut rc = RedisConfig::new("redis://127.0.0.1:1");
    rc.routing = Routing::PerUser;
    rc.cluster = redis_cluster.seeds();
    rc
}

/// An instance on the cluster, per-user routing, history on.
fn cluster_server(redis_cluster: &TestCluster) -> TestServer {
    let mut rc = cluster_config(redis_cluster);
    rc.reconnect_max = Duration::from_millis(300);
    TestServer::with_config(switchboard::Config {
        backplane: Some(rc),
        ..test_config()
    })
}

/// The primary owning `channel`'s slot: its address and its node.
fn owner_of<'c>(
    redis_cluster: &'c TestCluster,
    map: &cluster::SlotMap,
    channel: &str,
) -> (String, &'c TestRedis) {
    let owner = map.shards[map.shard_of(channel.as_bytes())].clone();
    let node = redis_cluster
        .nodes
        .iter()
        .find(|n| owner.ends_with(&format!(":{}", n.port)))
        .expect("the owner is a node of the cluster");
    (owner, node)
}

/// Users whose channels live on each of the cluster's three shards.
fn users_on_every_shard(map: &cluster::SlotMap) -> Vec<String> {
    let mut users = Vec::new();
    let mut shards_hit = std::collections::HashSet::new();
    for n in 0.. {
        let user = format!("user{n}");
        if shards_hit.insert(map.shard_of(format!("switchboard:u:{user}").as_bytes())) {
            users.push(user);
        }
        if shards_hit.len() == 3 {
            return users;
        }
    }
    unreachable!()
}

/// History on a cluster: every user's stream is hash-tagged into its channel's slot, so the
/// append script runs on the shard that owns the user, with offsets, held acks, `clientId`
/// deduplication, resume on another instance and pages, for users on all three shards.
#[test]
fn history_resume_and_dedupe_work_across_a_cluster() {
    let redis_cluster = TestCluster::start();
    let a = cluster_server(&redis_cluster);
    let b = cluster_server(&redis_cluster);
    let map = cluster::SlotMap::fetch(&cluster_config(&redis_cluster)).unwrap();
    let users = users_on_every_shard(&map);
    let mut on_a: Vec<Client> = users.iter().map(|u| a.connect(u)).collect();
    let mut sender = b.connect("sender");
    a.wait_channels(3);
    b.wait_channels(1);

    // The ack is held until the shard stored it; the device gets it with an offset.
    let mut offsets = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let args = serde_json::json!({"to": user, "text": "first", "clientId": format!("c{i}")});
        request_ok(&mut sender, "sendMessage", args.clone(), 10 + i as u64);
        // A resend with the same clientId: acked, not stored or delivered again.
        request_ok(&mut sender, "sendMessage", args, 20 + i as u64);
        let m = on_a[i].recv_event("newMessage");
        assert_eq!(m["args"]["text"], "first");
        offsets.push(m["offset"].as_str().expect("an offset").to_string());
        on_a[i].expect_silence(Duration::from_millis(100));
    }
    // Each stream lives on the shard owning the user's channel, once.
    for user in &users {
        let channel = format!("switchboard:u:{user}");
        let (owner, node) = owner_of(&redis_cluster, &map, &channel);
        let len: usize = redis::cmd("XLEN")
            .arg(format!("{{{channel}}}:h"))
            .query(&mut node.connection())
            .unwrap();
        assert_eq!(len, 1, "{user}'s stream on {owner}");
    }
    // Many users arriving at once: their subscriptions go out together, one `SSUBSCRIBE` per
    // channel (a cluster refuses one naming channels of several slots).
    let server = &b;
    let many: Vec<Client> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..24)
            .map(|n| s.spawn(move || server.connect(&format!("many{n}"))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    b.wait_channels(1 + 24);
    for (n, mut dev) in many.into_iter().enumerate() {
        sender.send_message(&format!("many{n}"), "hi");
        assert_eq!(dev.recv_event("newMessage")["args"]["text"], "hi");
    }
    // Missed while away, resumed on the other instance.
    for dev in on_a.drain(..) {
        dev.close();
    }
    for user in &users {
        sender.send_message(user, "missed");
    }
    for (i, user) in users.iter().enumerate() {
        let url = format!("ws://{}/ws?token={user}&since={}", b.addr, offsets[i]);
        let mut back = Client::connect_url(&url, user);
        assert_eq!(back.recv_event("newMessage")["args"]["text"], "missed");
        let rec = back.recv_event("recovered");
        assert_eq!(rec["args"]["complete"], true, "{user}: {rec}");
        let (status, body) = b.get(&format!("/api/history?token={user}"));
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("missed") && body.contains("first"), "{body}");
    }
}

/// `--redis-wait-replicas`: an ack waits until the shard's replica has the message; asking for
/// more replicas than there are gets `unavailable` (stored on the primary, so a resend with the
/// same `clientId` is recognised and acknowledged once a replica has it).
#[test]
fn acks_wait_for_replicas_with_wait_replicas() {
    let redis_cluster = TestCluster::start_with_replicas();
    let server = |replicas: u32, timeout_ms: u64| {
        let mut rc = RedisConfig::new("redis://127.0.0.1:1");
        rc.cluster = redis_cluster.seeds();
        rc.wait_replicas = replicas;
        rc.wait_timeout = Duration::from_millis(timeout_ms);
        TestServer::with_config(switchboard::Config {
            backplane: Some(rc),
            ..test_config()
        })
    };
    // Generous where a replica exists (the box may be busy); short where none can answer: the
    // publisher waits it out once per shard the message touches.
    let one = server(1, 1000);
    let two = server(2, 200);
    let mut on_one = one.connect("u1");
    let mut on_two = two.connect("u2");
    one.wait_channels(1);
    two.wait_channels(1);
    let args = serde_json::json!({"to": "u3", "text": "copied", "clientId": "k1"});
    request_ok(&mut on_one, "sendMessage", args, 1);
    let args = serde_json::json!({"to": "u3", "text": "twice", "clientId": "k2"});
    assert_eq!(
        request_err(&mut on_two, "sendMessage", args.clone(), 2),
        "unavailable",
        "one replica per primary: two cannot have it"
    );
    // The same sender resends through an instance that waits for one replica.
    let mut u2_on_one = one.connect("u2");
    request_ok(&mut u2_on_one, "sendMessage", args, 3);
    let (status, body) = one.get("/api/history?token=u3");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.matches("twice").count(), 1, "stored once: {body}");
}
