//! How long does another user's resume take while one user floods history reads (issue 16,
//! finding 3)?
//!
//! Starts a private `redis-server` (`TestRedis` of tests/common: a free port, a temp dir, never
//! the one on 6379) and the server binary on it (`--backplane redis --cores 2`, connect rates
//! off so the flood is
//! the finding's, not cut short by them). Writes `EVENTS` events of `EVENT_BYTES` bytes into the
//! hostile user's stream (what that many direct messages leave there), gives the victim 5
//! messages through the server, then runs the flood: every `EVERY_MS` (300) ms, `BURST` (10) new
//! attempts on threads of their own, whether earlier ones were answered or not. `FLOOD=resume`: connections of the
//! hostile user with `?since=0-0`, each read until `recovered` or its end; `FLOOD=api`:
//! `GET /api/history?limit=100` as the hostile user, each answer read whole. `EMBEDDED=1`: the
//! same without Redis, the hostile history sent through the server by the user to itself. After `WARMUP` s of flood, the victim
//! resumes after its first message `SAMPLES` times in a row, at most one every 100 ms (connect,
//! replay, `recovered`), and fetches `GET /api/history` once after each; prints the resume's p50/p99/max, how many were
//! `complete: false`, the victim's HTTP statuses, and the 1-minute load average before and after.
//!
//! Run: `cargo bench --bench history_flood` (the bench measures the binary cargo built for it, or
//! the one `BINARY` names, not itself). Knobs (environment): `BINARY`, `FLOOD` (`resume`),
//! `EVENTS` (1000), `EVENT_BYTES` (61440), `SAMPLES` (100), `WARMUP` (3), `EMBEDDED`, `ARGS` (extra server
//! flags, space-separated). The machine is shared: compare binaries in the same minutes,
//! alternating, and read the load average beside each figure.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{fill_history, ChildServer, TestRedis};
use tungstenite::Message;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Embedded mode: the hostile user sends itself `n` events of `size` bytes through the server,
/// one at a time (each read back before the next, so it never becomes a slow consumer).
fn fill_history_embedded(addr: SocketAddr, user: &str, n: usize, size: usize) {
    let (mut ws, _) = tungstenite::connect(format!("ws://{addr}/ws?token={user}")).unwrap();
    let text = "x".repeat(size);
    for _ in 0..n {
        let send = serde_json::json!({"event": "sendMessage", "args": {"to": user, "text": text}});
        ws.send(Message::text(send.to_string())).unwrap();
        loop {
            match ws.read().unwrap() {
                Message::Text(t) if t.contains("\"newMessage\"") => break,
                Message::Text(t) if t.contains("\"error\"") => panic!("fill refused: {t}"),
                _ => {}
            }
        }
    }
}

/// The binary on `redis`, or embedded (`None`).
fn start_server(binary: &str, redis: Option<&TestRedis>, extra: &[String]) -> ChildServer {
    let mut command = Command::new(binary);
    command.args(["--listen", "127.0.0.1:0", "--cores", "2"]);
    if let Some(redis) = redis {
        command.args(["--backplane", "redis", "--redis-url", &redis.url()]);
    }
    command
        .args(["--history", "on", "--rate-limit", "0"])
        .args(["--connect-rate-per-user", "0", "--connect-rate-per-ip", "0"])
        .args(extra)
        .env("RUST_LOG", "warn,switchboard=info");
    ChildServer::spawn_command(command)
}

/// Connects with `?since=` and reads until `recovered` (its `complete`) or the end (`None`).
fn resume(addr: SocketAddr, user: &str, since: &str, timeout: Duration) -> Option<bool> {
    let url = format!("ws://{addr}/ws?token={user}&since={since}");
    let (mut ws, _) = tungstenite::connect(url).ok()?;
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        let _ = s.set_read_timeout(Some(timeout));
    }
    let got = loop {
        match ws.read() {
            Ok(Message::Text(t)) => {
                let v: serde_json::Value = serde_json::from_str(&t).ok()?;
                if v["event"] == "recovered" {
                    break v["args"]["complete"].as_bool();
                }
            }
            Ok(_) => {}
            Err(_) => break None,
        }
    };
    let _ = ws.close(None);
    let _ = ws.flush();
    got
}

