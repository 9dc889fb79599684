//! Backpressure: a client that stops reading is closed with 4008 once more than
//! `max_outbound_bytes` wait for it, and the server's memory stays bounded meanwhile.

mod common;

use std::net::TcpStream;
use std::time::Instant;

use common::*;
use socket2::{Domain, Socket, Type};
use tungstenite::Message;

const MAX_OUTBOUND: usize = 128 * 1024;
const MESSAGE_BYTES: usize = 16 * 1024;
/// 24 MiB sent at a reader that takes none of it.
const MESSAGES: u64 = 1536;
/// Sends in flight before the sender reads its own copies and acks back (its own outbound
/// queue must stay under the bound too).
const WINDOW: u64 = 4;

/// A connected socket with a small receive buffer, so the kernel holds little for it.
fn small_rcvbuf_stream(addr: std::net::SocketAddr) -> TcpStream {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&addr.into()).unwrap();
    socket.into()
}

/// Users indexed over all cores, per /healthz. A server-initiated close unindexes the user at
/// once (the connection itself lingers until the close handshake or the close grace ends).
fn users_indexed(addr: std::net::SocketAddr) -> u64 {
    let (_, body) = http_get(addr, "/healthz");
    let h: serde_json::Value = serde_json::from_str(&body).unwrap();
    h["per_core"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["users"].as_u64().unwrap())
        .sum()
}

