//! `soak`: steady load while the servers and Redis are killed under it (see `soak.sh`).
//!
//! Unlike the mio scenarios this one favours simplicity over scale: one blocking thread per
//! device (the soak runs ~100 devices) plus one sender thread. A device whose connection
//! drops (close, reset, refused, timeout) reconnects with backoff (200 ms doubling to 2 s),
//! round-robin to the next `--addr`, with `?since=<last offset it received>`, until the run
//! ends. Deliveries are deduplicated per device by message seq: the server promises no gap
//! and no duplicate at the resume seam, so any second delivery of a seq is a duplicate.
//!
//! Every message carries an `ack` number and a `clientId`. The server acknowledges a message
//! only once it is stored (with Redis: appended to the history by Redis), so the sender keeps
//! each unacknowledged message and writes it again, same `clientId`, every
//! [`RESEND_AFTER`] through whatever connection its device has then (the server stores a
//! `clientId` once), until it is acknowledged or the run (drain included) ends.
//!
//! A message is *owed* to every device of its recipient and of its sender once it was
//! acknowledged, or once any device received it (then it was stored). A message never
//! acknowledged and seen by no device is *unconfirmed*: its sender knows it was not taken, which
//! is not a loss. A first write to a device that is disconnected is counted in `send_failed`
//! and retried like any unacknowledged message.

//!
//! This file owns the devices and the sender; `report` the accounting and its printing.

mod report;

pub use report::{print, SoakReport};

use crate::cli::Args;
use crate::rng::{self, splitmix64};
use crate::scenarios::marker::{self, Classifier, Frame};
use crate::transport::blocking;
use crate::transport::codec::{self, Parse};
use crate::transport::token;
use memchr::memmem;
use report::account;
use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
const MAX_PAYLOAD: usize = 16 << 20;
/// An unacknowledged message is written again this long after its previous attempt.
pub const RESEND_AFTER: Duration = Duration::from_secs(3);

/// One message of the run.
struct Sent {
    from: u32,
    to: u32,
    /// Index in `--addr` of the instance its first successful write went to (`u8::MAX`: none).
    via: u8,
}

/// A message not acknowledged yet, as the sender keeps it for resending.
struct Unacked {
    seq: u64,
    from_dev: usize,
    /// The text frame payload (unmasked), written again as is.
    payload: Vec<u8>,
    last_attempt: Option<Instant>,
}

/// What one device saw, kept behind a mutex and read at the end.
#[derive(Default)]
struct DeviceLog {
    seen: HashSet<u64>,
    duplicates: u64,
    reconnects: u64,
    /// Reconnects made without an offset (nothing received yet): live only, may miss events.
    resumes_without_offset: u64,
    recovered_complete: u64,
    recovered_incomplete: u64,
    connect_failures: u64,
    last_offset: Option<String>,
}

struct Device {
    user: u32,
    index: u32,
    /// Write half of the current connection and the index of its address; None while
    /// disconnected.
    writer: Mutex<Option<(TcpStream, u8)>>,
    log: Mutex<DeviceLog>,
}

/// The top-level `"offset":"A-B"` of a server frame: the last occurrence (the top-level key
/// follows `args` in the server's frames, and our texts cannot contain a quote).
pub fn find_offset(payload: &[u8]) -> Option<&str> {
    const KEY: &[u8] = b"\"offset\":\"";
    let at = memmem::rfind(payload, KEY)? + KEY.len();
    let rest = &payload[at..];
    let end = memchr::memchr(b'"', rest)?;
    let s = std::str::from_utf8(&rest[..end]).ok()?;
    let (a, b) = s.split_once('-')?;
    (!a.is_empty()
        && !b.is_empty()
        && a.bytes().all(|c| c.is_ascii_digit())
        && b.bytes().all(|c| c.is_ascii_digit()))
    .then_some(s)
}

/// `Some(complete)` for a `recovered` event.
pub fn recovered_complete(payload: &[u8]) -> Option<bool> {
    memmem::find(payload, b"\"recovered\"")?;
    if memmem::find(payload, b"\"complete\":true").is_some() {
        Some(true)
    } else {
        Some(false)
    }
}

struct Ctx {
    addrs: Vec<SocketAddr>,
    run_id: String,
    stop: AtomicBool,
    connected: AtomicU64,
    /// Seqs the server acknowledged.
    acked: Mutex<HashSet<u64>>,
    /// `unavailable` errors received (the server could not hand a message to Redis).
    refused: AtomicU64,
}

