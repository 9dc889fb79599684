//! The JavaScript client (`clients/js`, npm package `switchboard-client`) against the real binary:
//! runs its node tests (`node --test`), which start this crate's `switchboard` binary themselves
//! (embedded, and two instances on a private redis-server on a free port), restart it, and put a
//! frame-dropping proxy in front of it (clients/js/test/support.js).
//!
//! Needs `node` (20 or later) and `npm ci` run in clients/js for the `ws` package the tests use
//! as their WebSocket (./test.sh does that).

use std::io::Read as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The whole `node --test` run.
const RUN_DEADLINE: Duration = Duration::from_secs(300);

#[test]
fn the_js_client_loses_nothing_and_repeats_nothing() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/js");
    assert!(
        dir.join("node_modules/ws").is_dir(),
        "ws is not installed: run `npm ci` in {} (./test.sh does)",
        dir.display()
    );
    let mut node = Command::new("node")
        .args(["--test", "--test-reporter=spec", "test/"])
        .current_dir(&dir)
        .env("SWITCHBOARD_BIN", env!("CARGO_BIN_EXE_switchboard"))
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node (Node.js 20 or later) must be on PATH");
    // Read both pipes on threads: a full pipe would stall node.
    let drain = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut out = String::new();
            let _ = pipe.read_to_string(&mut out);
            out
        })
    };
    let stdout = drain(Box::new(node.stdout.take().unwrap()));
    let stderr = drain(Box::new(node.stderr.take().unwrap()));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = node.try_wait().expect("wait for node") {
            break Some(status);
        }
        if started.elapsed() > RUN_DEADLINE {
            let _ = node.kill();
            let _ = node.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = stdout.join().unwrap();
    let stderr = stderr.join().unwrap();
    println!("{stdout}");
    match status {
        Some(status) => assert!(
            status.success(),
            "node --test failed ({status}):\n{stdout}\n{stderr}"
        ),
        None => panic!("node --test took longer than {RUN_DEADLINE:?}:\n{stdout}\n{stderr}"),
    }
}
