//! Private Redis for tests: a `redis-server` (or a three-primary cluster) on free ports in a temp
//! dir, stopped by pid; servers on it, and waits on its subscriptions.

use super::*;

/// A private `redis-server` on a free port in a temp dir; stopped (by pid) on drop.
pub struct TestRedis {
    pub port: u16,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
    extra: Vec<String>,
}

impl TestRedis {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts with extra `redis-server` arguments (e.g. `["--appendonly", "yes"]`).
    pub fn start_with(extra: &[&str]) -> Self {
        Self::start_on(free_port(), extra)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port and directory.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server must be on PATH (./test.sh checks for it)");
        self.child = Some(child);
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Ok(client) = redis::Client::open(self.url()) {
                if let Ok(mut c) = client.get_connection_with_timeout(Duration::from_millis(200)) {
                    if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                        return;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The redis-server's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Writes `n` events of `size` bytes into `user`'s stream directly (what `n` direct messages
/// would leave there), in pipelines.
pub fn fill_history(redis: &TestRedis, user: &str, n: usize, size: usize) {
    let mut c = redis.connection();
    let text = "x".repeat(size);
    let frame =
        serde_json::json!({"event": "newMessage", "args": {"from": "h", "text": text}}).to_string();
    for chunk in 0..n.div_ceil(50) {
        let mut pipe = redis::pipe();
        for _ in 0..50.min(n - chunk * 50) {
            pipe.cmd("XADD")
                .arg(format!("switchboard:h:{user}"))
                .arg("*")
                .arg("f")
                .arg(&frame)
                .ignore();
        }
        let () = pipe.query(&mut c).expect("XADD");
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `pred` until it holds or the deadline passes.
pub fn wait_for(what: &str, mut pred: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !pred() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until `n` instances subscribed `user`'s channel (default prefix) on `redis`.
pub fn wait_subscribed(redis: &TestRedis, user: &str, n: usize) {
    let mut c = redis.connection();
    let channel = format!("switchboard:u:{user}");
    wait_for(&format!("{n} subscribers of {channel}"), || {
        let v: Vec<(String, usize)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(&channel)
            .query(&mut c)
            .unwrap_or_default();
        v.first().is_some_and(|(_, k)| *k >= n)
    });
}

/// A server on `redis` with the given routing.
pub fn redis_server(redis: &TestRedis, routing: switchboard::backplane::Routing) -> TestServer {
    redis_server_with(redis, routing, Duration::from_millis(300))
}

/// A server on `redis` whose reconnect backoff tops out at `reconnect_max` (its publisher also
/// holds an outage's backlog for that long after reconnecting).
pub fn redis_server_with(
    redis: &TestRedis,
    routing: switchboard::backplane::Routing,
    reconnect_max: Duration,
) -> TestServer {
    redis_server_history(redis, routing, reconnect_max, true)
}

/// Like [`redis_server_with`], with history on or off (on is the default).
pub fn redis_server_history(
    redis: &TestRedis,
    routing: switchboard::backplane::Routing,
    reconnect_max: Duration,
    history: bool,
) -> TestServer {
    let mut rc = switchboard::backplane::RedisConfig::new(redis.url());
    rc.routing = routing;
    rc.reconnect_max = reconnect_max;
    let mut config = Config {
        backplane: Some(rc),
        ..test_config()
    };
    config.history.enabled = history;
    TestServer::with_config(config)
}

impl TestServer {
    pub fn bp_stat(
        &self,
        f: impl Fn(&switchboard::backplane::BackplaneStats) -> &std::sync::atomic::AtomicU64,
    ) -> u64 {
        f(&self.handle.backplane().expect("a backplane").stats)
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until Redis confirmed exactly `n` subscribed channels for this instance.
    pub fn wait_channels(&self, n: u64) {
        wait_for(&format!("{n} subscribed channels"), || {
            self.bp_stat(|s| &s.subscribed_channels) == n
        });
    }
}

/// A three-primary Redis Cluster of private `redis-server`s, created with `redis-cli --cluster`.
pub struct TestCluster {
    pub nodes: Vec<TestRedis>,
}

impl TestCluster {
    pub fn start() -> Self {
        Self::start_nodes(3, 0)
    }

    /// Three primaries with a replica each (six nodes), every replica attached.
    pub fn start_with_replicas() -> Self {
        let cluster = Self::start_nodes(6, 1);
        for node in &cluster.nodes {
            wait_for("every primary has its replica", || {
                let mut c = node.connection();
                let info: String = redis::cmd("INFO")
                    .arg("replication")
                    .query(&mut c)
                    .unwrap_or_default();
                info.contains("role:slave") || info.contains("state=online")
            });
        }
        cluster
    }

    fn start_nodes(count: usize, replicas: usize) -> Self {
        let mut nodes = Vec::new();
        while nodes.len() < count {
            // The cluster bus listens on port + 10000: that one must be free as well.
            let port = free_port();
            if port > 55_000 || std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_err() {
                continue;
            }
            let conf = format!("nodes-{port}.conf");
            nodes.push(TestRedis::start_on(
                port,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &conf,
                    "--cluster-node-timeout",
                    "2000",
                ],
            ));
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let status = std::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("redis-cli must be on PATH");
        assert!(status.success(), "redis-cli --cluster create failed");
        for node in &nodes {
            wait_for("cluster_state:ok", || {
                let mut c = node.connection();
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query(&mut c)
                    .unwrap_or_default();
                info.contains("cluster_state:ok")
            });
        }
        TestCluster { nodes }
    }

    pub fn seeds(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect()
    }
}

impl TestRedis {
    /// Starts on a given port (used for cluster nodes).
    pub fn start_on(port: u16, extra: &[&str]) -> Self {
        let dir =
            std::env::temp_dir().join(format!("switchboard-redis-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = TestRedis {
            port,
            dir,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        r.restart();
        r
    }
}

/// Sets `maxmemory` (bytes; 0: none) with `noeviction`, so any write is refused while Redis is
/// over it.
pub fn set_maxmemory(conn: &mut redis::Connection, bytes: u64) {
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query(conn)
        .expect("CONFIG SET maxmemory-policy");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(bytes)
        .query(conn)
        .expect("CONFIG SET maxmemory");
}
