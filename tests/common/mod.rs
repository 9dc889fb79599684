//! Test support: an in-process server on port 0 (shut down on drop), the real binary as a child
//! process, and a blocking WebSocket client whose every wait has a deadline.

#![allow(dead_code)]

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

/// A WebSocket spoken by hand over a plain `TcpStream`: for frames tungstenite will not send
/// (unmasked, invalid UTF-8) and for clients that never read or never answer pings.
pub struct RawWs {
    pub stream: TcpStream,
    /// Bytes read past the last returned frame.
    buf: Vec<u8>,
}

/// A frame as read by [`RawWs::read_frame`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// The close code of a close frame (1005 when it carries none).
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == 0x8).then(|| match self.payload.get(..2) {
            Some(b) => u16::from_be_bytes([b[0], b[1]]),
            None => 1005,
        })
    }
}

impl RawWs {
    /// Upgrades a fresh connection to `addr` with `?token=`; panics unless the answer is 101.
    pub fn connect(addr: SocketAddr, token: &str) -> Self {
        Self::upgrade(TcpStream::connect(addr).expect("connect"), token)
    }

    /// Upgrades an already connected stream.
    pub fn upgrade(stream: TcpStream, token: &str) -> Self {
        Self::upgrade_path(stream, &format!("/ws?token={token}"))
    }

    /// Upgrades a fresh connection to `addr` at `path_and_query` (e.g. `/socket.io/?...`).
    pub fn connect_path(addr: SocketAddr, path_and_query: &str) -> Self {
        Self::upgrade_path(TcpStream::connect(addr).expect("connect"), path_and_query)
    }