/// One device's life: connect, read, reconnect, until `stop`.
fn device_loop(ctx: &Ctx, dev: &Device, base_path: &str, seed: u64) {
    let classifier = Classifier::new(&ctx.run_id);
    let mut rnd = seed;
    let mut addr_i = (dev.user as usize + dev.index as usize) % ctx.addrs.len();
    let mut backoff = BACKOFF_MIN;
    let mut first = true;
    while !ctx.stop.load(Ordering::Relaxed) {
        let since = dev.log.lock().unwrap().last_offset.clone();
        let path = match &since {
            Some(o) => format!("{base_path}&since={o}"),
            None => base_path.to_owned(),
        };
        let addr = ctx.addrs[addr_i];
        match blocking::connect(addr, &path, &mut rnd, Duration::from_secs(2)) {
            Err(_) => {
                dev.log.lock().unwrap().connect_failures += 1;
                addr_i = (addr_i + 1) % ctx.addrs.len();
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
            Ok((stream, leftover)) => {
                {
                    let mut log = dev.log.lock().unwrap();
                    if !first {
                        log.reconnects += 1;
                        if since.is_none() {
                            log.resumes_without_offset += 1;
                        }
                    }
                }
                if first {
                    ctx.connected.fetch_add(1, Ordering::Relaxed);
                }
                first = false;
                backoff = BACKOFF_MIN;
                stream
                    .set_read_timeout(Some(Duration::from_millis(200)))
                    .ok();
                *dev.writer.lock().unwrap() = stream.try_clone().ok().map(|w| (w, addr_i as u8));
                read_until_drop(ctx, dev, stream, leftover, &classifier, &mut rnd);
                *dev.writer.lock().unwrap() = None;
                if !ctx.stop.load(Ordering::Relaxed) {
                    addr_i = (addr_i + 1) % ctx.addrs.len();
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

fn read_until_drop(
    ctx: &Ctx,
    dev: &Device,
    mut stream: TcpStream,
    mut buf: Vec<u8>,
    classifier: &Classifier,
    rnd: &mut u64,
) {
    let mut tmp = vec![0u8; 64 << 10];
    loop {
        // Parse every complete frame in the buffer.
        loop {
            match codec::parse_frame(&buf, MAX_PAYLOAD) {
                Parse::Incomplete => break,
                Parse::Error(_) => return,
                Parse::Frame(h) => {
                    let payload = &buf[h.header_len..h.total_len()];
                    match h.opcode {
                        codec::OP_CLOSE => return,
                        codec::OP_PING => {
                            let mut out = Vec::new();
                            codec::encode_pong(&mut out, payload, codec::mask(rnd));
                            if let Some((w, _)) = dev.writer.lock().unwrap().as_mut() {
                                let _ = w.write_all(&out);
                            }
                        }
                        codec::OP_TEXT => on_text(ctx, dev, payload, classifier),
                        _ => {}
                    }
                    let n = h.total_len();
                    buf.drain(..n);
                }
            }
        }
        if ctx.stop.load(Ordering::Relaxed) {
            return;
        }
        match stream.read(&mut tmp) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// `Some((ack number, is an error))` for an `ack` or `error` answer.
pub fn answer_of(payload: &[u8]) -> Option<(u64, bool)> {
    let error = if payload.starts_with(b"{\"event\":\"ack\"") {
        false
    } else if payload.starts_with(b"{\"event\":\"error\"") {
        true
    } else {
        return None;
    };
    Some((marker::number_after(payload, b"\"ack\":")?, error))
}

fn on_text(ctx: &Ctx, dev: &Device, payload: &[u8], classifier: &Classifier) {
    if let Some((seq, error)) = answer_of(payload) {
        if error {
            ctx.refused.fetch_add(1, Ordering::Relaxed);
        } else {
            ctx.acked.lock().unwrap().insert(seq);
        }
        return;
    }
    let mut log = dev.log.lock().unwrap();
    if let Some(complete) = recovered_complete(payload) {
        if complete {
            log.recovered_complete += 1;
        } else {
            log.recovered_incomplete += 1;
        }
        return;
    }
    if let Some(o) = find_offset(payload) {
        log.last_offset = Some(o.to_owned());
    }
    if let Frame::Delivery { seq, .. } = classifier.classify(payload) {
        if !log.seen.insert(seq) {
            log.duplicates += 1;
        }
    }
}

pub fn run(args: &Args) -> Result<SoakReport, String> {
    let run_id = rng::run_id();
    let seed = args.seed.unwrap_or(0x50a4);
    let users = args.users as u32;
    let minter = token::Minter::new(args.jwt_secret.as_deref(), args.jwt_ttl);
    let user_ids: Vec<String> = (0..users)
        .map(|u| format!("{}{u}", args.user_prefix))
        .collect();
    let mut paths = Vec::new();
    for id in &user_ids {
        paths.push(minter.native_path(args.ws_path(), id)?);
    }
    let ctx = Arc::new(Ctx {
        addrs: args.addrs.clone(),
        run_id: run_id.clone(),
        stop: AtomicBool::new(false),
        connected: AtomicU64::new(0),
        acked: Mutex::new(HashSet::new()),
        refused: AtomicU64::new(0),
    });
    let devices: Arc<Vec<Device>> = Arc::new(
        (0..users)
            .flat_map(|u| (0..args.devices).map(move |d| (u, d)))
            .map(|(user, index)| Device {
                user,
                index,
                writer: Mutex::new(None),
                log: Mutex::new(DeviceLog::default()),
            })
            .collect(),
    );
    eprintln!(
        "loadtest soak: run {run_id}, {} devices to {} address(es), {} msg/s for {} s",
        devices.len(),
        ctx.addrs.len(),
        args.rate,
        args.duration
    );
    let mut handles = Vec::new();
    for i in 0..devices.len() {
        let (ctx, devices) = (ctx.clone(), devices.clone());
        let path = paths[devices[i].user as usize].clone();
        let s = splitmix64(seed ^ (i as u64 + 1));
        handles.push(
            std::thread::Builder::new()
                .stack_size(256 << 10)
                .spawn(move || device_loop(&ctx, &devices[i], &path, s))
                .map_err(|e| e.to_string())?,
        );
    }
    // Wait for the first connection of every device (bounded), then for the servers'
    // subscriptions: a connection without `since` only gets what follows the subscription.
    let t0 = Instant::now();
    while ctx.connected.load(Ordering::Relaxed) < devices.len() as u64
        && t0.elapsed() < Duration::from_secs_f64(args.connect_timeout)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "loadtest soak: {}/{} devices connected",
        ctx.connected.load(Ordering::Relaxed),
        devices.len()
    );
    std::thread::sleep(Duration::from_secs(1));

    // Sender: open loop at --rate, random sender device, random recipient; between sends,
    // unacknowledged messages are written again.
    let mut sent: Vec<Sent> = Vec::new();
    let mut unacked: Vec<Unacked> = Vec::new();
    let mut send_failed = 0u64;
    let mut resent = 0u64;
    let mut rnd = splitmix64(seed);
    let start = Instant::now();
    let duration = Duration::from_secs_f64(args.duration);
    let drain_end = duration + Duration::from_secs_f64(args.drain);
    let mut out = Vec::with_capacity(256);
    let mut last_progress = 0u64;
    let mut seq = 0u64;
    let mut next_resend_scan = start;
    loop {
        let now = Instant::now();
        let elapsed = now.duration_since(start);
        if elapsed >= drain_end {
            break;
        }
        if now >= next_resend_scan {
            next_resend_scan = now + Duration::from_millis(100);
            let acked = ctx.acked.lock().unwrap().clone();
            unacked.retain(|u| !acked.contains(&u.seq));
            for u in unacked.iter_mut() {
                if u.last_attempt
                    .is_some_and(|t| now.duration_since(t) < RESEND_AFTER)
                {
                    continue;
                }
                out.clear();
                codec::encode_frame(&mut out, codec::OP_TEXT, &u.payload, codec::mask(&mut rnd));
                if let Some(via) = write_via(&devices[u.from_dev], &out) {
                    if u.last_attempt.is_some() {
                        resent += 1;
                    }
                    u.last_attempt = Some(now);
                    let s = &mut sent[u.seq as usize];
                    if s.via == u8::MAX {
                        s.via = via;
                    }
                }
            }
        }
        if elapsed >= duration {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let due = start + Duration::from_secs_f64(seq as f64 / args.rate);
        if due > now {
            std::thread::sleep((due - now).min(Duration::from_millis(50)));
            continue;
        }
        rnd = splitmix64(rnd);
        let from_dev = (rnd % devices.len() as u64) as usize;
        let to = ((rnd >> 32) % u64::from(users)) as u32;
        let from = devices[from_dev].user;
        let mut payload = Vec::with_capacity(256);
        let intended_ns = start.elapsed().as_nanos() as u64;
        write_soak_message(
            &mut payload,
            &user_ids[to as usize],
            &run_id,
            seq,
            intended_ns,
            args.size,
        );
        out.clear();
        codec::encode_frame(&mut out, codec::OP_TEXT, &payload, codec::mask(&mut rnd));
        let via = write_via(&devices[from_dev], &out);
        if via.is_none() {
            send_failed += 1;
        }
        sent.push(Sent {
            from,
            to,
            via: via.unwrap_or(u8::MAX),
        });
        unacked.push(Unacked {
            seq,
            from_dev,
            payload,
            last_attempt: via.map(|_| Instant::now()),
        });
        seq += 1;
        let secs = start.elapsed().as_secs();
        if secs > last_progress && !args.quiet {
            last_progress = secs;
            let up = devices
                .iter()
                .filter(|d| d.writer.lock().unwrap().is_some())
                .count();
            eprintln!(
                "soak t={secs:>3}s sent={seq} send_failed={send_failed} unacked={} resent={resent} devices_up={up}/{}",
                unacked.len(),
                devices.len()
            );
        }
    }
    ctx.stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    let acked = ctx.acked.lock().unwrap().clone();
    let mut r = account(&run_id, &user_ids, &devices, &sent, &acked, send_failed);
    r.resent = resent;
    r.refused = ctx.refused.load(Ordering::Relaxed);
    r.lost_everywhere_by_addr.resize(args.addrs.len(), 0);
    if let Some((a, b)) = r.lost_everywhere_span_s {
        r.lost_everywhere_span_s = Some((a / args.rate, b / args.rate));
    }
    Ok(r)
}

/// Writes `frame` on the device's current connection; the `--addr` index it went to, or `None`
/// when the device is disconnected or the write failed.
fn write_via(dev: &Device, frame: &[u8]) -> Option<u8> {
    match dev.writer.lock().unwrap().as_mut() {
        Some((w, via)) => w.write_all(frame).is_ok().then_some(*via),
        None => None,
    }
}

/// The generator's marked `sendMessage`, with `clientId` `<run>-<seq>` and `ack` `seq`.
pub fn write_soak_message(
    out: &mut Vec<u8>,
    to: &str,
    run_id: &str,
    seq: u64,
    intended_ns: u64,
    pad_to: usize,
) {
    marker::write_send_message(out, to, run_id, seq, intended_ns, pad_to);
    // The marked message ends with `"}}`: reopen `args` after the text.
    out.truncate(out.len() - 2);
    let _ = write!(out, ",\"clientId\":\"{run_id}-{seq}\"}},\"ack\":{seq}}}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_is_the_top_level_one() {
        let f = br#"{"event":"newMessage","args":{"from":"u1","text":"lt:a:1:2"},"offset":"17-3"}"#;
        assert_eq!(find_offset(f), Some("17-3"));
        assert_eq!(find_offset(br#"{"event":"ack","ack":1}"#), None);
        assert_eq!(find_offset(br#"{"offset":"x-1"}"#), None);
    }

    #[test]
    fn soak_messages_carry_client_id_and_ack() {
        let mut out = Vec::new();
        write_soak_message(&mut out, "u3", "ab12", 7, 1000, 0);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["ack"], 7);
        assert_eq!(v["args"]["clientId"], "ab12-7");
        assert_eq!(v["args"]["to"], "u3");
        assert_eq!(
            answer_of(br#"{"event":"ack","ack":7,"args":{}}"#),
            Some((7, false))
        );
        let e = br#"{"event":"error","ack":9,"args":{"code":"unavailable"}}"#;
        assert_eq!(answer_of(e), Some((9, true)));
        assert_eq!(answer_of(br#"{"event":"newMessage","args":{}}"#), None);
    }

    #[test]
    fn recovered_flag() {
        let t = br#"{"event":"recovered","args":{"complete":true,"offset":"1-2"}}"#;
        let f = br#"{"event":"recovered","args":{"complete":false,"offset":null}}"#;
        assert_eq!(recovered_complete(t), Some(true));
        assert_eq!(recovered_complete(f), Some(false));
        assert_eq!(recovered_complete(b"{\"event\":\"newMessage\"}"), None);
    }
}
