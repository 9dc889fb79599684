//! Test support: an in-process server on port 0 (shut down on drop), the real binary as a child
//! process, and a blocking WebSocket client whose every wait has a deadline.

#![allow(dead_code)]

mod raw_ws;
mod redis_servers;

// Not every test binary uses both (dead_code above covers the items, not the imports).
#[allow(unused_imports)]
pub use raw_ws::*;
#[allow(unused_imports)]
pub use redis_servers::*;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::Value;
use switchboard::{Config, Server, ServerHandle};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

/// How long any single expectation may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A test configuration: port 0, two cores, short timers.
pub fn test_config() -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        cores: 2,
        ..Config::default()
    }
}

/// An in-process server; dropped → shut down and joined.
pub struct TestServer {
    pub handle: ServerHandle,
    pub addr: SocketAddr,
}

impl TestServer {
    pub fn start() -> Self {
        Self::with_config(test_config())
    }

    pub fn with_config(config: Config) -> Self {
        Self::from_server(Server::new(config))
    }

    pub fn from_server(server: Server) -> Self {
        let handle = server.start().expect("server starts");
        let addr = handle.local_addr();
        TestServer { handle, addr }
    }

    pub fn connect(&self, user: &str) -> Client {
        Client::connect(self.addr, user)
    }

    /// `GET path` → (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.addr, path)
    }

    pub fn health(&self) -> Value {
        let (status, body) = self.get("/healthz");
        assert_eq!(status, 200);
        serde_json::from_str(&body).expect("healthz is JSON")
    }

    /// Open connections per core, from the handle's gauges.
    pub fn per_core_connections(&self) -> Vec<u64> {
        self.handle.stats().iter().map(|s| s.connections).collect()
    }

    /// Waits until `pred` holds for the per-core stats.
    pub fn wait_stats(&self, what: &str, pred: impl Fn(&[switchboard::CoreStats]) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let stats = self.handle.stats();
            if pred(&stats) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {stats:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Sends a raw request and reads the whole response (the server closes after plain HTTP).
pub fn raw_request(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(request).expect("write request");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    raw_request(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes(),
    )
}

/// A server API call (`/api/...`) with `key` as its bearer token: the status and the JSON body
/// (`Null` when the body is not JSON).
pub fn api_call(addr: SocketAddr, method: &str, path: &str, key: &str, body: &str) -> (u16, Value) {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (status, body) = raw_request(addr, req.as_bytes());
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// Attempts a WebSocket upgrade; returns the HTTP status and body when refused.
pub fn try_upgrade(addr: SocketAddr, path_and_query: &str, extra_headers: &str) -> (u16, String) {
    let req = format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra_headers}\r\n"
    );
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    // A 101 leaves the socket open: stop at the end of the head in that case.
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
        if out.starts_with(b"HTTP/1.1 101") && out.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A blocking WebSocket client.
pub struct Client {
    pub ws: WebSocket<MaybeTlsStream<TcpStream>>,
    pub user: String,
}

impl Client {
    pub fn connect(addr: SocketAddr, token: &str) -> Self {
        Self::connect_url(&format!("ws://{addr}/ws?token={token}"), token)
    }

    pub fn connect_url(url: &str, user: &str) -> Self {
        let (ws, resp) = tungstenite::connect(url).expect("websocket connects");
        assert_eq!(resp.status(), 101);
        if let MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            s.set_nodelay(true).unwrap();
        }
        Client {
            ws,
            user: user.to_string(),
        }
    }

    /// Connects with a hand-built request (extra headers such as `Authorization`).
    pub fn connect_request(request: tungstenite::handshake::client::Request, user: &str) -> Self {
        let url = request.uri().clone();
        let host = url.host().unwrap_or("127.0.0.1").to_string();
        let port = url.port_u16().unwrap_or(80);
        let tcp = TcpStream::connect((host.as_str(), port)).expect("connect");
        let (ws, resp) =
            tungstenite::client(request, MaybeTlsStream::Plain(tcp)).expect("websocket connects");
        assert_eq!(resp.status(), 101);
        if let MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            s.set_nodelay(true).unwrap();
        }
        Client {
            ws,
            user: user.to_string(),
        }
    }

    /// The TCP socket under the WebSocket, for writing hand-made frames.
    pub fn tcp(&mut self) -> &mut TcpStream {
        match self.ws.get_mut() {
            MaybeTlsStream::Plain(s) => s,
            _ => unreachable!("tests use plain TCP"),
        }
    }

    /// Sends `sendMessage` with an ack number and returns the ack's result, skipping the
    /// sender's own `newMessage` copy (and anything else) that arrives first.
    pub fn send_acked(&mut self, to: &str, text: &str, ack: u64) -> Value {
        self.send_json(&serde_json::json!(
            {"event": "sendMessage", "args": {"to": to, "text": text}, "ack": ack}
        ));
        loop {
            let v = self.recv_json();
            if v["event"] == "ack" && v["ack"] == ack {
                return v["args"].clone();
            }
            assert_ne!(v["event"], "error", "{}: unexpected error {v}", self.user);
        }
    }

    pub fn send_json(&mut self, v: &Value) {
        self.ws.send(Message::text(v.to_string())).expect("send");
    }

    pub fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text.to_string())).expect("send");
    }

    pub fn send_message(&mut self, to: &str, text: &str) {
        self.send_json(
            &serde_json::json!({"event": "sendMessage", "args": {"to": to, "text": text}}),
        );
    }

    /// The next message of any kind, or `None` at the deadline.
    pub fn next_message(
        &mut self,
        deadline: Instant,
    ) -> Option<Result<Message, tungstenite::Error>> {
        loop {
            match self.ws.read() {
                Ok(m) => return Some(Ok(m)),
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if Instant::now() >= deadline {
                        return None;
                    }
                }
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// The next JSON text frame (pings are skipped); panics at the deadline.
    pub fn recv_json(&mut self) -> Value {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match self.next_message(deadline) {
                Some(Ok(Message::Text(t))) => {
                    return serde_json::from_str(&t).expect("server sends JSON")
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("{}: expected a text frame, got {other:?}", self.user),
            }
        }
    }

    /// The next event named `event`, skipping others.
    pub fn recv_event(&mut self, event: &str) -> Value {
        loop {
            let v = self.recv_json();
            if v["event"] == event {
                return v;
            }
        }
    }

    /// Asserts nothing but pings arrives within `wait`.
    pub fn expect_silence(&mut self, wait: Duration) {
        let deadline = Instant::now() + wait;
        loop {
            match self.next_message(deadline) {
                None => return,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("{}: expected nothing, got {other:?}", self.user),
            }
        }
    }

    /// Reads until the server's close frame; returns its code. The close reply tungstenite
    /// queued is flushed, as a well-behaved client would, so the server can finish at once.
    pub fn expect_close(&mut self) -> u16 {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match self.next_message(deadline) {
                Some(Ok(Message::Close(frame))) => {
                    let _ = self.ws.flush();
                    return frame.map_or(u16::from(CloseCode::Status), |f| u16::from(f.code));
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    panic!("{}: connection failed before a close frame: {e}", self.user)
                }
                None => panic!("{}: no close frame before the deadline", self.user),
            }
        }
    }

    pub fn close(mut self) {
        let _ = self.ws.close(None);
        let deadline = Instant::now() + DEADLINE;
        while let Some(Ok(_)) = self.next_message(deadline) {}
    }
}

