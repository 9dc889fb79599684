//! The binary's settings: `--config FILE` (TOML, keys named as the flags) under the environment
//! under the flags; flags that would be ignored, an unknown log level, and impossible sizes are
//! errors at start that say what they need; `--log-format json` writes one object a line.

mod common;

use std::process::Command;

use common::*;

fn binary() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    command.env_remove("RUST_LOG");
    command
}

fn write_config(name: &str, text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!(
        "switchboard-config-{}-{name}.toml",
        std::process::id()
    ));
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs the binary with `args`; it must refuse to start. Returns its stderr.
fn refused(args: &[&str]) -> String {
    let out = binary()
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{args:?} started: {stderr}");
    stderr
}

fn cores(addr: std::net::SocketAddr) -> u64 {
    let (_, body) = http_get(addr, "/healthz");
    let h: serde_json::Value = serde_json::from_str(&body).unwrap();
    h["cores"].as_u64().unwrap()
}

#[test]
fn the_file_fills_what_flags_and_environment_leave() {
    let path = write_config(
        "fills",
        "listen = \"127.0.0.1:0\"\ncores = 1\nchat_page = \"off\"\npin = \"off\"\n",
    );
    let mut command = binary();
    command.arg("--config").arg(&path).env("RUST_LOG", "info");
    let server = ChildServer::spawn_command(command);
    assert_eq!(cores(server.addr), 1, "cores from the file");
    assert_eq!(
        http_get(server.addr, "/").0,
        404,
        "chat-page off from the file"
    );
    drop(server);

    // The environment beats the file; a flag beats both.
    let mut command = binary();
    command
        .arg("--config")
        .arg(&path)
        .env("SWITCHBOARD_CORES", "2")
        .env("RUST_LOG", "info");
    let server = ChildServer::spawn_command(command);
    assert_eq!(cores(server.addr), 2, "the environment over the file");
    drop(server);
    let mut command = binary();
    command
        .arg("--config")
        .arg(&path)
        .args(["--chat-page", "on"])
        .env("SWITCHBOARD_CORES", "2")
        .env("RUST_LOG", "info");
    let server = ChildServer::spawn_command(command);
    assert_eq!(http_get(server.addr, "/").0, 200, "the flag over the file");
    let _ = std::fs::remove_file(path);
}

#[test]
fn bad_files_are_refused_with_the_key_or_line() {
    let unknown = write_config("unknown", "listne = \"127.0.0.1:0\"\n");
    let e = refused(&["--config", unknown.to_str().unwrap()]);
    assert!(e.contains("unknown key \"listne\""), "{e}");
    let broken = write_config("broken", "cores = 1\nlisten = \n");
    let e = refused(&["--config", broken.to_str().unwrap()]);
    assert!(e.contains("line 2"), "{e}");
    let bad_value = write_config("bad-value", "cores = \"many\"\n");
    let e = refused(&["--config", bad_value.to_str().unwrap()]);
    assert!(e.contains("--cores"), "{e}");
    // A file's setting that would be ignored is refused like the flag.
    let ignored = write_config("ignored", "redis-url = \"redis://127.0.0.1:1\"\n");
    let e = refused(&["--config", ignored.to_str().unwrap()]);
    assert!(e.contains("--redis-url needs --backplane redis"), "{e}");
    for p in [unknown, broken, bad_value, ignored] {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn flags_that_would_be_ignored_name_the_flag_they_need() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--redis-url", "redis://127.0.0.1:1"],
            "--redis-url needs --backplane redis",
        ),
        (&["--routing", "seed"], "--routing needs --backplane redis"),
        (
            &["--jwt-audience", "app"],
            "--jwt-audience needs --jwt-secret",
        ),
        (
            &["--rate-limit", "0", "--rate-limit-burst", "5"],
            "--rate-limit-burst needs --rate-limit above 0",
        ),
        (
            &["--history", "off", "--history-max-len", "5"],
            "--history-max-len needs --history on",
        ),
        (&["--hook-timeout", "1s"], "--hook-timeout needs --hook-url"),
        (
            &["--max-room-queue", "8"],
            "--max-room-queue needs --backplane redis",
        ),
        (
            &["--backplane", "redis", "--redis-sentinel-password", "pw"],
            "--redis-sentinel-password needs --redis-sentinel",
        ),
        (
            &["--backplane", "redis", "--redis-wait-replicas", "1"],
            "--redis-wait-replicas needs --redis-cluster",
        ),
        (
            &["--history", "off", "--room-history-max-len", "5"],
            "--room-history-max-len needs --history on",
        ),
        (
            &[
                "--backplane",
                "redis",
                "--history-max-total-bytes",
                "1048576",
            ],
            "--history-max-total-bytes needs --history on without Redis",
        ),
        (
            &["--history", "off", "--sender-bytes-per-minute", "0"],
            "--sender-bytes-per-minute needs --history on",
        ),
        (
            &["--sender-bytes-per-minute", "1000"],
            "--sender-bytes-per-minute must be 0 or at least twice the largest message",
        ),
        (
            &["--history-max-total-bytes", "1000"],
            "--history-max-total-bytes must be at least 1048576",
        ),
        (&["--cores", "4096"], "--cores 4096"),
        (
            &["--max-connections", "4000000000"],
            "--max-connections 4000000000",
        ),
        (&["--log-level", "verbose"], "unknown log level \"verbose\""),
    ];
    for (args, want) in cases {
        let e = refused(args);
        assert!(e.contains(want), "{args:?}: {e}");
    }
    let e = {
        let out = binary()
            .args(["--listen", "127.0.0.1:0"])
            .env("SWITCHBOARD_REDIS_URL", "redis://127.0.0.1:1")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(e.contains("--redis-url needs --backplane redis"), "{e}");
}

#[test]
fn json_logs_are_one_object_a_line() {
    use std::io::BufRead;
    let mut child = binary()
        .args([
            "--listen",
            "127.0.0.1:0",
            "--cores",
            "1",
            "--log-format",
            "json",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    for line in lines.map_while(Result::ok) {
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        for key in ["ts", "level", "target", "msg"] {
            assert!(v[key].is_string(), "{key} missing: {line}");
        }
        let msg = v["msg"].as_str().unwrap().to_string();
        if msg.starts_with("listening on") {
            let kill = Command::new("kill")
                .args(["-15", &child.id().to_string()])
                .status()
                .unwrap();
            assert!(kill.success());
        }
        seen.push(msg);
    }
    assert_eq!(child.wait().unwrap().code(), Some(0));
    assert!(seen.iter().any(|m| m.starts_with("dev auth")), "{seen:?}");
    assert!(seen.iter().any(|m| m == "stopped"), "{seen:?}");
}
