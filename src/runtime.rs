//! Starting and stopping the server: one pinned thread per core, each with its own `Poll` and
//! `SO_REUSEPORT` listener on the shared address, and the handle that shuts them down.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use mio::Poll;
use socket2::{Domain, Protocol, Socket, Type};
use tungstenite::protocol::WebSocketConfig;

use crate::auth::Authenticator;
use crate::backplane::Backplane;
use crate::bus::Bus;
use crate::config::{Config, ConfigError};
use crate::connection::ServerTls;
use crate::core_loop::{CoreLoop, Shared};
use crate::handlers::{Handler, Handlers};
use crate::metrics::CoreMetrics;

mod metrics_listener;

use metrics_listener::MetricsListener;

/// Listen backlog per core listener (the kernel caps it at `net.core.somaxconn`).
const LISTEN_BACKLOG: i32 = 4096;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A configuration value is invalid; fix the option named.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Binding the listen address failed (in use, permission, bad address).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// The TLS certificate or key could not be loaded; the message names the file.
    #[error("{0}")]
    Tls(String),
    /// A core thread could not be created or set up.
    #[error("cannot start core {core}: {source}")]
    Core {
        /// The core index.
        core: usize,
        /// The OS error.
        source: io::Error,
    },
}

/// A server to be started: configuration plus handlers.
pub struct Server {
    config: Config,
    handlers: Handlers,
}

impl Server {
    /// A server with the built-in handlers.
    pub fn new(config: Config) -> Self {
        Server {
            config,
            handlers: Handlers::with_builtins(),
        }
    }

    /// Adds (or replaces) the handler for `event`.
    #[must_use]
    pub fn handler(mut self, event: impl Into<String>, handler: impl Handler) -> Self {
        self.handlers.register(event, handler);
        self
    }

    /// Validates the configuration, binds every core's listener and starts the loops. Returns
    /// once every core accepts connections.
    pub fn start(self) -> Result<ServerHandle, StartError> {
        let config = self.config;
        config.validate()?;
        let write_threshold = (64 * 1024).min(config.max_outbound_bytes / 2);
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(config.read_buffer_bytes)
            .write_buffer_size(write_threshold)
            .max_write_buffer_size(config.max_outbound_bytes)
            .max_message_size(Some(config.max_message_bytes))
            .max_frame_size(Some(config.max_message_bytes));
        let tls = match &config.tls {
            Some(files) => Some(Arc::new(
                ServerTls::load(&files.cert, &files.key).map_err(StartError::Tls)?,
            )),
            None => None,
        };
        let node_id = new_node_id();
        let backplane = config
            .backplane
            .clone()
            .map(|redis| Backplane::new(redis, node_id));
        if let Some(bp) = &backplane {
            if config.history_active() {
                bp.enable_history(config.history.clone());
            }
            if config.rooms_active() {
                bp.enable_rooms(config.rooms.clone());
            }
        }
        let bus = Arc::new(Bus::new(config.cores, config.inbox_capacity));
        let hooks = crate::hooks::Hooks::start(&config.hooks, &bus)
            .map_err(|source| StartError::Core { core: 0, source })?;
        let shared = Arc::new(Shared {
            auth: Authenticator::new(&config.auth),
            handlers: self.handlers,
            hooks,
            bus,
            backplane,
            metrics: (0..config.cores).map(|_| CoreMetrics::default()).collect(),
            shutdown: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            started: AtomicBool::new(false),
            metrics_stop: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            open_connections: AtomicUsize::new(0),
            gate: crate::core_loop::Gate::new(config.max_handshakes, config.max_handshakes_per_ip),
            presence: crate::core_loop::Coalescer::new(config.rooms.presence_interval),
            connect_rates_ip: crate::core_loop::ConnectRates::connect_rates(
                config.connect_rate_per_ip,
                config.connect_burst_per_ip,
            ),
            connect_rates_user: crate::core_loop::ConnectRates::connect_rates(
                config.connect_rate_per_user,
                config.connect_burst_per_user,
            ),
            api_history_rates: crate::core_loop::ConnectRates::connect_rates(
                config.history.api_rate,
                config.history.api_burst,
            ),
            sender_budgets: crate::core_loop::SenderBudgets::sender_bytes(
                config.history.sender_bytes_per_minute,
            ),
            node_id,
            history: (config.history_active() && config.backplane.is_none()).then(|| {
                crate::history::MemoryHistory::new(&config.history, crate::types::now_ms())
            }),
            rooms: config
                .backplane
                .is_none()
                .then(crate::rooms::MemoryRooms::default),
            room_history: (config.history_active() && config.backplane.is_none()).then(|| {
                let (rooms, history) = (&config.rooms.history, &config.history);
                crate::history::MemoryHistory::for_rooms(rooms, history, crate::types::now_ms())
            }),
            ws_config,
            tls,
            config,
        });
        if shared.config.listen.port() != 0 {
            // SO_REUSEPORT would let a second process (same user) silently share the port and
            // take half the connections: refuse, as a plain bind would.
            probe_port_free(shared.config.listen).map_err(|source| StartError::Bind {
                addr: shared.config.listen,
                source,
            })?;
        }
        let allowed: Vec<usize> = core_affinity::get_core_ids()
            .unwrap_or_default()
            .iter()
            .map(|c| c.id)
            .collect();
        let plan = shared.config.pin.plan(shared.config.cores, &allowed);
        let mut handle = ServerHandle {
            addr: shared.config.listen,
            shared: Arc::clone(&shared),
            threads: Vec::new(),
            backplane_threads: Vec::new(),
            metrics_listener: None,
        };
        for (core, cpu) in plan.iter().enumerate() {
            let (ready_tx, ready_rx) = mpsc::channel();
            let cpu = cpu.map(|id| core_affinity::CoreId { id });
            let addr = handle.addr;
            let shared = Arc::clone(&shared);
            let spawned = std::thread::Builder::new()
                .name(format!("switchboard-core-{core}"))
                .spawn(move || run_core(core, cpu, addr, shared, ready_tx));
            let thread = match spawned {
                Ok(t) => t,
                Err(source) => {
                    handle.stop();
                    return Err(StartError::Core { core, source });
                }
            };
            handle.threads.push(thread);
            match ready_rx.recv() {
                // Core 0 resolves port 0; the others bind the port it got.
                Ok(Ok(bound)) => handle.addr = bound,
                Ok(Err(e)) => {
                    handle.stop();
                    return Err(e);
                }
                Err(_) => {
                    handle.stop();
                    let source = io::Error::other("core thread exited during start");
                    return Err(StartError::Core { core, source });
                }
            }
        }
        if let Some(bp) = &shared.backplane {
            match bp.start(Arc::clone(&shared.bus)) {
                Ok(threads) => handle.backplane_threads = threads,
                Err(source) => {
                    handle.stop();
                    return Err(StartError::Core { core: 0, source });
                }
            }
        }
        if let Some(addr) = shared.config.metrics_listen {
            match MetricsListener::start(addr, Arc::clone(&shared)) {
                Ok(listener) => handle.metrics_listener = Some(listener),
                Err(source) => {
                    handle.stop();
                    return Err(StartError::Bind { addr, source });
                }
            }
        }
        shared.started.store(true, Ordering::SeqCst);
        Ok(handle)
    }
}