/// [`test_config`] with HS256 JWTs signed with `secret` and no leeway on `exp`.
pub fn jwt_test_config(secret: &str) -> Config {
    Config {
        auth: switchboard::AuthMode::Jwt {
            secret: secret.into(),
            audience: None,
            issuer: None,
            leeway: Duration::ZERO,
        },
        ..test_config()
    }
}

/// Mints an HS256 JWT.
pub fn jwt(secret: &str, claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The real `switchboard` binary as a child process, on a port it picks (port 0 is resolved by
/// reading the "listening on" log line).
pub struct ChildServer {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    /// Every line the server wrote to stderr (its log).
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl ChildServer {
    pub fn spawn(args: &[&str]) -> Self {
        Self::spawn_on("127.0.0.1:0", args)
    }

    /// Like [`ChildServer::spawn`], listening on `listen` (e.g. the address of a server that
    /// just exited).
    pub fn spawn_on(listen: &str, args: &[&str]) -> Self {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"));
        command
            .args(["--listen", listen, "--cores", "2"])
            .args(args)
            .env("RUST_LOG", "info");
        Self::spawn_command(command)
    }

    /// Like [`ChildServer::spawn`], with at most `nofile` open files (through `prlimit`).
    pub fn spawn_with_nofile(nofile: u64, args: &[&str]) -> Self {
        let mut command = std::process::Command::new("prlimit");
        command
            .arg(format!("--nofile={nofile}"))
            .arg(env!("CARGO_BIN_EXE_switchboard"))
            .args(["--listen", "127.0.0.1:0", "--cores", "2"])
            .args(args)
            .env("RUST_LOG", "info");
        Self::spawn_command(command)
    }

    /// Spawns `command` (the binary with whatever flags and environment the test chose) and
    /// reads its address from the "listening on" line.
    pub fn spawn_command(mut command: std::process::Command) -> Self {
        use std::io::BufRead;
        let mut child = command
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn switchboard");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = std::sync::Arc::clone(&log);
        std::thread::spawn(move || {
            let mut sent = false;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                // Kept first, so a test that got the address sees the line that gave it.
                kept.lock().unwrap().push(line.clone());
                if !sent {
                    let rest = line.split("listening on ws://").nth(1);
                    if let Some(rest) = rest.or_else(|| line.split("listening on wss://").nth(1)) {
                        let addr = rest.split('/').next().unwrap().to_string();
                        let _ = tx.send(addr);
                        sent = true;
                    }
                }
            }
        });
        let addr = rx
            .recv_timeout(DEADLINE)
            .expect("server logs its address")
            .parse()
            .unwrap();
        ChildServer { child, addr, log }
    }

    /// The lines the server logged so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: i32) {
        let status = std::process::Command::new("kill")
            .args([format!("-{sig}"), self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "server did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// VmRSS of the child in KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS")
}

/// Peak resident set (VmHWM) of a process in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmHWM")
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The value of one sample in `/metrics` (`name` includes any labels), or panics if absent.
pub fn metric(addr: SocketAddr, name: &str) -> u64 {
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("metric {name} not in /metrics:\n{body}"))
}

/// Polls `/metrics` until `name` is at least `at_least`; returns its value.
pub fn wait_metric(addr: SocketAddr, name: &str, at_least: u64) -> u64 {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let v = metric(addr, name);
        if v >= at_least {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{name} stayed at {v}, wanted >= {at_least}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `switchboard_connections_closed_total{reason="..."}`.
pub fn closed_metric(reason: &str) -> String {
    format!("switchboard_connections_closed_total{{reason=\"{reason}\"}}")
}

/// Opens connections for `user` until `want` of them span both cores, and closes the extras
/// (SO_REUSEPORT picks the core by hashing the connection's addresses, so the test keeps trying).
/// Other connections may be open; none may open or close meanwhile.
pub fn connect_spread(server: &TestServer, user: &str, want: usize) -> Vec<(usize, Client)> {
    let start_total: u64 = server.per_core_connections().iter().sum();
    let mut by_core: Vec<Vec<Client>> = vec![Vec::new(), Vec::new()];
    for _ in 0..64 {
        if by_core.iter().all(|c| !c.is_empty())
            && by_core.iter().map(Vec::len).sum::<usize>() >= want
        {
            break;
        }
        let before = server.per_core_connections();
        let client = server.connect(user);
        let total = before.iter().sum::<u64>() + 1;
        server.wait_stats("the new connection", |s| {
            s.iter().map(|c| c.connections).sum::<u64>() == total
        });
        let after = server.per_core_connections();
        let core = (0..after.len())
            .find(|&i| after[i] > before[i])
            .expect("one core gained it");
        by_core[core].push(client);
    }
    assert!(
        by_core.iter().all(|c| !c.is_empty()),
        "could not reach both cores"
    );
    let mut kept = Vec::new();
    for (core, clients) in by_core.iter_mut().enumerate() {
        kept.push((core, clients.pop().unwrap()));
    }
    for (core, clients) in by_core.into_iter().enumerate() {
        for client in clients {
            if kept.len() < want {
                kept.push((core, client));
            } else {
                client.close();
            }
        }
    }
    let want_total = start_total + want as u64;
    server.wait_stats("extras to close", |s| {
        s.iter().map(|c| c.connections).sum::<u64>() == want_total
    });
    kept
}

/// Sends `event` with `args` and an ack number; returns the `ack` or `error` frame answering
/// it, skipping everything else.
pub fn request(client: &mut Client, event: &str, args: Value, ack: u64) -> Value {
    client.send_json(&serde_json::json!({"event": event, "args": args, "ack": ack}));
    loop {
        let v = client.recv_json();
        if (v["event"] == "ack" || v["event"] == "error") && v["ack"] == ack {
            return v;
        }
    }
}

/// Like [`request`], and the answer must be an `ack`: returns its result.
pub fn request_ok(client: &mut Client, event: &str, args: Value, ack: u64) -> Value {
    let v = request(client, event, args, ack);
    assert_eq!(v["event"], "ack", "{}: {event} failed: {v}", client.user);
    v["args"].clone()
}

/// Like [`request`], and the answer must be an `error`: returns its code.
pub fn request_err(client: &mut Client, event: &str, args: Value, ack: u64) -> String {
    let v = request(client, event, args, ack);
    assert_eq!(
        v["event"], "error",
        "{}: {event} should fail: {v}",
        client.user
    );
    v["args"]["code"].as_str().unwrap_or_default().to_string()
}

/// The room's members online, per the `presence` query, sorted.
pub fn presence_online(c: &mut Client, room: &str) -> Vec<String> {
    let r = request_ok(c, "presence", serde_json::json!({ "room": room }), 2);
    assert_eq!(r["room"], room);
    let mut users: Vec<String> = r["online"]
        .as_array()
        .expect("online")
        .iter()
        .map(|u| u.as_str().unwrap_or_default().to_string())
        .collect();
    users.sort();
    users
}

/// The next `presenceChanged` says `user` went online (`is_online`) or offline in `room`.
pub fn expect_presence(c: &mut Client, room: &str, user: &str, is_online: bool) {
    let e = c.recv_event("presenceChanged");
    assert_eq!(
        e["args"],
        serde_json::json!({"room": room, "user": user, "online": is_online}),
        "{}: {e}",
        c.user
    );
}

/// The next `newMessage` of a room, skipping other events (`recovered`, `presenceChanged`).
pub fn recv_room_message(client: &mut Client) -> Value {
    client.recv_event("newMessage")
}

/// Waits until the instance routes `pairs` (room, member) pairs and Redis confirmed `channels`
/// channels (users' and rooms').
pub fn wait_room_routes(server: &TestServer, channels: u64, pairs: u64) {
    wait_for(
        &format!("{channels} channels and {pairs} room routes"),
        || {
            server.bp_stat(|s| &s.subscribed_channels) == channels
                && server.bp_stat(|s| &s.room_members) == pairs
        },
    );
}

/// Waits for the ack (or error) numbered `ack`, skipping other frames; `None` at `deadline`.
pub fn answer(c: &mut Client, ack: u64, deadline: Instant) -> Option<Value> {
    loop {
        match c.next_message(deadline) {
            None => return None,
            Some(Ok(tungstenite::Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).expect("JSON");
                if v["ack"] == ack && (v["event"] == "ack" || v["event"] == "error") {
                    return Some(v);
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("{}: connection failed: {e}", c.user),
        }
    }
}

/// The `text`s of the caller's retained events, oldest first, read with the `history` event.
pub fn history_texts(c: &mut Client, ack: u64) -> Vec<String> {
    c.send_json(&serde_json::json!({"event": "history", "args": {"limit": 100}, "ack": ack}));
    let v = answer(c, ack, Instant::now() + DEADLINE).expect("history answer");
    assert_eq!(v["event"], "ack", "{v}");
    let mut texts: Vec<String> = v["args"]["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["args"]["text"].as_str().unwrap_or_default().to_string())
        .collect();
    texts.reverse();
    texts
}

/// Until the instance's subscription to `user` is confirmed, a fresh connection misses what is
/// published: probe with messages to self until one comes back.
pub fn wait_live(c: &mut Client, user: &str) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        assert!(Instant::now() < deadline, "{user} never got its probe");
        c.send_message(user, "probe");
        let wait = Instant::now() + Duration::from_millis(300);
        while let Some(Ok(tungstenite::Message::Text(t))) = c.next_message(wait) {
            if t.contains("probe") {
                return;
            }
        }
    }
}

/// Two instances on one Redis, once both are ready: alice on `a`, bob on `b`, bob's channel
/// subscribed (so a message for him from `a` reaches him).
pub fn alice_and_bob(a: &ChildServer, b: &ChildServer) -> (Client, Client) {
    for server in [a, b] {
        wait_for("ready", || http_get(server.addr, "/readyz").0 == 200);
    }
    let alice = Client::connect(a.addr, "alice");
    let bob = Client::connect(b.addr, "bob");
    wait_for("bob's channel", || {
        let (_, body) = http_get(b.addr, "/healthz");
        let h: Value = serde_json::from_str(&body).unwrap();
        h["backplane"]["subscribed_channels"].as_u64() >= Some(1)
    });
    (alice, bob)
}
