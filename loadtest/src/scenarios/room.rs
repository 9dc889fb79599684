//! `room`: one big room. `--users` members (each with `--devices` connections, spread
//! round-robin over `--addr`) join a room named after the run; member 0 sends room messages
//! at `--rate` for `--duration`. Every member device is owed every message: the report gives
//! deliveries per second, loss, duplicates and the send-to-delivery latency.
//!
//! One thread, one `mio::Poll` over every connection: a room message wakes every member, and a
//! thread per device would spend the server's CPUs on context switches. The timestamp travels
//! in the text (`rm:<seq>:<µs since start>`), so latency needs no clock shared between processes.

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use memchr::memmem;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::cli::Args;
use crate::rng;
use crate::scenarios::marker::number_after;
use crate::transport::blocking;
use crate::transport::codec::{self, Parse};
use crate::transport::nonblocking::{ReadResult, WsStream};
use crate::transport::token;

const MAX_PAYLOAD: usize = 1 << 20;
/// How long the joins, and then the warm-up (a message every member device has seen), may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);

struct Conn {
    ws: WsStream,
    /// Highest message seq seen (messages of one sender arrive in order).
    last_seq: Option<u64>,
    delivered: u64,
    duplicates: u64,
    warm: bool,
    acked: bool,
}

/// The outcome, printed and (with `--json`) emitted as JSON.
#[derive(Debug, serde::Serialize)]
pub struct RoomReport {
    pub room: String,
    pub members: u64,
    pub devices: u64,
    pub sent: u64,
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub send_seconds: f64,
    pub deliveries_per_sec: f64,
    pub messages_per_sec: f64,
    pub latency_ms_p50: f64,
    pub latency_ms_p99: f64,
    pub latency_ms_p999: f64,
    pub latency_ms_max: f64,
}

fn write_frame(conn: &mut Conn, payload: &str, rnd: &mut u64) {
    conn.ws.queue_text(payload.as_bytes(), rnd);
    flush(conn);
}

/// Writes what the socket takes; the writable event flushes the rest. A failed socket is
/// not judged here: its member's deliveries will be missing.
fn flush(conn: &mut Conn) {
    let _ = conn.ws.flush();
}

