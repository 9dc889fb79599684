//! The plain HTTP side of the port: /healthz, /metrics, and every status a request can get
//! before (or instead of) an upgrade.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use switchboard::Config;

/// Every metric name docs/PROTOCOL.md lists.
const METRICS: [&str; 23] = [
    "switchboard_connections_open",
    "switchboard_sends_over_budget_total",
    "switchboard_history_bytes",
    "switchboard_history_evicted_total",
    "switchboard_connects_rate_limited_total",
    "switchboard_handshakes_refused_total",
    "switchboard_handshakes_shed_total",
    "switchboard_outbound_buffered_bytes",
    "switchboard_connections_accepted_total",
    "switchboard_frames_in_total",
    "switchboard_frames_out_total",
    "switchboard_bytes_out_total",
    "switchboard_dispatches_total",
    "switchboard_inbox_drops_total",
    "switchboard_auth_failures_total",
    "switchboard_handshake_failures_total",
    "switchboard_rejected_over_capacity_total",
    "switchboard_client_errors_total",
    "switchboard_http_requests_total",
    "switchboard_connections_closed_total",
    "switchboard_core_connections_open",
    "switchboard_recoveries_complete_total",
    "switchboard_recoveries_incomplete_total",
];

const CLOSE_REASONS: [&str; 9] = [
    "client_close",
    "reset",
    "shutdown",
    "protocol_error",
    "binary_frame",
    "invalid_utf8",
    "message_too_big",
    "heartbeat_timeout",
    "slow_consumer",
];

/// The whole response: (head, body).
fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete response");
    (head.to_string(), body.to_string())
}

#[test]
fn healthz_reports_cores_connections_and_node() {
    let server = TestServer::start();
    let _a = server.connect("a");
    let _b = server.connect("b");
    server.wait_stats("two connections", |s| {
        s.iter().map(|c| c.connections).sum::<u64>() == 2
    });
    let (head, body) = exchange(server.addr, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains("Content-Type: application/json\r\n"),
        "{head}"
    );
    assert!(head.contains("Connection: close\r\n"), "{head}");
    let h: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(h["status"], "ok");
    assert_eq!(h["cores"], 2);
    assert_eq!(h["connections"], 2);
    let per_core = h["per_core"].as_array().unwrap();
    assert_eq!(per_core.len(), 2);
    let mut total = 0;
    for (i, c) in per_core.iter().enumerate() {
        assert_eq!(c["core"], i);
        let keys: Vec<&str> = c.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys.len(), 4, "{c}");
        total += c["connections"].as_u64().unwrap();
        assert!(c["sockets"].as_u64().unwrap() >= c["connections"].as_u64().unwrap());
        assert!(c["users"].as_u64().is_some());
    }
    assert_eq!(total, 2);
    let node = h["node"].as_str().unwrap();
    assert_eq!(node.len(), 16);
    assert!(node
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    assert_eq!(node, format!("{:016x}", server.handle.node_id()));
    // Without a backplane configured, it says so.
    assert_eq!(h["backplane"], serde_json::json!({"kind": "none"}));
    // History is on by default.
    assert_eq!(h["history"], "on");
    // Ready: started, not draining, no backplane to wait for.
    assert_eq!(h["ready"], true);
    let keys: Vec<&str> = h.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys.len(), 8, "{h}");
}

#[test]
fn metrics_lists_every_documented_family() {
    let server = TestServer::start();
    let (head, body) = exchange(server.addr, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"),
        "{head}"
    );
    for name in METRICS {
        assert!(
            body.contains(&format!("# TYPE {name} ")),
            "{name} missing:\n{body}"
        );
        assert!(
            body.contains(&format!("# HELP {name} ")),
            "{name} has no HELP"
        );
    }
    for reason in CLOSE_REASONS {
        assert_eq!(metric(server.addr, &closed_metric(reason)), 0, "{reason}");
    }
    for core in 0..2 {
        let name = format!("switchboard_core_connections_open{{core=\"{core}\"}}");
        assert_eq!(metric(server.addr, &name), 0);
    }
    // The scrape itself was answered, so the counter moved.
    assert!(metric(server.addr, "switchboard_http_requests_total") >= 1);
}

