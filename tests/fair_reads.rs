//! Fair history reads (issue 16, finding 3): one user flooding replays of a long history, or
//! `GET /api/history`, does not starve another user's resume or history page; a replay larger
//! than the answer budget keeps its newest events and leaves its requester open.
//!
//! The floods run against the real binary on a private `redis-server`; they assert behaviour
//! (the victim's resume completes, `complete: true`, while the flood still runs), never speed:
//! the latency under the flood is measured by `benches/history_flood.rs` (docs/SECURITY.md).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use switchboard::backplane::RedisConfig;
use switchboard::history::HistoryConfig;
use switchboard::Config;
use tungstenite::Message;

/// The hostile user's history: events of this many bytes ...
const BIG_EVENT: usize = 60 * 1024;
/// ... this many of them (the default `--history-max-len`).
const BIG_EVENTS: usize = 1000;
/// The flood of the finding: this many new attempts (connections resuming from `0-0`, or
/// `GET /api/history`) ...
const FLOOD_BURST: usize = 10;
/// ... this often, whether earlier ones were answered or not.
const FLOOD_EVERY: Duration = Duration::from_millis(300);
/// How long the flood runs at most; the victim must be served well before its end.
const FLOOD_FOR: Duration = Duration::from_secs(30);
/// Generous: the target under this flood is a p99 of 50 ms (measured, not asserted here).
const VICTIM_DEADLINE: Duration = Duration::from_secs(5);

/// The real binary on `redis`, history on, connect rates off (the flood of the finding
/// reconnects faster than `--connect-rate-per-user` allows: the reads are what is tested).
fn child(redis: &TestRedis, extra: &[&str]) -> ChildServer {
    let url = redis.url();
    let mut args = vec![
        "--backplane",
        "redis",
        "--redis-url",
        &url,
        "--history",
        "on",
        "--connect-rate-per-user",
        "0",
        "--connect-rate-per-ip",
        "0",
    ];
    args.extend_from_slice(extra);
    ChildServer::spawn(&args)
}

/// Connects as `user` with `?since=`, reading until `recovered` or the connection ends; the
/// `recovered` frame, or `None` if the connection ended (or was refused) first.
fn try_resume(addr: SocketAddr, user: &str, since: &str, until: Instant) -> Option<Value> {
    let url = format!("ws://{addr}/ws?token={user}&since={since}");
    let (mut ws, _) = tungstenite::connect(url).ok()?;
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    }
    let got = loop {
        match ws.read() {
            Ok(Message::Text(t)) => {
                let v: Value = serde_json::from_str(&t).ok()?;
                if v["event"] == "recovered" {
                    break Some(v);
                }
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) && Instant::now() < until => {}
            Err(_) => break None,
        }
    };
    let _ = ws.close(None);
    let _ = ws.flush();
    got
}

/// An open-loop flood, as in the finding: every `FLOOD_EVERY`, `FLOOD_BURST` new attempts, each
/// on its own thread (they do not wait for each other's answers), until `stop` or `FLOOD_FOR`;
/// counts the attempts that ended (answered, refused or closed).
struct Flood {
    stop: Arc<AtomicBool>,
    started: Arc<AtomicU64>,
    rounds: Arc<AtomicU64>,
    driver: std::thread::JoinHandle<()>,
    ends: Instant,
}

impl Flood {
    fn start(attempt: impl Fn(Instant) + Send + Sync + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let started = Arc::new(AtomicU64::new(0));
        let ends = Instant::now() + FLOOD_FOR;
        let attempt = Arc::new(attempt);
        let driver = {
            let (stop, rounds, started) = (stop.clone(), rounds.clone(), started.clone());
            std::thread::spawn(move || {
                let mut attempts = Vec::new();
                let mut next = Instant::now();
                while !stop.load(SeqCst) && Instant::now() < ends {
                    for _ in 0..FLOOD_BURST {
                        let (rounds, attempt) = (rounds.clone(), attempt.clone());
                        attempts.push(std::thread::spawn(move || {
                            attempt(ends);
                            rounds.fetch_add(1, SeqCst);
                        }));
                    }
                    started.fetch_add(FLOOD_BURST as u64, SeqCst);
                    attempts.retain(|t: &std::thread::JoinHandle<()>| !t.is_finished());
                    next += FLOOD_EVERY;
                    std::thread::sleep(next.saturating_duration_since(Instant::now()));
                }
                for t in attempts {
                    let _ = t.join();
                }
            })
        };
        Flood {
            stop,
            started,
            rounds,
            driver,
            ends,
        }
    }

