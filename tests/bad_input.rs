//! Every bad input in docs/PROTOCOL.md gets its documented answer (an `error` event, or a close
//! code) and harms no one else: after each, two bystanders still talk, and an offender that got
//! an error event (not a close) can still send valid messages.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use switchboard::Config;
use tungstenite::Message;

/// Small enough to make the over-size case cheap, large enough for every other case.
const MAX_MESSAGE_BYTES: usize = 1024;

/// Fields drop in order: the clients hang up before the server shuts down (otherwise the
/// shutdown waits for their close handshakes).
struct Scene {
    offender: Client,
    alice: Client,
    bob: Client,
    server: TestServer,
}

fn scene() -> Scene {
    let server = TestServer::with_config(Config {
        max_message_bytes: MAX_MESSAGE_BYTES,
        ..test_config()
    });
    Scene {
        offender: server.connect("offender"),
        alice: server.connect("alice"),
        bob: server.connect("bob"),
        server,
    }
}

impl Scene {
    /// Two other users still exchange messages.
    fn bystanders_still_talk(&mut self, label: &str) {
        let text = format!("after {label}");
        self.alice.send_message("bob", &text);
        let m = self.bob.recv_event("newMessage");
        assert_eq!(
            (m["args"]["from"].as_str(), m["args"]["text"].as_str()),
            (Some("alice"), Some(text.as_str()))
        );
        assert_eq!(self.alice.recv_event("newMessage")["args"]["text"], text);
    }

    /// The offender's connection still works: a valid send is delivered and acked.
    fn offender_still_works(&mut self, ack: u64) {
        let result = self.offender.send_acked("bob", "still here", ack);
        assert_eq!(result["id"].as_str().map(str::len), Some(32));
        let m = self.bob.recv_event("newMessage");
        assert_eq!(
            (m["args"]["from"].as_str(), m["args"]["text"].as_str()),
            (Some("offender"), Some("still here"))
        );
    }

