//! History and the zero-loss device switch: offsets on every event, `?since=` resume with no gap
//! and no duplicate at the seam, embedded and across instances through Redis (including an
//! instance killed with SIGKILL and a Redis restart with AOF persistence).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::Value;
use switchboard::backplane::{RedisConfig, Routing};
use switchboard::history::{HistoryConfig, Offset};
use switchboard::Config;

fn history(max_len: usize) -> HistoryConfig {
    HistoryConfig {
        enabled: true,
        max_len,
        ..HistoryConfig::default()
    }
}

// The live senders below burst far past the default per-connection rate limit on purpose (a
// dense stream makes any gap at the resume seam visible), so these servers run without it.
fn embedded(max_len: usize) -> TestServer {
    TestServer::with_config(Config {
        history: history(max_len),
        rate_limit_per_sec: 0,
        ..test_config()
    })
}

fn on_redis(redis: &TestRedis, max_len: usize) -> TestServer {
    let mut rc = RedisConfig::new(redis.url());
    rc.routing = Routing::PerUser;
    rc.reconnect_max = Duration::from_millis(300);
    TestServer::with_config(Config {
        backplane: Some(rc),
        history: history(max_len),
        rate_limit_per_sec: 0,
        ..test_config()
    })
}

fn child_on_redis(redis: &TestRedis) -> ChildServer {
    ChildServer::spawn(&[
        "--backplane",
        "redis",
        "--redis-url",
        &redis.url(),
        "--redis-reconnect-max",
        "300ms",
        "--history",
        "on",
        "--rate-limit",
        "0",
    ])
}

fn resume(addr: SocketAddr, user: &str, since: &str) -> Client {
    Client::connect_url(&format!("ws://{addr}/ws?token={user}&since={since}"), user)
}

fn offset_of(v: &Value) -> Offset {
    v["offset"]
        .as_str()
        .unwrap_or_else(|| panic!("no offset in {v}"))
        .parse()
        .unwrap_or_else(|_| panic!("bad offset in {v}"))
}

/// Sends `n` messages from `from` to `to` and waits until `witness` (a live device of `to`)
/// got all of them, so they are in history. Returns the last offset the witness saw.
fn send_and_witness(
    from: &mut Client,
    to: &str,
    witness: &mut Client,
    prefix: &str,
    n: usize,
) -> Offset {
    for i in 0..n {
        from.send_message(to, &format!("{prefix}{i}"));
    }
    let mut last = None;
    for i in 0..n {
        let m = witness.recv_event("newMessage");
        assert_eq!(m["args"]["text"], format!("{prefix}{i}"));
        let o = offset_of(&m);
        assert!(Some(o) > last, "offsets increase: {m}");
        last = Some(o);
    }
    last.unwrap()
}