    /// Waits until `ended` attempts of the flood have ended and `started` begun (the backlog
    /// they leave is what a victim meets).
    fn wait_running(&self, ended: u64, started: u64) {
        wait_for("the flood to run", || {
            self.rounds.load(SeqCst) >= ended && self.started.load(SeqCst) >= started
        });
    }

    fn still_running(&self) -> bool {
        Instant::now() < self.ends && !self.driver.is_finished()
    }

    fn finish(self) -> u64 {
        self.stop.store(true, SeqCst);
        self.driver.join().unwrap();
        self.rounds.load(SeqCst)
    }
}

/// The victim gets `n` small messages (through the server: they are in its Redis history);
/// returns the offset of the first, to resume after it.
fn victim_history(addr: SocketAddr, redis: &TestRedis, n: usize) -> String {
    let mut victim = Client::connect(addr, "victim");
    let mut sender = Client::connect(addr, "friend");
    wait_subscribed(redis, "victim", 1);
    let mut first = None;
    for k in 0..n {
        sender.send_message("victim", &format!("m{k}"));
        let got = victim.recv_event("newMessage");
        first.get_or_insert_with(|| got["offset"].as_str().unwrap().to_string());
    }
    victim.close();
    sender.close();
    first.unwrap()
}

/// The victim resumes after its first message while `flood` runs: every later message, then
/// `recovered` with `complete: true`, within the deadline, with the flood still running.
fn victim_resumes_during(addr: SocketAddr, since: &str, missed: usize, flood: &Flood) {
    let started = Instant::now();
    let url = format!("ws://{addr}/ws?token=victim&since={since}");
    let mut victim = Client::connect_url(&url, "victim");
    let mut replayed = 0;
    let recovered = loop {
        let v = victim.recv_json();
        match v["event"].as_str() {
            Some("newMessage") => replayed += 1,
            Some("recovered") => break v,
            _ => {}
        }
    };
    let took = started.elapsed();
    assert_eq!(recovered["args"]["complete"], true, "{recovered}");
    assert_eq!(replayed, missed);
    assert!(
        took < VICTIM_DEADLINE,
        "the victim's resume took {took:?} under the flood"
    );
    assert!(flood.still_running(), "the flood ended before the victim");
    victim.close();
}

#[test]
fn a_resume_flood_of_a_long_history_does_not_starve_another_users_resume() {
    let redis = TestRedis::start();
    fill_history(&redis, "hostile", BIG_EVENTS, BIG_EVENT);
    let server = child(&redis, &[]);
    let addr = server.addr;
    let since = victim_history(addr, &redis, 5);
    let flood = Flood::start(move |until| {
        try_resume(addr, "hostile", "0-0", until);
    });
    // The flood has been running (and queueing) for a while: some attempts ended.
    flood.wait_running(1, 6 * FLOOD_BURST as u64);
    for _ in 0..3 {
        victim_resumes_during(addr, &since, 4, &flood);
        let (status, body) = http_get(addr, "/api/history?token=victim&limit=10");
        assert_eq!(status, 200, "{body}");
        assert!(flood.still_running());
    }
    let rounds = flood.finish();
    assert!(rounds > FLOOD_BURST as u64);
}

