//! Readiness and drain of the real binary: `/readyz` answers 503 while the backplane cannot
//! publish and while draining; SIGTERM closes open connections with 1001 spread over
//! `--drain-period`, refusing new upgrades meanwhile, then exits 0.

mod common;

use std::time::{Duration, Instant};

use common::*;

const SIGTERM: i32 = 15;

fn readyz(addr: std::net::SocketAddr) -> (u16, serde_json::Value) {
    let (status, body) = http_get(addr, "/readyz");
    (status, serde_json::from_str(&body).unwrap_or_default())
}

fn health(addr: std::net::SocketAddr) -> serde_json::Value {
    let (status, body) = http_get(addr, "/healthz");
    assert_eq!(status, 200, "healthz is liveness: {body}");
    serde_json::from_str(&body).unwrap()
}

#[test]
fn embedded_is_ready_once_listening() {
    let server = ChildServer::spawn(&[]);
    let (status, body) = readyz(server.addr);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ready"], true);
    assert_eq!(health(server.addr)["status"], "ok");
}

#[test]
fn readyz_fails_while_redis_is_unreachable_and_recovers_with_it() {
    let mut redis = TestRedis::start();
    let url = redis.url();
    let server = ChildServer::spawn(&[
        "--backplane",
        "redis",
        "--redis-url",
        &url,
        "--redis-reconnect-max",
        "200ms",
    ]);
    wait_for("ready", || readyz(server.addr).0 == 200);
    assert_eq!(health(server.addr)["status"], "ok");

    redis.kill();
    wait_for("not ready without redis", || readyz(server.addr).0 == 503);
    let (_, body) = readyz(server.addr);
    assert!(
        body["reason"].as_str().unwrap().contains("backplane"),
        "{body}"
    );
    let h = health(server.addr);
    assert_eq!(h["status"], "degraded", "{h}");
    assert_eq!(h["ready"], false, "{h}");

    redis.restart();
    wait_for("ready again", || readyz(server.addr).0 == 200);
}

#[test]
fn sigterm_drains_in_batches_over_the_drain_period() {
    let mut server = ChildServer::spawn(&["--drain-period", "2s", "--shutdown-timeout", "2s"]);
    let addr = server.addr;
    let mut clients: Vec<Client> = (0..12)
        .map(|i| Client::connect(addr, &format!("d{i}")))
        .collect();
    wait_for("12 connections", || health(addr)["connections"] == 12);

    let signalled = Instant::now();
    server.signal(SIGTERM);
    wait_for("not ready while draining", || readyz(addr).0 == 503);
    assert_eq!(readyz(addr).1["reason"], "draining");
    assert_eq!(health(addr)["status"], "draining");
    let (status, body) = try_upgrade(addr, "/ws?token=late", "");
    assert_eq!(
        status, 503,
        "new upgrades are refused while draining: {body}"
    );

    // Each client reads until its close; the times are when each close was seen.
    let mut seen = Vec::new();
    for c in clients.iter_mut() {
        assert_eq!(c.expect_close(), 1001, "{}", c.user);
        seen.push(signalled.elapsed());
    }
    let status = server.wait_exit();
    assert_eq!(status.code(), Some(0), "{status:?}");
    let first = *seen.iter().min().unwrap();
    let last = *seen.iter().max().unwrap();
    assert!(
        first < Duration::from_millis(1200),
        "first batch at {first:?}"
    );
    assert!(
        last >= Duration::from_millis(1000),
        "the closes were not spread over the period: the last came at {last:?}"
    );
    assert!(last < Duration::from_secs(5), "last close at {last:?}");
}

#[test]
fn a_second_signal_closes_the_rest_at_once() {
    let mut server = ChildServer::spawn(&["--drain-period", "60s"]);
    let mut clients: Vec<Client> = (0..4)
        .map(|i| Client::connect(server.addr, &format!("s{i}")))
        .collect();
    wait_for("4 connections", || health(server.addr)["connections"] == 4);
    let signalled = Instant::now();
    server.signal(SIGTERM);
    wait_for("draining", || readyz(server.addr).0 == 503);
    server.signal(SIGTERM);
    for c in clients.iter_mut() {
        assert_eq!(c.expect_close(), 1001, "{}", c.user);
    }
    assert_eq!(server.wait_exit().code(), Some(0));
    assert!(signalled.elapsed() < Duration::from_secs(10));
}

#[test]
fn refusals_are_logged_with_their_reason_and_rate_limited() {
    // One core: the limit is per core.
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"));
    command
        .args(["--listen", "127.0.0.1:0", "--cores", "1"])
        .args(["--jwt-secret", "0123456789abcdef0123"])
        .env("RUST_LOG", "info");
    let server = ChildServer::spawn_command(command);
    for _ in 0..30 {
        let (status, _) = try_upgrade(server.addr, "/ws?token=forged", "");
        assert_eq!(status, 401);
    }
    let refused = |lines: &[String]| {
        lines
            .iter()
            .filter(|l| l.contains("refused 127.0.0.1:") && l.contains(": 401 "))
            .count()
    };
    wait_for("refusal lines", || refused(&server.log_lines()) >= 20);
    // A second later, the next refusal is logged with the count of those left out.
    std::thread::sleep(Duration::from_millis(1100));
    let (status, _) = try_upgrade(server.addr, "/ws?token=forged", "");
    assert_eq!(status, 401);
    wait_for("the count of lines left out", || {
        server
            .log_lines()
            .iter()
            .any(|l| l.contains("10 more refusals in the last second were not logged"))
    });
    assert_eq!(
        refused(&server.log_lines()),
        21,
        "{:#?}",
        server.log_lines()
    );
}
