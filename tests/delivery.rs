//! Delivery on one instance: every device of the recipient and of the sender, on every core,
//! gets each message exactly once, with the same id.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn every_device_on_every_core_gets_each_message_once() {
    let server = TestServer::start();
    let mut u1 = connect_spread(&server, "u1", 3);
    let cores: std::collections::HashSet<usize> = u1.iter().map(|(c, _)| *c).collect();
    assert_eq!(cores.len(), 2, "u1's devices span both cores");
    let mut u2 = server.connect("u2");

    u2.send_json(&serde_json::json!({"event": "sendMessage", "args": {"to": "u1", "text": "hello"}, "ack": 1}));
    let mut ids = Vec::new();
    for (_, c) in u1.iter_mut() {
        let m = c.recv_event("newMessage");
        assert_eq!(m["args"]["from"], "u2");
        assert_eq!(m["args"]["to"], "u1");
        assert_eq!(m["args"]["text"], "hello");
        assert!(m["args"]["ts"].as_u64().unwrap() > 0);
        ids.push(m["args"]["id"].as_str().unwrap().to_string());
    }
    let own = u2.recv_json();
    assert_eq!(
        own["event"], "newMessage",
        "the sender's device sees its own send first"
    );
    ids.push(own["args"]["id"].as_str().unwrap().to_string());
    let ack = u2.recv_json();
    assert_eq!(ack["event"], "ack");
    assert_eq!(ack["ack"], 1);
    ids.push(ack["args"]["id"].as_str().unwrap().to_string());
    assert!(
        ids.windows(2).all(|w| w[0] == w[1]),
        "one id everywhere: {ids:?}"
    );

    // Exactly once: nothing else arrives anywhere.
    for (_, c) in u1.iter_mut() {
        c.expect_silence(Duration::from_millis(300));
    }
    u2.expect_silence(Duration::from_millis(100));

    // u1 sends from one device: all three of u1's devices and u2 get it once.
    u1[0].1.send_message("u2", "back");
    for (_, c) in u1.iter_mut() {
        assert_eq!(c.recv_event("newMessage")["args"]["text"], "back");
    }
    assert_eq!(u2.recv_event("newMessage")["args"]["from"], "u1");
    for (_, c) in u1.iter_mut() {
        c.expect_silence(Duration::from_millis(200));
    }
    u2.expect_silence(Duration::from_millis(100));
}

#[test]
fn sending_to_yourself_arrives_once_per_device() {
    let server = TestServer::start();
    let mut a = server.connect("solo");
    let mut b = server.connect("solo");
    a.send_message("solo", "note to self");
    assert_eq!(a.recv_event("newMessage")["args"]["text"], "note to self");
    assert_eq!(b.recv_event("newMessage")["args"]["text"], "note to self");
    a.expect_silence(Duration::from_millis(200));
    b.expect_silence(Duration::from_millis(100));
}

#[test]
fn embedders_register_their_own_handlers() {
    let server = TestServer::from_server(switchboard::Server::new(test_config()).handler(
        "shout",
        |ctx: &mut switchboard::Context<'_>,
         args: switchboard::Args<'_>|
         -> switchboard::HandlerResult {
            let text: String = args.parse()?;
            let everyone = ["a", "b"].map(switchboard::UserId::from);
            ctx.dispatch(everyone, "shouted", &text.to_uppercase())?;
            Ok(serde_json::json!({"by": &**ctx.user()}))
        },
    ));
    let mut a = server.connect("a");
    let mut b = server.connect("b");
    a.send_json(&serde_json::json!({"event": "shout", "args": "hi", "ack": 9}));
    // Each user's copy carries that user's own offset (history is on by default).
    for device in [&mut b, &mut a] {
        let mut m = device.recv_json();
        let offset = m["offset"].take();
        assert!(offset.as_str().is_some_and(|o| o.contains('-')), "{m}");
        assert_eq!(
            m,
            serde_json::json!({"event": "shouted", "args": "HI", "offset": null})
        );
    }
    assert_eq!(
        a.recv_json(),
        serde_json::json!({"event": "ack", "ack": 9, "args": {"by": "a"}})
    );
}
