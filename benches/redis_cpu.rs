//! How much Redis CPU does one direct message cost on the history path (issue 14)?
//!
//! A direct message is appended to two users' streams (the sender's copy and the recipient's)
//! and published on both users' channels. This starts a private `redis-server` (a free port,
//! `--save "" --appendonly no`; never the one on 6379), subscribes one connection to every
//! user's channel (as instances do, so `PUBLISH` pays for a real subscriber), fills every stream
//! to `--history-max-len` (steady state: every append trims one entry), then for each variant
//! sends the same messages (random sender and recipient among the users) through pipelines and
//! reads `used_cpu_sys + used_cpu_user` from `INFO cpu` before and after: Redis CPU per message.
//!
//! Variants: `before` is the old per-user script (one `EVALSHA` per user, `TIME` for the age
//! cutoff); `after` is [`switchboard::history::APPEND_SCRIPT`] (one `EVALSHA` per message); the
//! others change one thing in `after` to price it (the age trim, approximate `MAXLEN`, `TIME`,
//! a Redis Function instead of a script);
//! `publish only` is history off (two bare `PUBLISH`), the floor.
//!
//! Run: `cargo bench --bench redis_cpu` (any profile works: the figure is Redis's own CPU,
//! not the client's). Knobs (environment): `MESSAGES` (20000), `USERS` (200), `BATCH` messages
//! per pipeline (16), `ROUNDS` (3; the minimum, least disturbed by other load, and the median are shown), `MAX_LEN` (1000). Redis CPU time is
//! per process, so other load on the machine disturbs it less than wall time, but not nothing:
//! compare variants of one run.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use switchboard::history::{self, HistoryConfig};

/// The script before issue 14: one call per (user, dispatch).
const OLD_SCRIPT: &str = r#"
if KEYS[3] then
  local earlier = redis.call('GET', KEYS[3])
  if earlier then
    return earlier
  end
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[3], '*', 'f', ARGV[2])
local t = redis.call('TIME')
local cutoff = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[4])
if cutoff > 0 then
  redis.call('XTRIM', KEYS[1], 'MINID', string.format('%d', cutoff))
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if KEYS[3] then
  redis.call('SET', KEYS[3], id, 'PX', ARGV[5])
end
local framed = string.sub(ARGV[2], 1, -2) .. ',"offset":"' .. id .. '"}'
redis.call('PUBLISH', KEYS[2], ARGV[1] .. ' ' .. id .. ' ' .. framed)
return id
"#;

const PREFIX: &str = "sb";
const NODE: u64 = 0x1234_5678_9abc_def0;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `script` with `from` replaced by `to` (which must occur).
fn variant(script: &str, from: &str, to: &str) -> String {
    assert!(script.contains(from), "variant does not apply: {from}");
    script.replace(from, to)
}

#[derive(Clone, Copy, PartialEq)]
enum Shape {
    /// One call per user with the old script.
    PerUser,
    /// One call per message with a multi-user script.
    PerMessage,
    /// Two `PUBLISH`, no history.
    PublishOnly,
    /// One `FCALL` per message: the multi-user script as a Redis Function.
    Function,
}

struct Variant {
    name: &'static str,
    shape: Shape,
    script: String,
    dedupe: bool,
    sha: String,
}

struct Redis {
    child: Child,
    url: String,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_redis() -> Option<Redis> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .ok()?;
    let redis = Redis {
        child,
        url: format!("redis://127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(mut c) = connect(&redis.url) {
            if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                return Some(redis);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn connect(url: &str) -> redis::RedisResult<redis::Connection> {
    redis::Client::open(url)?.get_connection_with_timeout(Duration::from_secs(2))
}

/// Redis's CPU time so far, in seconds.
fn redis_cpu(c: &mut redis::Connection) -> f64 {
    let info: String = redis::cmd("INFO").arg("cpu").query(c).expect("INFO cpu");
    info.lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| *k == "used_cpu_sys" || *k == "used_cpu_user")
        .filter_map(|(_, v)| v.trim().parse::<f64>().ok())
        .sum()
}

/// A connection subscribed to every user's channel, drained by a thread until Redis goes.
fn subscribe_all(port_url: &str, channels: &[String]) {
    let addr = port_url.trim_start_matches("redis://");
    let mut s = TcpStream::connect(addr).expect("subscriber connects");
    let mut cmd = format!("*{}\r\n$9\r\nSUBSCRIBE\r\n", channels.len() + 1);
    for ch in channels {
        cmd.push_str(&format!("${}\r\n{ch}\r\n", ch.len()));
    }
    s.write_all(cmd.as_bytes()).expect("subscribe");
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
    });
}

