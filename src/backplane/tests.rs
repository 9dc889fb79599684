//! Unit tests of `backplane`, beside it (moved out to keep the module under 800 lines).

use std::time::Duration;

use super::*;

#[test]
fn backoff_grows_to_the_cap_with_jitter() {
    let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1), 42);
    let delays: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
    assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
    assert!(delays.iter().all(|d| *d <= Duration::from_secs(1)));
    assert!(delays[7] >= Duration::from_millis(500));
    b.reset();
    assert!(b.next_delay() <= Duration::from_millis(100));
}

#[test]
fn config_validation() {
    assert!(RedisConfig::new("redis://127.0.0.1:6379")
        .validate()
        .is_ok());
    assert!(RedisConfig::new("not a url").validate().is_err());
    let mut c = RedisConfig::new("redis://127.0.0.1:1");
    c.channel_prefix = "a:b".into();
    assert!(c.validate().is_err());
}

#[test]
fn only_per_user_routing_on_one_redis_publishes_from_the_cores() {
    let one = Backplane::new(RedisConfig::new("redis://127.0.0.1:1"), 1);
    assert!(one.core_links());
    assert!(!one.publisher_connected(), "no link is up yet");
    let mut seed = RedisConfig::new("redis://127.0.0.1:1");
    seed.routing = Routing::Seed;
    assert!(!Backplane::new(seed, 1).core_links());
    let mut cluster = RedisConfig::new("redis://127.0.0.1:1");
    cluster.cluster = vec!["127.0.0.1:7000".into()];
    let cluster = Backplane::new(cluster, 1);
    assert!(
        !cluster.core_links(),
        "a cluster keeps the publisher thread"
    );
    cluster.stats.publisher_connected.store(1, Relaxed);
    assert!(cluster.publisher_connected());
}

#[test]
fn full_queue_drops_the_oldest() {
    let mut cfg = RedisConfig::new("redis://127.0.0.1:1");
    cfg.publish_queue = 2;
    let bp = Backplane::new(cfg, 1);
    let d = Arc::new(
        crate::bus::encode_dispatch(vec!["a".into(), "b".into(), "c".into()], "e", &1).unwrap(),
    );
    bp.publish(&d, None);
    assert_eq!(bp.queue_depth(), 2);
    assert_eq!(bp.stats.dropped.load(Relaxed), 1);
    let first = bp.publications.pop().unwrap();
    assert_eq!(&*first.user, "b", "the oldest (a) was dropped");
}
