//! Heartbeat: the server pings every `ping_interval`; a connection silent for
//! `ping_interval + ping_timeout` is closed with 4000, one that answers stays.

mod common;

use std::time::{Duration, Instant};

use common::*;
use switchboard::Config;
use tungstenite::Message;

fn fast_pings() -> Config {
    Config {
        ping_interval: Duration::from_millis(200),
        ping_timeout: Duration::from_millis(200),
        ..test_config()
    }
}

#[test]
fn a_client_that_answers_pings_stays_connected() {
    let server = TestServer::with_config(fast_pings());
    let mut c = server.connect("steady");
    let until = Instant::now() + Duration::from_millis(1500);
    let mut pings = 0;
    // tungstenite answers each ping with a pong on the next read.
    while let Some(m) = c.next_message(until) {
        match m {
            Ok(Message::Ping(_)) => pings += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(pings >= 3, "only {pings} pings in 1.5 s");
    c.send_message("steady", "still here");
    assert_eq!(c.recv_event("newMessage")["args"]["text"], "still here");
    assert_eq!(metric(server.addr, &closed_metric("heartbeat_timeout")), 0);
}

#[test]
fn a_silent_client_is_closed_with_4000() {
    let server = TestServer::with_config(fast_pings());
    let started = Instant::now();
    let mut raw = RawWs::connect(server.addr, "mute");
    let mut seen = Vec::new();
    let code = raw.read_until_close(Instant::now() + DEADLINE, &mut seen);
    let waited = started.elapsed();
    assert_eq!(code, Some(4000), "frames before the end: {seen:?}");
    assert!(seen.contains(&0x9), "pinged before being closed: {seen:?}");
    assert!(
        waited >= Duration::from_millis(400),
        "closed too early: {waited:?}"
    );
    assert!(waited < Duration::from_secs(2), "closed late: {waited:?}");
    wait_metric(server.addr, &closed_metric("heartbeat_timeout"), 1);
    // Without a close reply, the server drops the socket after its close grace.
    server.wait_stats("the mute socket to go", |s| {
        s.iter().all(|c| c.sockets == 0)
    });
}

#[test]
fn any_frame_counts_as_a_sign_of_life() {
    // A client that sends its own pings but ignores the server's stays open too.
    let server = TestServer::with_config(fast_pings());
    let mut raw = RawWs::connect(server.addr, "chatty");
    let until = Instant::now() + Duration::from_millis(1200);
    while Instant::now() < until {
        raw.write_frame(true, 0, 0x9, b"hi", true);
        let frame = raw
            .read_frame(Instant::now() + Duration::from_millis(150))
            .map(|f| f.opcode);
        assert!(matches!(frame, None | Some(0x9) | Some(0xA)), "{frame:?}");
    }
    assert_eq!(metric(server.addr, &closed_metric("heartbeat_timeout")), 0);
    assert_eq!(server.health()["connections"], 1);
}
