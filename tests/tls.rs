//! TLS in the binary: `--tls-cert`/`--tls-key` serve `wss://` and `https://` on the listen
//! port; the handshake runs in the core loop without holding it up; SIGHUP reloads the
//! certificate for new connections. And to Redis: with a `rediss://` URL and `--redis-ca-cert`
//! every connection the server opens (cores' links, subscriber, workers) uses TLS, against a
//! `redis-server` the test starts with only a TLS port. The certificates are self-signed ones
//! the test makes.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

type Tls = StreamOwned<ClientConnection, TcpStream>;

/// A self-signed certificate for localhost and 127.0.0.1, written as PEM files in `dir`.
struct Cert {
    cert: PathBuf,
    key: PathBuf,
    der: CertificateDer<'static>,
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("switchboard-tls-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn self_signed(dir: &Path, name: &str) -> Cert {
    let made =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    Cert {
        cert,
        key,
        der: made.cert.der().clone(),
    }
}

fn trusting(cert: &CertificateDer<'static>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let provider = Arc::new(switchboard::connection::crypto_provider());
    Arc::new(
        ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

fn tls_connect(addr: SocketAddr, config: &Arc<ClientConfig>) -> std::io::Result<Tls> {
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(DEADLINE))?;
    let name = ServerName::try_from("localhost").unwrap();
    let conn = ClientConnection::new(Arc::clone(config), name).map_err(std::io::Error::other)?;
    let mut tls = StreamOwned::new(conn, tcp);
    // Drive the handshake now, so a refused certificate shows here.
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}

fn https_get(addr: SocketAddr, config: &Arc<ClientConfig>, path: &str) -> (u16, String) {
    let mut tls = tls_connect(addr, config).expect("TLS handshake");
    write!(tls, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
    (status, body.unwrap_or_default())
}

fn wss(addr: SocketAddr, config: &Arc<ClientConfig>, user: &str) -> WebSocket<Tls> {
    let tls = tls_connect(addr, config).expect("TLS handshake");
    let url = format!("wss://localhost:{}/ws?token={user}", addr.port());
    let (ws, resp) = tungstenite::client(url, tls).expect("websocket over TLS");
    assert_eq!(resp.status(), 101);
    ws
}

/// Sends a message to oneself and waits for it to come back.
fn echo(ws: &mut WebSocket<Tls>, user: &str, text: &str) {
    let send = json!({"event": "sendMessage", "args": {"to": user, "text": text}});
    ws.send(Message::text(send.to_string())).unwrap();
    let deadline = Instant::now() + DEADLINE;
    loop {
        assert!(Instant::now() < deadline, "no newMessage");
        if let Message::Text(t) = ws.read().unwrap() {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["event"] == "newMessage" {
                assert_eq!(v["args"]["text"], text);
                return;
            }
        }
    }
}

fn tls_server(cert: &Cert, extra: &[&str]) -> ChildServer {
    let mut command = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    command
        .args(["--listen", "127.0.0.1:0"])
        .arg("--tls-cert")
        .arg(&cert.cert)
        .arg("--tls-key")
        .arg(&cert.key)
        .args(extra)
        .env("RUST_LOG", "info");
    ChildServer::spawn_command(command)
}

#[test]
fn wss_and_https_are_served_on_the_listen_port() {
    let dir = temp_dir("serve");
    let cert = self_signed(&dir, "a");
    let server = tls_server(&cert, &["--cores", "2"]);
    assert!(server
        .log_lines()
        .iter()
        .any(|l| l.contains("listening on wss://")));
    let config = trusting(&cert.der);
    let (status, body) = https_get(server.addr, &config, "/readyz");
    assert_eq!(status, 200, "{body}");
    let mut alice = wss(server.addr, &config, "alice");
    echo(&mut alice, "alice", "over tls");
    // A plain-text client gets no answer it could mistake for HTTP.
    let (status, _) = http_get(server.addr, "/readyz");
    assert_eq!(status, 0, "plain HTTP on the TLS port");
    echo(&mut alice, "alice", "still fine");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn stalled_handshakes_do_not_hold_up_the_loop() {
    let dir = temp_dir("stall");
    let cert = self_signed(&dir, "a");
    // One core: a blocking handshake would stall every other client.
    let server = tls_server(&cert, &["--cores", "1", "--handshake-timeout", "30s"]);
    let silent = TcpStream::connect(server.addr).unwrap();
    let mut half = TcpStream::connect(server.addr).unwrap();
    // The first bytes of a TLS record header announcing a ClientHello, then nothing.
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let config = trusting(&cert.der);
    let mut bob = wss(server.addr, &config, "bob");
    echo(&mut bob, "bob", "not blocked");
    assert_eq!(https_get(server.addr, &config, "/readyz").0, 200);
    drop((silent, half));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn sighup_reloads_the_certificate_for_new_connections() {
    let dir = temp_dir("reload");
    let first = self_signed(&dir, "first");
    let server = tls_server(&first, &["--cores", "2"]);
    let trusts_first = trusting(&first.der);
    let mut early = wss(server.addr, &trusts_first, "early");
    echo(&mut early, "early", "before");

    // The files are replaced in place, as a certificate renewal does, then SIGHUP.
    let second = self_signed(&dir, "second");
    std::fs::copy(&second.cert, &first.cert).unwrap();
    std::fs::copy(&second.key, &first.key).unwrap();
    server.signal(1);
    wait_for("the reload", || {
        server
            .log_lines()
            .iter()
            .any(|l| l.contains("TLS certificate reloaded"))
    });
    let trusts_second = trusting(&second.der);
    let mut late = wss(server.addr, &trusts_second, "late");
    echo(&mut late, "late", "after");
    // A fresh client config: the first one would resume its session, which skips the
    // certificate (as with any TLS server).
    assert!(
        tls_connect(server.addr, &trusting(&first.der)).is_err(),
        "new handshakes get the new certificate"
    );
    // The connection opened before the reload goes on.
    echo(&mut early, "early", "after");

    // A broken file keeps the certificate in force.
    std::fs::write(&first.key, "not a key").unwrap();
    server.signal(1);
    wait_for("the failed reload", || {
        server
            .log_lines()
            .iter()
            .any(|l| l.contains("TLS certificate kept"))
    });
    echo(
        &mut wss(server.addr, &trusts_second, "later"),
        "later",
        "kept",
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bad_certificate_files_stop_the_start_with_the_file_named() {
    let dir = temp_dir("bad");
    let a = self_signed(&dir, "a");
    let b = self_signed(&dir, "b");
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["--listen", "127.0.0.1:0", "--cores", "1"])
        .arg("--tls-cert")
        .arg(&a.cert)
        .arg("--tls-key")
        .arg(&b.key)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("does not match"), "{stderr}");
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["--listen", "127.0.0.1:0", "--cores", "1"])
        .arg("--tls-cert")
        .arg(&a.cert)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--tls-cert needs --tls-key"), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Starts a `redis-server` with only a TLS `port` (certificate and CA `cert`, clients without
/// certificates), its files in `dir`, with `extra` flags; returns once the port answers.
fn tls_redis_server(cert: &Cert, port: u16, dir: &Path, extra: &[&str]) -> std::process::Child {
    let child = Command::new("redis-server")
        .args(["--port", "0", "--tls-port", &port.to_string()])
        .args(["--bind", "127.0.0.1", "--save", ""])
        .arg("--tls-cert-file")
        .arg(&cert.cert)
        .arg("--tls-key-file")
        .arg(&cert.key)
        .arg("--tls-ca-cert-file")
        .arg(&cert.cert)
        .args(["--tls-auth-clients", "no"])
        .arg("--dir")
        .arg(dir)
        .args(extra)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server must be on PATH");
    wait_for("redis-server's TLS port", || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    child
}

/// A `redis-server` listening only on a TLS port, stopped (by pid) on drop.
struct TlsRedis {
    port: u16,
    child: std::process::Child,
    dir: PathBuf,
}

impl TlsRedis {
    fn start(name: &str) -> (Self, Cert) {
        let dir = temp_dir(name);
        let cert = self_signed(&dir, "redis");
        let port = free_port();
        let child = tls_redis_server(&cert, port, &dir, &[]);
        (TlsRedis { port, child, dir }, cert)
    }

    fn url(&self) -> String {
        format!("rediss://localhost:{}", self.port)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn on_tls_redis(redis: &TlsRedis, ca: Option<&Path>) -> ChildServer {
    let mut command = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    command
        .args(["--listen", "127.0.0.1:0", "--cores", "2"])
        .args(["--backplane", "redis", "--redis-url", &redis.url()])
        .args(["--redis-reconnect-max", "300ms"])
        .env("RUST_LOG", "info");
    if let Some(ca) = ca {
        command.arg("--redis-ca-cert").arg(ca);
    }
    ChildServer::spawn_command(command)
}

#[test]
fn every_redis_connection_uses_tls_with_the_given_ca() {
    let (redis, cert) = TlsRedis::start("redis-ok");
    let a = on_tls_redis(&redis, Some(&cert.cert));
    let b = on_tls_redis(&redis, Some(&cert.cert));
    let (mut alice, mut bob) = alice_and_bob(&a, &b);
    // Through a core's link (the held ack) and the subscriber.
    alice.send_acked("bob", "across tls", 1);
    assert_eq!(bob.recv_event("newMessage")["args"]["text"], "across tls");
    // The rooms worker and the history worker (the redis crate's connections).
    request_ok(&mut bob, "joinRoom", json!({"room": "r"}), 2);
    let page = request_ok(&mut bob, "history", json!({"limit": 10}), 3);
    assert_eq!(page["events"][0]["args"]["text"], "across tls", "{page}");
}

#[test]
fn without_the_ca_redis_is_refused_in_plain_words_and_not_ready() {
    let (redis, _cert) = TlsRedis::start("redis-no-ca");
    let server = on_tls_redis(&redis, None);
    wait_for("the TLS failure in the log", || {
        server
            .log_lines()
            .iter()
            .any(|l| l.contains("the TLS handshake with Redis failed"))
    });
    let (status, body) = http_get(server.addr, "/readyz");
    assert_eq!(status, 503, "{body}");
}

/// A three-node Redis Cluster serving only TLS, its cluster bus too, every node with the same
/// certificate (for localhost and 127.0.0.1); stopped (by pid) on drop.
struct TlsCluster {
    ports: Vec<u16>,
    children: Vec<std::process::Child>,
    dir: PathBuf,
}

impl TlsCluster {
    fn start() -> (Self, Cert) {
        let dir = temp_dir("redis-cluster");
        let cert = self_signed(&dir, "redis");
        let mut cluster = TlsCluster {
            ports: Vec::new(),
            children: Vec::new(),
            dir: dir.clone(),
        };
        while cluster.ports.len() < 3 {
            // The cluster bus listens on port + 10000: that one must be free as well.
            let port = free_port();
            if port > 55_000 || std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_err() {
                continue;
            }
            let node_dir = dir.join(port.to_string());
            std::fs::create_dir_all(&node_dir).unwrap();
            let cluster_flags = [
                "--cluster-enabled",
                "yes",
                "--cluster-node-timeout",
                "2000",
                "--tls-cluster",
                "yes",
                "--tls-replication",
                "yes",
            ];
            let child = tls_redis_server(&cert, port, &node_dir, &cluster_flags);
            cluster.children.push(child);
            cluster.ports.push(port);
        }
        let status = Command::new("redis-cli")
            .args(["--tls", "--cacert"])
            .arg(&cert.cert)
            .args(["--cluster", "create"])
            .args(cluster.seeds())
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("redis-cli must be on PATH");
        assert!(status.success(), "redis-cli --tls --cluster create failed");
        for port in &cluster.ports {
            wait_for("cluster_state:ok over TLS", || {
                let out = Command::new("redis-cli")
                    .args(["--tls", "--cacert"])
                    .arg(&cert.cert)
                    .args(["-p", &port.to_string(), "cluster", "info"])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout).contains("cluster_state:ok")
            });
        }
        (cluster, cert)
    }

    fn seeds(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect()
    }
}

impl Drop for TlsCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `--redis-cluster` with `rediss://`: the slot map, the publisher's shard connections, the
/// subscriber's shard links and the history worker all reach the TLS-only cluster.
#[test]
fn a_redis_cluster_over_tls_delivers_and_resumes() {
    let (redis, cert) = TlsCluster::start();
    let seeds = redis.seeds();
    // The slot map as the server reads it: over TLS, trusting the CA.
    let mut config = switchboard::backplane::RedisConfig::new(format!("rediss://{}", seeds[0]));
    config.cluster = seeds.clone();
    config.ca_cert = Some(cert.cert.clone());
    let map = switchboard::backplane::cluster::SlotMap::fetch(&config).unwrap();
    assert_eq!(map.shards.len(), 3, "{map:?}");

    let server = || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_switchboard"));
        command
            .args([
                "--listen",
                "127.0.0.1:0",
                "--cores",
                "2",
                "--backplane",
                "redis",
            ])
            .args(["--redis-url", &format!("rediss://{}", seeds[0])])
            .args(["--redis-cluster", &seeds.join(",")])
            .args(["--redis-reconnect-max", "300ms"])
            .arg("--redis-ca-cert")
            .arg(&cert.cert)
            .env("RUST_LOG", "info");
        ChildServer::spawn_command(command)
    };
    let a = server();
    let b = server();
    let (mut alice, mut bob) = alice_and_bob(&a, &b);
    // alice's and bob's channels on different shards: two of the shard links carry it.
    assert_ne!(
        map.shard_of(b"switchboard:u:alice"),
        map.shard_of(b"switchboard:u:bob")
    );
    alice.send_acked("bob", "across a tls cluster", 1);
    let m = bob.recv_event("newMessage");
    assert_eq!(m["args"]["text"], "across a tls cluster");
    let offset = m["offset"].as_str().expect("an offset").to_string();
    bob.close();
    alice.send_acked("bob", "missed", 2);
    // Resumed on the other instance: the history worker reads bob's shard.
    let url = format!("ws://{}/ws?token=bob&since={offset}", a.addr);
    let mut back = Client::connect_url(&url, "bob");
    assert_eq!(back.recv_event("newMessage")["args"]["text"], "missed");
    assert_eq!(back.recv_event("recovered")["args"]["complete"], true);
    let page = request_ok(&mut back, "history", json!({"limit": 10}), 3);
    assert_eq!(page["events"].as_array().map(Vec::len), Some(2), "{page}");
}
