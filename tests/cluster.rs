//! A three-node Redis Cluster: two instances deliver across it with sharded pub/sub, each user's
//! channel subscribed on the shard that owns its slot.

mod common;

use std::time::Duration;

use common::*;
use switchboard::backplane::{cluster, RedisConfig, Routing};

#[test]
fn two_instances_deliver_across_a_cluster_with_sharded_pubsub() {
    let redis_cluster = TestCluster::start();
    let start = || {
        let mut rc = RedisConfig::new("redis://127.0.0.1:1");
        rc.routing = Routing::PerUser;
        rc.cluster = redis_cluster.seeds();
        rc.reconnect_max = Duration::from_millis(300);
        TestServer::with_config(switchboard::Config {
            backplane: Some(rc),
            ..test_config()
        })
    };
    let a = start();
    let b = start();

    // Users whose channels live on all three shards.
    let map = cluster::SlotMap::fetch(&redis_cluster.seeds()).unwrap();
    assert_eq!(map.shards.len(), 3);
    let mut users: Vec<String> = Vec::new();
    let mut shards_hit = std::collections::HashSet::new();
    for n in 0.. {
        let user = format!("user{n}");
        let shard = map.shard_of(format!("switchboard:u:{user}").as_bytes());
        if shards_hit.insert(shard) {
            users.push(user);
        }
        if shards_hit.len() == 3 {
            break;
        }
    }
    let mut on_a: Vec<Client> = users.iter().map(|u| a.connect(u)).collect();
    let mut on_b: Vec<Client> = users.iter().map(|u| b.connect(u)).collect();
    let mut sender = a.connect("sender");
    a.wait_channels(4);
    b.wait_channels(3);

    // Each shard holds the sharded subscriptions of its users, from both instances.
    for user in &users {
        let channel = format!("switchboard:u:{user}");
        let owner = &map.shards[map.shard_of(channel.as_bytes())];
        let node = redis_cluster
            .nodes
            .iter()
            .find(|n| owner.ends_with(&format!(":{}", n.port)))
            .unwrap();
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