#[test]
fn unknown_paths_and_methods() {
    let server = TestServer::start();
    assert_eq!(http_get(server.addr, "/nope"), (404, "not found\n".into()));
    assert_eq!(
        http_get(server.addr, "/index.htm"),
        (404, "not found\n".into())
    );
    assert_eq!(
        http_get(server.addr, "/healthz/extra"),
        (404, "not found\n".into())
    );
    for (method, path) in [
        ("POST", "/healthz"),
        ("PUT", "/metrics"),
        ("POST", "/ws"),
        ("HEAD", "/healthz"),
        ("POST", "/"),
        ("HEAD", "/index.html"),
    ] {
        let req = format!("{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(
            raw_request(server.addr, req.as_bytes()),
            (405, "method not allowed\n".into()),
            "{method} {path}"
        );
    }
    // A query string does not change the route.
    assert_eq!(http_get(server.addr, "/healthz?verbose=1").0, 200);
}

#[test]
fn the_chat_page_is_served_at_the_root() {
    let server = TestServer::start();
    for path in ["/", "/index.html", "/?token=ignored"] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
        let (head, body) = exchange(server.addr, req.as_bytes());
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{path}: {head}");
        let lines: Vec<&str> = head.lines().collect();
        assert!(
            lines.contains(&"Content-Type: text/html; charset=utf-8"),
            "{head}"
        );
        assert!(lines.contains(&"Cache-Control: no-cache"), "{head}");
        assert!(lines.contains(&"Connection: close"), "{head}");
        let csp = lines
            .iter()
            .find_map(|l| l.strip_prefix("Content-Security-Policy: "))
            .expect("a Content-Security-Policy");
        assert!(csp.starts_with("default-src 'none'; "), "{csp}");
        assert!(csp.contains("connect-src 'self'"), "{csp}");
        assert_eq!(body, switchboard::web::index_html());
    }
}

#[test]
fn the_chat_page_can_be_turned_off() {
    let server = TestServer::with_config(Config {
        chat_page: false,
        ..test_config()
    });
    assert_eq!(http_get(server.addr, "/"), (404, "not found\n".into()));
    assert_eq!(
        http_get(server.addr, "/index.html"),
        (404, "not found\n".into())
    );
    // The rest of the port is unchanged.
    assert_eq!(server.health()["status"], "ok");
}

