//! Redis Sentinel: with `--redis-sentinel` and `--redis-sentinel-master`, every connection goes
//! to the master the sentinels name, and after a failover (forced with `SENTINEL FAILOVER`) an
//! acknowledged message is still stored and delivered, across two instances. The test starts
//! its own master, replica and sentinel on free ports and stops them by pid.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

/// A sentinel (`redis-server CONF --sentinel`) watching `master`, stopped on drop.
struct Sentinel {
    port: u16,
    child: std::process::Child,
    dir: std::path::PathBuf,
    /// Its `requirepass`, if any.
    password: Option<String>,
}

impl Sentinel {
    /// Once it names `master`.
    fn start(master: &TestRedis, password: Option<&str>) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!(
            "switchboard-sentinel-{}-{port}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor main 127.0.0.1 {} 1\n\
                 sentinel down-after-milliseconds main 1000\n\
                 sentinel failover-timeout main 5000\n{}",
                dir.display(),
                master.port,
                password.map_or(String::new(), |p| format!("requirepass {p}\n")),
            ),
        )
        .unwrap();
        let child = std::process::Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server must be on PATH");
        let password = password.map(str::to_string);
        let sentinel = Sentinel {
            port,
            child,
            dir,
            password,
        };
        wait_for("the sentinel to name the master", || {
            sentinel.master_port() == Some(master.port)
        });
        sentinel
    }

    fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        let auth = self
            .password
            .as_ref()
            .map_or(String::new(), |p| format!(":{p}@"));
        let client = redis::Client::open(format!("redis://{auth}127.0.0.1:{}", self.port))?;
        let mut conn = client.get_connection_with_timeout(Duration::from_millis(500))?;
        cmd.query(&mut conn)
    }

    fn master_port(&self) -> Option<u16> {
        let cmd = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg("main")
            .clone();
        self.query::<Option<(String, u16)>>(&cmd)
            .ok()
            .flatten()
            .map(|(_, port)| port)
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn on_sentinel(sentinel: &Sentinel, extra: &[&str]) -> ChildServer {
    let at = format!("127.0.0.1:{}", sentinel.port);
    let mut args = vec![
        "--backplane",
        "redis",
        "--redis-sentinel",
        &at,
        "--redis-sentinel-master",
        "main",
        "--redis-reconnect-max",
        "300ms",
    ];
    args.extend_from_slice(extra);
    ChildServer::spawn(&args)
}

fn history_texts(c: &mut Client, ack: u64) -> Vec<String> {
    let page = request_ok(c, "history", json!({"limit": 20}), ack);
    page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["args"]["text"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn an_acked_message_survives_a_master_failover() {
    let master = TestRedis::start();
    let replica = TestRedis::start_with(&["--replicaof", "127.0.0.1", &master.port.to_string()]);
    wait_for("the replica in sync", || {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query(&mut replica.connection())
            .unwrap_or_default();
        info.contains("master_link_status:up")
    });
    let sentinel = Sentinel::start(&master, None);
    wait_for("the sentinel to see the replica", || {
        sentinel
            .query(redis::cmd("SENTINEL").arg("replicas").arg("main"))
            .is_ok_and(|r: Vec<redis::Value>| !r.is_empty())
    });
    let a = on_sentinel(&sentinel, &[]);
    let b = on_sentinel(&sentinel, &[]);
    let (mut alice, mut bob) = alice_and_bob(&a, &b);
    alice.send_acked("bob", "before", 1);
    assert_eq!(bob.recv_event("newMessage")["args"]["text"], "before");

    let _: String = sentinel
        .query(redis::cmd("SENTINEL").arg("failover").arg("main"))
        .expect("the sentinel starts a failover");
    wait_for("the replica promoted", || {
        sentinel.master_port() == Some(replica.port)
    });
    for server in [&a, &b] {
        wait_for("the move seen by each instance", || {
            server
                .log_lines()
                .iter()
                .any(|l| l.contains("the master moved from"))
        });
    }
    // Acked only once stored on the new master, and delivered through it. (A message sent in
    // the moment between the promotion and Sentinel cutting the old master's clients off can
    // land on the old master and be lost with it, as with any Redis Sentinel client: see
    // docs/DEPLOY.md.)
    alice.send_acked("bob", "after", 2);
    let text = loop {
        let v = bob.recv_json();
        if v["event"] == "newMessage" {
            break v["args"]["text"].as_str().unwrap().to_string();
        }
    };
    assert_eq!(text, "after");
    for server in [&a, &b] {
        wait_for("ready after the failover", || {
            http_get(server.addr, "/readyz").0 == 200
        });
    }
    let stored: String = redis::cmd("ROLE")
        .query::<Vec<redis::Value>>(&mut replica.connection())
        .map(|r| format!("{r:?}"))
        .unwrap();
    assert!(stored.contains("master"), "{stored}");
    assert!(history_texts(&mut bob, 3).contains(&"after".to_string()));
}

/// `--redis-sentinel-password`: sentinels with `requirepass` are asked with `AUTH`; without the
/// password they refuse and the instance never becomes ready.
#[test]
fn sentinels_with_a_password_are_asked_with_it() {
    let master = TestRedis::start();
    let sentinel = Sentinel::start(&master, Some("s3ntinel"));
    let a = on_sentinel(&sentinel, &["--redis-sentinel-password", "s3ntinel"]);
    let b = on_sentinel(&sentinel, &["--redis-sentinel-password", "s3ntinel"]);
    let (mut alice, mut bob) = alice_and_bob(&a, &b);
    alice.send_acked("bob", "via an authenticated sentinel", 1);
    let m = bob.recv_event("newMessage");
    assert_eq!(m["args"]["text"], "via an authenticated sentinel");

    let without = on_sentinel(&sentinel, &[]);
    wait_for("the refusal in the log", || {
        without
            .log_lines()
            .iter()
            .any(|l| l.contains("no master yet") && l.contains("NOAUTH"))
    });
    assert_eq!(http_get(without.addr, "/readyz").0, 503);
}
