//! The application backend's hooks (`--hook-url`), against a real HTTP backend started by each
//! test (a server thread, and in one test a Node process of its own, tests/hooks-backend): connect (403 before the upgrade, Socket.IO CONNECT_ERROR, rooms set by the answer),
//! join and publish (refused, or the text rewritten), failures (refused by default: 503 or
//! `hook_unavailable`; let through with fail-open), and a slow hook never holds up others.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use switchboard::config::hooks::HooksConfig;
use switchboard::Config;

/// How long the backend waits, then its status and JSON body.
type Reply = (Duration, u16, String);
type Answer = dyn Fn(&str, &Value) -> Reply + Send + Sync;

/// An immediate `200` with `body`.
fn ok(body: Value) -> Reply {
    (Duration::ZERO, 200, body.to_string())
}

/// A backend on a free port: each request's path and JSON body are recorded, and `answer`
/// says how long to wait and what to answer.
struct Backend {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<(String, Value)>>>,
}

impl Backend {
    fn start(answer: impl Fn(&str, &Value) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let answer: Arc<Answer> = Arc::new(answer);
        let record = Arc::clone(&seen);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let (answer, record) = (Arc::clone(&answer), Arc::clone(&record));
                std::thread::spawn(move || serve(stream, &*answer, &record));
            }
        });
        Backend { addr, seen }
    }

    fn url(&self) -> String {
        format!("http://{}/hooks", self.addr)
    }

    /// The bodies posted to `path`.
    fn calls(&self, path: &str) -> Vec<Value> {
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .filter(|(p, _)| p == path)
            .map(|(_, b)| b.clone())
            .collect()
    }
}

fn serve(stream: TcpStream, answer: &Answer, seen: &Mutex<Vec<(String, Value)>>) {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split(' ').nth(1).unwrap_or("").to_string();
    let mut len = 0;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap_or(0) == 0 {
            return;
        }
        if header == "\r\n" {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                len = value.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; len];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    seen.lock().unwrap().push((path.clone(), body.clone()));
    let (delay, status, text) = answer(&path, &body);
    std::thread::sleep(delay);
    let mut stream = reader.into_inner();
    let _ = write!(
        stream,
        "HTTP/1.1 {status} Answer\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Location: /elsewhere\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
}

fn server(url: String, fail_open: bool) -> TestServer {
    server_with(url, fail_open, Duration::from_millis(500), 2)
}

fn server_with(url: String, fail_open: bool, timeout: Duration, cores: usize) -> TestServer {
    TestServer::with_config(Config {
        hooks: HooksConfig {
            url: Some(url),
            timeout,
            fail_open,
            ..HooksConfig::default()
        },
        cores,
        ..test_config()
    })
}

/// Allows everyone but `mallory`; `alice` may only use rooms `ok:*`; the join of `secret`
/// is refused; texts containing `darn` are rewritten.
fn application(path: &str, body: &Value) -> Reply {
    let answer = match path {
        "/hooks/connect" => match body["user"].as_str() {
            Some("mallory") => json!({"allow": false, "reason": "banned"}),
            Some("alice") => json!({"allow": true, "rooms": ["ok:*"]}),
            Some("slow") => {
                return (
                    Duration::from_secs(5),
                    200,
                    json!({"allow": true}).to_string(),
                )
            }
            _ => json!({"allow": true}),
        },
        "/hooks/join" if body["args"]["room"] == "secret" => {
            json!({"allow": false, "reason": "members only"})
        }
        "/hooks/publish" => {
            let text = body["args"]["text"].as_str().unwrap_or("");
            if text.contains("darn") {
                json!({"allow": true, "text": text.replace("darn", "****")})
            } else if text == "forbidden words" {
                json!({"allow": false})
            } else {
                json!({"allow": true})
            }
        }
        _ => json!({"allow": true}),
    };
    ok(answer)
}

#[test]
fn the_connect_hook_refuses_with_403_before_the_upgrade_and_can_set_rooms() {
    let backend = Backend::start(application);
    let server = server(backend.url(), false);
    let (status, body) = try_upgrade(server.addr, "/ws?token=mallory", "Origin: http://test\r\n");
    assert_eq!((status, body.trim()), (403, "banned"));
    let denied = r#"switchboard_hook_calls_total{hook="connect",verdict="deny"}"#;
    assert_eq!(metric(server.addr, denied), 1);
    let call = &backend.calls("/hooks/connect")[0];
    assert_eq!(call["user"], "mallory");
    assert_eq!(call["transport"], "websocket");
    assert_eq!(call["origin"], "http://test");

    let mut alice = server.connect("alice");
    request_ok(&mut alice, "joinRoom", json!({"room": "ok:1"}), 1);
    let refused = request_err(&mut alice, "joinRoom", json!({"room": "other"}), 2);
    assert_eq!(refused, "forbidden");
    // Others are not restricted by the hook: no rooms in its answer.
    let mut bob = server.connect("bob");
    request_ok(&mut bob, "joinRoom", json!({"room": "other"}), 1);
}

#[test]
fn join_and_publish_hooks_refuse_and_rewrite() {
    let backend = Backend::start(application);
    let server = server(backend.url(), false);
    let mut bob = server.connect("bob");
    let mut carol = server.connect("carol");
    let v = request(&mut bob, "joinRoom", json!({"room": "secret"}), 1);
    assert_eq!(v["args"]["code"], "forbidden", "{v}");
    assert_eq!(v["args"]["message"], "members only");
    request_ok(&mut bob, "joinRoom", json!({"room": "r"}), 2);
    request_ok(&mut carol, "joinRoom", json!({"room": "r"}), 1);
    let say = |c: &mut Client, text: &str, ack| {
        request(
            c,
            "sendRoomMessage",
            json!({"room": "r", "text": text}),
            ack,
        )
    };
    assert_eq!(say(&mut bob, "well darn it", 3)["event"], "ack");
    assert_eq!(
        recv_room_message(&mut carol)["args"]["text"],
        "well **** it"
    );
    let refused = say(&mut bob, "forbidden words", 4);
    assert_eq!(refused["args"]["code"], "forbidden", "{refused}");
    // sendMessage goes through the publish hook too.
    bob.send_acked("carol", "darn", 5);
    assert_eq!(carol.recv_event("newMessage")["args"]["text"], "****");
    carol.expect_silence(Duration::from_millis(200));
    let publish = backend.calls("/hooks/publish");
    assert_eq!(publish[0]["user"], "bob");
    assert_eq!(publish[0]["event"], "sendRoomMessage");
    assert_eq!(publish.last().unwrap()["event"], "sendMessage");
}

#[test]
fn an_unreachable_hook_fails_closed_by_default_and_open_when_asked() {
    // A port with nothing listening.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let closed = server(url.clone(), false);
    let (status, body) = try_upgrade(closed.addr, "/ws?token=u1", "");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("connect hook unavailable"), "{body}");

    let open = server(url, true);
    let mut u1 = open.connect("u1");
    request_ok(&mut u1, "joinRoom", json!({"room": "r"}), 1);
}

