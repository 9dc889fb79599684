//! Test-only stand-in for the switchboard server (blocking, thread per connection), so the
//! event loops, codec and accounting can be exercised end to end inside `cargo test`.
//! It can misbehave on purpose: duplicate or drop every n-th delivery. With `socketio` it
//! speaks Engine.IO v4 / Socket.IO v5 framing like a socket.io v4 server (default namespace).

use crate::transport::codec;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Clone, Copy, Default)]
pub struct Faults {
    pub duplicate_every: u64,
    pub drop_every: u64,
    /// Speak Socket.IO (Engine.IO open, CONNECT ack, `42[...]` events, a heartbeat ping).
    pub socketio: bool,
    /// Socket.IO: answer this user's CONNECT with CONNECT_ERROR.
    pub reject_user: Option<&'static str>,
}

type Registry = Arc<Mutex<HashMap<String, Vec<TcpStream>>>>;

/// Starts a server that accepts exactly `conns` connections; returns its address.
pub fn start(conns: usize, faults: Faults) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let reg: Registry = Arc::default();
    let counter = Arc::new(AtomicU64::new(0));
    let live = Arc::new(AtomicU64::new(0));
    std::thread::spawn(move || {
        for stream in listener.incoming().take(conns).flatten() {
            let reg = Arc::clone(&reg);
            let counter = Arc::clone(&counter);
            let live = Arc::clone(&live);
            std::thread::spawn(move || {
                live.fetch_add(1, Ordering::Relaxed);
                let _ = serve(stream, &reg, &counter, &live, faults);
                live.fetch_sub(1, Ordering::Relaxed);
            });
        }
    });
    addr
}

/// Builds an unmasked server frame, as the server would send it.
pub fn server_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![(if fin { 0x80 } else { 0 }) | opcode];
    let n = payload.len();
    if n < 126 {
        v.push(n as u8);
    } else if n <= 65535 {
        v.push(126);
        v.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        v.push(127);
        v.extend_from_slice(&(n as u64).to_be_bytes());
    }
    v.extend_from_slice(payload);
    v
}

fn serve(
    mut s: TcpStream,
    reg: &Registry,
    counter: &AtomicU64,
    live: &AtomicU64,
    f: Faults,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b)?;
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    if head.starts_with("GET /healthz ") {
        // Open connections, this request excluded.
        let body = format!(
            r#"{{"status":"ok","connections":{},"per_core":[]}}"#,
            live.load(Ordering::Relaxed) - 1
        );
        return s.write_all(format!("HTTP/1.1 200 OK\r\n\r\n{body}").as_bytes());
    }
    let user = head
        .split_once("token=")
        .and_then(|(_, r)| r.split_whitespace().next())
        .unwrap_or("")
        .to_owned();
    let key = head
        .lines()
        .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
        .unwrap_or("")
        .trim()
        .to_owned();
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        codec::accept_for(&key)
    );
    if f.socketio {
        s.write_all(resp.as_bytes())?;
        s.write_all(&server_frame(
                true,
            codec::OP_TEXT,
            br#"0{"sid":"e1","upgrades":[],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}"#,
        ))?;
        let (op, connect) = read_frame(&mut s)?;
        let want = format!("40{{\"token\":\"{user}\"}}");
        if op != codec::OP_TEXT || connect != want.as_bytes() {
            return Ok(());
        }
        if f.reject_user == Some(user.as_str()) {
            s.write_all(&server_frame(
                true,
                codec::OP_TEXT,
                br#"44{"message":"unauthorized"}"#,
            ))?;
            return Ok(());
        }
        let mut map = reg.lock().expect("registry");
        s.write_all(&server_frame(true, codec::OP_TEXT, br#"40{"sid":"s1"}"#))?;
        s.write_all(&server_frame(true, codec::OP_TEXT, b"2"))?;
        map.entry(user.clone()).or_default().push(s.try_clone()?);
    } else {
        let mut map = reg.lock().expect("registry");
        s.write_all(resp.as_bytes())?;
        s.write_all(&server_frame(true, codec::OP_PING, b"hi"))?;
        map.entry(user.clone()).or_default().push(s.try_clone()?);
    }
    loop {
        // Shutting the socket down (not just dropping this handle) also ends the registry's
        // clone of it, so the client sees the connection end.
        let (op, payload) = match read_frame(&mut s) {
            Ok(f) => f,
            Err(e) => {
                let _ = s.shutdown(std::net::Shutdown::Both);
                return Err(e);
            }
        };
        match op {
            codec::OP_CLOSE => {
                let _ = s.write_all(&server_frame(true, codec::OP_CLOSE, &payload));
                let _ = s.shutdown(std::net::Shutdown::Both);
                return Ok(());
            }
            codec::OP_TEXT => {}
            _ => continue,
        }
        let (v, out) = if f.socketio {
            // Only events; pongs ("3") and anything else are ignored.
            let Some(json) = payload.strip_prefix(b"42") else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_slice(json)?;
            (v[1].clone(), "42")
        } else {
            (serde_json::from_slice(&payload)?, "")
        };
        let to = v["args"]["to"].as_str().unwrap_or("").to_owned();
        let event = serde_json::json!({
            "event": "newMessage",
            "args": {"id": "x", "from": user, "to": to, "text": v["args"]["text"], "ts": 0},
            "offset": "0-0",
        });
        let body = if f.socketio {
            format!("{out}{}", serde_json::json!(["message", event]))
        } else {
            event.to_string()
        };
        let frame = server_frame(true, codec::OP_TEXT, body.as_bytes());
        let mut map = reg.lock().expect("registry");
        let mut users = vec![to.clone()];
        if to != user {
            users.push(user.clone());
        }
        for u in users {
            for t in map.get_mut(&u).into_iter().flatten() {
                let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
                if f.drop_every > 0 && n % f.drop_every == 0 {
                    continue;
                }
                let _ = t.write_all(&frame);
                if f.duplicate_every > 0 && n % f.duplicate_every == 0 {
                    let _ = t.write_all(&frame);
                }
            }
        }
    }
}

/// Reads one client frame (masked), returns its opcode and unmasked payload.
fn read_frame(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    s.read_exact(&mut h)?;
    let mut len = u64::from(h[1] & 0x7F);
    if len == 126 {
        let mut e = [0u8; 2];
        s.read_exact(&mut e)?;
        len = u64::from(u16::from_be_bytes(e));
    } else if len == 127 {
        let mut e = [0u8; 8];
        s.read_exact(&mut e)?;
        len = u64::from_be_bytes(e);
    }
    let mut mask = [0u8; 4];
    s.read_exact(&mut mask)?;
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload)?;
    codec::apply_mask(&mut payload, mask);
    Ok((h[0] & 0x0F, payload))
}
