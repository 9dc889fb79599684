//! Socket.IO clients connect unchanged: the real socket.io-client v4 (Node.js, driven through
//! tests/socketio-client/scenarios.js) against one or two servers, and a hand-written Engine.IO
//! client for what socket.io-client will not send (binary frames, broken packets, silence).

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use switchboard::backplane::Routing;
use switchboard::Config;

/// How long a whole Node.js scenario may take.
const NODE_DEADLINE: Duration = Duration::from_secs(40);

/// One run of `node scenarios.js <scenario> <config>`; killed on drop.
struct Node {
    child: Child,
    lines: mpsc::Receiver<String>,
    scenario: String,
}

fn node(scenario: &str, config: Value) -> Node {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/socketio-client");
    assert!(
        dir.join("node_modules/socket.io-client").is_dir(),
        "socket.io-client is not installed: run `npm ci` in {} (./test.sh does)",
        dir.display()
    );
    let mut child = Command::new("node")
        .arg("scenarios.js")
        .arg(scenario)
        .arg(config.to_string())
        .current_dir(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node (Node.js 18 or later) must be on PATH");
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    Node {
        child,
        lines,
        scenario: scenario.to_string(),
    }
}

impl Node {
    /// Waits for the line `{"step": step, ...}`; panics on `{"error": ...}` or at the deadline.
    fn step(&mut self, step: &str) -> Value {
        let deadline = Instant::now() + NODE_DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match self.lines.recv_timeout(left) {
                Ok(line) => line,
                Err(_) => panic!(
                    "{}: no {step:?} step (exit: {:?})",
                    self.scenario,
                    self.child.try_wait()
                ),
            };
            let v: Value = serde_json::from_str(&line)
                .unwrap_or_else(|_| panic!("{}: not JSON: {line}", self.scenario));
            assert!(
                v.get("error").is_none(),
                "{}: {}",
                self.scenario,
                v["error"]
            );
            if v["step"] == step {
                return v;
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const SECRET: &str = "0123456789abcdef0123456789abcdef";

fn jwt_config() -> Config {
    jwt_test_config(SECRET)
}

// ---- the real socket.io-client ------------------------------------------------------------

#[test]
fn across_two_instances_every_connection_gets_the_event_exactly_once() {
    let redis = TestRedis::start();
    let a = redis_server(&redis, Routing::PerUser);
    let b = redis_server(&redis, Routing::PerUser);
    // u1 natively on A too.
    let mut native = a.connect("u1");
    let text = "across the backplane";
    let mut run = node(
        "fanout",
        json!({"a": a.addr.to_string(), "b": b.addr.to_string(), "text": text,
               "channels_a": 1, "channels_b": 2}),
    );
    let done = run.step("done");
    assert_eq!(
        done["counts"],
        json!({"u1a": 1, "u1b": 1, "u2": 1}),
        "{done}"
    );
    // The shape the original frontends listen for: message({event, args}).
    let sample = &done["sample"];
    assert_eq!(sample["event"], "newMessage");
    assert_eq!(sample["args"]["from"], "u2");
    assert_eq!(sample["args"]["to"], "u1");
    assert_eq!(done["answer"]["event"], "ack");
    assert_eq!(done["answer"]["args"]["id"], sample["args"]["id"]);
    // The native connection: once, the same event.
    let got = native.recv_event("newMessage");
    assert_eq!(got["args"]["id"], sample["args"]["id"]);
    native.expect_silence(Duration::from_millis(300));
}

#[test]
fn a_refused_token_is_a_connect_error_with_the_native_reason() {
    let server = TestServer::with_config(jwt_config());
    let good = jwt(SECRET, json!({"sub": "u1", "exp": now_secs() + 300}));
    let forged = jwt(
        "another secret, 32 bytes long...",
        json!({"sub": "u1", "exp": now_secs() + 300}),
    );
    let mut run = node(
        "bad_token",
        json!({"addr": server.addr.to_string(), "tokens": [forged, "not a jwt", null, good]}),
    );
    let done = run.step("done");
    assert_eq!(
        done["results"],
        json!([
            {"message": "invalid signature"},
            {"message": "malformed token"},
            {"message": "missing token"},
            {"connected": true}
        ]),
        "{done}"
    );
    wait_metric(server.addr, "switchboard_auth_failures_total", 3);
}

#[test]
fn acks_round_trip() {
    let server = TestServer::start();
    let mut run = node("acks", json!({"addr": server.addr.to_string()}));
    let done = run.step("done");
    assert_eq!(done["ok"]["event"], "ack", "{done}");
    assert_eq!(done["ok"]["args"]["id"].as_str().map(str::len), Some(32));
    assert!(done["ok"]["args"]["ts"].is_u64());
    assert_eq!(done["unknown"]["event"], "error");
    assert_eq!(done["unknown"]["args"]["code"], "unknown_event");
    assert_eq!(done["badArgs"]["args"]["code"], "bad_args");
    assert_eq!(done["callback"]["event"], "ack");
    // Without an ack the error arrives as a message event, like the native one.
    let events = done["events"].as_array().unwrap();
    let error = events.iter().find(|e| e["event"] == "error").unwrap();
    assert_eq!(error["args"]["code"], "bad_args");
    assert!(error.get("ack").is_none(), "{error}");
}

#[test]
fn the_client_reconnects_by_itself_after_the_server_restarts() {
    let mut server = ChildServer::spawn(&["--shutdown-timeout", "2s"]);
    let addr = server.addr;
    let mut run = node("reconnect", json!({"addr": addr.to_string()}));
    run.step("connected");
    server.signal(15);
    assert_eq!(server.wait_exit().code(), Some(0));
    let _again = ChildServer::spawn_on(&addr.to_string(), &[]);
    let done = run.step("done");
    assert_ne!(done["first"], done["second"], "a new session: {done}");
    // A server going away is a transport close, which the client retries (an "io server
    // disconnect" would not be).
    assert_eq!(done["reasons"], json!(["transport close"]), "{done}");
    assert_eq!(done["answer"]["event"], "ack");
}

#[test]
fn namespaces_root_and_socket_share_one_connection_and_see_the_same_events() {
    let server = TestServer::start();
    let mut run = node("namespaces", json!({"addr": server.addr.to_string()}));
    let done = run.step("done");
    assert_eq!(done["same_engine"], true, "{done}");
    assert_eq!(done["engines"], 1, "one Engine.IO connection: {done}");
    assert_eq!(done["counts"], json!({"root": 1, "socket": 1}), "{done}");
    assert_eq!(done["admin"], json!({"message": "Invalid namespace"}));
    assert_eq!(done["answer"]["event"], "ack");
}

// ---- by hand: what socket.io-client does not send ---------------------------------------

/// A hand-written Engine.IO client over [`RawWs`].
struct Sio {
    ws: RawWs,
    open: Value,
}

impl Sio {
    /// Upgrades at `/socket.io/?EIO=4&transport=websocket<query>` and reads the open packet.
    fn connect(addr: SocketAddr, query: &str) -> Self {
        let path = format!("/socket.io/?EIO=4&transport=websocket{query}");
        let mut ws = RawWs::connect_path(addr, &path);
        let first = read_text(&mut ws).expect("the open packet");
        let open = first
            .strip_prefix('0')
            .and_then(|j| serde_json::from_str(j).ok())
            .unwrap_or_else(|| panic!("not an open packet: {first}"));
        Sio { ws, open }
    }

    fn send(&mut self, text: &str) {
        self.ws.send_text_bytes(text.as_bytes());
    }

    /// The next text frame other than a ping.
    fn recv(&mut self) -> String {
        loop {
            match read_text(&mut self.ws) {
                Some(t) if t == "2" => continue,
                Some(t) => return t,
                None => panic!("no packet before the deadline"),
            }
        }
    }

    /// Sends `packet` and returns the next packet.
    fn ask(&mut self, packet: &str) -> String {
        self.send(packet);
        self.recv()
    }

    /// Reads until the close frame; returns its code (`None`: the connection just ended).
    fn close_code(&mut self) -> Option<u16> {
        self.ws
            .read_until_close(Instant::now() + DEADLINE, &mut Vec::new())
    }
}

/// The next text frame's payload (other frames are skipped); `None` at the end or deadline.
fn read_text(ws: &mut RawWs) -> Option<String> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let frame = ws.read_frame(deadline)?;
        match frame.opcode {
            0x1 => return Some(String::from_utf8(frame.payload).expect("UTF-8")),
            0x8 => return None,
            _ => continue,
        }
    }
}

/// The JSON after a packet's `prefix`.
fn json_after(packet: &str, prefix: &str) -> Value {
    let rest = packet
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("{packet:?} does not start with {prefix:?}"));
    serde_json::from_str(rest).unwrap_or_else(|e| panic!("{packet:?}: {e}"))
}

#[test]
fn the_polling_transport_gets_400_with_a_json_reason() {
    let server = TestServer::start();
    for path in [
        "/socket.io/?EIO=4&transport=polling&t=abc",
        "/socket.io?EIO=4&transport=polling",
        "/socket.io/?EIO=4",
    ] {
        let (status, body) = server.get(path);
        assert_eq!(status, 400, "{path}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["code"], 0, "{body}");
        assert!(
            v["message"]
                .as_str()
                .unwrap()
                .contains("transports: [\"websocket\"]"),
            "{body}"
        );
    }
    let (status, _) = raw_request(
        server.addr,
        b"POST /socket.io/?EIO=4&transport=polling&sid=x HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(status, 400);
    let (status, body) = server.get("/socket.io/?EIO=3&transport=websocket");
    assert_eq!(
        (status, json_after(&body, "")["code"].clone()),
        (400, json!(5))
    );
    // The upgrade itself is checked like the native one.
    let (status, _) = server.get("/socket.io/?EIO=4&transport=websocket");
    assert_eq!(status, 426);
}

#[test]
fn the_open_packet_carries_the_configured_heartbeat_and_max_payload() {
    let config = Config {
        ping_interval: Duration::from_millis(1500),
        ping_timeout: Duration::from_millis(700),
        max_message_bytes: 4096,
        ..test_config()
    };
    let server = TestServer::with_config(config);
    let sio = Sio::connect(server.addr, "");
    assert!(sio.open["sid"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!(sio.open["upgrades"], json!([]));
    assert_eq!(sio.open["pingInterval"], 1500);
    assert_eq!(sio.open["pingTimeout"], 700);
    assert_eq!(sio.open["maxPayload"], 4096);
}

#[test]
fn connect_by_query_token_events_and_acks_on_both_namespaces() {
    let server = TestServer::start();
    let mut sio = Sio::connect(server.addr, "&token=u1");
    assert!(json_after(&sio.ask("40"), "40")["sid"].is_string());
    assert!(json_after(&sio.ask("40/socket,"), "40/socket,")["sid"].is_string());
    assert_eq!(
        json_after(&sio.ask("40/admin,"), "44/admin,"),
        json!({"message": "Invalid namespace"})
    );
    // A native user reaches both namespaces, once each.
    let mut u2 = server.connect("u2");
    u2.send_message("u1", "hello");
    let root = json_after(&sio.recv(), "42");
    let socket = json_after(&sio.recv(), "42/socket,");
    assert_eq!(root, socket);
    assert_eq!(root[0], "message");
    assert_eq!(root[1]["event"], "newMessage");
    assert_eq!(root[1]["args"]["text"], "hello");
    // An acked request on /socket: the event on both namespaces, then the ack on /socket.
    sio.send(r#"42/socket,7["message",{"event":"sendMessage","args":{"to":"u2","text":"back"}}]"#);
    assert!(sio.recv().starts_with("42[\"message\""));
    assert!(sio.recv().starts_with("42/socket,[\"message\""));
    let ack = json_after(&sio.recv(), "43/socket,7");
    assert_eq!(ack[0]["event"], "ack");
    assert!(ack[0]["args"]["id"].is_string());
    while u2.recv_event("newMessage")["args"]["text"] != "back" {}
    // A badly shaped event: an error event on the namespace it came from, or in its ack.
    let err = json_after(&sio.ask(r#"42/socket,["other",{}]"#), "42/socket,");
    assert_eq!(err[1]["event"], "error");
    assert_eq!(err[1]["args"]["code"], "bad_envelope");
    let err = json_after(&sio.ask(r#"429["message",{"args":1}]"#), "439");
    assert_eq!(err[0]["args"]["code"], "bad_envelope");
    // DISCONNECT from both: out of the user index, nothing more arrives.
    sio.send("41/socket,");
    sio.send("41");
    u2.send_message("u1", "gone");
    u2.recv_event("newMessage");
    let quiet = sio
        .ws
        .read_frame(Instant::now() + Duration::from_millis(300));
    assert!(quiet.is_none(), "{quiet:?}");
}

#[test]
fn refused_connects_keep_the_connection_and_name_the_reason() {
    let server = TestServer::with_config(jwt_config());
    let mut sio = Sio::connect(server.addr, "");
    let refusal = |sio: &mut Sio, packet: &str| json_after(&sio.ask(packet), "44");
    assert_eq!(refusal(&mut sio, "40"), json!({"message": "missing token"}));
    assert_eq!(
        refusal(&mut sio, r#"40{"token":"x.y.z"}"#),
        json!({"message": "malformed token"})
    );
    assert_eq!(
        refusal(&mut sio, r#"40{"token":7}"#)["message"]
            .as_str()
            .map(|m| m.contains("auth payload")),
        Some(true)
    );
    let u1 = jwt(SECRET, json!({"sub": "u1", "exp": now_secs() + 300}));
    let u2 = jwt(SECRET, json!({"sub": "u2", "exp": now_secs() + 300}));
    assert!(sio
        .ask(&format!(r#"40{{"token":"{u1}"}}"#))
        .starts_with("40{"));
    // One connection, one user.
    assert_eq!(
        json_after(
            &sio.ask(&format!(r#"40/socket,{{"token":"{u2}"}}"#)),
            "44/socket,"
        ),
        json!({"message": "this connection is already connected as another user"})
    );
}

#[test]
fn binary_packets_get_a_connect_error_and_their_attachments_are_skipped() {
    let server = TestServer::start();
    let mut sio = Sio::connect(server.addr, "&token=u1");
    sio.ask("40");
    sio.send(r#"451-["message",{"_placeholder":true,"num":0}]"#);
    sio.ws.write_frame(true, 0, 0x2, b"\x01\x02\x03", true);
    assert_eq!(
        json_after(&sio.recv(), "44"),
        json!({"message": "binary packets are not supported: send JSON"})
    );
    // The connection lives on: join again and talk.
    assert!(sio.ask("40").starts_with("40{"));
    sio.send(r#"421["message",{"event":"sendMessage","args":{"to":"u1","text":"still here"}}]"#);
    assert!(sio.recv().contains("still here"));
    assert!(sio.recv().starts_with("431["));
    // A binary frame that no packet announced closes like on the native endpoint.
    sio.ws.write_frame(true, 0, 0x2, b"\x01", true);
    assert_eq!(sio.close_code(), Some(1003));
}

#[test]
fn broken_packets_close_with_4002_and_nothing_else_suffers() {
    let server = TestServer::start();
    let mut bystander = server.connect("bystander");
    for packet in [
        "",
        "9",
        "0",
        "5",
        "4",
        "47",
        "4é",
        "42[",
        r#"42["message",{"event":"sendMessage"}]"#, // an event before any CONNECT
        "40/socket",                                // fine...
    ] {
        let mut sio = Sio::connect(server.addr, "&token=u1");
        sio.send(packet);
        if packet == "40/socket" {
            // ...but a second CONNECT to a joined namespace breaks the protocol.
            assert!(sio.recv().starts_with("40/socket,{"));
            sio.send("40/socket,");
        }
        assert_eq!(sio.close_code(), Some(4002), "{packet:?}");
    }
    let attachments = format!("5{}-[]", 65);
    let mut sio = Sio::connect(server.addr, "&token=u1");
    sio.ask("40");
    sio.send(&attachments);
    assert_eq!(sio.close_code(), Some(4002));
    bystander.send_message("bystander", "fine");
    assert_eq!(bystander.recv_event("newMessage")["args"]["text"], "fine");
    wait_metric(server.addr, &closed_metric("bad_packet"), 11);
}

#[test]
fn engine_io_heartbeat_pings_and_times_out_the_silent() {
    let config = Config {
        ping_interval: Duration::from_millis(200),
        ping_timeout: Duration::from_millis(300),
        ..test_config()
    };
    let server = TestServer::with_config(config);
    let mut silent = Sio::connect(server.addr, "&token=u1");
    silent.ask("40");
    let mut alive = Sio::connect(server.addr, "&token=u2");
    alive.ask("40");
    // The answering client outlives several timeouts.
    let until = Instant::now() + Duration::from_millis(1500);
    let mut pings = 0;
    while Instant::now() < until {
        match read_text(&mut alive.ws).as_deref() {
            Some("2") => {
                pings += 1;
                alive.send("3");
            }
            other => panic!("expected pings, got {other:?}"),
        }
    }
    assert!(pings >= 3, "{pings} pings");
    // The silent one got the same pings, did not answer, and was closed.
    assert_eq!(silent.close_code(), Some(4000));
    assert_eq!(
        json_after(&alive.ask(r#"421["message",{"event":"nope"}]"#), "431")[0]["event"],
        "error"
    );
}

#[test]
fn a_connection_that_joins_no_namespace_is_closed_at_the_handshake_timeout() {
    let config = Config {
        handshake_timeout: Duration::from_millis(300),
        ..test_config()
    };
    let server = TestServer::with_config(config);
    let mut never = Sio::connect(server.addr, "&token=u1");
    let mut left = Sio::connect(server.addr, "&token=u1");
    left.ask("40");
    assert_eq!(never.close_code(), Some(4001));
    // Joined: past the same deadline, still served...
    let answer = json_after(&left.ask(r#"421["message",{"event":"nope"}]"#), "431");
    assert_eq!(answer[0]["args"]["code"], "unknown_event");
    // ...until the last namespace is left.
    left.send("41");
    assert_eq!(left.close_code(), Some(4001));
    wait_metric(server.addr, &closed_metric("connect_timeout"), 2);
}

#[test]
fn with_history_off_dispatches_reach_socket_io_connections_too() {
    let mut config = test_config();
    config.history.enabled = false;
    let server = TestServer::with_config(config);
    // Several connections, spread over the cores by the kernel: the sender's core delivers to
    // its own, the other core from its inbox, both from the dispatch's one frame cache.
    let mut clients: Vec<Sio> = (0..6)
        .map(|_| {
            let mut sio = Sio::connect(server.addr, "&token=u1");
            sio.ask("40");
            sio
        })
        .collect();
    let mut u2 = server.connect("u2");
    let ack = u2.send_acked("u1", "no history", 1);
    for sio in clients.iter_mut() {
        let event = json_after(&sio.recv(), "42");
        assert_eq!(event[1]["args"]["id"], ack["id"]);
        assert!(event[1].get("offset").is_none(), "{event}");
    }
}

#[test]
fn a_socket_io_session_expires_with_4010_unless_refreshed() {
    let server = TestServer::with_config(jwt_config());
    let short = |user: &str| jwt(SECRET, json!({"sub": user, "exp": now_secs() + 2}));
    let mut expiring = Sio::connect(server.addr, "");
    let connect = format!(r#"40{{"token":"{}"}}"#, short("u1"));
    assert!(json_after(&expiring.ask(&connect), "40")["sid"].is_string());
    let mut refreshed = Sio::connect(server.addr, "");
    let connect = format!(r#"40{{"token":"{}"}}"#, short("u2"));
    assert!(json_after(&refreshed.ask(&connect), "40")["sid"].is_string());
    let fresh = jwt(SECRET, json!({"sub": "u2", "exp": now_secs() + 60}));
    let refresh = format!(r#"423["message",{{"event":"refresh","args":{{"token":"{fresh}"}}}}]"#);
    let ack = json_after(&refreshed.ask(&refresh), "433");
    assert!(ack[0]["args"]["exp"].is_u64(), "{ack}");
    assert_eq!(expiring.close_code(), Some(4010));
    // The refreshed one outlives the first token by more than a sweep (250 ms) of its core.
    std::thread::sleep(Duration::from_millis(600));
    let echo = r#"424["message",{"event":"sendMessage","args":{"to":"u2","text":"here"}}]"#;
    refreshed.send(echo);
    loop {
        let packet = refreshed.recv();
        if packet.starts_with("434") {
            break;
        }
    }
}

/// A Socket.IO connection counts like a native one: for `--max-devices` (the one over it is
/// closed with 4009, whichever endpoint it came through) and in `presence`.
#[test]
fn socket_io_connections_count_for_the_device_limit_and_presence() {
    let mut config = test_config();
    config.rooms.max_devices = 1;
    let server = TestServer::with_config(config);
    let mut sio = Sio::connect(server.addr, "&token=u1");
    assert!(json_after(&sio.ask("40"), "40")["sid"].is_string());
    let joined = json_after(
        &sio.ask(r#"421["message",{"event":"joinRoom","args":{"room":"r"}}]"#),
        "431",
    );
    assert_eq!(joined[0]["args"]["room"], "r", "{joined}");
    let mut u2 = server.connect("u2");
    request_ok(&mut u2, "joinRoom", json!({"room": "r"}), 1);
    let online = request_ok(&mut u2, "presence", json!({"room": "r"}), 2);
    let mut online: Vec<&str> = online["online"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap())
        .collect();
    online.sort_unstable();
    assert_eq!(online, ["u1", "u2"], "a Socket.IO-only member is online");
    // The device limit holds over both endpoints.
    let mut second = Sio::connect(server.addr, "&token=u1");
    second.send("40");
    assert_eq!(second.close_code(), Some(4009));
    let mut native = server.connect("u1");
    assert_eq!(native.expect_close(), 4009);
    // Leaving the namespace uncounts it: u1 goes offline and may connect again.
    sio.send("41");
    let changed = u2.recv_event("presenceChanged");
    assert_eq!(
        changed["args"],
        json!({"room": "r", "user": "u1", "online": false})
    );
    let mut again = server.connect("u1");
    again.send_message("u2", "back");
    assert_eq!(u2.recv_event("newMessage")["args"]["text"], "back");
}

#[test]
fn a_room_is_resumed_through_the_connect_payload() {
    let server = TestServer::start();
    let mut run = node("room_resume", json!({ "addr": server.addr.to_string() }));
    let done = run.step("done");
    assert_eq!(done["first_room"], "r", "a room frame names its room");
    assert_eq!(done["texts"], json!(["m2", "m3"]));
    assert_eq!(done["recovered"]["args"]["room"], "r");
    assert_eq!(done["recovered"]["args"]["complete"], true);
}
