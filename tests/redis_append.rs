//! The history append path through Redis (issue 14): a message to another user is stored in
//! both users' streams (same frame, each user's own offset) and published to both by ONE script
//! call; a resend with the same `clientId` is skipped per user; the reads keep the bounds exact
//! although the streams are trimmed approximately.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use switchboard::backplane::{RedisConfig, Routing};
use switchboard::history::{self, HistoryConfig};
use switchboard::Config;

/// A server on `redis` with history on; presence heartbeats (scripts too) once an hour, so
/// they do not disturb the script count.
fn server(redis: &TestRedis, history: HistoryConfig) -> TestServer {
    let mut rc = RedisConfig::new(redis.url());
    rc.routing = Routing::PerUser;
    rc.reconnect_max = Duration::from_millis(300);
    let mut config = Config {
        backplane: Some(rc),
        history,
        rate_limit_per_sec: 0,
        ..test_config()
    };
    config.rooms.presence_ttl = Duration::from_secs(3600);
    TestServer::with_config(config)
}

/// `cmdstat_evalsha:calls` of `INFO commandstats`.
fn evalsha_calls(c: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(c)
        .expect("INFO");
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// `user`'s stream: (id, frame without offset), oldest first.
fn stream(c: &mut redis::Connection, user: &str) -> Vec<(String, String)> {
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(history::stream_key("switchboard", user))
        .arg("-")
        .arg("+")
        .query(c)
        .expect("XRANGE");
    reply
        .ids
        .into_iter()
        .map(|e| {
            let f = match e.map.get("f") {
                Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                other => panic!("field f: {other:?}"),
            };
            (e.id, f)
        })
        .collect()
}

/// A device: its connection and the frames read while waiting for something else.
struct Dev {
    c: Client,
    pending: std::collections::VecDeque<Value>,
}

impl Dev {
    fn new(c: Client) -> Self {
        Dev {
            c,
            pending: Default::default(),
        }
    }

    /// The next frame: a kept one first.
    fn recv(&mut self) -> Value {
        self.pending
            .pop_front()
            .unwrap_or_else(|| self.c.recv_json())
    }
}

/// Sends `text` to `to` (with `clientId` if given) and waits for the ack: with Redis, the ack
/// comes once Redis took every publication of the message. Other frames are kept.
fn send_acked(d: &mut Dev, to: &str, text: &str, client_id: Option<&str>, ack: u64) {
    let mut args = json!({"to": to, "text": text});
    if let Some(id) = client_id {
        args["clientId"] = json!(id);
    }
    d.c.send_json(&json!({"event": "sendMessage", "args": args, "ack": ack}));
    loop {
        let v = d.c.recv_json();
        if v["ack"] == ack && (v["event"] == "ack" || v["event"] == "error") {
            assert_eq!(v["event"], "ack", "{v}");
            return;
        }
        d.pending.push_back(v);
    }
}

/// The next `newMessage` with `text` (stray probes and other events skipped).
fn recv_text(d: &mut Dev, text: &str) -> Value {
    loop {
        let m = d.recv();
        if m["event"] != "newMessage" {
            continue;
        }
        if m["args"]["text"] == text {
            return m;
        }
        assert_eq!(m["args"]["text"], "probe", "{m}");
    }
}

/// The next `newMessage`, whatever its text.
fn recv_message(d: &mut Dev) -> Value {
    loop {
        let m = d.recv();
        if m["event"] == "newMessage" {
            return m;
        }
    }
}

/// The frame as stored: the delivered one without its `offset` field.
fn without_offset(m: &Value) -> Value {
    let mut m = m.clone();
    m.as_object_mut().expect("object").remove("offset");
    m
}

#[test]
fn a_message_is_one_script_call_for_both_users_and_dedupe_is_per_user() {
    let redis = TestRedis::start();
    let s = server(
        &redis,
        HistoryConfig {
            enabled: true,
            ..HistoryConfig::default()
        },
    );
    let mut u1 = Dev::new(s.connect("u1"));
    let mut u2 = Dev::new(s.connect("u2"));
    wait_live(&mut u1.c, "u1");
    wait_live(&mut u2.c, "u2");
    // Acked, so every probe before it went through Redis too (the publisher is FIFO).
    send_acked(&mut u1, "u1", "sync", None, 99);
    recv_text(&mut u1, "sync");
    let mut c = redis.connection();
    let (len1, len2) = (stream(&mut c, "u1").len(), stream(&mut c, "u2").len());

    let calls = evalsha_calls(&mut c);
    send_acked(&mut u1, "u2", "hello", None, 1);
    assert_eq!(evalsha_calls(&mut c) - calls, 1, "one call for both users");
    let to_sender = recv_text(&mut u1, "hello");
    let to_recipient = recv_text(&mut u2, "hello");
    assert_eq!(to_recipient["args"]["text"], "hello");
    assert_eq!(without_offset(&to_sender), without_offset(&to_recipient));
    let (s1, s2) = (stream(&mut c, "u1"), stream(&mut c, "u2"));
    assert_eq!((s1.len(), s2.len()), (len1 + 1, len2 + 1));
    let (id1, f1) = s1.last().expect("u1's entry");
    let (id2, f2) = s2.last().expect("u2's entry");
    assert_eq!(f1, f2, "the same frame in both streams");
    let stored: Value = serde_json::from_str(f1).expect("JSON frame");
    assert_eq!(stored, without_offset(&to_recipient));
    // Each user's own offset: its stream's entry id, as its devices received it.
    assert_eq!(to_sender["offset"], id1.as_str());
    assert_eq!(to_recipient["offset"], id2.as_str());

    // With a clientId: still one call, both stored once.
    let calls = evalsha_calls(&mut c);
    send_acked(&mut u1, "u2", "once", Some("c-1"), 2);
    assert_eq!(evalsha_calls(&mut c) - calls, 1);
    let first = recv_text(&mut u2, "once");
    recv_text(&mut u1, "once");
    // A resend: one call, nothing appended, nothing delivered.
    send_acked(&mut u1, "u2", "once", Some("c-1"), 3);
    assert_eq!(evalsha_calls(&mut c) - calls, 2);
    assert_eq!(stream(&mut c, "u1").len(), len1 + 2);
    assert_eq!(stream(&mut c, "u2").len(), len2 + 2);
    // Per user: with the sender's record of it gone (as if it had expired for u1 only), a resend
    // is stored again for the sender alone; the recipient's record still holds.
    let _: () = redis::cmd("DEL")
        .arg(history::dedupe_key("switchboard", "u1", "2:u1:c-1"))
        .query(&mut c)
        .expect("DEL");
    send_acked(&mut u1, "u2", "once", Some("c-1"), 4);
    assert_eq!(stream(&mut c, "u1").len(), len1 + 3, "stored again for u1");
    assert_eq!(stream(&mut c, "u2").len(), len2 + 2, "not again for u2");
    // u1's device got the second copy; u2's nothing more: the next thing it gets is "after".
    let again = recv_text(&mut u1, "once");
    send_acked(&mut u1, "u2", "after", None, 5);
    let after = recv_message(&mut u2);
    assert_eq!(after["args"]["text"], "after", "u2 got nothing in between");
    assert!(offset_of(&first) < offset_of(&after));
    assert!(offset_of(&again) < offset_of(&recv_text(&mut u1, "after")));
}

fn offset_of(v: &Value) -> history::Offset {
    v["offset"]
        .as_str()
        .and_then(|o| o.parse().ok())
        .unwrap_or_else(|| panic!("no offset in {v}"))
}

#[test]
fn the_script_returns_every_id_and_publishes_each_users_payload() {
    let redis = TestRedis::start();
    let mut c = redis.connection();
    let mut sub = redis.connection();
    let mut ps = sub.as_pubsub();
    ps.subscribe(&["p:u:a", "p:u:b"]).expect("SUBSCRIBE");
    ps.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(history::APPEND_SCRIPT)
        .query(&mut c)
        .expect("SCRIPT LOAD");
    let config = HistoryConfig {
        enabled: true,
        max_len: 5,
        ..HistoryConfig::default()
    };
    let frame = r#"{"event":"e","args":{"n":1}}"#;
    let users = [("a", "p:u:a"), ("b", "p:u:b")];
    let call = |c: &mut redis::Connection, dedupe: Option<&str>| -> Vec<String> {
        history::append_call(&sha, "p", 0xab, &config, frame, dedupe, &users)
            .query(c)
            .expect("EVALSHA")
    };
    let ids = call(&mut c, None);
    assert_eq!(ids.len(), 2);
    for (id, channel) in ids.iter().zip(["p:u:a", "p:u:b"]) {
        let msg = ps.get_message().expect("published");
        assert_eq!(msg.get_channel_name(), channel);
        let payload: String = msg.get_payload().expect("payload");
        assert_eq!(
            payload,
            format!("00000000000000ab {id} {{\"event\":\"e\",\"args\":{{\"n\":1}},\"offset\":\"{id}\"}}")
        );
    }
    // With a key: recorded per user; a second call returns the same ids and appends nothing.
    let keyed = call(&mut c, Some("k"));
    assert_eq!(call(&mut c, Some("k")), keyed);
    let len = |c: &mut redis::Connection, u: &str| -> usize {
        redis::cmd("XLEN")
            .arg(history::stream_key("p", u))
            .query(c)
            .expect("XLEN")
    };
    assert_eq!((len(&mut c, "a"), len(&mut c, "b")), (2, 2));
    // Trimming by count keeps at least `max_len` (approximately: whole nodes), never fewer.
    for _ in 0..300 {
        call(&mut c, None);
    }
    let n = len(&mut c, "a");
    assert!((5..=5 + 100).contains(&n), "{n} entries");
    let ttl: i64 = redis::cmd("PTTL")
        .arg(history::stream_key("p", "a"))
        .query(&mut c)
        .expect("PTTL");
    assert!(ttl > 0 && ttl <= config.max_age.as_millis() as i64, "{ttl}");
}

#[test]
fn reads_keep_the_bounds_exact_although_trims_are_approximate() {
    let redis = TestRedis::start();
    let s = server(
        &redis,
        HistoryConfig {
            enabled: true,
            max_len: 10,
            max_age: Duration::from_secs(2),
            ..HistoryConfig::default()
        },
    );
    let mut u1 = Dev::new(s.connect("u1"));
    let mut u2 = Dev::new(s.connect("u2"));
    wait_live(&mut u1.c, "u1");
    wait_live(&mut u2.c, "u2");
    // Count: 25 events; a resume from the 11th newest is past the last 10.
    let mut offsets = Vec::new();
    for i in 0..25 {
        let text = format!("m{i}");
        send_acked(&mut u2, "u1", &text, None, i + 1);
        offsets.push(offset_of(&recv_text(&mut u1, &text)));
    }
    let mut c = redis.connection();
    let kept = stream(&mut c, "u1").len();
    assert!(kept >= 10, "{kept}");
    let resume = |since: history::Offset| -> (Vec<String>, Value) {
        let mut laptop =
            Client::connect_url(&format!("ws://{}/ws?token=u1&since={since}", s.addr), "u1");
        let mut texts = Vec::new();
        loop {
            let m = laptop.recv_json();
            if m["event"] == "recovered" {
                return (texts, m);
            }
            texts.push(m["args"]["text"].as_str().unwrap_or_default().to_string());
        }
    };
    let (texts, r) = resume(offsets[14]);
    assert_eq!(r["args"]["complete"], false, "{r}: {texts:?}");
    let last10: Vec<String> = (15..25).map(|i| format!("m{i}")).collect();
    assert_eq!(texts, last10);
    let (texts, r) = resume(offsets[15]);
    assert_eq!(r["args"]["complete"], true, "{r}");
    assert_eq!(texts, last10[1..]);

    // Pages stop at the last 10 too.
    let mut newest_first = last10.clone();
    newest_first.reverse();
    assert_eq!(page_texts(&mut u1, 8), newest_first);

    // Age: an event older than 2 s is neither replayed nor paged, even if still in the stream.
    std::thread::sleep(Duration::from_millis(1500));
    send_acked(&mut u2, "u1", "fresh", None, 100);
    let fresh = offset_of(&recv_text(&mut u1, "fresh"));
    std::thread::sleep(Duration::from_millis(800));
    let (texts, r) = resume(offsets[24]);
    assert_eq!(r["args"]["complete"], false, "{r}");
    assert_eq!(texts, ["fresh"]);
    let (texts, r) = resume(fresh);
    assert_eq!((texts.len(), &r["args"]["complete"]), (0, &json!(true)));
    assert_eq!(page_texts(&mut u1, 9), ["fresh"]);
}

/// The texts of the `history` page (limit 50) of `c`'s user, newest first.
fn page_texts(d: &mut Dev, ack: u64) -> Vec<String> {
    d.c.send_json(&json!({"event": "history", "args": {"limit": 50}, "ack": ack}));
    let page = loop {
        let v = d.c.recv_json();
        if v["ack"] == ack {
            break v;
        }
        d.pending.push_back(v);
    };
    page["args"]["events"]
        .as_array()
        .unwrap_or_else(|| panic!("events: {page}"))
        .iter()
        .map(|e| e["args"]["text"].as_str().unwrap_or_default().to_string())
        .collect()
}
