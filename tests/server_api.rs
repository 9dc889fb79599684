//! The server API under `/api` with the API key: publish to a room and to everyone, presence of
//! a room, a user's connection count, any user's history, `POST /api/disconnect` (4011 on every
//! device, on every instance); JSON errors; `--allowed-origins` for upgrades and CORS.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use switchboard::backplane::RedisConfig;
use switchboard::config::hooks::Origins;
use switchboard::Config;

const KEY: &str = "0123456789abcdef-api";

fn config() -> Config {
    let mut config = Config {
        rate_limit_per_sec: 0,
        ..test_config()
    };
    config.history.api_key = Some(KEY.into());
    config
}

fn on_redis(redis: &TestRedis) -> TestServer {
    let mut rc = RedisConfig::new(redis.url());
    rc.reconnect_max = Duration::from_millis(300);
    TestServer::with_config(Config {
        backplane: Some(rc),
        ..config()
    })
}

fn post(addr: SocketAddr, path: &str, body: &str) -> (u16, Value) {
    api_call(addr, "POST", path, KEY, body)
}

fn get(addr: SocketAddr, path: &str) -> (u16, Value) {
    api_call(addr, "GET", path, KEY, "")
}

fn join(c: &mut Client, room: &str, ack: u64) {
    request_ok(c, "joinRoom", json!({ "room": room }), ack);
}

#[test]
fn publish_to_a_room_and_to_everyone_presence_counts_and_history() {
    let server = TestServer::with_config(config());
    let (mut phone, mut laptop) = (server.connect("u1"), server.connect("u1"));
    let mut u2 = server.connect("u2");
    let mut u3 = server.connect("u3");
    join(&mut phone, "r", 1);
    join(&mut u2, "r", 1);

    let (status, answer) = post(
        server.addr,
        "/api/publish",
        r#"{"room":"r","event":"notice","args":{"n":1}}"#,
    );
    assert_eq!(status, 200, "{answer}");
    assert!(answer["offsets"]["u1"].is_string() && answer["offsets"]["u2"].is_string());
    assert_eq!(answer["offsets"].as_object().unwrap().len(), 2, "{answer}");
    for c in [&mut phone, &mut laptop, &mut u2] {
        assert_eq!(c.recv_event("notice")["args"]["n"], 1);
    }
    u3.expect_silence(Duration::from_millis(100));

    let (status, answer) = post(
        server.addr,
        "/api/publish",
        r#"{"everyone":true,"event":"notice","args":{"n":2}}"#,
    );
    assert_eq!(status, 200, "{answer}");
    for c in [&mut phone, &mut laptop, &mut u2, &mut u3] {
        assert_eq!(c.recv_event("notice")["args"]["n"], 2);
    }

    let (status, presence) = get(server.addr, "/api/presence?room=r");
    assert_eq!(status, 200);
    assert_eq!(presence, json!({"room": "r", "online": ["u1", "u2"]}));
    let (_, count) = get(server.addr, "/api/connections?user=u1");
    assert_eq!(count, json!({"user": "u1", "connections": 2}));
    let (_, none) = get(server.addr, "/api/connections?user=nobody");
    assert_eq!(none["connections"], 0);

    let (status, page) = get(server.addr, "/api/history?user=u3&limit=5");
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["events"][0]["args"]["n"], 2, "{page}");
}

