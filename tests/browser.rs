//! The chat page (`GET /`) in a real browser: headless Chromium driven by `playwright-core`
//! (tests/browser/chat.spec.mjs) against two `switchboard` binaries on one private Redis.
//!
//! Two pages as u1 on different instances and one as u2: u2's message appears in both u1 pages.
//! Then one u1 page goes offline, messages are sent, it comes back online and shows them in
//! order, once each, without a reload, resumed with `since`. A fourth page, with its liveness
//! probe sped up and its `offline` listener unplugged, goes offline too: the probe alone notices
//! the dead socket and the page catches up the same way. Screenshots are written to
//! `target/browser-screenshots/` (or `$SWITCHBOARD_SCREENSHOTS`).
//!
//! Needs Debian's `chromium` (or `$CHROMIUM`), `node`, and `npm ci` run in tests/browser
//! (./test.sh does that). Without them the test prints one line saying what is missing and
//! passes, except under `CI=true`, where it fails.

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The whole browser run: launch, three pages, the offline round trip, screenshots.
const RUN_DEADLINE: Duration = Duration::from_secs(150);

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from)
}

/// What is missing to run the browser test, if anything.
fn missing_prerequisite() -> Option<String> {
    let chromium = chromium();
    if !chromium.exists() {
        return Some(format!(
            "chromium not found at {} (apt-get install chromium, or set CHROMIUM)",
            chromium.display()
        ));
    }
    let node = Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !matches!(node, Ok(s) if s.success()) {
        return Some("node not found on PATH (apt-get install nodejs npm)".into());
    }
    if !browser_dir()
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        return Some("playwright-core not installed (run: npm ci --prefix tests/browser)".into());
    }
    None
}

fn screenshot_dir() -> PathBuf {
    match std::env::var_os("SWITCHBOARD_SCREENSHOTS") {
        Some(dir) => PathBuf::from(dir),
        // CARGO_TARGET_TMPDIR is <target>/tmp.
        None => Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .expect("the target dir")
            .join("browser-screenshots"),
    }
}

#[test]
fn two_windows_see_the_message_and_an_offline_window_catches_up() {
    if let Some(why) = missing_prerequisite() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "browser test cannot run under CI=true: {why}"
        );
        // Straight to stderr: the test harness would capture println! of a passing test.
        let _ = writeln!(std::io::stderr(), "browser test skipped: {why}");
        return;
    }
    let redis = TestRedis::start();
    let url = redis.url();
    let args = ["--backplane", "redis", "--redis-url", url.as_str()];
    let a = ChildServer::spawn(&args);
    let b = ChildServer::spawn(&args);
    for server in [&a, &b] {
        wait_for("the backplane to connect", || {
            let (status, body) = http_get(server.addr, "/healthz");
            status == 200 && body.contains(r#""state":"connected""#)
        });
    }
    let shots = screenshot_dir();
    let mut node = Command::new("node")
        .arg("chat.spec.mjs")
        .arg(format!("http://{}", a.addr))
        .arg(format!("http://{}", b.addr))
        .current_dir(browser_dir())
        .env("CHROMIUM", chromium())
        .env("SCREENSHOTS", &shots)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn node");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = node.try_wait().expect("wait for node") {
            break status;
        }
        if started.elapsed() > RUN_DEADLINE {
            let _ = node.kill();
            let _ = node.wait();
            panic!("the browser run took longer than {RUN_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = node.wait_with_output().expect("node output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let line = stdout.lines().last().unwrap_or_default();
    let result: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| {
        panic!("node printed no JSON result ({e}), {status}:\n{stdout}\n{stderr}")
    });
    println!("{result}");
    assert_eq!(result["ok"], true, "browser run failed: {result}\n{stderr}");
    assert!(status.success(), "{status}");

    let texts = |key: &str| -> Vec<String> {
        result[key]
            .as_array()
            .unwrap_or_else(|| panic!("{key} missing: {result}"))
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    // While offline the page had only what came before; after, everything, in order, once.
    assert_eq!(texts("offline_texts"), ["hello from u2", "hi u2, u1 here"]);
    assert_eq!(
        texts("after_resume"),
        [
            "hello from u2",
            "hi u2, u1 here",
            "missed 1",
            "missed 2",
            "missed 3"
        ]
    );
    // A fourth page, whose only way to notice a dead connection is its probe, also caught up.
    assert_eq!(
        texts("silent_drop"),
        [
            "hello from u2",
            "hi u2, u1 here",
            "missed 1",
            "missed 2",
            "missed 3",
            "missed 4"
        ]
    );
    let resumed = texts("resumed_with");
    assert_eq!(resumed.len(), 1, "{resumed:?}");
    assert!(resumed[0].contains("&since="), "{resumed:?}");
    assert_eq!(
        result["notice"],
        "Back online: 3 missed messages delivered."
    );
    assert!(result["errors"].as_array().unwrap().is_empty(), "{result}");
    for shot in texts("screenshots") {
        let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
        assert!(size > 1000, "screenshot {shot} missing or empty");
    }
    assert!(shots.join("chat.png").exists());
}
