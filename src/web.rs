//! The chat page served at `GET /`: one self-contained HTML file (inline CSS and script, no
//! external fetches) embedded in the binary, so there is no build step at run time.
//!
//! The page speaks only the public protocol (docs/PROTOCOL.md) through the JavaScript client
//! (`clients/js`, the npm package `switchboard-client`): the client's one source file is put into
//! the page's script here, so the page and the package cannot drift apart. Its
//! Content-Security-Policy allows exactly the inline `<style>` and `<script>` of the assembled
//! page (by SHA-256 hash), connections to the page's own origin, and nothing else.

use std::fmt::Write as _;
use std::sync::OnceLock;

use base64::Engine as _;
use sha2::{Digest, Sha256};

/// The page as committed in `src/web/index.html`, with [`CLIENT_MARKER`] where the client goes.
pub const PAGE_TEMPLATE: &str = include_str!("web/index.html");

/// The JavaScript client, one ES module without imports (`clients/js/src/index.js`).
pub const CLIENT_JS: &str = include_str!("../clients/js/src/index.js");

/// The line of [`PAGE_TEMPLATE`] that [`CLIENT_JS`] replaces.
const CLIENT_MARKER: &str = "/* switchboard-client: clients/js/src/index.js goes here */";

/// The page served: the template with the client in it, built once.
pub fn index_html() -> &'static str {
    static PAGE: OnceLock<String> = OnceLock::new();
    PAGE.get_or_init(|| assemble(PAGE_TEMPLATE, CLIENT_JS))
}

/// `template` with `module` in place of [`CLIENT_MARKER`], as a classic script: the module's
/// `export` keywords are dropped, so its declarations become locals of the function around the
/// marker.
fn assemble(template: &str, module: &str) -> String {
    let script: Vec<&str> = module
        .lines()
        .map(|line| line.strip_prefix("export ").unwrap_or(line))
        .collect();
    template.replacen(CLIENT_MARKER, &script.join("\n"), 1)
}

/// The complete `200` response for the page, built once.
pub fn index_response() -> &'static [u8] {
    static RESPONSE: OnceLock<Vec<u8>> = OnceLock::new();
    RESPONSE.get_or_init(|| {
        let mut head = String::with_capacity(600);
        let _ = write!(
            head,
            "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\n\
             Connection: close\r\nCache-Control: no-cache\r\nContent-Security-Policy: {}\r\n\
             X-Content-Type-Options: nosniff\r\nReferrer-Policy: no-referrer\r\n\r\n",
            index_html().len(),
            content_security_policy(index_html())
        );
        let mut out = head.into_bytes();
        out.extend_from_slice(index_html().as_bytes());
        out
    })
}

/// The policy for `html`: its inline `<style>` and `<script>` by hash, same-origin fetches and
/// WebSockets (`'self'` covers `ws:`/`wss:` to the page's host), nothing else.
pub fn content_security_policy(html: &str) -> String {
    let hashes = |tag: &str| -> String {
        inline_blocks(html, tag)
            .map(|block| {
                let digest = Sha256::digest(block.as_bytes());
                format!(
                    " 'sha256-{}'",
                    base64::engine::general_purpose::STANDARD.encode(digest)
                )
            })
            .collect()
    };
    format!(
        "default-src 'none'; script-src{}; style-src{}; connect-src 'self'; img-src data:; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hashes("script"),
        hashes("style")
    )
}

/// The text inside each `<tag>...</tag>` (tags without attributes, as the page writes them).
fn inline_blocks<'a>(html: &'a str, tag: &str) -> impl Iterator<Item = &'a str> + 'a {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let mut rest = html;
    std::iter::from_fn(move || {
        let start = rest.find(&open)? + open.len();
        let len = rest[start..].find(&close)?;
        let block = &rest[start..start + len];
        rest = &rest[start + len + close.len()..];
        Some(block)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_carries_the_client_as_a_classic_script() {
        let page = index_html();
        assert_eq!(PAGE_TEMPLATE.matches(CLIENT_MARKER).count(), 1);
        assert!(!page.contains(CLIENT_MARKER));
        assert!(page.contains("function connect(url, options = {})"));
        assert!(page.contains("class SwitchboardClient {"));
        // A module keyword left in a classic script is a syntax error: none may remain.
        for line in page.lines() {
            assert!(!line.starts_with("export "), "{line}");
            assert!(!line.starts_with("import "), "{line}");
        }
        // The client cannot end the script block early.
        assert!(!CLIENT_JS.contains("</script"));
    }

    #[test]
    fn the_policy_hashes_the_one_script_and_the_one_style() {
        let page = index_html();
        let csp = content_security_policy(page);
        assert_eq!(inline_blocks(page, "script").count(), 1);
        assert_eq!(inline_blocks(page, "style").count(), 1);
        assert_eq!(csp.matches("'sha256-").count(), 2, "{csp}");
        assert!(csp.starts_with("default-src 'none'; script-src 'sha256-"));
        // No other way in: no external script, stylesheet or inline handler attribute.
        for forbidden in [
            "<script src",
            "<link rel=\"stylesheet\"",
            " onclick=",
            " style=\"",
        ] {
            assert!(!page.contains(forbidden), "{forbidden}");
        }
    }

    #[test]
    fn blocks_are_found_between_their_tags() {
        let html = "<p><style>a{}</style><script>x()</script><script>y()</script>";
        assert_eq!(
            inline_blocks(html, "script").collect::<Vec<_>>(),
            ["x()", "y()"]
        );
        assert_eq!(inline_blocks(html, "style").collect::<Vec<_>>(), ["a{}"]);
    }

    #[test]
    fn the_response_is_html_and_not_cached_stale() {
        let text = std::str::from_utf8(index_response()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains("\r\nContent-Type: text/html; charset=utf-8\r\n"));
        assert!(head.contains("\r\nCache-Control: no-cache\r\n"));
        assert!(head.contains(&format!("\r\nContent-Length: {}\r\n", body.len())));
        assert_eq!(body, index_html());
    }
}
