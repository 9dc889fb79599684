//! `/metrics` beyond the counters: the histograms (message latency, ack wait, outbound backlog,
//! Redis round trip), build info and process metrics, and `--metrics-listen`.

mod common;

use common::*;

#[test]
fn histograms_build_info_and_process_metrics() {
    let server = TestServer::start();
    let mut a = server.connect("a");
    let mut b = server.connect("b");
    a.send_message("b", "hello");
    b.recv_event("newMessage");
    let latency = wait_metric(server.addr, "switchboard_message_latency_seconds_count", 1);
    assert!(latency >= 1);
    assert!(
        metric(
            server.addr,
            "switchboard_message_latency_seconds_bucket{le=\"+Inf\"}"
        ) == metric(server.addr, "switchboard_message_latency_seconds_count"),
        "+Inf counts every observation"
    );
    assert!(metric(server.addr, "switchboard_outbound_backlog_bytes_count") >= 1);
    let (_, body) = http_get(server.addr, "/metrics");
    for family in [
        "switchboard_message_latency_seconds",
        "switchboard_ack_wait_seconds",
        "switchboard_outbound_backlog_bytes",
    ] {
        assert!(
            body.contains(&format!("# TYPE {family} histogram")),
            "{family}"
        );
    }
    assert!(
        body.contains(&format!(
            "switchboard_build_info{{version=\"{}\"",
            env!("CARGO_PKG_VERSION")
        )),
        "{body}"
    );
    for gauge in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_cpu_seconds_total",
        "process_start_time_seconds",
    ] {
        assert!(body.contains(&format!("\n{gauge} ")), "{gauge} missing");
    }
}

#[test]
fn redis_round_trip_and_ack_wait_are_observed() {
    let redis = TestRedis::start();
    let server = redis_server(&redis, switchboard::backplane::Routing::PerUser);
    let mut a = server.connect("a");
    let answer = a.send_acked("b", "stored", 1);
    assert!(answer.is_object() || answer.is_null(), "{answer}");
    wait_metric(server.addr, "switchboard_redis_round_trip_seconds_count", 1);
    wait_metric(server.addr, "switchboard_ack_wait_seconds_count", 1);
}

#[test]
fn metrics_listen_serves_metrics_off_the_public_port() {
    let server = ChildServer::spawn(&["--metrics-listen", "127.0.0.1:0"]);
    let logged = || {
        server
            .log_lines()
            .into_iter()
            .find(|l| l.contains("metrics on http://"))
    };
    wait_for("the metrics address in the log", || logged().is_some());
    let line = logged().unwrap();
    let addr: std::net::SocketAddr = line
        .split("metrics on http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap()
        .parse()
        .unwrap();
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200);
    assert!(body.contains("# TYPE switchboard_connections_open gauge"));
    assert_eq!(http_get(addr, "/readyz").0, 200);
    assert_eq!(http_get(addr, "/healthz").0, 200);
    assert_eq!(http_get(addr, "/ws").0, 404);
    assert_eq!(
        http_get(server.addr, "/metrics").0,
        404,
        "not on the public port"
    );
    assert_eq!(http_get(server.addr, "/readyz").0, 200);
}