#[test]
fn an_api_history_flood_is_rate_limited_and_does_not_starve_another_user() {
    let redis = TestRedis::start();
    fill_history(&redis, "hostile", BIG_EVENTS, BIG_EVENT);
    let server = child(&redis, &[]);
    let addr = server.addr;
    let since = victim_history(addr, &redis, 5);
    let limited = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&limited);
    let flood = Flood::start(move |_| {
        let request = "GET /api/history?token=hostile&limit=100 HTTP/1.1\r\nHost: t\r\n\r\n";
        let mut s = match std::net::TcpStream::connect(addr) {
            Ok(s) => s,
            Err(_) => return,
        };
        use std::io::{Read, Write};
        let _ = s.set_read_timeout(Some(DEADLINE));
        let _ = s.write_all(request.as_bytes());
        let mut head = [0u8; 512];
        let n = s.read(&mut head).unwrap_or(0);
        let head = String::from_utf8_lossy(&head[..n]);
        if head.starts_with("HTTP/1.1 429") {
            assert!(head.contains("Retry-After: 1\r\n"), "{head}");
            counted.fetch_add(1, SeqCst);
        }
    });
    flood.wait_running(FLOOD_BURST as u64, 6 * FLOOD_BURST as u64);
    for _ in 0..3 {
        let (status, body) = http_get(addr, "/api/history?token=victim&limit=10");
        assert_eq!(status, 200, "{body}");
        victim_resumes_during(addr, &since, 4, &flood);
    }
    flood.finish();
    assert!(limited.load(SeqCst) > 0, "the flood met the rate limit");
    assert!(metric(server.addr, "switchboard_api_history_rate_limited_total") > 0);
}

/// A replay longer than half the outbound bound keeps its newest events, `complete: false`
/// (the client pages further back with `history`), and its requester stays open: before, it
/// was closed with 4008 on every resume. Embedded and with Redis.
fn a_replay_over_the_budget_keeps_the_newest(server: TestServer, redis: Option<&TestRedis>) {
    let mut phone = server.connect("v");
    let mut sender = server.connect("s");
    if let Some(r) = redis {
        wait_subscribed(r, "v", 1);
    }
    let text = "x".repeat(800);
    let mut first = None;
    let mut last = None;
    for n in 0..20 {
        sender.send_message("v", &format!("{n:02}{text}"));
        let got = phone.recv_event("newMessage");
        first.get_or_insert_with(|| got["offset"].as_str().unwrap().to_string());
        last = got["offset"].as_str().map(String::from);
    }
    let since = first.unwrap();
    let url = format!("ws://{}/ws?token=v&since={since}", server.addr);
    let mut laptop = Client::connect_url(&url, "v");
    let mut replayed = Vec::new();
    let recovered = loop {
        let v = laptop.recv_json();
        match v["event"].as_str() {
            Some("newMessage") => {
                replayed.push(v["args"]["text"].as_str().unwrap()[..2].to_string())
            }
            Some("recovered") => break v,
            _ => {}
        }
    };
    assert_eq!(recovered["args"]["complete"], false, "{recovered}");
    assert_eq!(recovered["args"]["offset"].as_str(), last.as_deref());
    assert!(!replayed.is_empty() && replayed.len() < 19, "{replayed:?}");
    let newest: Vec<String> = (20 - replayed.len()..20)
        .map(|n| format!("{n:02}"))
        .collect();
    assert_eq!(replayed, newest, "the newest events, in order");
    // Still open: live messages arrive.
    sender.send_message("v", "after");
    assert_eq!(laptop.recv_event("newMessage")["args"]["text"], "after");
}

#[test]
fn a_replay_over_the_answer_budget_keeps_its_newest_events_and_the_requester() {
    let small = |mut config: Config| {
        config.max_message_bytes = 1024;
        config.max_outbound_bytes = 4096;
        config
    };
    let history = HistoryConfig {
        enabled: true,
        max_len: 100,
        ..HistoryConfig::default()
    };
    a_replay_over_the_budget_keeps_the_newest(
        TestServer::with_config(small(Config {
            history: history.clone(),
            ..test_config()
        })),
        None,
    );
    let redis = TestRedis::start();
    let mut rc = RedisConfig::new(redis.url());
    rc.reconnect_max = Duration::from_millis(300);
    a_replay_over_the_budget_keeps_the_newest(
        TestServer::with_config(small(Config {
            backplane: Some(rc),
            history,
            ..test_config()
        })),
        Some(&redis),
    );
}