#[test]
fn errors_are_json_with_a_status() {
    let server = TestServer::with_config(config());
    let cases = [
        ("GET", "/api/presence?room=r", "wrong", "", 401),
        ("GET", "/api/presence", KEY, "", 400),
        ("GET", "/api/connections", KEY, "", 400),
        ("GET", "/api/nothing", KEY, "", 404),
        ("GET", "/api/publish", KEY, "", 405),
        ("POST", "/api/presence", KEY, "", 405),
        ("POST", "/api/disconnect", KEY, "{}", 400),
        ("POST", "/api/disconnect", KEY, r#"{"user":""}"#, 400),
        (
            "POST",
            "/api/publish",
            KEY,
            r#"{"room":"r","users":["a"],"event":"e","args":1}"#,
            400,
        ),
        ("GET", "/api/history?user=", KEY, "", 400),
    ];
    for (method, path, key, body, want) in cases {
        let (status, answer) = api_call(server.addr, method, path, key, body);
        assert_eq!(status, want, "{method} {path} {body}: {answer}");
        assert!(answer["error"].is_string(), "{method} {path}: {answer}");
    }
    let keyless = TestServer::start();
    assert_eq!(
        post(keyless.addr, "/api/disconnect", r#"{"user":"u"}"#).0,
        404
    );
}

#[test]
fn disconnect_closes_every_device_of_the_user_with_4011() {
    let server = TestServer::with_config(config());
    let (mut phone, mut laptop) = (server.connect("u1"), server.connect("u1"));
    let mut u2 = server.connect("u2");
    let (status, answer) = post(server.addr, "/api/disconnect", r#"{"user":"u1"}"#);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(phone.expect_close(), 4011);
    assert_eq!(laptop.expect_close(), 4011);
    u2.send_acked("u2", "still here", 1);
}

#[test]
fn across_the_cluster_disconnect_presence_counts_and_room_publish() {
    let redis = TestRedis::start();
    let a = on_redis(&redis);
    let b = on_redis(&redis);
    let mut on_a = a.connect("u1");
    let mut on_b = b.connect("u1");
    let mut u2 = b.connect("u2");
    wait_subscribed(&redis, "u1", 2);
    wait_subscribed(&redis, "u2", 1);
    join(&mut on_a, "r", 1);
    join(&mut u2, "r", 1);

    let (_, count) = get(a.addr, "/api/connections?user=u1");
    assert_eq!(count, json!({"user": "u1", "connections": 2}));
    let (_, presence) = get(a.addr, "/api/presence?room=r");
    assert_eq!(presence["online"], json!(["u1", "u2"]));

    let (status, answer) = post(
        a.addr,
        "/api/publish",
        r#"{"room":"r","event":"notice","args":{"n":1}}"#,
    );
    assert_eq!(status, 200, "{answer}");
    for c in [&mut on_a, &mut on_b, &mut u2] {
        assert_eq!(c.recv_event("notice")["args"]["n"], 1);
    }

    let (status, answer) = post(a.addr, "/api/disconnect", r#"{"user":"u1"}"#);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["instances"], 2, "{answer}");
    assert_eq!(on_a.expect_close(), 4011);
    assert_eq!(on_b.expect_close(), 4011);
    u2.send_acked("u2", "still here", 1);
}

/// The whole response head and body.
fn raw(addr: SocketAddr, request: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn allowed_origins_guard_upgrades_and_answer_cors() {
    let jwt_config = |origins: Origins| {
        let mut c = jwt_test_config("0123456789abcdef0123456789abcdef");
        c.history.api_key = Some(KEY.into());
        c.allowed_origins = origins;
        c
    };
    let token = jwt(
        "0123456789abcdef0123456789abcdef",
        json!({"sub": "u1", "exp": now_secs() + 60}),
    );
    let path = format!("/ws?token={token}");
    // JWT mode without a list: the page's own origin (and non-browser clients) only.
    let own = TestServer::with_config(jwt_config(Origins::Default));
    assert_eq!(
        try_upgrade(own.addr, &path, "Origin: https://evil.example\r\n").0,
        403
    );
    assert_eq!(
        try_upgrade(own.addr, &path, "Origin: http://test\r\n").0,
        101
    );
    assert_eq!(try_upgrade(own.addr, &path, "").0, 101);
    // A list: exactly those.
    let listed =
        TestServer::with_config(jwt_config(Origins::List(
            vec!["https://app.example".into()],
        )));
    assert_eq!(
        try_upgrade(listed.addr, &path, "Origin: https://app.example\r\n").0,
        101
    );
    assert_eq!(
        try_upgrade(listed.addr, &path, "Origin: http://test\r\n").0,
        403
    );
    // Dev mode without a list: any.
    let dev = TestServer::with_config(config());
    assert_eq!(
        try_upgrade(dev.addr, "/ws?token=u1", "Origin: https://evil.example\r\n").0,
        101
    );

    // CORS: the preflight is answered for a listed origin only, and answers carry the header.
    let preflight = |origin: &str| {
        raw(
            listed.addr,
            &format!(
                "OPTIONS /api/publish HTTP/1.1\r\nHost: t\r\nOrigin: {origin}\r\n\
                 Access-Control-Request-Method: POST\r\n\r\n"
            ),
        )
    };
    let ok = preflight("https://app.example");
    assert!(ok.starts_with("HTTP/1.1 204"), "{ok}");
    assert!(
        ok.contains("Access-Control-Allow-Origin: https://app.example\r\n"),
        "{ok}"
    );
    assert!(
        ok.contains("Access-Control-Allow-Headers: Authorization, Content-Type"),
        "{ok}"
    );
    assert!(preflight("https://evil.example").starts_with("HTTP/1.1 403"));
    let answer = raw(
        listed.addr,
        &format!(
            "GET /api/connections?user=u1 HTTP/1.1\r\nHost: t\r\nOrigin: https://app.example\r\n\
             Authorization: Bearer {KEY}\r\n\r\n"
        ),
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains("Access-Control-Allow-Origin: https://app.example"),
        "{answer}"
    );
    let unlisted = raw(
        dev.addr,
        "GET /api/connections?user=u1 HTTP/1.1\r\nHost: t\r\nOrigin: https://app.example\r\n\r\n",
    );
    assert!(
        !unlisted.contains("Access-Control-Allow-Origin"),
        "{unlisted}"
    );
}

/// A room message as a member's `GET /api/history?room=` would see it, read with the API key
/// instead: any room, no membership needed; a user's own token still needs membership.
fn api_key_reads_room_history(server: &TestServer) {
    let mut u1 = server.connect("u1");
    join(&mut u1, "hist", 1);
    request_ok(
        &mut u1,
        "sendRoomMessage",
        json!({"room": "hist", "text": "kept once"}),
        2,
    );
    let (status, page) = get(server.addr, "/api/history?room=hist&limit=5");
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["events"][0]["args"]["text"], "kept once", "{page}");
    assert_eq!(page["events"][0]["room"], "hist", "{page}");
    assert!(page["events"][0]["offset"].is_string(), "{page}");
    let (status, empty) = get(server.addr, "/api/history?room=nothing-here");
    assert_eq!((status, empty), (200, json!({"events": []})));
    let (status, bad) = get(server.addr, "/api/history?room=bad%20room");
    assert_eq!(status, 400, "{bad}");
    // A non-member with its own token is refused.
    let stranger = "GET /api/history?room=hist&token=u3 HTTP/1.1\r\nHost: t\r\n\r\n";
    assert_eq!(raw_request(server.addr, stranger.as_bytes()).0, 403);
}

#[test]
fn the_api_key_reads_any_rooms_history_embedded() {
    api_key_reads_room_history(&TestServer::with_config(config()));
}

#[test]
fn the_api_key_reads_any_rooms_history_on_redis() {
    let redis = TestRedis::start();
    let server = on_redis(&redis);
    // The server reaches Redis once u1's channel is subscribed.
    let _probe = server.connect("u1");
    wait_subscribed(&redis, "u1", 1);
    api_key_reads_room_history(&server);
}