#[test]
fn a_hook_that_fails_after_the_upgrade_refuses_the_request_with_hook_unavailable() {
    // Connects are allowed; joins answer garbage; publishes an error status, or a redirect
    // (not followed) with an allowing body.
    let backend = Backend::start(|path, body| match path {
        "/hooks/join" => (Duration::ZERO, 200, "not json".into()),
        "/hooks/publish" if body["args"]["text"] == "500" => (Duration::ZERO, 500, "{}".into()),
        "/hooks/publish" => (Duration::ZERO, 302, json!({"allow": true}).to_string()),
        _ => ok(json!({"allow": true})),
    });
    let server = server(backend.url(), false);
    let mut u1 = server.connect("u1");
    let code = request_err(&mut u1, "joinRoom", json!({"room": "r"}), 1);
    assert_eq!(code, "hook_unavailable");
    for (text, ack) in [("500", 2), ("302", 3)] {
        let args = json!({"to": "u1", "text": text});
        assert_eq!(
            request_err(&mut u1, "sendMessage", args, ack),
            "hook_unavailable"
        );
    }
    u1.expect_silence(Duration::from_millis(100));
}

#[test]
fn a_slow_connect_hook_holds_up_no_other_connection() {
    let backend = Backend::start(application);
    // One core: a hook call made on the loop's thread would stall every connection.
    let server = server_with(backend.url(), false, Duration::from_secs(3), 1);
    // `slow`'s hook answers after 5 s, past the 3 s timeout: refused with 503.
    let slow = std::thread::spawn({
        let addr = server.addr;
        move || {
            let started = Instant::now();
            let (status, _) = try_upgrade(addr, "/ws?token=slow", "");
            (status, started.elapsed())
        }
    });
    wait_for("the slow hook call", || {
        !backend.calls("/hooks/connect").is_empty()
    });
    let started = Instant::now();
    let mut fast = server.connect("fast");
    fast.send_acked("fast", "hello", 1);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "waited for the slow hook: {:?}",
        started.elapsed()
    );
    let (status, took) = slow.join().unwrap();
    assert_eq!(status, 503);
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(5),
        "the timeout ended it: {took:?}"
    );
}

