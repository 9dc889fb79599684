//! Graceful shutdown of the real binary: SIGTERM closes every connection with 1001, the process
//! exits 0 within its shutdown timeout, and the address can be served again at once.

mod common;

use std::time::{Duration, Instant};

use common::*;

const SIGTERM: i32 = 15;

/// Connects clients until both cores hold at least one, per /healthz.
fn clients_on_both_cores(server: &ChildServer) -> Vec<Client> {
    let mut clients = Vec::new();
    for i in 0..64 {
        clients.push(Client::connect(server.addr, &format!("u{i}")));
        let deadline = Instant::now() + DEADLINE;
        let per_core = loop {
            let (_, body) = http_get(server.addr, "/healthz");
            let h: serde_json::Value = serde_json::from_str(&body).unwrap();
            let per_core: Vec<u64> = h["per_core"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["connections"].as_u64().unwrap())
                .collect();
            if per_core.iter().sum::<u64>() == clients.len() as u64 {
                break per_core;
            }
            assert!(
                Instant::now() < deadline,
                "healthz never counted the clients"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        if clients.len() >= 3 && per_core.iter().all(|&n| n > 0) {
            return clients;
        }
    }
    panic!("could not reach both cores");
}

#[test]
fn sigterm_closes_with_1001_exits_0_and_frees_the_port() {
    // No drain period: every close goes at once (tests/readiness.rs covers the spread).
    let mut server = ChildServer::spawn(&["--shutdown-timeout", "3s", "--drain-period", "0"]);
    let addr = server.addr;
    let mut clients = clients_on_both_cores(&server);
    // A client mid-conversation is closed the same way.
    clients[0].send_message("u1", "before");
    assert_eq!(
        clients[1].recv_event("newMessage")["args"]["text"],
        "before"
    );

    let started = Instant::now();
    server.signal(SIGTERM);
    for c in clients.iter_mut() {
        assert_eq!(c.expect_close(), 1001, "{}", c.user);
    }
    let status = server.wait_exit();
    let took = started.elapsed();
    assert_eq!(status.code(), Some(0), "{status:?}");
    // Every client answered the close, so the server need not wait out its timeout.
    assert!(took < Duration::from_secs(3), "exit took {took:?}");

    // The same address is served again at once.
    let again = ChildServer::spawn_on(&addr.to_string(), &[]);
    assert_eq!(again.addr, addr);
    let (status, body) = http_get(addr, "/healthz");
    assert_eq!(status, 200, "{body}");
    let mut c = Client::connect(addr, "back");
    c.send_message("back", "again");
    assert_eq!(c.recv_event("newMessage")["args"]["text"], "again");
}

#[test]
fn shutdown_does_not_wait_past_its_timeout_for_clients_that_never_answer() {
    let mut server = ChildServer::spawn(&["--shutdown-timeout", "1s", "--drain-period", "0"]);
    // Raw clients that never read: their close frames are never answered.
    let _mute: Vec<RawWs> = (0..4)
        .map(|i| RawWs::connect(server.addr, &format!("m{i}")))
        .collect();
    let started = Instant::now();
    server.signal(SIGTERM);
    let status = server.wait_exit();
    let took = started.elapsed();
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(
        took >= Duration::from_millis(900),
        "exited before its timeout: {took:?}"
    );
    assert!(took < Duration::from_secs(3), "exit took {took:?}");
}

#[test]
fn sigint_is_graceful_too() {
    let mut server = ChildServer::spawn(&[]);
    let mut c = Client::connect(server.addr, "u");
    server.signal(2);
    assert_eq!(c.expect_close(), 1001);
    assert_eq!(server.wait_exit().code(), Some(0));
}
