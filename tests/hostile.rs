//! Hostile input beyond malformed envelopes: oversized headers, fragmented floods, ping floods,
//! invalid close codes, numbers past f64's range. Each gets its documented answer, and another
//! user keeps being served meanwhile.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

/// A bystander pair whose messages must keep flowing while an attacker misbehaves.
fn bystanders_still_served(server: &TestServer) {
    let mut a = server.connect("bystander-a");
    let mut b = server.connect("bystander-b");
    a.send_message("bystander-b", "still here");
    assert_eq!(b.recv_event("newMessage")["args"]["text"], "still here");
}

#[test]
fn a_megabyte_of_headers_gets_431_not_a_reset() {
    let server = TestServer::start();
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(b"GET /ws?token=x HTTP/1.1\r\nHost: a\r\n")
        .unwrap();
    let line = format!("X-Padding: {}\r\n", "a".repeat(1000));
    // The server answers after its 8 KiB limit and drains the rest, so the writes complete.
    for _ in 0..1024 {
        if s.write_all(line.as_bytes()).is_err() {
            break;
        }
    }
    let _ = s.write_all(b"\r\n");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 431 "), "{text}");
    bystanders_still_served(&server);
}

#[test]
fn fragments_adding_up_past_the_limit_close_1009() {
    let server = TestServer::with_config(switchboard::Config {
        max_message_bytes: 1024,
        ..test_config()
    });
    let mut raw = RawWs::connect(server.addr, "fragmenter");
    raw.write_frame(false, 0, 0x1, &[b'x'; 600], true);
    raw.write_frame(false, 0, 0x0, &[b'x'; 600], true);
    let mut seen = Vec::new();
    assert_eq!(
        raw.read_until_close(Instant::now() + DEADLINE, &mut seen),
        Some(1009)
    );
    bystanders_still_served(&server);
}

#[test]
fn a_ping_flood_is_answered_and_bounded() {
    let server = TestServer::start();
    let mut raw = RawWs::connect(server.addr, "pinger");
    let mut frames = Vec::new();
    for i in 0..10_000u32 {
        frames.extend_from_slice(&encode_frame(true, 0, 0x9, &i.to_be_bytes(), true));
    }
    raw.stream.write_all(&frames).unwrap();
    // Only the latest pong is owed (RFC 6455 5.5.3): the server answers without queueing
    // thousands of them, and the connection stays usable.
    let mut pongs = 0;
    let deadline = Instant::now() + Duration::from_millis(500);
    while let Some(frame) = raw.read_frame(deadline) {
        assert_eq!(frame.opcode, 0xA, "only pongs come back");
        pongs += 1;
    }
    assert!((1..=10_000).contains(&pongs), "{pongs} pongs");
    raw.send_text_bytes(br#"{"event":"sendMessage","args":{"to":"pinger","text":"alive"}}"#);
    let frame = loop {
        let f = raw.read_frame(Instant::now() + DEADLINE).expect("a reply");
        if f.opcode == 0x1 {
            break f;
        }
    };
    assert!(String::from_utf8_lossy(&frame.payload).contains("alive"));
    bystanders_still_served(&server);
}

#[test]
fn an_invalid_close_code_is_answered_with_1002() {
    let server = TestServer::start();
    let mut raw = RawWs::connect(server.addr, "closer");
    // 999 is not a valid close code (RFC 6455 7.4).
    raw.write_frame(true, 0, 0x8, &999u16.to_be_bytes(), true);
    let mut seen = Vec::new();
    assert_eq!(
        raw.read_until_close(Instant::now() + DEADLINE, &mut seen),
        Some(1002)
    );
    bystanders_still_served(&server);
}

#[test]
fn numbers_past_f64_range_are_not_a_crash() {
    let server = TestServer::start();
    let mut a = server.connect("numbers");
    // A huge number in a field the handler ignores is carried along; as the ack, the server
    // cannot read it (serde_json: "number out of range") and says bad_json.
    a.send_text(r#"{"event":"sendMessage","args":{"to":"numbers","text":"n","n":1e99999}}"#);
    assert_eq!(a.recv_event("newMessage")["args"]["text"], "n");
    a.send_text(r#"{"event":"sendMessage","args":{"to":"numbers","text":"n"},"ack":1e400}"#);
    let e = a.recv_event("error");
    assert_eq!(e["args"]["code"], "bad_json", "{e}");
    a.send_text(r#"{"event":"sendMessage","args":{"to":"numbers","text":18446744073709551616}}"#);
    assert_eq!(a.recv_event("error")["args"]["code"], "bad_args");
    bystanders_still_served(&server);
}

#[test]
fn an_event_flood_is_rate_limited_then_closed_with_1008() {
    let server = TestServer::with_config(switchboard::Config {
        rate_limit_per_sec: 10,
        rate_limit_burst: 20,
        ..test_config()
    });
    let mut raw = RawWs::connect(server.addr, "flooder");
    let mut frames = Vec::new();
    for i in 0..200 {
        let text = format!(r#"{{"event":"sendMessage","args":{{"to":"nobody","text":"{i}"}}}}"#);
        frames.extend_from_slice(&encode_frame(true, 0, 0x1, text.as_bytes(), true));
    }
    raw.stream.write_all(&frames).unwrap();
    // The burst goes through (each send echoes to the sender's own device), then one
    // rate_limited error, then the close.
    let deadline = Instant::now() + DEADLINE;
    let (mut delivered, mut limited) = (0, 0);
    let code = loop {
        let frame = raw.read_frame(deadline).expect("frames until the close");
        if let Some(code) = frame.close_code() {
            break code;
        }
        let text = String::from_utf8_lossy(&frame.payload).into_owned();
        if text.contains("\"newMessage\"") {
            delivered += 1;
        } else if text.contains("\"rate_limited\"") {
            limited += 1;
        }
    };
    assert_eq!(code, 1008);
    assert_eq!(limited, 1, "one error per run of refusals");
    assert!(
        (20..=25).contains(&delivered),
        "the burst (plus what refilled) went through: {delivered}"
    );
    wait_metric(server.addr, &closed_metric("rate_limited"), 1);
    bystanders_still_served(&server);
}

#[test]
fn a_refused_message_that_asked_for_an_ack_gets_its_error() {
    let server = TestServer::with_config(switchboard::Config {
        rate_limit_per_sec: 1,
        rate_limit_burst: 5,
        ..test_config()
    });
    let mut c = server.connect("eager");
    for n in 1..=7u64 {
        c.send_json(&serde_json::json!({"event": "sendMessage", "args": {"to": "eager", "text": "x"}, "ack": n}));
    }
    let mut acks = Vec::new();
    let mut errors = Vec::new();
    while acks.len() + errors.len() < 7 {
        let v = c.recv_json();
        match v["event"].as_str() {
            Some("ack") => acks.push(v["ack"].as_u64().unwrap()),
            Some("error") => {
                assert_eq!(v["args"]["code"], "rate_limited");
                errors.push(v["ack"].as_u64().unwrap());
            }
            _ => {}
        }
    }
    assert_eq!(acks, [1, 2, 3, 4, 5]);
    assert_eq!(errors, [6, 7]);
}

#[test]
fn a_second_process_on_the_same_port_is_refused() {
    let first = ChildServer::spawn(&[]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["--listen", &first.addr.to_string(), "--cores", "1"])
        .output()
        .expect("run switchboard");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("address already in use"), "{stderr}");
    // The first one still serves every connection.
    let (status, _) = http_get(first.addr, "/healthz");
    assert_eq!(status, 200);
}
