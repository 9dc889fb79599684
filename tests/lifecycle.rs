//! Connection churn: many connect/disconnect cycles, clean and abrupt, leave every core's slab
//! and user index empty.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::*;

const CYCLES: usize = 1000;
const THREADS: usize = 4;

fn all_empty(s: &[switchboard::CoreStats]) -> bool {
    s.iter()
        .all(|c| c.connections == 0 && c.sockets == 0 && c.users == 0)
}

#[test]
fn a_thousand_connect_disconnect_cycles_leak_nothing() {
    // Churn as fast as the threads go: the connect rate limits are another test's subject.
    let server = TestServer::with_config(switchboard::Config {
        connect_rate_per_ip: 0,
        connect_rate_per_user: 0,
        ..test_config()
    });
    let addr = server.addr;
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..CYCLES / THREADS {
                    // Few users, many connections each: the index must drop a user only with
                    // their last connection.
                    let user = format!("u{}", (t * 7 + i) % 5);
                    match i % 4 {
                        0 => Client::connect(addr, &user).close(),
                        1 => {
                            // Abrupt: the TCP connection goes without a close frame.
                            let mut c = Client::connect(addr, &user);
                            c.send_message(&user, "bye");
                            drop(c);
                        }
                        2 => {
                            let raw = RawWs::connect(addr, &user);
                            raw.stream.shutdown(std::net::Shutdown::Both).unwrap();
                        }
                        _ => {
                            // Never upgraded: half a request, then gone.
                            let mut s = TcpStream::connect(addr).unwrap();
                            s.write_all(b"GET /ws?token=x HTTP/1.1\r\nHo").unwrap();
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    server.wait_stats("every core to be empty", all_empty);
    let upgrades = (0..CYCLES / THREADS).filter(|i| i % 4 != 3).count() * THREADS;
    assert_eq!(
        metric(addr, "switchboard_connections_accepted_total"),
        upgrades as u64
    );
    // Every upgraded connection was counted closed exactly once, for some reason.
    let closed: u64 = [
        "client_close",
        "reset",
        "shutdown",
        "protocol_error",
        "binary_frame",
        "invalid_utf8",
        "message_too_big",
        "heartbeat_timeout",
        "slow_consumer",
    ]
    .iter()
    .map(|r| metric(addr, &closed_metric(r)))
    .sum();
    assert_eq!(closed, upgrades as u64);
    // And the server still works.
    let mut a = server.connect("after");
    a.send_message("after", "ok");
    assert_eq!(a.recv_event("newMessage")["args"]["text"], "ok");
}

/// `Closed::Reset` is documented as "the TCP connection failed or was reset without a close
/// frame"; a peer that just hangs up must not inflate `protocol_error`.
#[test]
fn abrupt_drops_are_counted_as_resets_not_protocol_errors() {
    let server = TestServer::start();
    for i in 0..10 {
        let c = Client::connect(server.addr, &format!("d{i}"));
        drop(c);
    }
    server.wait_stats("every core to be empty", all_empty);
    assert_eq!(metric(server.addr, &closed_metric("protocol_error")), 0);
    assert_eq!(metric(server.addr, &closed_metric("reset")), 10);
}

#[test]
fn a_user_stays_reachable_while_any_device_is_connected() {
    let server = TestServer::start();
    let mut devices: Vec<Client> = (0..4).map(|_| server.connect("multi")).collect();
    let mut other = server.connect("other");
    while devices.len() > 1 {
        drop(devices.pop());
        server.wait_stats("a device to go", |s| {
            s.iter().map(|c| c.connections).sum::<u64>() == devices.len() as u64 + 1
        });
        other.send_message("multi", "ping");
        assert_eq!(other.recv_event("newMessage")["args"]["to"], "multi");
        for d in devices.iter_mut() {
            assert_eq!(d.recv_event("newMessage")["args"]["text"], "ping");
        }
    }
    drop(devices);
    server.wait_stats("only `other` left", |s| {
        s.iter().map(|c| c.users).sum::<u64>() == 1
    });
    other.expect_silence(Duration::from_millis(50));
}
