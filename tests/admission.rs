//! Admission before authentication: sockets that have not proved who they are (a request head
//! still coming, a Socket.IO connection before its CONNECT) take no `--max-connections` slot,
//! are bounded per source address and per process (the oldest shed first), and a process out
//! of file descriptors keeps accepting.

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use switchboard::Config;

/// Whether the server dropped `s` (EOF or reset) before `wait` passed.
fn dropped_within(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut b = [0u8; 64];
    !matches!(s.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
        || e.kind() == std::io::ErrorKind::TimedOut)
}

/// Idle TCP connections, each seen by the server (a round trip of another request after it
/// proves it was accepted: one core, accepts in order).
fn idle(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n).map(|_| TcpStream::connect(addr).unwrap()).collect()
}

fn upgrade_sio(addr: SocketAddr) -> RawWs {
    RawWs::connect_path(addr, "/socket.io/?EIO=4&transport=websocket")
}

#[test]
fn socket_io_upgrades_take_a_slot_only_once_authenticated() {
    let server = TestServer::with_config(Config {
        max_connections: 2,
        ..test_config()
    });
    // Five tokenless Socket.IO sockets used to hold five slots for the handshake timeout.
    let mut tokenless: Vec<RawWs> = (0..5).map(|_| upgrade_sio(server.addr)).collect();
    let mut a = server.connect("a");
    let _b = server.connect("b");
    a.send_message("b", "in");
    let (status, _) = try_upgrade(server.addr, "/ws?token=c", "");
    assert_eq!(status, 503, "the two slots are the two users'");
    // A CONNECT with every slot taken is refused, in Socket.IO's own terms.
    let ws = &mut tokenless[0];
    ws.read_frame(Instant::now() + DEADLINE)
        .expect("the open packet");
    ws.send_text_bytes(br#"40{"token":"c"}"#);
    let frame = ws.read_frame(Instant::now() + DEADLINE).expect("an answer");
    let text = String::from_utf8(frame.payload).unwrap();
    assert_eq!(text, r#"44{"message":"server at max_connections"}"#);
}

#[test]
fn handshakes_per_address_are_bounded() {
    let server = TestServer::with_config(Config {
        max_handshakes_per_ip: 4,
        cores: 1,
        ..test_config()
    });
    let held = idle(server.addr, 4);
    let mut fifth = TcpStream::connect(server.addr).unwrap();
    assert!(
        dropped_within(&mut fifth, DEADLINE),
        "a fifth silent socket from the same address is dropped at once"
    );
    drop(held);
    // Their handshakes end with them: the address may connect again.
    let deadline = Instant::now() + DEADLINE;
    while http_get(server.addr, "/healthz").0 != 200 {
        assert!(Instant::now() < deadline, "healthz never answered");
    }
    assert!(metric(server.addr, "switchboard_handshakes_refused_total") >= 1);
}

#[test]
fn the_oldest_handshake_is_shed_at_the_process_bound() {
    let server = TestServer::with_config(Config {
        max_handshakes: 4,
        cores: 1,
        handshake_timeout: Duration::from_secs(60),
        ..test_config()
    });
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(server.addr).unwrap());
        // Each is accepted before the next: the order of age is the order here.
        std::thread::sleep(Duration::from_millis(20));
    }
    // A fifth socket, a real request: the oldest silent one makes room for it.
    assert_eq!(http_get(server.addr, "/healthz").0, 200);
    assert!(
        dropped_within(&mut held[0], DEADLINE),
        "the oldest was shed"
    );
    assert!(
        !dropped_within(&mut held[3], Duration::from_millis(200)),
        "the newest stays"
    );
    assert!(metric(server.addr, "switchboard_handshakes_shed_total") >= 1);
}

/// 1,100 silent sockets against a 1,000-fd limit once stopped accepting until the handshake
/// timeout; now the oldest unauthenticated sockets are shed and `/healthz` answers at once.
#[test]
fn out_of_file_descriptors_the_oldest_silent_sockets_make_room() {
    let server = ChildServer::spawn_with_nofile(
        256,
        &["--handshake-timeout", "60s", "--max-connections", "100"],
    );
    let held = idle(server.addr, 400);
    let started = Instant::now();
    assert_eq!(http_get(server.addr, "/healthz").0, 200);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(metric(server.addr, "switchboard_handshakes_shed_total") >= 1);
    drop(held);
}

#[test]
fn connects_are_rate_limited_per_address_before_the_token_and_per_user() {
    let server = TestServer::with_config(Config {
        connect_rate_per_ip: 1,
        connect_burst_per_ip: 4,
        connect_rate_per_user: 1,
        connect_burst_per_user: 2,
        ..test_config()
    });
    let _a1 = server.connect("a");
    let _a2 = server.connect("a");
    let (status, body) = try_upgrade(server.addr, "/ws?token=a", "");
    assert_eq!(
        status, 429,
        "the user's third connect in a burst of two: {body}"
    );
    assert!(
        body.contains("too many connections for this user"),
        "{body}"
    );
    let _b = server.connect("b");
    // The address spent its burst of four: even a bad token is refused before it is checked.
    let (status, body) = try_upgrade(server.addr, "/ws?token=", "");
    assert_eq!(status, 429, "{body}");
    assert!(
        body.contains("too many connections from this address"),
        "{body}"
    );
    assert!(metric(server.addr, "switchboard_connects_rate_limited_total") >= 2);
    // Plain HTTP is not an upgrade: probes still get through.
    assert_eq!(http_get(server.addr, "/healthz").0, 200);
}