#[test]
fn ws_without_upgrade_headers_is_426() {
    let server = TestServer::start();
    let (head, body) = exchange(server.addr, b"GET /ws?token=u1 HTTP/1.1\r\nHost: t\r\n\r\n");
    assert!(
        head.starts_with("HTTP/1.1 426 Upgrade Required\r\n"),
        "{head}"
    );
    assert!(head.lines().any(|l| l == "Upgrade: websocket"), "{head}");
    assert_eq!(body, "websocket upgrade required\n");
    // Upgrade without Connection: upgrade is not an upgrade request either.
    let (status, _) = raw_request(
        server.addr,
        b"GET /ws?token=u1 HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    );
    assert_eq!(status, 426);
    // A version other than 13.
    let (head, body) = exchange(
        server.addr,
        b"GET /ws?token=u1 HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    );
    assert!(head.starts_with("HTTP/1.1 426 "), "{head}");
    assert!(
        head.lines().any(|l| l == "Sec-WebSocket-Version: 13"),
        "{head}"
    );
    assert_eq!(body, "unsupported websocket version\n");
}

#[test]
fn a_bad_websocket_key_is_400() {
    let server = TestServer::start();
    for key in [
        "",
        "short",
        "dGhlIHNhbXBsZSBub25jZQ=!",
        "dGhlIHNhbXBsZSBub25jZQ",
    ] {
        let req = format!(
            "GET /ws?token=u1 HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
        );
        assert_eq!(
            raw_request(server.addr, req.as_bytes()),
            (400, "missing or invalid Sec-WebSocket-Key\n".into()),
            "{key:?}"
        );
    }
    let no_key = b"GET /ws?token=u1 HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\n\
        Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n";
    assert_eq!(raw_request(server.addr, no_key).0, 400);
}

#[test]
fn oversized_request_heads_are_431() {
    let server = TestServer::start();
    // Over max_request_header_bytes (8 KiB by default).
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(9 * 1024)
    );
    assert_eq!(
        raw_request(server.addr, big.as_bytes()),
        (431, "request header fields too large\n".into())
    );
    // More than 64 headers, each small.
    let mut many = String::from("GET /healthz HTTP/1.1\r\n");
    for i in 0..70 {
        many.push_str(&format!("X-{i}: y\r\n"));
    }
    many.push_str("\r\n");
    assert!(many.len() < 8 * 1024);
    assert_eq!(
        raw_request(server.addr, many.as_bytes()),
        (431, "request header fields too large\n".into())
    );
    // Just under the size limit is fine.
    let fits = format!(
        "GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(7 * 1024)
    );
    assert_eq!(raw_request(server.addr, fits.as_bytes()).0, 200);
}

#[test]
fn garbage_bytes_are_400() {
    let server = TestServer::start();
    for garbage in [
        &b"\x00\x01garbage\r\n\r\n"[..],
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", // a TLS ClientHello
        b"GET\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
    ] {
        assert_eq!(
            raw_request(server.addr, garbage),
            (400, "malformed request\n".into()),
            "{garbage:?}"
        );
    }
    // The server is fine afterwards.
    assert_eq!(server.health()["status"], "ok");
}

#[test]
fn ambiguous_lengths_and_bare_lf_are_400_and_statuses_have_their_reason() {
    let mut config = test_config();
    config.history.api_key = Some("k".repeat(16));
    let server = TestServer::with_config(config);
    let body = r#"{"users":["u1"],"event":"e","args":{}}"#;
    let auth = format!("Authorization: Bearer {}\r\n", "k".repeat(16));
    let smuggles = [
        format!(
            "POST /api/publish HTTP/1.1\r\n{auth}Content-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{body}",
            body.len()
        ),
        format!(
            "POST /api/publish HTTP/1.1\r\n{auth}Content-Length: {}\r\nContent-Length: 5\r\n\r\n{body}",
            body.len()
        ),
        format!(
            "POST /api/publish HTTP/1.1\r\n{auth}Content-Length: +{}\r\n\r\n{body}",
            body.len()
        ),
        "GET /healthz HTTP/1.1\nHost: a\n\n".to_string(),
    ];
    for raw in &smuggles {
        let (head, _) = exchange(server.addr, raw.as_bytes());
        assert!(
            head.starts_with("HTTP/1.1 400 Bad Request"),
            "{raw:?}: {head}"
        );
    }
    let (head, _) = exchange(
        server.addr,
        format!("POST /api/publish HTTP/1.1\r\n{auth}\r\n").as_bytes(),
    );
    assert!(head.starts_with("HTTP/1.1 411 Length Required"), "{head}");
    // The same request, framed once, is served.
    let (head, _) = exchange(
        server.addr,
        format!(
            "POST /api/publish HTTP/1.1\r\n{auth}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
}

#[test]
fn max_connections_reached_is_503() {
    let server = TestServer::with_config(Config {
        max_connections: 2,
        ..test_config()
    });
    let a = server.connect("a");
    let _b = server.connect("b");
    assert_eq!(
        try_upgrade(server.addr, "/ws?token=c", ""),
        (503, "server at max_connections\n".into())
    );
    assert_eq!(
        metric(server.addr, "switchboard_rejected_over_capacity_total"),
        1
    );
    // Plain HTTP is still served at capacity.
    assert_eq!(server.health()["connections"], 2);
    // A slot freed is a slot usable again.
    a.close();
    server.wait_stats("a to go", |s| {
        s.iter().map(|c| c.connections).sum::<u64>() == 1
    });
    let mut c = server.connect("c");
    c.send_message("c", "in");
    assert_eq!(c.recv_event("newMessage")["args"]["text"], "in");
}

#[test]
fn a_slowloris_is_dropped_after_the_handshake_timeout() {
    let timeout = Duration::from_millis(300);
    let server = TestServer::with_config(Config {
        handshake_timeout: timeout,
        ..test_config()
    });
    let before = metric(server.addr, "switchboard_handshake_failures_total");
    let mut s = TcpStream::connect(server.addr).unwrap();
    let started = Instant::now();
    s.write_all(b"GET /ws?token=slow HTTP/1.1\r\nHost: t\r\nConnection: Upg")
        .unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).unwrap_or(0);
    let waited = started.elapsed();
    assert_eq!(n, 0, "dropped without a response: {:?}", &buf[..n]);
    assert!(waited >= timeout, "dropped too early: {waited:?}");
    // The deadline is checked every 250 ms.
    assert!(
        waited < timeout + Duration::from_secs(1),
        "dropped late: {waited:?}"
    );
    wait_metric(
        server.addr,
        "switchboard_handshake_failures_total",
        before + 1,
    );
    server.wait_stats("no sockets left", |st| st.iter().all(|c| c.sockets == 0));
    // A client that sends nothing at all is dropped the same way.
    let mut idle = TcpStream::connect(server.addr).unwrap();
    idle.set_read_timeout(Some(DEADLINE)).unwrap();
    assert_eq!(idle.read(&mut buf).unwrap_or(0), 0);
    wait_metric(
        server.addr,
        "switchboard_handshake_failures_total",
        before + 2,
    );
}

#[test]
fn a_request_sent_in_pieces_is_still_served() {
    let server = TestServer::start();
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_nodelay(true).unwrap();
    for piece in ["GE", "T /heal", "thz HTTP/1.1\r\nHo", "st: t\r\n", "\r\n"] {
        s.write_all(piece.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
}