fn run_core(
    core: usize,
    cpu: Option<core_affinity::CoreId>,
    addr: SocketAddr,
    shared: Arc<Shared>,
    ready: mpsc::Sender<Result<SocketAddr, StartError>>,
) {
    // Pin first, so the Poll, listener and every buffer this loop allocates start on this CPU.
    if let Some(cpu) = cpu {
        if !core_affinity::set_for_current(cpu) {
            log::warn!("core={core} could not pin to cpu {}", cpu.id);
        }
    }
    let setup = || -> Result<CoreLoop, StartError> {
        let poll = Poll::new().map_err(|source| StartError::Core { core, source })?;
        let listener = bind_reuseport(addr).map_err(|source| StartError::Bind { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| StartError::Bind { addr, source })?;
        let core_loop = CoreLoop::new(core, poll, listener, Arc::clone(&shared))
            .map_err(|source| StartError::Core { core, source })?;
        let _ = ready.send(Ok(bound));
        Ok(core_loop)
    };
    let core_loop = match setup() {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    log::debug!("core={core} running on {addr}");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| core_loop.run()));
    let failed = match result {
        Ok(Ok(())) => false,
        Ok(Err(e)) => {
            log::error!("core={core} event loop failed: {e}");
            true
        }
        Err(_) => {
            log::error!("core={core} panicked");
            true
        }
    };
    if failed {
        // A dead core strands its connections: stop the whole server rather than limp on.
        shared.failed.store(true, Ordering::SeqCst);
        shared.shutdown.store(true, Ordering::SeqCst);
        for c in 0..shared.bus.cores() {
            shared.bus.wake(c);
        }
    }
}