/// A deterministic xorshift.
struct Rng(u64);
impl Rng {
    fn next(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn frame(from: &str, to: &str, seq: usize) -> String {
    let text = format!(
        "lt:bench:{seq}:{}",
        1_700_000_000_000_000_000u64 + seq as u64
    );
    format!(
        r#"{{"event":"newMessage","args":{{"from":"{from}","to":"{to}","text":"{text:.<100}","id":"{seq:016x}","ts":1764486000000}}}}"#
    )
}

/// What every run shares.
struct Setup {
    users: Vec<String>,
    channels: Vec<String>,
    config: HistoryConfig,
    batch: usize,
}

/// Every stream back to exactly `max_len` (approximate trims and the filling leave some more).
fn normalise(c: &mut redis::Connection, users: &[String], config: &HistoryConfig) {
    let mut pipe = redis::pipe();
    for u in users {
        pipe.cmd("XTRIM")
            .arg(history::stream_key(PREFIX, u))
            .arg("MAXLEN")
            .arg(config.max_len)
            .ignore();
    }
    pipe.exec(c).expect("XTRIM");
}

/// Sends `messages` (sender, recipient, frame) the variant's way; returns Redis CPU seconds.
fn run(
    c: &mut redis::Connection,
    v: &Variant,
    messages: &[(usize, usize, String)],
    setup: &Setup,
    tag: usize,
) -> f64 {
    let Setup {
        users,
        channels,
        config,
        batch,
    } = setup;
    let batch = *batch;
    let before = redis_cpu(c);
    for (n, chunk) in messages.chunks(batch).enumerate() {
        let mut pipe = redis::pipe();
        for (k, (from, to, frame)) in chunk.iter().enumerate() {
            let key = format!("{tag}:{n}:{k}");
            let dedupe = v.dedupe.then_some(key.as_str());
            match v.shape {
                Shape::PublishOnly => {
                    for u in [from, to] {
                        let mut payload = format!("{NODE:016x} ");
                        payload.push_str(frame);
                        pipe.cmd("PUBLISH").arg(&channels[*u]).arg(payload).ignore();
                    }
                }
                Shape::PerUser => {
                    for u in [from, to] {
                        let cmd = pipe
                            .cmd("EVALSHA")
                            .arg(&v.sha)
                            .arg(if dedupe.is_some() { 3 } else { 2 })
                            .arg(history::stream_key(PREFIX, &users[*u]))
                            .arg(&channels[*u]);
                        if let Some(key) = dedupe {
                            cmd.arg(history::dedupe_key(PREFIX, &users[*u], key));
                        }
                        cmd.arg(format!("{NODE:016x}"))
                            .arg(frame)
                            .arg(config.max_len)
                            .arg(config.max_age.as_millis() as u64);
                        if dedupe.is_some() {
                            cmd.arg(config.dedupe_window.as_millis() as u64);
                        }
                        cmd.ignore();
                    }
                }
                Shape::PerMessage => {
                    let pair = [
                        (users[*from].as_str(), channels[*from].as_str()),
                        (users[*to].as_str(), channels[*to].as_str()),
                    ];
                    let cmd =
                        history::append_call(&v.sha, PREFIX, NODE, config, frame, dedupe, &pair);
                    pipe.add_command(cmd).ignore();
                }
                Shape::Function => {
                    let pair = [
                        (users[*from].as_str(), channels[*from].as_str()),
                        (users[*to].as_str(), channels[*to].as_str()),
                    ];
                    // The same keys and args, `FCALL sb_append` instead of `EVALSHA sha`.
                    let eval = history::append_call(
                        "sb_append",
                        PREFIX,
                        NODE,
                        config,
                        frame,
                        dedupe,
                        &pair,
                    );
                    let mut cmd = redis::cmd("FCALL");
                    for arg in eval.args_iter().skip(1) {
                        if let redis::Arg::Simple(bytes) = arg {
                            cmd.arg(bytes);
                        }
                    }
                    pipe.add_command(cmd).ignore();
                }
            }
        }
        pipe.exec(c).expect("pipeline");
    }
    redis_cpu(c) - before
}

fn main() {
    if Command::new("redis-server")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("redis_cpu: skipped (redis-server not on PATH)");
        return;
    }
    // `cargo bench` passes `--bench`; under `cargo test` (no `--bench`) one small round only
    // checks that every variant still runs.
    let measuring = std::env::args().any(|a| a == "--bench");
    let n_messages = env("MESSAGES", if measuring { 20_000 } else { 200 });
    let n_users = env("USERS", 200).max(2);
    let batch = env("BATCH", 16).max(1);
    let rounds = env("ROUNDS", if measuring { 3 } else { 1 }).max(1);
    let config = HistoryConfig {
        enabled: true,
        max_len: env("MAX_LEN", 1000).max(1),
        ..HistoryConfig::default()
    };
    let Some(redis) = start_redis() else {
        println!("redis_cpu: skipped (redis-server did not start)");
        return;
    };
    let mut c = connect(&redis.url).expect("connect");
    let users: Vec<String> = (0..n_users).map(|n| format!("u{n}")).collect();
    let channels: Vec<String> = users
        .iter()
        .map(|u| switchboard::backplane::wire::user_channel(PREFIX, u))
        .collect();
    subscribe_all(&redis.url, &channels);

    let after = history::APPEND_SCRIPT.to_string();
    let mut variants = vec![
        ("publish only (history off)", Shape::PublishOnly, String::new(), false),
        ("before: per-user calls", Shape::PerUser, OLD_SCRIPT.to_string(), false),
        ("after: one call per message", Shape::PerMessage, after.clone(), false),
        (
            "after, but exact MAXLEN",
            Shape::PerMessage,
            variant(&after, "'MAXLEN', '~', maxlen", "'MAXLEN', maxlen"),
            false,
        ),
        (
            "after, but the age trim on every append",
            Shape::PerMessage,
            variant(&after, "ms % 16 == 0 and ", ""),
            false,
        ),
        (
            "after, but TIME and the age trim every time",
            Shape::PerMessage,
            variant(
                &variant(&after, "ms % 16 == 0 and ", ""),
                "local ms = tonumber(string.match(id, '^%d+'))",
                "local t = redis.call('TIME')\n    local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)",
            ),
            false,
        ),
        (
            "one call, old trimming (exact, TIME, every time)",
            Shape::PerMessage,
            variant(
                &variant(
                    &variant(&after, "ms % 16 == 0 and ", ""),
                    "local ms = tonumber(string.match(id, '^%d+'))",
                    "local t = redis.call('TIME')\n    local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)",
                ),
                "'MAXLEN', '~', maxlen",
                "'MAXLEN', maxlen",
            ),
            false,
        ),
        (
            "after, as a Redis Function (FCALL)",
            Shape::Function,
            format!(
                "#!lua name=sb\nredis.register_function('sb_append', function(KEYS, ARGV)\n{}\nend)",
                after
            ),
            false,
        ),
        (
            "(probe) an empty script call",
            Shape::PerMessage,
            "return {'1-1', '1-1'}".to_string(),
            false,
        ),
        ("before, with clientId", Shape::PerUser, OLD_SCRIPT.to_string(), true),
        ("after, with clientId", Shape::PerMessage, after.clone(), true),
    ]
    .into_iter()
    .map(|(name, shape, script, dedupe)| {
        let sha = if script.is_empty() {
            String::new()
        } else if shape == Shape::Function {
            redis::cmd("FUNCTION")
                .arg("LOAD")
                .arg("REPLACE")
                .arg(&script)
                .query::<String>(&mut c)
                .expect("FUNCTION LOAD")
        } else {
            redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(&script)
                .query(&mut c)
                .expect("SCRIPT LOAD")
        };
        Variant {
            name,
            shape,
            script,
            dedupe,
            sha,
        }
    })
    .collect::<Vec<_>>();
    variants.retain(|v| v.shape == Shape::PublishOnly || !v.script.is_empty());

    // Steady state: every stream full, so every append trims one entry.
    let filler = frame("u0", "u1", 0);
    for (u, _) in users.iter().enumerate() {
        let mut pipe = redis::pipe();
        for _ in 0..config.max_len {
            pipe.cmd("XADD")
                .arg(history::stream_key(PREFIX, &users[u]))
                .arg("MAXLEN")
                .arg(config.max_len)
                .arg("*")
                .arg("f")
                .arg(&filler)
                .ignore();
        }
        pipe.exec(&mut c).expect("fill");
    }

    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let messages: Vec<(usize, usize, String)> = (0..n_messages)
        .map(|seq| {
            let from = rng.next(n_users);
            let to = (from + 1 + rng.next(n_users - 1)) % n_users;
            (from, to, frame(&users[from], &users[to], seq))
        })
        .collect();
    let warmup = &messages[..messages.len().min(2000)];

    println!(
        "redis_cpu: {n_messages} direct messages (2 users each), {n_users} users, {batch} \
         messages per pipeline, streams full at MAXLEN {}, min and median of {rounds} rounds",
        config.max_len
    );
    let setup = Setup {
        users,
        channels,
        config,
        batch,
    };
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut tag = 0;
    for _ in 0..rounds {
        for (i, v) in variants.iter().enumerate() {
            tag += 1;
            // The same start for every variant, then a warm-up, so a steady state is measured.
            normalise(&mut c, &setup.users, &setup.config);
            run(&mut c, v, warmup, &setup, tag);
            tag += 1;
            let s = run(&mut c, v, &messages, &setup, tag);
            cpu[i].push(s);
        }
    }
    println!(
        "{:<48} {:>9} {:>18} {:>18}",
        "variant", "calls/msg", "µs Redis/msg min", "median (/deliv.*)"
    );
    for (v, samples) in variants.iter().zip(&mut cpu) {
        samples.sort_by(f64::total_cmp);
        let per_msg = samples[samples.len() / 2] * 1e6 / n_messages as f64;
        let min = samples[0] * 1e6 / n_messages as f64;
        let calls = match v.shape {
            Shape::PerUser | Shape::PublishOnly => 2,
            Shape::PerMessage | Shape::Function => 1,
        };
        println!(
            "{:<48} {:>9} {:>18.2} {:>9.2} ({:>5.2})",
            v.name,
            calls,
            min,
            per_msg,
            per_msg / 4.0
        );
    }
    println!("* 4 deliveries per message: 2 users x 2 devices, as in loadtest direct --devices 2");
}