pub fn run(args: &Args) -> Result<RoomReport, String> {
    let room = format!("loadtest-{}", rng::run_id());
    let mut rnd = args.seed.unwrap_or(0x700d);
    let minter = token::Minter::new(args.jwt_secret.as_deref(), args.jwt_ttl);
    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    let mut conns: Vec<Conn> = Vec::new();
    // (user index, conn index) of each user's first device: it joins and, for user 0, sends.
    let mut firsts = Vec::new();
    let started = Instant::now();
    for u in 0..args.users {
        let user = format!("{}{u}", args.user_prefix);
        let path = minter.native_path(args.ws_path(), &user)?;
        for d in 0..args.devices {
            let addr: SocketAddr =
                args.addrs[(u as usize * args.devices as usize + d as usize) % args.addrs.len()];
            let timeout = Duration::from_secs_f64(args.connect_timeout);
            let (std_stream, leftover) = blocking::connect(addr, &path, &mut rnd, timeout)
                .map_err(|e| format!("connecting {user} to {addr}: {e}"))?;
            std_stream
                .set_nonblocking(true)
                .map_err(|e| e.to_string())?;
            let mut stream = TcpStream::from_std(std_stream);
            let token = Token(conns.len());
            poll.registry()
                .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                .map_err(|e| e.to_string())?;
            if d == 0 {
                firsts.push(conns.len());
            }
            conns.push(Conn {
                ws: WsStream::upgraded(stream, leftover),
                last_seq: None,
                delivered: 0,
                duplicates: 0,
                warm: false,
                acked: false,
            });
        }
    }
    if !args.quiet {
        eprintln!(
            "room: {} connections open in {:.1}s; joining {room}",
            conns.len(),
            started.elapsed().as_secs_f64()
        );
    }
    let join = format!(r#"{{"event":"joinRoom","args":{{"room":"{room}"}},"ack":1}}"#);
    for &i in &firsts {
        write_frame(&mut conns[i], &join, &mut rnd);
    }
    let mut reader = Reader {
        events: Events::with_capacity(1024),
        scratch: vec![0u8; 64 * 1024],
    };
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?;
    let base = Instant::now();
    let marker = b"\"text\":\"rm:";
    // Setup: every join acked, then a warm-up message every device has seen.
    let deadline = Instant::now() + SETUP_TIMEOUT;
    let mut next_warm = Instant::now();
    let sender = firsts[0];
    loop {
        let all_acked = firsts.iter().all(|&i| conns[i].acked);
        if all_acked && conns.iter().all(|c| c.warm) {
            break;
        }
        if Instant::now() >= deadline {
            let warm = conns.iter().filter(|c| c.warm).count();
            return Err(format!(
                "setup timed out: {warm} of {} devices saw the warm-up",
                conns.len()
            ));
        }
        if all_acked && Instant::now() >= next_warm {
            let frame = format!(
                r#"{{"event":"sendRoomMessage","args":{{"room":"{room}","text":"warm"}}}}"#
            );
            write_frame(&mut conns[sender], &frame, &mut rnd);
            next_warm = Instant::now() + Duration::from_millis(500);
        }
        let timeout = Duration::from_millis(50);
        reader.turn(&mut poll, timeout, &mut conns, &mut rnd, |conn, payload| {
            if memmem::find(payload, b"\"event\":\"ack\"").is_some() {
                conn.acked = true;
            } else if memmem::find(payload, b"\"text\":\"warm\"").is_some() {
                conn.warm = true;
            } else if memmem::find(payload, b"\"event\":\"error\"").is_some() {
                eprintln!(
                    "room: error from the server: {}",
                    String::from_utf8_lossy(payload)
                );
            }
        })?;
    }
    if !args.quiet {
        eprintln!("room: every device is in; sending {} messages/s", args.rate);
    }
    // Sending, open loop, then the drain.
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    // `--size`: each message's text padded to about that many bytes (after the numbers).
    let pad = if args.size > 0 {
        format!(":{}", "x".repeat(args.size))
    } else {
        String::new()
    };
    let send_for = Duration::from_secs_f64(args.duration);
    let send_start = Instant::now();
    let mut sent = 0u64;
    let end = send_start + send_for + Duration::from_secs_f64(args.drain);
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        while now < send_start + send_for && send_start + interval * sent as u32 <= now {
            let us = base.elapsed().as_micros();
            let frame = format!(
                r#"{{"event":"sendRoomMessage","args":{{"room":"{room}","text":"rm:{sent}:{us}{pad}"}}}}"#
            );
            write_frame(&mut conns[sender], &frame, &mut rnd);
            sent += 1;
        }
        let next_send = send_start + interval * sent as u32;
        let wait = if next_send < send_start + send_for {
            next_send.saturating_duration_since(Instant::now())
        } else {
            end.saturating_duration_since(Instant::now())
        };
        let timeout = wait.min(Duration::from_millis(100));
        reader.turn(&mut poll, timeout, &mut conns, &mut rnd, |conn, payload| {
            let Some(at) = memmem::find(payload, marker) else {
                return;
            };
            let rest = &payload[at + marker.len()..];
            let Some(seq) = number_after(rest, b"") else {
                return;
            };
            let colon = rest.iter().position(|&b| b == b':').unwrap_or(0);
            let Some(us) = number_after(&rest[colon..], b":") else {
                return;
            };
            if conn.last_seq.is_some_and(|last| seq <= last) {
                conn.duplicates += 1;
                return;
            }
            conn.last_seq = Some(seq);
            conn.delivered += 1;
            let now_us = base.elapsed().as_micros() as u64;
            let _ = hist.record(now_us.saturating_sub(us).max(1));
        })?;
    }
    let send_seconds = send_for.as_secs_f64();
    let leave = format!(r#"{{"event":"leaveRoom","args":{{"room":"{room}"}}}}"#);
    for &i in &firsts {
        write_frame(&mut conns[i], &leave, &mut rnd);
    }
    // Let the leaves go out before the sockets close.
    std::thread::sleep(Duration::from_millis(200));
    let delivered: u64 = conns.iter().map(|c| c.delivered).sum();
    let expected = sent * conns.len() as u64;
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    Ok(RoomReport {
        room,
        members: args.users,
        devices: conns.len() as u64,
        sent,
        expected,
        delivered,
        lost: expected.saturating_sub(delivered),
        duplicated: conns.iter().map(|c| c.duplicates).sum(),
        send_seconds,
        deliveries_per_sec: delivered as f64 / send_seconds,
        messages_per_sec: sent as f64 / send_seconds,
        latency_ms_p50: ms(0.5),
        latency_ms_p99: ms(0.99),
        latency_ms_p999: ms(0.999),
        latency_ms_max: hist.max() as f64 / 1000.0,
    })
}

/// The reading side, kept for the whole run: zeroing a 64 KiB buffer per poll would cost the
/// CPUs the generator shares with the servers.
struct Reader {
    events: Events,
    scratch: Vec<u8>,
}

impl Reader {
    /// Waits up to `timeout` for readiness, then reads every ready connection ([`pump`]).
    fn turn(
        &mut self,
        poll: &mut Poll,
        timeout: Duration,
        conns: &mut [Conn],
        rnd: &mut u64,
        on_text: impl FnMut(&mut Conn, &[u8]),
    ) -> Result<(), String> {
        poll.poll(&mut self.events, Some(timeout))
            .map_err(|e| e.to_string())?;
        pump(&self.events, conns, rnd, &mut self.scratch, on_text);
        Ok(())
    }
}

/// Reads every ready connection until it is drained and hands each text frame to `on_text`;
/// answers pings; flushes pending output on writable.
fn pump(
    events: &Events,
    conns: &mut [Conn],
    rnd: &mut u64,
    tmp: &mut [u8],
    mut on_text: impl FnMut(&mut Conn, &[u8]),
) {
    for event in events.iter() {
        let Some(conn) = conns.get_mut(event.token().0) else {
            continue;
        };
        if event.is_writable() {
            flush(conn);
        }
        if !event.is_readable() {
            continue;
        }
        while let ReadResult::Data(n) = conn.ws.read(tmp) {
            conn.ws.rbuf.extend_from_slice(&tmp[..n]);
            if n < tmp.len() {
                // A short read drained the socket: edge-triggered readiness reports what comes
                // later, so the read that would only say WouldBlock is skipped (one syscall per
                // delivery, on a box the generator shares with the servers).
                break;
            }
        }
        // Taken out of the connection while its frames are handed over: no copy per frame.
        let mut buf = std::mem::take(&mut conn.ws.rbuf);
        let mut at = 0;
        while let Parse::Frame(h) = codec::parse_frame(&buf[at..], MAX_PAYLOAD) {
            let payload = &buf[at + h.header_len..at + h.total_len()];
            match h.opcode {
                codec::OP_TEXT => on_text(conn, payload),
                codec::OP_PING => {
                    conn.ws.queue_pong(payload, rnd);
                    flush(conn);
                }
                _ => {}
            }
            at += h.total_len();
        }
        buf.drain(..at);
        conn.ws.rbuf = buf;
    }
}

pub fn print(r: &RoomReport, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(
        out,
        "room {}: {} members, {} devices; {} messages in {:.1}s ({:.0}/s)",
        r.room, r.members, r.devices, r.sent, r.send_seconds, r.messages_per_sec
    )?;
    writeln!(
        out,
        "  deliveries: {} of {} expected ({:.0}/s), lost {}, duplicated {}",
        r.delivered, r.expected, r.deliveries_per_sec, r.lost, r.duplicated
    )?;
    writeln!(
        out,
        "  latency ms: p50 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        r.latency_ms_p50, r.latency_ms_p99, r.latency_ms_p999, r.latency_ms_max
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_numbers_in_a_text() {
        let payload = br#"{"event":"newMessage","args":{"text":"rm:42:1234567"}}"#;
        let at = memmem::find(payload, b"\"text\":\"rm:").unwrap() + 11;
        assert_eq!(number_after(&payload[at..], b""), Some(42));
        assert_eq!(number_after(&payload[at..], b":"), Some(1_234_567));
        assert_eq!(number_after(b"x", b":"), None);
    }
}
