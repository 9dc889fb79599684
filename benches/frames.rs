//! What does one message cost on the wire path, before any socket is involved?
//!
//! Three steps every chat message takes through the server, measured alone: encoding the
//! outgoing `newMessage` event ([`switchboard::protocol::encode_event`], done once per dispatch),
//! parsing the client's `sendMessage` envelope ([`switchboard::protocol::parse_envelope`], done
//! once per inbound frame), and tungstenite framing one text message for one recipient and
//! flushing it into an in-memory stream (done once per recipient). The WebSocket is configured
//! as the server configures it (2 KiB read buffer, 64 KiB write threshold, 1 MiB write bound).
//!
//! Run: `cargo bench --bench frames` (add `-- --quick` for a rough figure in seconds).

use std::hint::black_box;
use std::io::{self, Read, Write};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde::Serialize;
use switchboard::protocol::{encode_event, parse_envelope};
use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::{Message, WebSocket};

/// The `newMessage` arguments as the built-in `sendMessage` handler sends them.
#[derive(Serialize)]
struct NewMessage<'a> {
    id: &'a str,
    from: &'a str,
    to: &'a str,
    text: &'a str,
    ts: u64,
}

const MESSAGE: NewMessage<'static> = NewMessage {
    id: "7a157e12a77b34cd0000000000000001",
    from: "alice",
    to: "bob",
    text: "see you at the station at six, the usual platform",
    ts: 1_796_020_468_116,
};

const ENVELOPE: &str = r#"{"event":"sendMessage","args":{"to":"bob","text":"see you at the station at six, the usual platform"},"ack":42}"#;

/// A socket stand-in: writes copy into a buffer that keeps only the last write (so memory stays
/// flat over millions of iterations), reads would block.
#[derive(Default)]
struct Sink {
    last: Vec<u8>,
}

impl Read for Sink {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.last.clear();
        self.last.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The server's WebSocket settings at their defaults (see `Server::start`).
fn server_ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(switchboard::config::DEFAULT_READ_BUFFER_BYTES)
        .write_buffer_size(64 * 1024)
        .max_write_buffer_size(switchboard::config::DEFAULT_MAX_OUTBOUND_BYTES)
}

fn frames(c: &mut Criterion) {
    let mut group = c.benchmark_group("frames");
    group.throughput(Throughput::Elements(1));

    group.bench_function("encode_new_message", |b| {
        b.iter(|| encode_event(black_box("newMessage"), black_box(&MESSAGE)).unwrap())
    });

    group.bench_function("parse_envelope", |b| {
        b.iter(|| {
            let env = parse_envelope(black_box(ENVELOPE)).unwrap();
            black_box((env.event.len(), env.args.map(|a| a.get().len()), env.ack))
        })
    });

    let frame = encode_event("newMessage", &MESSAGE).unwrap();
    let mut ws =
        WebSocket::from_raw_socket(Sink::default(), Role::Server, Some(server_ws_config()));
    group.bench_function("write_flush_one_recipient", |b| {
        b.iter(|| {
            ws.write(Message::Text(frame.clone())).unwrap();
            ws.flush().unwrap();
        })
    });
    // One unmasked frame and nothing else: a 2-byte header, plus 2 length bytes past 125 bytes.
    // (Nothing was written when a name filter skipped the benchmark.)
    let header = if frame.len() <= 125 { 2 } else { 4 };
    let written = ws.get_ref().last.len();
    assert!(
        written == 0 || written == header + frame.len(),
        "{written} bytes"
    );
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = frames
}
criterion_main!(benches);