/// Reads the sender's own copies and acks until `acked` reaches `upto`. Big frames are the
/// copies (not parsed: JSON-parsing 16 KiB in a debug build is the slow part of this test).
fn drain_sender(sender: &mut Client, acked: &mut u64, upto: u64) {
    let deadline = Instant::now() + DEADLINE;
    while *acked < upto {
        match sender.next_message(deadline) {
            Some(Ok(Message::Text(t))) if t.len() > MESSAGE_BYTES => {
                assert!(t.starts_with(r#"{"event":"newMessage""#))
            }
            Some(Ok(Message::Text(t))) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                assert_eq!(
                    (v["event"].as_str(), v["ack"].as_u64()),
                    (Some("ack"), Some(*acked + 1)),
                    "{v}"
                );
                *acked += 1;
            }
            Some(Ok(Message::Ping(_))) => {}
            other => panic!("sender got {other:?}"),
        }
    }
}

#[test]
fn a_reader_that_never_reads_is_closed_with_4008_and_memory_stays_bounded() {
    // History keeps what is sent (max-len events per user): a short history keeps it from
    // counting as growth here, while the bound under test stays the outbound one.
    let server = ChildServer::spawn(&[
        // The sender floods on purpose; the per-connection rate limit and the per-sender budget
        // of what it may store for others are other tests' subjects.
        "--rate-limit",
        "0",
        "--sender-bytes-per-minute",
        "0",
        "--max-outbound-bytes",
        &MAX_OUTBOUND.to_string(),
        "--history-max-len",
        "16",
    ]);
    let addr = server.addr;
    let reader = RawWs::upgrade(small_rcvbuf_stream(addr), "reader");
    let mut sender = Client::connect(addr, "sender");
    let mut witness = Client::connect(addr, "witness");
    // Everyone is indexed before the flood starts.
    sender.send_acked("witness", "hello", 0);
    assert_eq!(witness.recv_event("newMessage")["args"]["text"], "hello");
    assert_eq!(users_indexed(addr), 3);
    let rss_before = server.rss_kib();

    let text = "x".repeat(MESSAGE_BYTES);
    let mut acked = 0;
    let mut reader = Some(reader);
    let mut reading = None;
    for n in 1..=MESSAGES {
        sender.send_json(&serde_json::json!(
            {"event": "sendMessage", "args": {"to": "reader", "text": text}, "ack": n}
        ));
        drain_sender(&mut sender, &mut acked, n.saturating_sub(WINDOW));
        // Once the server has given up on the reader, the reader wakes up and reads what it
        // was sent, in the background, while the flood goes on.
        if n % 16 == 0 && reader.is_some() && users_indexed(addr) == 2 {
            let mut r = reader.take().unwrap();
            reading = Some((
                n,
                std::thread::spawn(move || {
                    let mut seen = Vec::new();
                    let code = r.read_until_close(Instant::now() + DEADLINE, &mut seen);
                    (code, seen)
                }),
            ));
        }
    }
    drain_sender(&mut sender, &mut acked, MESSAGES);
    let sent_kib = MESSAGES * MESSAGE_BYTES as u64 / 1024;
    let grew = peak_rss_kib(server.pid()).saturating_sub(rss_before);
    assert!(
        grew < 16 * 1024,
        "server peak RSS grew by {grew} KiB while {sent_kib} KiB were sent to a stalled reader"
    );

    let (closed_after, reading) = reading.expect("the reader was closed during the flood");
    assert!(
        closed_after * (MESSAGE_BYTES as u64) < 8 * 1024 * 1024,
        "closed only after {closed_after} messages"
    );
    let (code, seen) = reading.join().unwrap();
    assert_eq!(
        code,
        Some(4008),
        "after {} frames (opcodes {:?}...)",
        seen.len(),
        &seen[..seen.len().min(8)]
    );
    assert!(!seen.is_empty() && seen.iter().all(|&op| op == 0x1 || op == 0x9));
    assert!((seen.len() as u64) <= closed_after);
    wait_metric(addr, &closed_metric("slow_consumer"), 1);

    // The sender kept working throughout (every send was acked), and still does.
    sender.send_acked("witness", "after the flood", MESSAGES + 1);
    assert_eq!(
        witness.recv_event("newMessage")["args"]["text"],
        "after the flood"
    );
    let h: serde_json::Value = serde_json::from_str(&http_get(addr, "/healthz").1).unwrap();
    assert_eq!(h["connections"], 2, "only the reader was closed: {h}");
}

/// Many stalled readers, each under its own bound: the process-wide budget
/// (`--max-outbound-total-bytes`) closes the biggest of them (4008) until the total fits, while
/// the readers that read and the sender carry on.
#[test]
fn stalled_readers_past_the_process_budget_are_closed_biggest_first() {
    const READERS: usize = 2;
    const BIG: usize = 48 * 1024;
    let server = ChildServer::spawn(&[
        "--rate-limit",
        "0",
        "--sender-bytes-per-minute",
        "0",
        "--max-outbound-bytes",
        &(32 * 1024 * 1024).to_string(),
        "--max-outbound-total-bytes",
        &(512 * 1024).to_string(),
        "--history-max-len",
        "16",
    ]);
    let addr = server.addr;
    let readers: Vec<RawWs> = (0..READERS)
        .map(|n| RawWs::upgrade(small_rcvbuf_stream(addr), &format!("reader{n}")))
        .collect();
    let mut sender = Client::connect(addr, "sender");
    let mut witness = Client::connect(addr, "witness");
    sender.send_acked("witness", "hello", 0);
    assert_eq!(witness.recv_event("newMessage")["args"]["text"], "hello");
    assert_eq!(users_indexed(addr), READERS as u64 + 2);

    // 12 MiB for each reader: under its own bound, even if the kernel took none of it (it takes
    // up to 4 MiB, tcp_wmem), and many times the process budget together.
    let text = "x".repeat(BIG);
    let per_reader = 12 * 1024 * 1024 / BIG as u64;
    let mut acked = 0;
    let mut n: u64 = 0;
    for _ in 0..per_reader {
        for r in 0..READERS {
            n += 1;
            sender.send_json(&serde_json::json!(
                {"event": "sendMessage", "args": {"to": format!("reader{r}"), "text": text}, "ack": n}
            ));
            drain_sender(&mut sender, &mut acked, n.saturating_sub(WINDOW));
        }
    }
    drain_sender(&mut sender, &mut acked, n);
    let closed = wait_metric(addr, &closed_metric("slow_consumer"), 1);
    assert!(closed <= READERS as u64);
    let buffered = metric(addr, "switchboard_outbound_buffered_bytes");
    assert!(buffered <= 512 * 1024, "{buffered} bytes still buffered");
    // The witness and the sender never noticed.
    sender.send_acked("witness", "after", n + 1);
    assert_eq!(witness.recv_event("newMessage")["args"]["text"], "after");
    drop(readers);
}