/// Past `--history-read-queue-per-user`, a user's replays are answered `complete: false` at
/// once and its `history` reads refused with `rate_limited`, rather than queued without end;
/// another user's read still answers.
#[test]
fn a_users_reads_past_its_queue_are_refused_and_others_still_answer() {
    let redis = TestRedis::start();
    fill_history(&redis, "hostile", 200, BIG_EVENT);
    let server = child(
        &redis,
        &[
            "--history-workers",
            "1",
            "--history-read-queue-per-user",
            "1",
            "--rate-limit",
            "0",
        ],
    );
    // 20 resumes at once: one runs, one waits, the rest are refused (counted).
    let addr = server.addr;
    let until = Instant::now() + DEADLINE;
    let resumes: Vec<_> = (0..20)
        .map(|_| std::thread::spawn(move || try_resume(addr, "hostile", "0-0", until)))
        .collect();
    for r in resumes {
        let recovered = r.join().unwrap().expect("every resume is answered");
        assert_eq!(recovered["args"]["complete"], false, "{recovered}");
    }
    assert!(metric(addr, "switchboard_history_reads_refused_total") > 0);

    let mut hostile = Client::connect(server.addr, "hostile");
    for ack in 0..40u64 {
        hostile.send_json(&serde_json::json!(
            {"event": "history", "args": {"limit": 100}, "ack": ack}
        ));
    }
    let mut refused = 0;
    let mut answered = 0;
    while refused + answered < 40 {
        let v = hostile.recv_json();
        if v["event"] == "error" && v["args"]["code"] == "rate_limited" {
            refused += 1;
        } else if v["event"] == "ack" {
            answered += 1;
        }
    }
    assert!(refused > 0, "40 reads at once, one may wait");
    let (status, body) = http_get(server.addr, "/api/history?token=victim&limit=10");
    assert_eq!(status, 200, "{body}");
    assert!(metric(server.addr, "switchboard_history_reads_refused_total") > 0);
}

/// The replay read newest first keeps the old bounds exactly: with `max_len` events after
/// `since`, an exact trim would have dropped `since` (`complete: false`); with one fewer it is
/// complete.
#[test]
fn a_replay_read_newest_first_keeps_the_exact_length_bound() {
    let redis = TestRedis::start();
    let mut rc = RedisConfig::new(redis.url());
    rc.reconnect_max = Duration::from_millis(300);
    let server = TestServer::with_config(Config {
        backplane: Some(rc),
        history: HistoryConfig {
            enabled: true,
            max_len: 10,
            ..HistoryConfig::default()
        },
        rate_limit_per_sec: 0,
        ..test_config()
    });
    let mut phone = server.connect("u1");
    let mut sender = server.connect("u2");
    wait_subscribed(&redis, "u1", 1);
    let mut offsets = Vec::new();
    for n in 0..11 {
        sender.send_message("u1", &format!("m{n}"));
        let got = phone.recv_event("newMessage");
        offsets.push(got["offset"].as_str().unwrap().to_string());
    }
    for (since, complete, replayed) in [(&offsets[0], false, 10), (&offsets[1], true, 9)] {
        let url = format!("ws://{}/ws?token=u1&since={since}", server.addr);
        let mut laptop = Client::connect_url(&url, "u1");
        let mut got = 0;
        let recovered = loop {
            let v = laptop.recv_json();
            match v["event"].as_str() {
                Some("newMessage") => got += 1,
                Some("recovered") => break v,
                _ => {}
            }
        };
        assert_eq!(recovered["args"]["complete"], complete, "{recovered}");
        assert_eq!(got, replayed);
    }
}