    /// Sends `text` from the offender and returns the error event it gets back.
    fn error_for(&mut self, text: &str) -> Value {
        self.offender.send_text(text);
        let v = self.offender.recv_json();
        assert_eq!(v["event"], "error", "answer to {text:?}: {v}");
        assert!(
            v["args"]["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{v}"
        );
        v
    }
}

fn assert_error(v: &Value, code: &str, ack: Option<u64>) {
    assert_eq!(v["args"]["code"], code, "{v}");
    assert_eq!(v["ack"].as_u64(), ack, "{v}");
    let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    let want = if ack.is_some() { 3 } else { 2 };
    assert_eq!(keys.len(), want, "only event, [ack,] args: {v}");
}

#[test]
fn malformed_json_is_bad_json() {
    let mut s = scene();
    for text in ["{", "not json", r#"{"event":"sendMessage","ack":1"#, ""] {
        let v = s.error_for(text);
        assert_error(&v, "bad_json", None);
        s.bystanders_still_talk(text);
    }
    s.offender_still_works(1);
}

#[test]
fn envelopes_of_the_wrong_shape_are_bad_envelope() {
    let mut s = scene();
    let cases: [(&str, Option<u64>); 9] = [
        ("[1,2]", None),
        ("42", None),
        (r#""sendMessage""#, None),
        ("null", None),
        (r#"{"args":{"to":"bob","text":"x"}}"#, None),
        (r#"{"args":1,"ack":3}"#, Some(3)),
        (r#"{"event":5,"ack":4}"#, Some(4)),
        (r#"{"event":null}"#, None),
        (r#"{"event":"sendMessage","ack":-1}"#, None),
    ];
    for (text, ack) in cases {
        let v = s.error_for(text);
        assert_error(&v, "bad_envelope", ack);
        s.bystanders_still_talk(text);
    }
    let v = s.error_for(r#"{"event":"sendMessage","ack":1.5}"#);
    assert_error(&v, "bad_envelope", None);
    assert!(
        v["args"]["message"].as_str().unwrap().contains("ack"),
        "{v}"
    );
    s.offender_still_works(2);
}

#[test]
fn unknown_events_are_refused_with_the_clients_ack() {
    let mut s = scene();
    let v = s.error_for(r#"{"event":"launchMissiles","args":{},"ack":77}"#);
    assert_error(&v, "unknown_event", Some(77));
    assert!(v["args"]["message"]
        .as_str()
        .unwrap()
        .contains("launchMissiles"));
    let v = s.error_for(r#"{"event":"nope"}"#);
    assert_error(&v, "unknown_event", None);
    s.bystanders_still_talk("unknown event");
    s.offender_still_works(78);
}

#[test]
fn unknown_top_level_fields_are_ignored() {
    let mut s = scene();
    s.offender.send_text(
        r#"{"event":"sendMessage","args":{"to":"bob","text":"extra","future":1},"ack":5,"v":2,"room":"x"}"#,
    );
    assert_eq!(s.bob.recv_event("newMessage")["args"]["text"], "extra");
    let ack = s.offender.recv_event("ack");
    assert_eq!(ack["ack"], 5);
}

#[test]
fn wrong_send_message_args_are_bad_args() {
    let mut s = scene();
    let cases = [
        json!({"event": "sendMessage", "ack": 1}),
        json!({"event": "sendMessage", "args": null, "ack": 2}),
        json!({"event": "sendMessage", "args": {"text": "no to"}, "ack": 3}),
        json!({"event": "sendMessage", "args": {"to": "bob"}, "ack": 4}),
        json!({"event": "sendMessage", "args": {"to": 5, "text": "x"}, "ack": 5}),
        json!({"event": "sendMessage", "args": {"to": "", "text": "x"}, "ack": 6}),
        json!({"event": "sendMessage", "args": {"to": "a\nb", "text": "x"}, "ack": 7}),
        json!({"event": "sendMessage", "args": {"to": "bob", "text": 7}, "ack": 8}),
        json!({"event": "sendMessage", "args": "bob", "ack": 9}),
    ];
    for case in cases {
        let v = s.error_for(&case.to_string());
        assert_error(&v, "bad_args", case["ack"].as_u64());
        s.bystanders_still_talk(&case.to_string());
    }
    // Without an ack the error still comes, without one.
    let v = s.error_for(r#"{"event":"sendMessage","args":{}}"#);
    assert_error(&v, "bad_args", None);
    // Nothing was delivered for any of them.
    s.bob.expect_silence(Duration::from_millis(100));
    s.offender_still_works(10);
}

#[test]
fn deeply_nested_json_is_bad_json_not_a_crash() {
    let mut s = scene();
    // Past serde_json's limit of 128 levels, within the 1 KiB frame limit.
    for (open, close, n) in [("[", "]", 480), (r#"{"a":"#, "}", 150)] {
        let nested = format!("{}1{}", open.repeat(n), close.repeat(n));
        for text in [
            format!(r#"{{"event":"sendMessage","args":{nested},"ack":1}}"#),
            format!(r#"{{"event":"nope","args":{nested}}}"#),
            nested.clone(),
        ] {
            assert!(text.len() <= MAX_MESSAGE_BYTES);
            let v = s.error_for(&text);
            assert_error(&v, "bad_json", None);
            s.bystanders_still_talk("deep nesting");
        }
    }
    s.offender_still_works(2);
}

/// Runs `offend` on a fresh scene, expects the offender to be closed with `code`, and checks
/// the bystanders and the close metric.
fn expect_closed(code: u16, reason: &str, offend: impl FnOnce(&mut Client)) {
    let mut s = scene();
    offend(&mut s.offender);
    assert_eq!(s.offender.expect_close(), code);
    s.bystanders_still_talk(reason);
    wait_metric(s.server.addr, &closed_metric(reason), 1);
    s.server.wait_stats("the offender to be gone", |st| {
        st.iter().map(|c| c.connections).sum::<u64>() == 2
    });
    // The offender's user is no longer reachable, the others are.
    s.alice.send_message("offender", "anyone?");
    assert_eq!(s.alice.recv_event("newMessage")["args"]["to"], "offender");
    s.bystanders_still_talk("the close");
}

#[test]
fn a_binary_frame_closes_with_1003() {
    expect_closed(1003, "binary_frame", |c| {
        c.ws.send(Message::binary(b"{\"event\":\"sendMessage\"}".to_vec()))
            .unwrap();
    });
}

#[test]
fn invalid_utf8_closes_with_1007() {
    expect_closed(1007, "invalid_utf8", |c| {
        let frame = encode_frame(true, 0, 0x1, b"{\"event\":\"\xff\xfe\"}", true);
        std::io::Write::write_all(c.tcp(), &frame).unwrap();
    });
}

#[test]
fn invalid_utf8_split_across_fragments_closes_with_1007() {
    expect_closed(1007, "invalid_utf8", |c| {
        // "é" is C3 A9: cut after C3 and follow it with an invalid continuation.
        let mut bytes = encode_frame(false, 0, 0x1, b"{\"event\":\"\xc3", true);
        bytes.extend(encode_frame(true, 0, 0x0, b"\x28\"}", true));
        std::io::Write::write_all(c.tcp(), &bytes).unwrap();
    });
}

#[test]
fn a_message_over_the_size_limit_closes_with_1009() {
    expect_closed(1009, "message_too_big", |c| {
        let text = "x".repeat(MAX_MESSAGE_BYTES + 1);
        c.send_message("bob", &text);
    });
}

#[test]
fn fragments_adding_up_over_the_size_limit_close_with_1009() {
    expect_closed(1009, "message_too_big", |c| {
        let half = vec![b' '; MAX_MESSAGE_BYTES / 2 + 1];
        let mut bytes = encode_frame(false, 0, 0x1, &half, true);
        bytes.extend(encode_frame(true, 0, 0x0, &half, true));
        std::io::Write::write_all(c.tcp(), &bytes).unwrap();
    });
}

#[test]
fn a_message_at_the_size_limit_is_accepted() {
    let mut s = scene();
    let envelope = json!({"event": "sendMessage", "args": {"to": "bob", "text": ""}, "ack": 1});
    let pad = MAX_MESSAGE_BYTES - envelope.to_string().len();
    let text = "y".repeat(pad);
    let frame = json!({"event": "sendMessage", "args": {"to": "bob", "text": text}, "ack": 1});
    assert_eq!(frame.to_string().len(), MAX_MESSAGE_BYTES);
    s.offender.send_json(&frame);
    assert_eq!(s.bob.recv_event("newMessage")["args"]["text"], text);
}

#[test]
fn an_unmasked_client_frame_closes_with_1002() {
    expect_closed(1002, "protocol_error", |c| {
        let frame = encode_frame(true, 0, 0x1, br#"{"event":"sendMessage"}"#, false);
        std::io::Write::write_all(c.tcp(), &frame).unwrap();
    });
}

#[test]
fn reserved_bits_close_with_1002() {
    expect_closed(1002, "protocol_error", |c| {
        let frame = encode_frame(true, 0b100, 0x1, br#"{"event":"x"}"#, true);
        std::io::Write::write_all(c.tcp(), &frame).unwrap();
    });
}

#[test]
fn a_reserved_opcode_closes_with_1002() {
    expect_closed(1002, "protocol_error", |c| {
        let frame = encode_frame(true, 0, 0x3, b"?", true);
        std::io::Write::write_all(c.tcp(), &frame).unwrap();
    });
}

#[test]
fn a_continuation_without_a_start_closes_with_1002() {
    expect_closed(1002, "protocol_error", |c| {
        let frame = encode_frame(true, 0, 0x0, b"orphan", true);
        std::io::Write::write_all(c.tcp(), &frame).unwrap();
    });
}

#[test]
fn bad_input_does_not_slow_the_others_down() {
    // A burst of every error-event input from one client while another pair keeps a
    // request/response rhythm: every exchange completes well within the deadline.
    let mut s = scene();
    for i in 0..50 {
        s.offender.send_text("{");
        s.offender.send_text("[]");
        s.offender.send_text(r#"{"event":"nope","ack":1}"#);
        let started = Instant::now();
        s.bystanders_still_talk(&format!("burst {i}"));
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    let mut errors = 0;
    while errors < 150 {
        assert_eq!(s.offender.recv_json()["event"], "error");
        errors += 1;
    }
    s.offender_still_works(3);
    assert!(metric(s.server.addr, "switchboard_client_errors_total") >= 150);
}
