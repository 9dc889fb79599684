//! The blocking client (one thread per connection): connect with a timeout and upgrade.
//! Used where simplicity beats scale: `soak` reads on it, `room` turns it non-blocking.

use crate::transport::codec::{self, Handshake};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Connects and upgrades (key from `rng`), with `timeout` for the connect and for every read
/// and write; returns the stream and any bytes read past the upgrade response.
pub fn connect(
    addr: SocketAddr,
    path: &str,
    rng: &mut u64,
    timeout: Duration,
) -> Result<(TcpStream, Vec<u8>), String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    s.set_nodelay(true).ok();
    s.set_read_timeout(Some(timeout)).ok();
    s.set_write_timeout(Some(timeout)).ok();
    let (request, accept) = codec::upgrade(&addr.to_string(), path, codec::key_bytes(rng));
    s.write_all(&request).map_err(|e| e.to_string())?;
    let mut buf = Vec::with_capacity(4096);
    let mut tmp = [0u8; 4096];
    loop {
        let n = s.read(&mut tmp).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("eof during handshake".into());
        }
        buf.extend_from_slice(&tmp[..n]);
        match codec::parse_handshake(&buf, &accept) {
            Handshake::Incomplete => continue,
            Handshake::Rejected(r) => return Err(r),
            Handshake::Accepted { header_len } => {
                buf.drain(..header_len);
                return Ok((s, buf));
            }
        }
    }
}
