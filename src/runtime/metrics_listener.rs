//! `--metrics-listen`: `/metrics`, `/healthz` and `/readyz` on a second, plain-HTTP address
//! (an internal network, a sidecar), so the public port need not expose them. One blocking
//! thread answers one request per connection; it is not on any core's loop.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::core_loop::Shared;
use crate::http::{self, Parse};

/// How long one scrape may take to send its request and read the answer.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head read.
const MAX_HEAD: usize = 8 * 1024;

/// The running listener: stop it with [`MetricsListener::stop`].
pub(crate) struct MetricsListener {
    addr: SocketAddr,
    thread: Option<JoinHandle<()>>,
}

impl MetricsListener {
    /// Binds `addr` and starts answering.
    pub(crate) fn start(addr: SocketAddr, shared: Arc<Shared>) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let thread = std::thread::Builder::new()
            .name("switchboard-metrics".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if shared.metrics_stop.load(Ordering::SeqCst) {
                        return;
                    }
                    if let Ok(stream) = stream {
                        let _ = answer(stream, &shared);
                    }
                }
            })?;
        Ok(MetricsListener {
            addr,
            thread: Some(thread),
        })
    }

    /// The bound address (the real port when port 0 was asked for).
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the thread: the flag is set, then a connection wakes the blocking accept.
    pub(crate) fn stop(&mut self, shared: &Shared) {
        shared.metrics_stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = TcpStream::connect_timeout(&self.addr, SCRAPE_TIMEOUT);
            let _ = thread.join();
        }
    }
}

fn answer(mut stream: TcpStream, shared: &Shared) -> io::Result<()> {
    stream.set_read_timeout(Some(SCRAPE_TIMEOUT))?;
    stream.set_write_timeout(Some(SCRAPE_TIMEOUT))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let request = loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        match http::parse_request(&buf) {
            Ok(Parse::Complete(request, _)) => break request,
            Ok(Parse::Partial) if buf.len() < MAX_HEAD => continue,
            _ => {
                let response = http::error_response(400, "bad request");
                return stream.write_all(&response);
            }
        }
    };
    let response = match (request.method.as_str(), request.path.as_str()) {
        ("GET", "/metrics") => shared.metrics_response(),
        ("GET", "/readyz") => shared.readyz_response(),
        ("GET", "/healthz") => http::response(200, "application/json", "", &shared.render_health()),
        (_, "/metrics" | "/readyz" | "/healthz") => http::error_response(405, "method not allowed"),
        _ => http::error_response(404, "not found"),
    };
    stream.write_all(&response)?;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    Ok(())
}
