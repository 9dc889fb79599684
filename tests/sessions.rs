//! Sessions from the token: the `rooms`/`rooms_read` claims decide which rooms a connection may
//! join and send to (`forbidden` otherwise; no claim: any room); a JWT connection is closed with
//! 4010 when its `exp` passes, unless a `refresh` with a valid token for the same user came first.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const SECRET: &str = "0123456789abcdef0123456789abcdef";

fn jwt_server() -> TestServer {
    TestServer::with_config(jwt_test_config(SECRET))
}

fn token(claims: Value) -> String {
    jwt(SECRET, claims)
}

fn connect(server: &TestServer, claims: Value) -> Client {
    let user = claims["sub"].as_str().unwrap_or_default().to_string();
    Client::connect_url(
        &format!("ws://{}/ws?token={}", server.addr, token(claims)),
        &user,
    )
}

#[test]
fn room_claims_decide_where_a_user_may_join_and_send() {
    let server = jwt_server();
    let exp = now_secs() + 600;
    let mut alice = connect(
        &server,
        json!({"sub": "alice", "exp": exp, "rooms": ["team:42:*", "lobby"], "rooms_read": ["news"]}),
    );
    let join = |c: &mut Client, room: &str, ack| request(c, "joinRoom", json!({"room": room}), ack);
    let say = |c: &mut Client, room: &str, ack| {
        request(
            c,
            "sendRoomMessage",
            json!({"room": room, "text": "hi"}),
            ack,
        )
    };
    assert_eq!(join(&mut alice, "team:42:dev", 1)["event"], "ack");
    assert_eq!(join(&mut alice, "lobby", 2)["event"], "ack");
    assert_eq!(join(&mut alice, "news", 3)["event"], "ack");
    for (room, ack) in [("team:43:dev", 4), ("lobby2", 5), ("team:42", 6)] {
        let refused = join(&mut alice, room, ack);
        assert_eq!(refused["args"]["code"], "forbidden", "{room}: {refused}");
    }
    assert_eq!(say(&mut alice, "team:42:dev", 7)["event"], "ack");
    let read_only = say(&mut alice, "news", 8);
    assert_eq!(read_only["args"]["code"], "forbidden", "{read_only}");

    // Read-only members still receive the room's messages.
    let mut editor = connect(
        &server,
        json!({"sub": "editor", "exp": exp, "rooms": ["news"]}),
    );
    assert_eq!(join(&mut editor, "news", 1)["event"], "ack");
    assert_eq!(say(&mut editor, "news", 2)["event"], "ack");
    assert_eq!(recv_room_message(&mut alice)["args"]["room"], "news");

    // No claim: any room (development behaviour).
    let mut bob = connect(&server, json!({"sub": "bob", "exp": exp}));
    assert_eq!(join(&mut bob, "team:43:dev", 1)["event"], "ack");
    assert_eq!(say(&mut bob, "team:43:dev", 2)["event"], "ack");
}

#[test]
fn a_session_is_closed_with_4010_when_its_token_expires() {
    let server = jwt_server();
    let started = Instant::now();
    let mut c = connect(&server, json!({"sub": "u1", "exp": now_secs() + 2}));
    assert_eq!(c.expect_close(), 4010);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "not before exp"
    );
    wait_metric(server.addr, &closed_metric("session_expired"), 1);
}

#[test]
fn a_refresh_for_the_same_user_keeps_the_session_open() {
    let server = jwt_server();
    let mut c = connect(&server, json!({"sub": "u1", "exp": now_secs() + 2}));
    // Refused refreshes change nothing.
    for (bad, ack) in [
        (token(json!({"sub": "u2", "exp": now_secs() + 60})), 1),
        (token(json!({"sub": "u1", "exp": now_secs() - 60})), 2),
        ("garbage".to_string(), 3),
    ] {
        let code = request_err(&mut c, "refresh", json!({ "token": bad }), ack);
        assert_eq!(code, "bad_token");
    }
    assert_eq!(request_err(&mut c, "refresh", json!({}), 4), "bad_args");
    let exp = now_secs() + 60;
    let answer = request_ok(
        &mut c,
        "refresh",
        json!({ "token": token(json!({"sub": "u1", "exp": exp})) }),
        5,
    );
    assert_eq!(answer["exp"], exp);
    // Past the first token's exp, the connection still works.
    c.expect_silence(Duration::from_millis(3500));
    c.send_message("u1", "still here");
    assert_eq!(c.recv_event("newMessage")["args"]["text"], "still here");
}

#[test]
fn a_refreshed_token_carries_its_own_rooms() {
    let server = jwt_server();
    let exp = now_secs() + 600;
    let mut c = connect(&server, json!({"sub": "u1", "exp": exp, "rooms": ["a"]}));
    assert_eq!(
        request_err(&mut c, "joinRoom", json!({"room": "b"}), 1),
        "forbidden"
    );
    let wider = token(json!({"sub": "u1", "exp": exp, "rooms": ["a", "b"]}));
    request_ok(&mut c, "refresh", json!({ "token": wider }), 2);
    request_ok(&mut c, "joinRoom", json!({"room": "b"}), 3);
}

/// Reading a room's history needs the right to join it: a member whose session's claims leave
/// the room out gets `forbidden` for `history {room}`, 403 over HTTP, and a resume of the room
/// replays nothing (`recovered` with `complete: false`).
#[test]
fn room_history_needs_the_right_to_read_the_room() {
    let server = jwt_server();
    let exp = now_secs() + 600;
    let wide = json!({"sub": "carol", "exp": exp, "rooms": ["*"]});
    let narrow = json!({"sub": "carol", "exp": exp, "rooms": ["lobby"]});
    let mut member = connect(&server, wide.clone());
    request_ok(&mut member, "joinRoom", json!({"room": "vault"}), 1);
    let sent = json!({"room": "vault", "text": "secret"});
    request_ok(&mut member, "sendRoomMessage", sent, 2);
    let page = request_ok(&mut member, "history", json!({"room": "vault"}), 3);
    assert_eq!(page["events"][0]["args"]["text"], "secret", "{page}");

    // The same user, still a member, with a token that does not cover the room.
    let mut narrowed = connect(&server, narrow.clone());
    let refused = request(&mut narrowed, "history", json!({"room": "vault"}), 1);
    assert_eq!(refused["args"]["code"], "forbidden", "{refused}");
    let http = |claims: &Value| {
        let path = format!("/api/history?room=vault&token={}", token(claims.clone()));
        let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
        raw_request(server.addr, req.as_bytes())
    };
    assert_eq!(http(&wide).0, 200);
    let (status, body) = http(&narrow);
    assert_eq!(status, 403, "{body}");
    let resume = format!(
        "ws://{}/ws?token={}&rooms=vault@0-0",
        server.addr,
        token(narrow)
    );
    let mut resumed = Client::connect_url(&resume, "carol");
    let recovered = loop {
        let frame = resumed.recv_json();
        assert_ne!(
            frame["room"], "vault",
            "replayed without the right: {frame}"
        );
        if frame["event"] == "recovered" {
            break frame;
        }
    };
    assert_eq!(recovered["args"]["room"], "vault", "{recovered}");
    assert_eq!(recovered["args"]["complete"], false, "{recovered}");
}