/// While the laptop resumes, u3 keeps sending `live{k}` to u1 from `live_addr`.
struct LiveSender {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl LiveSender {
    fn start(live_addr: SocketAddr) -> Self {
        let mut u3 = Client::connect(live_addr, "u3");
        // Until its instance is subscribed to u3's channel, u3 would not get its own copies
        // (a fresh connection gets what is published after that): probe until one comes back.
        let deadline = std::time::Instant::now() + DEADLINE;
        'probe: loop {
            assert!(
                std::time::Instant::now() < deadline,
                "u3 never got its probe"
            );
            u3.send_message("u3", "probe");
            let wait = std::time::Instant::now() + Duration::from_millis(300);
            while let Some(Ok(tungstenite::Message::Text(t))) = u3.next_message(wait) {
                if t.contains("probe") {
                    break 'probe;
                }
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut k = 0;
            // Bursts with short pauses: dense enough that a gap at the seam (even one of a
            // fraction of a millisecond) would swallow a message.
            while !flag.load(Ordering::SeqCst) && k < 3000 {
                for _ in 0..20 {
                    u3.send_message("u1", &format!("live{k}"));
                    k += 1;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            // Every message is acknowledged by its own copy coming back: all were dispatched.
            let mut seen = 0;
            while seen < k {
                let m = u3.recv_event("newMessage");
                if m["args"]["text"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("live"))
                {
                    seen += 1;
                }
            }
            k
        });
        LiveSender {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sending; returns how many were sent.
    fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

/// Reads the resumed laptop: exactly `missed` (`m0..`) in order, then `live{k}` with k
/// consecutive from 0, `recovered` somewhere after the replay, offsets strictly increasing,
/// nothing twice. Returns once `live{total-1}` arrived.
fn check_resumed(laptop: &mut Client, missed: usize, live: LiveSender) {
    let mut last: Option<Offset> = None;
    for i in 0..missed {
        let m = laptop.recv_json();
        assert_eq!(m["event"], "newMessage", "replay first: {m}");
        assert_eq!(
            m["args"]["text"],
            format!("m{i}"),
            "the missed ones, in order"
        );
        let o = offset_of(&m);
        assert!(Some(o) > last);
        last = Some(o);
    }
    let mut next_live = 0;
    let mut recovered = false;
    let mut live = Some(live);
    let mut total = None;
    loop {
        if recovered && next_live >= 20 {
            if let Some(sender) = live.take() {
                total = Some(sender.finish());
            }
        }
        if recovered && total == Some(next_live) {
            break;
        }
        let m = laptop.recv_json();
        match m["event"].as_str() {
            Some("recovered") => {
                assert!(!recovered, "one recovered event");
                assert_eq!(m["args"]["complete"], true, "{m}");
                assert_eq!(
                    m["args"]["offset"]
                        .as_str()
                        .map(|s| s.parse::<Offset>().unwrap()),
                    last,
                    "recovered names the last event sent"
                );
                recovered = true;
            }
            Some("newMessage") => {
                assert_eq!(
                    m["args"]["text"],
                    format!("live{next_live}"),
                    "no gap, no duplicate at the seam"
                );
                let o = offset_of(&m);
                assert!(Some(o) > last);
                last = Some(o);
                next_live += 1;
            }
            _ => panic!("unexpected {m}"),
        }
    }
    laptop.expect_silence(Duration::from_millis(200));
}

/// The kitchen scenario on any deployment: phone on `a`, laptop on `b` (connected by the
/// caller), the laptop drops, 100 messages arrive, `between` runs (restart Redis...), and the
/// laptop resumes on `a` while messages keep coming.
fn kitchen(a: SocketAddr, laptop: Client, between: impl FnOnce(), wait_ready: impl Fn()) {
    kitchen_to(a, a, laptop, drop, between, wait_ready)
}

/// [`kitchen`], with the laptop resuming on `resume_on` and dropped by `disconnect`.
fn kitchen_to(
    a: SocketAddr,
    resume_on: SocketAddr,
    mut laptop: Client,
    disconnect: impl FnOnce(Client),
    between: impl FnOnce(),
    wait_ready: impl Fn(),
) {
    let mut phone = Client::connect(a, "u1");
    let mut u2 = Client::connect(a, "u2");
    wait_ready();
    let seen = send_and_witness(&mut u2, "u1", &mut phone, "warmup", 1);
    let m = laptop.recv_event("newMessage");
    assert_eq!(offset_of(&m), seen, "every device sees the same offset");
    disconnect(laptop);
    let _ = send_and_witness(&mut u2, "u1", &mut phone, "m", 100);
    between();
    let live = LiveSender::start(a);
    let mut laptop = resume(resume_on, "u1", &seen.to_string());
    check_resumed(&mut laptop, 100, live);
}

#[test]
fn embedded_resume_replays_exactly_what_was_missed_then_goes_live() {
    let server = embedded(1000);
    let laptop = server.connect("u1");
    kitchen(server.addr, laptop, || {}, || {});
}

#[test]
fn embedded_since_older_than_history_is_incomplete() {
    let server = embedded(10);
    let mut phone = server.connect("u1");
    let mut u2 = server.connect("u2");
    let first = send_and_witness(&mut u2, "u1", &mut phone, "a", 1);
    send_and_witness(&mut u2, "u1", &mut phone, "m", 30);
    let mut laptop = resume(server.addr, "u1", &first.to_string());
    for i in 20..30 {
        assert_eq!(
            laptop.recv_json()["args"]["text"],
            format!("m{i}"),
            "what is left"
        );
    }
    let r = laptop.recv_json();
    assert_eq!(r["event"], "recovered");
    assert_eq!(r["args"]["complete"], false, "{r}");
    // Garbage and offsets of another process run are incomplete too, never an error.
    for since in ["garbage", "1-1"] {
        let mut c = resume(server.addr, "u1", since);
        let r = c.recv_event("recovered");
        assert_eq!(r["args"]["complete"], false, "{since}: {r}");
    }
    assert_eq!(
        metric(server.addr, "switchboard_recoveries_incomplete_total"),
        3
    );
    assert_eq!(
        metric(server.addr, "switchboard_recoveries_complete_total"),
        0
    );
}

#[test]
fn history_off_sends_no_offsets() {
    let mut config = test_config();
    config.history.enabled = false;
    let server = TestServer::with_config(config);
    let mut u1 = server.connect("u1");
    let mut u2 = server.connect("u2");
    u2.send_message("u1", "x");
    let m = u1.recv_event("newMessage");
    assert!(m.get("offset").is_none(), "{m}");
    assert_eq!(server.health()["history"], "off");
    // Nor resume: `since` is ignored, and the reserved events are unknown.
    let mut c = resume(server.addr, "u1", "1-1");
    c.send_json(&serde_json::json!({"event": "history", "ack": 1}));
    let e = c.recv_json();
    assert_eq!(e["event"], "error", "{e}");
    assert_eq!(e["args"]["code"], "unknown_event");
}

#[test]
fn history_is_on_by_default() {
    let server = TestServer::start();
    let mut u1 = server.connect("u1");
    let mut u2 = server.connect("u2");
    u2.send_message("u1", "x");
    offset_of(&u1.recv_event("newMessage"));
    assert_eq!(server.health()["history"], "on");
}

#[test]
fn kitchen_across_instances() {
    let redis = TestRedis::start();
    let a = on_redis(&redis, 1000);
    let b = on_redis(&redis, 1000);
    let laptop = b.connect("u1");
    kitchen(
        a.addr,
        laptop,
        || {},
        || {
            wait_subscribed(&redis, "u1", 2);
            wait_subscribed(&redis, "u2", 1);
        },
    );
}

#[test]
fn kitchen_resuming_on_an_instance_that_never_hosted_the_user() {
    // C subscribes to u1's channel only when the laptop arrives: the replay must wait for
    // Redis to confirm that subscription, or what is published in between is lost.
    let redis = TestRedis::start();
    let a = on_redis(&redis, 1000);
    let b = on_redis(&redis, 1000);
    let c = on_redis(&redis, 1000);
    let laptop = b.connect("u1");
    kitchen_to(
        a.addr,
        c.addr,
        laptop,
        drop,
        || {},
        || {
            wait_subscribed(&redis, "u1", 2);
            wait_subscribed(&redis, "u2", 1);
        },
    );
}

#[test]
fn kitchen_after_sigkill_of_the_laptops_instance() {
    let redis = TestRedis::start();
    let a = on_redis(&redis, 1000);
    let b = child_on_redis(&redis);
    let laptop = Client::connect(b.addr, "u1");
    let b = std::cell::RefCell::new(Some(b));
    kitchen_to(
        a.addr,
        a.addr,
        laptop,
        // B dies under the laptop, which finds its connection gone.
        |mut laptop| {
            let mut b = b.borrow_mut().take().unwrap();
            b.signal(9);
            b.wait_exit();
            let gone = laptop.next_message(std::time::Instant::now() + DEADLINE);
            assert!(matches!(gone, Some(Err(_))), "{gone:?}");
        },
        || {},
        || {
            wait_subscribed(&redis, "u1", 2);
            wait_subscribed(&redis, "u2", 1);
        },
    );
}

#[test]
fn kitchen_across_a_redis_restart_with_aof() {
    let redis = std::cell::RefCell::new(TestRedis::start_with(&[
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
    ]));
    let a = on_redis(&redis.borrow(), 1000);
    let b = on_redis(&redis.borrow(), 1000);
    let laptop = b.connect("u1");
    kitchen(
        a.addr,
        laptop,
        || {
            let mut r = redis.borrow_mut();
            r.kill();
            r.restart();
        },
        || {
            let r = redis.borrow();
            wait_subscribed(&r, "u1", 2);
            wait_subscribed(&r, "u2", 1);
        },
    );
}

#[test]
fn redis_since_older_than_history_is_incomplete() {
    let redis = TestRedis::start();
    let a = on_redis(&redis, 10);
    let mut phone = a.connect("u1");
    let mut u2 = a.connect("u2");
    wait_subscribed(&redis, "u1", 1);
    wait_subscribed(&redis, "u2", 1);
    let first = send_and_witness(&mut u2, "u1", &mut phone, "a", 1);
    let last = send_and_witness(&mut u2, "u1", &mut phone, "m", 30);
    let mut laptop = resume(a.addr, "u1", &first.to_string());
    for i in 20..30 {
        assert_eq!(
            laptop.recv_json()["args"]["text"],
            format!("m{i}"),
            "what is left"
        );
    }
    let r = laptop.recv_json();
    assert_eq!(r["event"], "recovered");
    assert_eq!(r["args"]["complete"], false, "{r}");
    // Up to date: nothing to replay, complete.
    let mut c = resume(a.addr, "u1", &last.to_string());
    let r = c.recv_json();
    assert_eq!(r["event"], "recovered", "{r}");
    assert_eq!(r["args"]["complete"], true, "{r}");
    assert_eq!(r["args"]["offset"], last.to_string());
}

const SECRET: &str = "a-test-secret-of-32-bytes-length";
const API_KEY: &str = "publish-key-0123456789";

fn token(user: &str) -> String {
    jwt(
        SECRET,
        serde_json::json!({"sub": user, "exp": now_secs() + 600}),
    )
}

/// History on with JWT auth and an API key; on `redis` when given.
fn api_server(redis: Option<&TestRedis>) -> TestServer {
    let backplane = redis.map(|r| {
        let mut rc = RedisConfig::new(r.url());
        rc.reconnect_max = Duration::from_millis(300);
        rc
    });
    TestServer::with_config(Config {
        auth: switchboard::AuthMode::Jwt {
            secret: SECRET.into(),
            audience: None,
            issuer: None,
            leeway: Duration::from_secs(5),
        },
        backplane,
        history: HistoryConfig {
            api_key: Some(API_KEY.into()),
            max_publish_users: 3,
            max_publish_body_bytes: 4096,
            ..history(1000)
        },
        ..test_config()
    })
}

fn post(addr: SocketAddr, path: &str, key: &str, body: &str) -> (u16, Value) {
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (status, body) = raw_request(addr, req.as_bytes());
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn history_api(redis: Option<&TestRedis>) {
    let server = api_server(redis);
    let connect = |user: &str| Client::connect(server.addr, &token(user));
    let mut u1 = connect("u1");
    let mut u2 = connect("u2");
    if let Some(r) = redis {
        wait_subscribed(r, "u1", 1);
        wait_subscribed(r, "u2", 1);
    }
    let last = send_and_witness(&mut u2, "u1", &mut u1, "m", 60);

    // GET: the newest 50, newest first, each with its offset.
    let (status, body) = server.get(&format!("/api/history?token={}", token("u1")));
    assert_eq!(status, 200, "{body}");
    let page: Value = serde_json::from_str(&body).unwrap();
    let events = page["events"].as_array().unwrap();
    assert_eq!(events.len(), 50);
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["args"]["text"], format!("m{}", 59 - i), "newest first");
    }
    assert_eq!(offset_of(&events[0]), last);
    // The next page, before the oldest of this one.
    let before = events[49]["offset"].as_str().unwrap();
    let (status, body) = server.get(&format!(
        "/api/history?token={}&limit=20&before={before}",
        token("u1")
    ));
    assert_eq!(status, 200);
    let page: Value = serde_json::from_str(&body).unwrap();
    let texts: Vec<&str> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["args"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        ["m9", "m8", "m7", "m6", "m5", "m4", "m3", "m2", "m1", "m0"]
    );
    // Wrong or missing token, bad parameters.
    assert_eq!(server.get("/api/history?token=forged").0, 401);
    assert_eq!(server.get("/api/history").0, 401);
    let t = token("u1");
    assert_eq!(
        server.get(&format!("/api/history?token={t}&limit=0")).0,
        400
    );
    assert_eq!(
        server.get(&format!("/api/history?token={t}&before=x")).0,
        400
    );
    // Nothing is before the first possible offset: an empty page, not a 503 (Redis refuses
    // `(0-0` as a range end).
    let (status, body) = server.get(&format!("/api/history?token={t}&before=0-0"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["events"],
        serde_json::json!([])
    );

    // The `history` event answers through its ack.
    u1.send_json(&serde_json::json!({"event": "history", "args": {"limit": 3}, "ack": 9}));
    let ack = u1.recv_event("ack");
    assert_eq!(ack["ack"], 9);
    let texts: Vec<&str> = ack["args"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["args"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["m59", "m58", "m57"]);

    // `resume` as an event: the replay after m49, then recovered.
    let mut laptop = connect("u1");
    let since = events[10]["offset"].as_str().unwrap(); // m49
    laptop.send_json(&serde_json::json!({"event": "resume", "args": {"since": since}}));
    for i in 50..60 {
        assert_eq!(laptop.recv_json()["args"]["text"], format!("m{i}"));
    }
    let r = laptop.recv_json();
    assert_eq!(r["event"], "recovered");
    assert_eq!(r["args"]["complete"], true);
    assert_eq!(r["args"]["offset"], last.to_string());

    // POST /api/publish.
    let body = r#"{"users":["u1","u2"],"event":"notice","args":{"n":1}}"#;
    assert_eq!(post(server.addr, "/api/publish", "wrong-key", body).0, 401);
    for bad in [
        "not json",
        r#"{"users":["u1"],"event":"notice"}"#,
        r#"{"users":[],"event":"notice","args":1}"#,
        r#"{"users":["a","b","c","d"],"event":"notice","args":1}"#,
    ] {
        let (status, err) = post(server.addr, "/api/publish", API_KEY, bad);
        assert_eq!(status, 400, "{bad}: {err}");
        assert!(err["error"].is_string(), "JSON error: {err}");
    }
    let huge = format!(
        r#"{{"users":["u1"],"event":"e","args":"{}"}}"#,
        "x".repeat(5000)
    );
    assert_eq!(post(server.addr, "/api/publish", API_KEY, &huge).0, 413);
    // Nothing of the refused calls went out.
    let (status, answer) = post(server.addr, "/api/publish", API_KEY, body);
    assert_eq!(status, 200, "{answer}");
    for (device, user) in [(&mut u1, "u1"), (&mut laptop, "u1"), (&mut u2, "u2")] {
        // The refused calls (args 1) would come first: the first notice is the good one.
        let m = device.recv_event("notice");
        assert_eq!(m["args"]["n"], 1, "{m}");
        assert_eq!(m["offset"], answer["offsets"][user], "{answer}");
        device.expect_silence(Duration::from_millis(100));
    }
}

#[test]
fn history_api_embedded() {
    history_api(None);
}

#[test]
fn history_api_on_redis() {
    let redis = TestRedis::start();
    history_api(Some(&redis));
}

#[test]
fn publish_is_off_without_an_api_key() {
    let server = embedded(10);
    let (status, body) = post(server.addr, "/api/publish", "anything", "{}");
    assert_eq!(status, 404, "{body}");
}

#[test]
fn publish_reaches_every_device_of_every_user_across_instances() {
    let redis = TestRedis::start();
    let a = api_server(Some(&redis));
    let b = api_server(Some(&redis));
    let mut devices = [
        ("u1", Client::connect(a.addr, &token("u1"))),
        ("u1", Client::connect(b.addr, &token("u1"))),
        ("u2", Client::connect(b.addr, &token("u2"))),
        ("u3", Client::connect(a.addr, &token("u3"))),
    ];
    wait_subscribed(&redis, "u1", 2);
    wait_subscribed(&redis, "u2", 1);
    wait_subscribed(&redis, "u3", 1);
    let body = r#"{"users":["u1","u2","u3"],"event":"notice","args":{"n":2}}"#;
    let (status, answer) = post(a.addr, "/api/publish", API_KEY, body);
    assert_eq!(status, 200, "{answer}");
    for (user, device) in devices.iter_mut() {
        let m = device.recv_json();
        assert_eq!(m["event"], "notice", "{user}: {m}");
        assert_eq!(m["args"]["n"], 2);
        assert_eq!(m["offset"], answer["offsets"][*user], "{answer}");
        device.expect_silence(Duration::from_millis(100));
    }
    // The publication is in each user's history too.
    let (_, page) = b.get(&format!("/api/history?token={}&limit=1", token("u2")));
    let page: Value = serde_json::from_str(&page).unwrap();
    assert_eq!(page["events"][0]["offset"], answer["offsets"]["u2"]);
    // A client that waits for `100 Continue` before its body gets it.
    let mut s = std::net::TcpStream::connect(a.addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let head = format!(
        "POST /api/publish HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {API_KEY}\r\n\
         Expect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    std::io::Write::write_all(&mut s, head.as_bytes()).unwrap();
    let mut got = [0u8; 25];
    std::io::Read::read_exact(&mut s, &mut got).unwrap();
    assert_eq!(&got, b"HTTP/1.1 100 Continue\r\n\r\n");
    std::io::Write::write_all(&mut s, body.as_bytes()).unwrap();
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut s, &mut rest);
    assert!(rest.starts_with("HTTP/1.1 200"), "{rest}");
    for (_, device) in devices.iter_mut() {
        assert_eq!(device.recv_json()["event"], "notice");
    }
    // Another method is refused, with a JSON body.
    let (status, body) = http_get(a.addr, "/api/publish");
    assert_eq!(status, 405);
    assert!(serde_json::from_str::<Value>(&body).is_ok(), "{body}");
}

#[test]
fn a_replay_cut_short_by_a_smaller_bound_is_incomplete() {
    // A keeps 100 events per user, B only 10: B must not claim a complete replay of 40.
    let redis = TestRedis::start();
    let a = on_redis(&redis, 100);
    let b = on_redis(&redis, 10);
    let mut phone = a.connect("u1");
    let mut u2 = a.connect("u2");
    wait_subscribed(&redis, "u1", 1);
    wait_subscribed(&redis, "u2", 1);
    let first = send_and_witness(&mut u2, "u1", &mut phone, "a", 1);
    send_and_witness(&mut u2, "u1", &mut phone, "m", 40);
    let mut laptop = resume(b.addr, "u1", &first.to_string());
    for i in 30..40 {
        assert_eq!(
            laptop.recv_json()["args"]["text"],
            format!("m{i}"),
            "the newest"
        );
    }
    let r = laptop.recv_json();
    assert_eq!(r["event"], "recovered");
    assert_eq!(r["args"]["complete"], false, "{r}");
}

#[test]
fn devices_that_stay_connected_through_a_subscriber_outage_get_what_they_missed() {
    let redis = TestRedis::start();
    let a = on_redis(&redis, 1000);
    // B waits ~1 s before reconnecting its subscriber, so the outage below is wide enough.
    let b = {
        let mut rc = RedisConfig::new(redis.url());
        rc.routing = Routing::PerUser;
        rc.reconnect_min = Duration::from_millis(1000);
        rc.reconnect_max = Duration::from_millis(1000);
        TestServer::with_config(Config {
            backplane: Some(rc),
            history: history(1000),
            ..test_config()
        })
    };
    let mut laptop = b.connect("u1");
    let mut phone = a.connect("u2");
    wait_subscribed(&redis, "u1", 1);
    wait_subscribed(&redis, "u2", 1);
    phone.send_message("u1", "before");
    assert_eq!(laptop.recv_event("newMessage")["args"]["text"], "before");
    assert_eq!(phone.recv_event("newMessage")["args"]["text"], "before");

    // Redis drops B's subscriber (its output buffer limit), while the laptop stays connected.
    let mut r = redis.connection();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("client-output-buffer-limit")
        .arg("pubsub 4kb 4kb 0")
        .query(&mut r)
        .unwrap();
    let big = "x".repeat(64 * 1024);
    let _: i64 = redis::cmd("PUBLISH")
        .arg("switchboard:u:u1")
        .arg(&big)
        .query(&mut r)
        .unwrap();
    wait_for("B's subscriber to be dropped", || {
        b.bp_stat(|s| &s.subscriber_connected) == 0
    });
    // Sent while B hears nothing: stored in u1's history, delivered live to no device of u1.
    for n in 0..5 {
        phone.send_message("u1", &format!("missed {n}"));
    }
    for n in 0..5 {
        assert_eq!(
            phone.recv_event("newMessage")["args"]["text"],
            format!("missed {n}")
        );
    }
    // Once B is subscribed again, the laptop gets them, in order, then `recovered`.
    for n in 0..5 {
        let m = laptop.recv_event("newMessage");
        assert_eq!(m["args"]["text"], format!("missed {n}"), "{m}");
    }
    let recovered = laptop.recv_event("recovered");
    assert_eq!(recovered["args"]["complete"], true, "{recovered}");
    // And live delivery goes on, without duplicates.
    phone.send_message("u1", "after");
    assert_eq!(laptop.recv_event("newMessage")["args"]["text"], "after");
    laptop.expect_silence(Duration::from_millis(200));
}

/// A `history` answer larger than half the outbound bound carries the newest events that fit and
/// `more: true`; paging on with `before` gets the rest. Before, 20 large events closed the
/// requester with 4008 on every `history` (limit 50): embedded and with Redis.
fn history_is_paged(server: TestServer, redis: Option<&TestRedis>) {
    let mut victim = server.connect("v");
    let mut sender = server.connect("s");
    if let Some(r) = redis {
        wait_subscribed(r, "v", 1);
    }
    let text = "x".repeat(800);
    for n in 0..20 {
        sender.send_message("v", &format!("{n:02}{text}"));
        let got = victim.recv_event("newMessage");
        assert_eq!(
            got["args"]["text"].as_str().unwrap()[..2],
            format!("{n:02}")
        );
    }
    let mut seen = Vec::new();
    let mut before: Option<String> = None;
    for ack in 100.. {
        let args = match &before {
            Some(b) => serde_json::json!({"limit": 50, "before": b}),
            None => serde_json::json!({"limit": 50}),
        };
        victim.send_json(&serde_json::json!({"event": "history", "args": args, "ack": ack}));
        let answer = victim.recv_event("ack");
        assert_eq!(answer["ack"], ack);
        let events = answer["args"]["events"].as_array().unwrap();
        assert!(events.len() < 20, "one frame would exceed the bound");
        seen.extend(
            events
                .iter()
                .map(|e| e["args"]["text"].as_str().unwrap()[..2].to_string()),
        );
        if answer["args"]["more"] != true {
            break;
        }
        before = events
            .last()
            .and_then(|e| e["offset"].as_str())
            .map(String::from);
    }
    let expected: Vec<String> = (0..20).rev().map(|n| format!("{n:02}")).collect();
    assert_eq!(seen, expected, "every event once, newest first");
}

#[test]
fn history_answers_over_the_outbound_bound_are_paged() {
    let small = |mut config: Config| {
        config.max_message_bytes = 1024;
        config.max_outbound_bytes = 4096;
        config
    };
    history_is_paged(
        TestServer::with_config(small(Config {
            history: history(100),
            ..test_config()
        })),
        None,
    );
    let redis = TestRedis::start();
    let mut rc = RedisConfig::new(redis.url());
    rc.reconnect_max = Duration::from_millis(300);
    history_is_paged(
        TestServer::with_config(small(Config {
            backplane: Some(rc),
            history: history(100),
            ..test_config()
        })),
        Some(&redis),
    );
}