/// Fails with `AddrInUse` when anything is bound to `addr` already.
fn probe_port_free(addr: SocketAddr) -> io::Result<()> {
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // SO_REUSEADDR: a port left in TIME_WAIT by a previous run is free; a listener is not.
    probe.set_reuse_address(true)?;
    probe.bind(&addr.into()).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            io::Error::new(
                e.kind(),
                "address already in use (is another switchboard running?)",
            )
        } else {
            e
        }
    })
}

fn bind_reuseport(addr: SocketAddr) -> io::Result<mio::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(mio::net::TcpListener::from_std(socket.into()))
}

/// A random 64-bit instance id: time, pid and the std hasher's per-process random keys.
fn new_node_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.write_u64(Instant::now().elapsed().as_nanos() as u64);
    h.finish()
}

/// Per-core gauges, as `/healthz` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoreStats {
    /// Open WebSocket connections.
    pub connections: u64,
    /// Sockets held (any state).
    pub sockets: u64,
    /// Users in the core's index.
    pub users: u64,
}

/// Triggers graceful shutdown from anywhere (see [`ServerHandle::stopper`]).
#[derive(Clone)]
pub struct Stopper(Arc<Shared>);

impl Stopper {
    /// Same as [`ServerHandle::shutdown`].
    pub fn stop(&self) {
        self.0.shutdown.store(true, Ordering::SeqCst);
        self.wake_all();
    }

    /// Same as [`ServerHandle::drain`].
    pub fn drain(&self) {
        self.0.draining.store(true, Ordering::SeqCst);
        self.wake_all();
    }

    fn wake_all(&self) {
        for core in 0..self.0.bus.cores() {
            self.0.bus.wake(core);
        }
    }
}

/// A running server. Dropping it shuts the server down and waits for the cores.
pub struct ServerHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    backplane_threads: Vec<JoinHandle<()>>,
    metrics_listener: Option<MetricsListener>,
}

impl ServerHandle {
    /// The `--metrics-listen` address actually bound, when one is configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .map(MetricsListener::local_addr)
    }

    /// The bound address (with the real port when the config said port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// This instance's node id.
    pub fn node_id(&self) -> u64 {
        self.shared.node_id
    }

    /// Per-core gauges (updated at the end of each loop turn).
    pub fn stats(&self) -> Vec<CoreStats> {
        self.shared
            .metrics
            .iter()
            .map(|m| CoreStats {
                connections: m.connections_open.load(Ordering::Relaxed),
                sockets: m.sockets.load(Ordering::Relaxed),
                users: m.users.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Asks every core to stop accepting, close its connections with 1001 and exit. Returns at
    /// once; [`ServerHandle::join`] waits.
    pub fn shutdown(&self) {
        self.stopper().stop();
    }

    /// Drains, then stops: `/readyz` answers 503 at once and new upgrades are refused; each
    /// core closes its open connections with 1001 in batches spread over
    /// [`Config::drain_period`], then shuts down as [`ServerHandle::shutdown`] does. Returns at
    /// once; [`ServerHandle::join`] waits. A shutdown during the drain closes the rest at once.
    pub fn drain(&self) {
        self.stopper().drain();
    }

    /// A cloneable trigger for [`ServerHandle::shutdown`], e.g. for a signal-handling thread.
    pub fn stopper(&self) -> Stopper {
        Stopper(Arc::clone(&self.shared))
    }

    /// Whether shutdown was requested (by [`ServerHandle::shutdown`] or a failed core).
    pub fn is_shutting_down(&self) -> bool {
        self.shared.shutdown.load(Ordering::SeqCst)
    }

    /// Waits for every core to finish. Returns `false` if a core loop failed or panicked.
    pub fn join(mut self) -> bool {
        self.join_threads() && !self.shared.failed.load(Ordering::SeqCst)
    }

    fn join_threads(&mut self) -> bool {
        let mut ok = true;
        for t in self.threads.drain(..) {
            ok &= t.join().is_ok();
        }
        // The cores are done: nothing more will be published. Let the publisher flush, then stop.
        if let Some(bp) = &self.shared.backplane {
            bp.stop();
        }
        for t in self.backplane_threads.drain(..) {
            ok &= t.join().is_ok();
        }
        if let Some(mut listener) = self.metrics_listener.take() {
            listener.stop(&self.shared);
        }
        ok
    }

    /// The TLS settings, when the listen port serves TLS: [`ServerTls::reload`] reads the
    /// certificate and key again.
    pub fn tls(&self) -> Option<&Arc<ServerTls>> {
        self.shared.tls.as_ref()
    }

    /// The backplane, when one is configured (for its counters).
    pub fn backplane(&self) -> Option<&Arc<Backplane>> {
        self.shared.backplane.as_ref()
    }

    fn stop(&mut self) {
        self.shutdown();
        self.join_threads();
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}