#[test]
fn a_socket_io_connect_refused_by_the_hook_is_a_connect_error() {
    let backend = Backend::start(application);
    let server = server(backend.url(), false);
    let mut ws = RawWs::connect_path(server.addr, "/socket.io/?EIO=4&transport=websocket");
    let deadline = Instant::now() + DEADLINE;
    let next_text = |ws: &mut RawWs| loop {
        let frame = ws.read_frame(deadline).expect("a frame");
        if frame.opcode == 0x1 {
            return String::from_utf8(frame.payload).unwrap();
        }
    };
    assert!(next_text(&mut ws).starts_with('0'), "the open packet");
    ws.send_text_bytes(br#"40{"token":"mallory"}"#);
    assert_eq!(next_text(&mut ws), r#"44{"message":"banned"}"#);
    ws.send_text_bytes(br#"40{"token":"bob"}"#);
    assert!(next_text(&mut ws).starts_with("40{"), "connected");
    let call = backend.calls("/hooks/connect");
    assert_eq!(call.last().unwrap()["transport"], "socketio");

    // A second CONNECT while the first waits for the hook breaks the protocol: 4002.
    let mut twice = RawWs::connect_path(server.addr, "/socket.io/?EIO=4&transport=websocket");
    assert!(next_text(&mut twice).starts_with('0'), "the open packet");
    twice.send_text_bytes(br#"40{"token":"slow"}"#);
    twice.send_text_bytes(br#"40{"token":"slow"}"#);
    let code = twice.read_until_close(Instant::now() + DEADLINE, &mut Vec::new());
    assert_eq!(code, Some(4002));
}

#[test]
fn the_binary_takes_the_hook_and_origin_flags() {
    let backend = Backend::start(application);
    let url = backend.url();
    let server = ChildServer::spawn(&[
        "--hook-url",
        &url,
        "--hook-timeout",
        "1s",
        "--allowed-origins",
        "https://app.example",
    ]);
    let (status, body) = try_upgrade(server.addr, "/ws?token=mallory", "");
    assert_eq!((status, body.trim()), (403, "banned"));
    let evil = try_upgrade(
        server.addr,
        "/ws?token=bob",
        "Origin: https://evil.example\r\n",
    );
    assert_eq!(evil.0, 403, "{}", evil.1);
    let listed = try_upgrade(
        server.addr,
        "/ws?token=bob",
        "Origin: https://app.example\r\n",
    );
    assert_eq!(listed.0, 101, "{}", listed.1);
}

#[test]
fn rooms_set_by_the_connect_hook_survive_a_refresh() {
    const SECRET: &str = "0123456789abcdef0123456789abcdef";
    let backend = Backend::start(application);
    let server = TestServer::with_config(Config {
        hooks: HooksConfig {
            url: Some(backend.url()),
            ..HooksConfig::default()
        },
        ..jwt_test_config(SECRET)
    });
    let token = |rooms: Value| {
        jwt(
            SECRET,
            json!({"sub": "alice", "exp": now_secs() + 600, "rooms": rooms}),
        )
    };
    let url = format!("ws://{}/ws?token={}", server.addr, token(json!(["*"])));
    let mut alice = Client::connect_url(&url, "alice");
    // The hook narrowed the token's `*` to `ok:*`.
    assert_eq!(
        request_err(&mut alice, "joinRoom", json!({"room": "other"}), 1),
        "forbidden"
    );
    let refreshed = request_ok(
        &mut alice,
        "refresh",
        json!({"token": token(json!(["*"]))}),
        2,
    );
    assert!(refreshed["exp"].is_u64());
    assert_eq!(
        request_err(&mut alice, "joinRoom", json!({"room": "other"}), 3),
        "forbidden"
    );
    request_ok(&mut alice, "joinRoom", json!({"room": "ok:1"}), 4);
}

/// The hooks against an application backend that is a process of its own (a Node HTTP server,
/// tests/hooks-backend/backend.mjs) and the real binary: connect refused with 403, a join
/// refused, a message rewritten and one refused.
#[test]
fn a_backend_process_decides_connects_joins_and_publishes() {
    /// The backend process, killed however the test ends.
    struct Process(std::process::Child);
    impl Drop for Process {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut backend = Process(
        std::process::Command::new("node")
            .arg(root.join("tests/hooks-backend/backend.mjs"))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("node runs (./test.sh requires Node.js)"),
    );
    let mut line = String::new();
    let stdout = backend.0.stdout.take().expect("piped stdout");
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let port = line
        .trim()
        .strip_prefix("listening ")
        .expect("the backend says its port");
    let url = format!("http://127.0.0.1:{port}/hooks");
    let server = ChildServer::spawn(&["--hook-url", &url]);

    let (status, body) = try_upgrade(server.addr, "/ws?token=mallory", "");
    assert_eq!((status, body.trim()), (403, "banned"));
    let mut alice = Client::connect(server.addr, "alice");
    let refused = request_err(&mut alice, "joinRoom", json!({"room": "other"}), 1);
    assert_eq!(refused, "forbidden", "rooms set by the connect answer");
    let mut bob = Client::connect(server.addr, "bob");
    let mut carol = Client::connect(server.addr, "carol");
    let v = request(&mut bob, "joinRoom", json!({"room": "secret"}), 1);
    assert_eq!(v["args"]["message"], "members only", "{v}");
    bob.send_acked("carol", "well darn", 2);
    assert_eq!(carol.recv_event("newMessage")["args"]["text"], "well ****");
    let v = request(
        &mut bob,
        "sendMessage",
        json!({"to": "carol", "text": "forbidden words"}),
        3,
    );
    assert_eq!(v["args"]["code"], "forbidden", "{v}");
    carol.expect_silence(Duration::from_millis(200));
}