    /// Upgrades an already connected stream at `path_and_query`.
    pub fn upgrade_path(mut stream: TcpStream, path_and_query: &str) -> Self {
        stream.set_nodelay(true).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        let req = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = stream.read(&mut chunk).expect("read the upgrade response");
            assert!(n > 0, "server closed during the upgrade");
            buf.extend_from_slice(&chunk[..n]);
        };
        assert!(
            buf.starts_with(b"HTTP/1.1 101 "),
            "upgrade refused: {}",
            String::from_utf8_lossy(&buf)
        );
        let rest = buf.split_off(head_end);
        RawWs { stream, buf: rest }
    }

    /// Writes one frame. `mask` is what a client must do; `rsv` sets RSV1-3 (bits 4-6).
    pub fn write_frame(&mut self, fin: bool, rsv: u8, opcode: u8, payload: &[u8], mask: bool) {
        self.stream
            .write_all(&encode_frame(fin, rsv, opcode, payload, mask))
            .expect("write frame");
    }

    /// A masked, final text frame with arbitrary (possibly invalid UTF-8) bytes.
    pub fn send_text_bytes(&mut self, payload: &[u8]) {
        self.write_frame(true, 0, 0x1, payload, true);
    }

    /// Reads the next frame; `None` at EOF, on a reset, or at the deadline.
    pub fn read_frame(&mut self, deadline: Instant) -> Option<RawFrame> {
        loop {
            if let Some((frame, used)) = decode_frame(&self.buf) {
                self.buf.drain(..used);
                return Some(frame);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads frames until a close frame (returns its code) or the end of the connection
    /// (returns `None`); `seen` counts the other frames by opcode.
    pub fn read_until_close(&mut self, deadline: Instant, seen: &mut Vec<u8>) -> Option<u16> {
        while let Some(frame) = self.read_frame(deadline) {
            if let Some(code) = frame.close_code() {
                return Some(code);
            }
            seen.push(frame.opcode);
        }
        None
    }
}

/// Encodes a client (or, unmasked, server) frame.
pub fn encode_frame(fin: bool, rsv: u8, opcode: u8, payload: &[u8], mask: bool) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | ((rsv & 0x7) << 4) | (opcode & 0xf)];
    let mask_bit = if mask { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if mask {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// Decodes one frame from the start of `buf`: the frame and the bytes it took.
pub fn decode_frame(buf: &[u8]) -> Option<(RawFrame, usize)> {
    let b0 = *buf.first()?;
    let b1 = *buf.get(1)?;
    let (len, mut at) = match b1 & 0x7f {
        126 => (
            u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let key = if b1 & 0x80 != 0 {
        let k: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(k)
    } else {
        None
    };
    let mut payload = buf.get(at..at + len)?.to_vec();
    if let Some(k) = key {
        payload
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b ^= k[i % 4]);
    }
    let frame = RawFrame {
        fin: b0 & 0x80 != 0,
        opcode: b0 & 0x0f,
        payload,
    };
    Some((frame, at + len))
}

/// A private `redis-server` on a free port in a temp dir; stopped (by pid) on drop.
pub struct TestRedis {
    pub port: u16,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
    extra: Vec<String>,
}

impl TestRedis {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts with extra `redis-server` arguments (e.g. `["--appendonly", "yes"]`).
    pub fn start_with(extra: &[&str]) -> Self {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("switchboard-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = TestRedis {
            port,
            dir,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port and directory.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server must be on PATH (./test.sh checks for it)");
        self.child = Some(child);
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Ok(client) = redis::Client::open(self.url()) {
                if let Ok(mut c) = client.get_connection_with_timeout(Duration::from_millis(200)) {
                    if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                        return;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The redis-server's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `pred` until it holds or the deadline passes.
pub fn wait_for(what: &str, mut pred: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !pred() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until `n` instances subscribed `user`'s channel (default prefix) on `redis`.
pub fn wait_subscribed(redis: &TestRedis, user: &str, n: usize) {
    let mut c = redis.connection();
    let channel = format!("switchboard:u:{user}");
    wait_for(&format!("{n} subscribers of {channel}"), || {
        let v: Vec<(String, usize)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(&channel)
            .query(&mut c)
            .unwrap_or_default();
        v.first().is_some_and(|(_, k)| *k >= n)
    });
}

/// A server on `redis` with the given routing.
pub fn redis_server(redis: &TestRedis, routing: switchboard::backplane::Routing) -> TestServer {
    redis_server_with(redis, routing, Duration::from_millis(300))
}

/// A server on `redis` whose reconnect backoff tops out at `reconnect_max` (its publisher also
/// holds an outage's backlog for that long after reconnecting).
pub fn redis_server_with(
    redis: &TestRedis,
    routing: switchboard::backplane::Routing,
    reconnect_max: Duration,
) -> TestServer {
    redis_server_history(redis, routing, reconnect_max, true)
}

/// Like [`redis_server_with`], with history on or off (on is the default).
pub fn redis_server_history(
    redis: &TestRedis,
    routing: switchboard::backplane::Routing,
    reconnect_max: Duration,
    history: bool,
) -> TestServer {
    let mut rc = switchboard::backplane::RedisConfig::new(redis.url());
    rc.routing = routing;
    rc.reconnect_max = reconnect_max;
    let mut config = Config {
        backplane: Some(rc),
        ..test_config()
    };
    config.history.enabled = history;
    TestServer::with_config(config)
}

impl TestServer {
    pub fn bp_stat(
        &self,
        f: impl Fn(&switchboard::backplane::BackplaneStats) -> &std::sync::atomic::AtomicU64,
    ) -> u64 {
        f(&self.handle.backplane().expect("a backplane").stats)
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until Redis confirmed exactly `n` subscribed channels for this instance.
    pub fn wait_channels(&self, n: u64) {
        wait_for(&format!("{n} subscribed channels"), || {
            self.bp_stat(|s| &s.subscribed_channels) == n
        });
    }
}

/// A three-primary Redis Cluster of private `redis-server`s, created with `redis-cli --cluster`.
pub struct TestCluster {
    pub nodes: Vec<TestRedis>,
}

impl TestCluster {
    pub fn start() -> Self {
        Self::start_nodes(3, 0)
    }

    /// Three primaries with a replica each (six nodes), every replica attached.
    pub fn start_with_replicas() -> Self {
        let cluster = Self::start_nodes(6, 1);
        for node in &cluster.nodes {
            wait_for("every primary has its replica", || {
                let mut c = node.connection();
                let info: String = redis::cmd("INFO")
                    .arg("replication")
                    .query(&mut c)
                    .unwrap_or_default();
                info.contains("role:slave") || info.contains("state=online")
            });
        }
        cluster
    }

    fn start_nodes(count: usize, replicas: usize) -> Self {
        let mut nodes = Vec::new();
        while nodes.len() < count {
            // The cluster bus listens on port + 10000: that one must be free as well.
            let port = free_port();
            if port > 55_000 || std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_err() {
                continue;
            }
            let conf = format!("nodes-{port}.conf");
            nodes.push(TestRedis::start_on(
                port,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &conf,
                    "--cluster-node-timeout",
                    "2000",
                ],
            ));
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let status = std::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("redis-cli must be on PATH");
        assert!(status.success(), "redis-cli --cluster create failed");
        for node in &nodes {
            wait_for("cluster_state:ok", || {
                let mut c = node.connection();
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query(&mut c)
                    .unwrap_or_default();
                info.contains("cluster_state:ok")
            });
        }
        TestCluster { nodes }
    }

    pub fn seeds(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect()
    }
}

impl TestRedis {
    /// Starts on a given port (used for cluster nodes).
    pub fn start_on(port: u16, extra: &[&str]) -> Self {
        let dir =
            std::env::temp_dir().join(format!("switchboard-redis-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = TestRedis {
            port,
            dir,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        r.restart();
        r
    }
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

/// Sets `maxmemory` (bytes; 0: none) with `noeviction`, so any write is refused while Redis is
/// over it.
pub fn set_maxmemory(conn: &mut redis::Connection, bytes: u64) {
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query(conn)
        .expect("CONFIG SET maxmemory-policy");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(bytes)
        .query(conn)
        .expect("CONFIG SET maxmemory");
}
