//! The chat page's session handling (refresh before `exp` from `?token_url=`, what it does on
//! 4010 and 4011), checked by running the page's own script in Node with a fake DOM, clock and
//! WebSocket (tests/chat-page/session.mjs): no browser needed. The page is the one the binary
//! serves (the template with the JS client put in). Needs `node` on PATH, as ./test.sh does.

use std::path::Path;
use std::process::Command;

#[test]
fn the_chat_page_refreshes_its_token_and_ends_expired_sessions() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let page = std::env::temp_dir().join(format!("switchboard-page-{}.html", std::process::id()));
    std::fs::write(&page, switchboard::web::index_html()).expect("write the served page");
    let out = Command::new("node")
        .arg(root.join("tests/chat-page/session.mjs"))
        .arg(&page)
        .output()
        .expect("node runs (./test.sh requires Node.js)");
    let _ = std::fs::remove_file(&page);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