/// The status of a GET; the whole answer is read (as a client would), the server closes.
fn get_status(addr: SocketAddr, path: &str) -> u16 {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(15)));
    let _ = s.write_all(format!("GET {path} HTTP/1.1\r\nHost: b\r\n\r\n").as_bytes());
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer[..answer.len().min(64)])
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn main() {
    // Cargo builds the binary for benches: a plain `cargo bench` (or the test suite's one run of
    // each bench) uses that one; BINARY measures another, e.g. a release build of an older commit.
    let binary =
        std::env::var("BINARY").unwrap_or_else(|_| env!("CARGO_BIN_EXE_switchboard").into());
    let flood_kind = std::env::var("FLOOD").unwrap_or_else(|_| "resume".into());
    // `cargo bench` passes `--bench`; `cargo test` (the suite runs every bench once) does not:
    // then a small run checks that the bench works, measuring nothing.
    let measuring = std::env::args().any(|a| a == "--bench");
    let events: usize = env_or("EVENTS", if measuring { 1000 } else { 50 });
    let event_bytes: usize = env_or("EVENT_BYTES", 61440);
    let samples: usize = env_or("SAMPLES", if measuring { 100 } else { 5 });
    let warmup: u64 = env_or("WARMUP", if measuring { 3 } else { 0 });
    let burst: usize = env_or("BURST", 10);
    let every = Duration::from_millis(env_or("EVERY_MS", 300));
    let extra: Vec<String> = std::env::var("ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect();
    let load_before = load_average();
    let embedded = std::env::var("EMBEDDED").is_ok_and(|v| v == "1");
    let redis = (!embedded).then(TestRedis::start);
    if let Some(redis) = &redis {
        fill_history(redis, "hostile", events, event_bytes);
    }
    let server = start_server(&binary, redis.as_ref(), &extra);
    let addr = server.addr;
    if embedded {
        fill_history_embedded(addr, "hostile", events, event_bytes);
    }

    // The victim's history: 5 messages through the server, resumed after the first.
    let (mut victim, _) = tungstenite::connect(format!("ws://{addr}/ws?token=victim")).unwrap();
    let (mut friend, _) = tungstenite::connect(format!("ws://{addr}/ws?token=friend")).unwrap();
    std::thread::sleep(Duration::from_millis(300)); // the subscription settles (setup only)
    let mut first = None;
    for k in 0..5 {
        let send = serde_json::json!({"event": "sendMessage", "args": {"to": "victim", "text": format!("m{k}")}});
        friend.send(Message::text(send.to_string())).unwrap();
        loop {
            let Ok(Message::Text(t)) = victim.read() else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            if v["event"] == "newMessage" {
                first.get_or_insert_with(|| v["offset"].as_str().unwrap().to_string());
                break;
            }
        }
    }
    let since = first.unwrap();
    drop((victim, friend));

    let stop = Arc::new(AtomicBool::new(false));
    let flood_ended = Arc::new(AtomicU64::new(0));
    let driver = {
        let (stop, ended, kind) = (stop.clone(), flood_ended.clone(), flood_kind.clone());
        std::thread::spawn(move || {
            let mut next = Instant::now();
            let mut threads = Vec::new();
            while !stop.load(SeqCst) {
                for _ in 0..burst {
                    let (ended, kind) = (ended.clone(), kind.clone());
                    threads.push(std::thread::spawn(move || {
                        if kind == "api" {
                            get_status(addr, "/api/history?token=hostile&limit=100");
                        } else {
                            resume(addr, "hostile", "0-0", Duration::from_secs(15));
                        }
                        ended.fetch_add(1, SeqCst);
                    }));
                }
                threads.retain(|t: &std::thread::JoinHandle<()>| !t.is_finished());
                next += every;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            for t in threads {
                let _ = t.join();
            }
        })
    };
    std::thread::sleep(Duration::from_secs(warmup));

    let mut took = Vec::with_capacity(samples);
    let (mut incomplete, mut failed) = (0, 0);
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    let mut next = Instant::now();
    for _ in 0..samples {
        // One sample every 100 ms at most: the victim's own GETs stay within its
        // `--api-history-rate` (10/s), so a 429 it gets is the flood's doing.
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        next = Instant::now() + Duration::from_millis(100);
        let started = Instant::now();
        match resume(addr, "victim", &since, Duration::from_secs(15)) {
            Some(true) => {}
            Some(false) => incomplete += 1,
            None => failed += 1,
        }
        took.push(started.elapsed());
        *statuses
            .entry(get_status(addr, "/api/history?token=victim&limit=10"))
            .or_default() += 1;
    }
    stop.store(true, SeqCst);
    let flood_done = flood_ended.load(SeqCst);
    let _ = driver.join();
    took.sort();
    println!(
        "binary={binary} embedded={embedded} flood={flood_kind} burst={burst} every={every:?} events={events}x{event_bytes}B samples={samples} args={extra:?}"
    );
    println!(
        "victim resume: p50={:.1}ms p99={:.1}ms max={:.1}ms complete:false={incomplete} failed={failed}",
        percentile(&took, 0.50).as_secs_f64() * 1000.0,
        percentile(&took, 0.99).as_secs_f64() * 1000.0,
        took.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
    );
    println!("victim GET /api/history statuses: {statuses:?}; flood attempts ended: {flood_done}");
    println!(
        "load average (1/5/15 min): before {load_before}, after {}",
        load_average()
    );
}
