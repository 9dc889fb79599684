//! Facts about processes and the server, gathered outside the hot path: the generator's own
//! CPU time (getrusage), a server's resident memory (/proc/PID/status) and open files
//! (/proc/PID/fd), and `/healthz`.

use nix::sys::resource::{getrusage, UsageWho};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// User + system CPU seconds of this process (all threads).
pub fn cpu_self_s() -> f64 {
    cpu_of(UsageWho::RUSAGE_SELF)
}

fn cpu_of(who: UsageWho) -> f64 {
    match getrusage(who) {
        Ok(u) => {
            let tv = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
            tv(u.user_time()) + tv(u.system_time())
        }
        Err(_) => 0.0,
    }
}

/// VmRSS of `pid` in KiB, or None if the process or field is not there.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vmrss(&status)
}

/// Summed VmRSS of all `pids`; None if there are none or any cannot be read.
pub fn rss_total_kib(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| rss_kib(p)).sum()
}

/// Open file descriptors of `pid` (entries of /proc/PID/fd), or None if they cannot be listed.
pub fn fd_count(pid: u32) -> Option<u64> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(dir.count() as u64)
}

/// Summed open fds of all `pids`; None if there are none or any cannot be listed.
pub fn fd_total(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| fd_count(p)).sum()
}

fn parse_vmrss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// GET /healthz; returns the body parsed as JSON, or the error as a JSON string.
pub fn healthz(addr: SocketAddr) -> serde_json::Value {
    match fetch_healthz(addr) {
        Ok(v) => v,
        Err(e) => serde_json::Value::String(format!("unavailable: {e}")),
    }
}

fn fetch_healthz(addr: SocketAddr) -> Result<serde_json::Value, String> {
    let t = Duration::from_secs(2);
    let mut s = TcpStream::connect_timeout(&addr, t).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(t)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(t)).map_err(|e| e.to_string())?;
    write!(
        s,
        "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut body = Vec::new();
    // Bounded: a health answer is tiny; stop at 64 KiB whatever the server does.
    let _ = s.take(64 * 1024).read_to_end(&mut body);
    parse_http_json(&body)
}

fn parse_http_json(resp: &[u8]) -> Result<serde_json::Value, String> {
    let text = String::from_utf8_lossy(resp);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| "no HTTP response".to_owned())?;
    let status = head.lines().next().unwrap_or("");
    if !status.contains(" 200") {
        return Err(format!("status line {status:?}"));
    }
    // Tolerate chunked encoding of a small body by taking the outermost JSON object.
    let body = match (body.find('{'), body.rfind('}')) {
        (Some(a), Some(b)) if b > a => &body[a..=b],
        _ => body,
    };
    serde_json::from_str(body).map_err(|e| format!("body is not JSON: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmrss_parse() {
        let s = "Name:\tx\nVmPeak:\t 100 kB\nVmRSS:\t   5120 kB\nThreads: 2\n";
        assert_eq!(parse_vmrss(s), Some(5120));
        assert_eq!(parse_vmrss("Name: x\n"), None);
        assert!(rss_kib(std::process::id()).is_some_and(|k| k > 0));
        assert!(fd_total(&[std::process::id()]).is_some_and(|n| n >= 3));
        assert_eq!(fd_total(&[]), None);
    }

    #[test]
    fn http_json_parse() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{\"status\":\"ok\",\"connections\":3}";
        assert_eq!(parse_http_json(ok).unwrap()["connections"], 3);
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{\"status\":\"ok\"}\r\n0\r\n\r\n";
        assert_eq!(parse_http_json(chunked).unwrap()["status"], "ok");
        assert!(parse_http_json(b"HTTP/1.1 503 Busy\r\n\r\n{}").is_err());
        assert!(parse_http_json(b"garbage").is_err());
    }

    #[test]
    fn cpu_is_measured() {
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        assert!(x > 0);
        assert!(cpu_self_s() > 0.0);
    }
}
