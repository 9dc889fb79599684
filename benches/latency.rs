//! End to end, how long does a message take from one device's `send` to another device's
//! `read`, through a real in-process server: recipient on the same core, on another core, and on
//! another instance through a private Redis? Criterion times the round; an HDR histogram of the
//! individual rounds prints p50/p99/p99.9 per case.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Client, TestRedis, TestServer};
use criterion::{criterion_group, criterion_main, Criterion};
use hdrhistogram::Histogram;
use switchboard::backplane::Routing;

/// Connects `user` to `server` until the connection lands on core `want` (SO_REUSEPORT hashes).
fn connect_on_core(server: &TestServer, user: &str, want: usize) -> Client {
    for _ in 0..64 {
        let before = server.per_core_connections();
        let client = server.connect(user);
        let total = before.iter().sum::<u64>() + 1;
        server.wait_stats("connection", |s| {
            s.iter().map(|c| c.connections).sum::<u64>() == total
        });
        let after = server.per_core_connections();
        if after[want] > before[want] {
            return client;
        }
        client.close();
        let back = total - 1;
        server.wait_stats("close", |s| {
            s.iter().map(|c| c.connections).sum::<u64>() == back
        });
    }
    panic!("no connection landed on core {want}");
}

/// One round: the sender sends, the recipient reads it (the sender's own copy is drained too).
fn round(sender: &mut Client, recipient: &mut Client, to: &str) -> Duration {
    let start = Instant::now();
    sender.send_message(to, "x");
    recipient.recv_event("newMessage");
    let elapsed = start.elapsed();
    sender.recv_event("newMessage");
    elapsed
}

fn run_case(c: &mut Criterion, name: &str, sender: &mut Client, recipient: &mut Client, to: &str) {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let d = round(sender, recipient, to);
                let _ = hist.record(d.as_micros().max(1) as u64);
                total += d;
            }
            total
        })
    });
    println!(
        "{name}: rounds={} p50={}us p99={}us p99.9={}us max={}us",
        hist.len(),
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999),
        hist.max()
    );
}

fn latency(c: &mut Criterion) {
    if let Ok(cpu) = std::env::var("PIN_BENCH") {
        let ids = core_affinity::get_core_ids().unwrap();
        core_affinity::set_for_current(ids[cpu.parse::<usize>().unwrap()]);
    }
    // One message at a time, back to back: well over the default per-connection rate limit.
    let server = TestServer::with_config(switchboard::Config {
        rate_limit_per_sec: 0,
        ..common::test_config()
    });
    let mut sender = connect_on_core(&server, "sender", 0);
    let mut same = connect_on_core(&server, "same", 0);
    let mut cross = connect_on_core(&server, "cross", 1);
    run_case(c, "latency/same_core", &mut sender, &mut same, "same");
    run_case(c, "latency/cross_core", &mut sender, &mut cross, "cross");

    if std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("latency/cross_instance: skipped (redis-server not on PATH)");
        return;
    }
    let redis = TestRedis::start();
    let unlimited = || {
        let mut rc = switchboard::backplane::RedisConfig::new(redis.url());
        rc.routing = Routing::PerUser;
        TestServer::with_config(switchboard::Config {
            backplane: Some(rc),
            rate_limit_per_sec: 0,
            ..common::test_config()
        })
    };
    let a = unlimited();
    let b = unlimited();
    let mut sender = a.connect("s");
    let mut remote = b.connect("r");
    b.wait_channels(1);
    a.wait_channels(1);
    run_case(
        c,
        "latency/cross_instance_redis",
        &mut sender,
        &mut remote,
        "r",
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
    targets = latency
}
criterion_main!(benches);
