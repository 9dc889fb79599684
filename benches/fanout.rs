//! Why encode a dispatch once? Fan-out cost for N recipients, encode-once versus per-recipient.
//!
//! A dispatch to a user reaches every live connection of that user, and a group event reaches
//! many users. The server serializes the event once into a `Utf8Bytes` and gives each recipient
//! a reference-counted clone (what `Context::dispatch` and the core loop's `deliver_local` do).
//! This bench writes one `newMessage` event as a frame to N = 1, 10, 100 and 1000 in-memory
//! WebSockets (queue on each, then flush each once, as the end of a loop turn does), and compares
//! it with serializing the event again for every recipient (what ws-rs style servers did).
//! The difference per recipient is the cost of one JSON serialization and one allocation.
//!
//! Run: `cargo bench --bench fanout`.

use std::hint::black_box;
use std::io::{self, Read, Write};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use serde::Serialize;
use switchboard::protocol::encode_event;
use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::{Message, WebSocket};

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
    to: "room-42",
    text: "see you at the station at six, the usual platform",
    ts: 1_796_020_468_116,
};

/// A socket stand-in that copies each write and keeps only the last one; reads would block.
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

fn recipients(n: usize) -> Vec<WebSocket<Sink>> {
    let config = WebSocketConfig::default()
        .read_buffer_size(switchboard::config::DEFAULT_READ_BUFFER_BYTES)
        .write_buffer_size(64 * 1024)
        .max_write_buffer_size(switchboard::config::DEFAULT_MAX_OUTBOUND_BYTES);
    (0..n)
        .map(|_| WebSocket::from_raw_socket(Sink::default(), Role::Server, Some(config)))
        .collect()
}

fn flush_all(sockets: &mut [WebSocket<Sink>]) {
    for ws in sockets {
        ws.flush().unwrap();
    }
}

fn fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("fanout");
    for n in [1usize, 10, 100, 1000] {
        let mut sockets = recipients(n);
        group.throughput(Throughput::Elements(n as u64));

        group.bench_with_input(BenchmarkId::new("encode_once", n), &n, |b, _| {
            b.iter(|| {
                let frame = encode_event("newMessage", black_box(&MESSAGE)).unwrap();
                for ws in sockets.iter_mut() {
                    ws.write(Message::Text(frame.clone())).unwrap();
                }
                flush_all(&mut sockets);
            })
        });

        group.bench_with_input(BenchmarkId::new("encode_per_recipient", n), &n, |b, _| {
            b.iter(|| {
                for ws in sockets.iter_mut() {
                    let frame = encode_event("newMessage", black_box(&MESSAGE)).unwrap();
                    ws.write(Message::Text(frame)).unwrap();
                }
                flush_all(&mut sockets);
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = fanout
}
criterion_main!(benches);
