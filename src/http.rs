//! The plain HTTP side of the port: parsing request heads, routing, and building responses.
//!
//! Every request arrives here first. `GET /ws` with valid upgrade headers becomes a WebSocket;
//! `/healthz` and `/metrics` are answered in place; everything else gets a status and a one-line
//! reason. Plain HTTP responses always close the connection (no keep-alive: these routes are
//! for probes and scrapers, not browsers).

use std::fmt::Write as _;

use crate::config::hooks::Origins;

/// Most headers a request may carry before it is refused with 431.
const MAX_HEADERS: usize = 64;

/// The parts of a request head the server acts on.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `POST`, ...
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// Raw query string, without `?`.
    pub query: Option<String>,
    /// `Connection` lists `upgrade` and `Upgrade` is `websocket`.
    pub wants_upgrade: bool,
    /// `Sec-WebSocket-Key`.
    pub ws_key: Option<String>,
    /// `Sec-WebSocket-Version`.
    pub ws_version: Option<String>,
    /// The token of an `Authorization: Bearer` header.
    pub bearer: Option<String>,
    /// `Content-Length`, when present and numeric.
    pub content_length: Option<usize>,
    /// `Expect: 100-continue`: the client waits for `100 Continue` before sending its body.
    pub expect_continue: bool,
    /// `Origin` (sent by browsers).
    pub origin: Option<String>,
    /// `Host`.
    pub host: Option<String>,
}

/// What a buffer holding the start of a request amounts to so far.
// One per request head, moved once into the route: boxing the request would only add an
// allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    /// More bytes are needed.
    Partial,
    /// A full head of `head_len` bytes; bytes after it belong to the body or the WebSocket.
    Complete(Request, usize),
}

/// Why a request head was refused before routing.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Not HTTP/1.x, or broken syntax. Answer 400.
    #[error("malformed request")]
    Malformed,
    /// A body length a proxy in front could read differently (request smuggling): both
    /// `Content-Length` and `Transfer-Encoding`, several `Content-Length`s, or one that is not
    /// plain digits (`+36`). Answer 400.
    #[error("ambiguous request body length")]
    AmbiguousLength,
    /// A line ended by a bare LF rather than CRLF, which proxies split differently. Answer 400.
    #[error("bare LF in request head")]
    BareLf,
    /// Too many headers (or too large: the caller checks the size). Answer 431.
    #[error("request header fields too large")]
    TooLarge,
}

/// Parses the request head in `buf`.
pub fn parse_request(buf: &[u8]) -> Result<Parse, RequestError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(Parse::Partial),
        Err(httparse::Error::TooManyHeaders) => return Err(RequestError::TooLarge),
        Err(_) => return Err(RequestError::Malformed),
    };
    if has_bare_lf(&buf[..head_len]) {
        return Err(RequestError::BareLf);
    }
    let target = req.path.unwrap_or("/");
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (target, None),
    };
    let mut out = Request {
        method: req.method.unwrap_or("").to_string(),
        path: path.to_string(),
        query,
        ..Request::default()
    };
    let mut connection_upgrade = false;
    let mut upgrade_websocket = false;
    let mut lengths = 0;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("transfer-encoding") {
            // No route reads a chunked body: any transfer coding is refused, with or without a
            // Content-Length beside it.
            return Err(RequestError::AmbiguousLength);
        }
        if name.eq_ignore_ascii_case("content-length") {
            lengths += 1;
            out.content_length =
                Some(content_length(h.value).ok_or(RequestError::AmbiguousLength)?);
            if lengths > 1 {
                return Err(RequestError::AmbiguousLength);
            }
            continue;
        }
        let value = match std::str::from_utf8(h.value) {
            Ok(v) => v.trim(),
            Err(_) => continue,
        };
        if name.eq_ignore_ascii_case("connection") {
            connection_upgrade |= value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade_websocket |= value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("websocket"));
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            out.ws_key = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            out.ws_version = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("authorization") {
            if let Some((scheme, token)) = value.split_once(' ') {
                if scheme.eq_ignore_ascii_case("bearer") {
                    out.bearer = Some(token.trim().to_string());
                }
            }
        } else if name.eq_ignore_ascii_case("origin") {
            out.origin = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("host") {
            out.host = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("expect") {
            out.expect_continue = value.eq_ignore_ascii_case("100-continue");
        }
    }
    out.wants_upgrade = connection_upgrade && upgrade_websocket;
    Ok(Parse::Complete(out, head_len))
}

/// A `Content-Length` value: 1 to 19 ASCII digits, nothing else (`+36`, `3 6`, `0x10` and
/// `36, 36` are refused; surrounding spaces are allowed, as RFC 9110 allows them around values).
fn content_length(value: &[u8]) -> Option<usize> {
    let digits = value.trim_ascii();
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Whether a line of the head ends with LF alone (httparse accepts that; proxies differ).
fn has_bare_lf(head: &[u8]) -> bool {
    head.iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || head[i - 1] != b'\r'))
}

impl Request {
    /// The first value of query parameter `name`, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        let query = self.query.as_deref()?;
        query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name).then(|| percent_decode(v))
        })
    }

    /// The token from `Authorization: Bearer` or else `?token=`.
    pub fn token(&self) -> Option<String> {
        self.bearer.clone().or_else(|| self.query_param("token"))
    }
}

/// Whether a request from `origin` may upgrade or read `/api` answers (`--allowed-origins`).
/// A request without `Origin` does not come from a browser page and passes: the check stops
/// other sites' pages from using a visitor's browser (cross-site WebSocket hijacking).
pub fn origin_allowed(origins: &Origins, dev: bool, req: &Request) -> bool {
    let Some(origin) = req.origin.as_deref() else {
        return true;
    };
    match origins {
        Origins::Any => true,
        Origins::List(list) => list.iter().any(|o| o.eq_ignore_ascii_case(origin)),
        Origins::Default if dev => true,
        // Same origin: the page was served by this host.
        Origins::Default => {
            let host = origin.split_once("://").map_or("", |(_, h)| h);
            req.host
                .as_deref()
                .is_some_and(|h| !h.is_empty() && h.eq_ignore_ascii_case(host))
        }
    }
}

/// The CORS headers an `/api` answer to `origin` carries: only for an origin listed in
/// `--allowed-origins` (or any, with `*`); none otherwise, so browsers keep other pages out.
pub fn cors_headers(origins: &Origins, req: &Request) -> Option<String> {
    let origin = req.origin.as_deref()?;
    let allowed = match origins {
        Origins::Any => true,
        Origins::List(list) => list.iter().any(|o| o.eq_ignore_ascii_case(origin)),
        Origins::Default => false,
    };
    allowed.then(|| {
        format!(
            "Access-Control-Allow-Origin: {origin}\r\nVary: Origin\r\n\
             Access-Control-Allow-Methods: GET, POST, OPTIONS\r\n\
             Access-Control-Allow-Headers: Authorization, Content-Type\r\n\
             Access-Control-Max-Age: 600\r\n"
        )
    })
}

/// Inserts `headers` (each ending in CRLF) after the status line of `response`.
pub fn with_headers(mut response: Vec<u8>, headers: &str) -> Vec<u8> {
    if let Some(at) = response.windows(2).position(|w| w == b"\r\n") {
        response.splice(at + 2..at + 2, headers.bytes());
    }
    response
}

/// Decodes `%XX` escapes and `+` (as space); invalid escapes are kept literally.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The reason phrase of a status: its RFC 9110 name, or its class's for one not listed.
pub fn reason_phrase(status: u16) -> &'static str {
    named_reason(status).unwrap_or(match status {
        100..=199 => "Informational",
        200..=299 => "Success",
        300..=399 => "Redirection",
        400..=499 => "Client Error",
        _ => "Server Error",
    })
}

fn named_reason(status: u16) -> Option<&'static str> {
    Some(match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => return None,
    })
}

/// A complete response that closes the connection.
pub fn response(status: u16, content_type: &str, extra_headers: &str, body: &str) -> Vec<u8> {
    let mut head = String::with_capacity(160 + body.len());
    let _ = write!(
        head,
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\nCache-Control: no-store\r\n{extra_headers}\r\n",
        reason_phrase(status),
        body.len()
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// A plain-text error response with a one-line reason.
pub fn error_response(status: u16, reason: &str) -> Vec<u8> {
    response(
        status,
        "text/plain; charset=utf-8",
        "",
        &format!("{reason}\n"),
    )
}

/// The `101 Switching Protocols` answer for a WebSocket key.
pub fn upgrade_response(ws_key: &str) -> Vec<u8> {
    let accept = tungstenite::handshake::derive_accept_key(ws_key.as_bytes());
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    )
    .into_bytes()
}

/// A `Sec-WebSocket-Key` must be 16 bytes, base64-encoded: 24 characters ending in `==`.
pub fn valid_ws_key(key: &str) -> bool {
    key.len() == 24
        && key.ends_with("==")
        && key[..22]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

#[cfg(test)]
mod tests {
    use crate::config::hooks::Origins;

    fn from(origin: Option<&str>, host: &str) -> Request {
        Request {
            origin: origin.map(String::from),
            host: Some(host.into()),
            ..Request::default()
        }
    }

    #[test]
    fn origins_are_checked_as_configured() {
        let list = Origins::List(vec!["https://app.example".into()]);
        let site = from(Some("https://app.example"), "ws.example");
        let evil = from(Some("https://evil.example"), "ws.example");
        let same = from(Some("http://ws.example"), "ws.example");
        let none = from(None, "ws.example");
        assert!(origin_allowed(&list, false, &site));
        assert!(!origin_allowed(&list, false, &evil));
        assert!(origin_allowed(&list, false, &none));
        assert!(origin_allowed(&Origins::Default, true, &evil));
        assert!(!origin_allowed(&Origins::Default, false, &evil));
        assert!(origin_allowed(&Origins::Default, false, &same));
        assert!(origin_allowed(&Origins::Any, false, &evil));
        assert!(cors_headers(&list, &site)
            .unwrap()
            .contains("https://app.example"));
        assert_eq!(cors_headers(&list, &evil), None);
        assert_eq!(cors_headers(&Origins::Default, &site), None);
    }

    #[test]
    fn headers_go_after_the_status_line() {
        let r = with_headers(response(200, "text/plain", "", "hi"), "X-A: 1\r\n");
        let text = String::from_utf8(r).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Type"));
    }
    use super::*;

    #[test]
    fn parses_an_upgrade_request() {
        let raw =
            b"GET /ws?token=u%201&x=2 HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\n\
            Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
            Sec-WebSocket-Version: 13\r\n\r\nrest";
        let Parse::Complete(req, len) = parse_request(raw).unwrap() else {
            panic!("partial")
        };
        assert_eq!(&raw[len..], b"rest");
        assert_eq!(req.method, "GET");
        assert_eq!(req.path, "/ws");
        assert!(req.wants_upgrade);
        assert_eq!(req.query_param("token").as_deref(), Some("u 1"));
        assert_eq!(req.token().as_deref(), Some("u 1"));
        assert!(valid_ws_key(req.ws_key.as_deref().unwrap()));
    }

    #[test]
    fn bearer_wins_over_query() {
        let raw = b"GET /ws?token=q HTTP/1.1\r\nAuthorization: Bearer h\r\n\r\n";
        let Parse::Complete(req, _) = parse_request(raw).unwrap() else {
            panic!("partial")
        };
        assert_eq!(req.token().as_deref(), Some("h"));
        assert!(!req.wants_upgrade);
    }

    #[test]
    fn partial_garbage_and_too_many_headers() {
        assert_eq!(
            parse_request(b"GET /ws HTTP/1.1\r\nHost:").unwrap(),
            Parse::Partial
        );
        assert_eq!(
            parse_request(b"\x00\x01garbage\r\n\r\n"),
            Err(RequestError::Malformed)
        );
        let mut raw = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..100 {
            raw.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        raw.extend_from_slice(b"\r\n");
        assert_eq!(parse_request(&raw), Err(RequestError::TooLarge));
    }

    #[test]
    fn ambiguous_body_lengths_and_bare_lf_are_refused() {
        let ambiguous = [
            &b"POST /api/publish HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST /api/publish HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST /api/publish HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            b"POST /api/publish HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
            b"POST /api/publish HTTP/1.1\r\nContent-Length: +36\r\n\r\n",
            b"POST /api/publish HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n",
            b"POST /api/publish HTTP/1.1\r\nContent-Length: 0x10\r\n\r\n",
            b"POST /api/publish HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
        ];
        for raw in ambiguous {
            assert_eq!(
                parse_request(raw),
                Err(RequestError::AmbiguousLength),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        let bare_lf = b"GET /healthz HTTP/1.1\nHost: a\r\n\r\n";
        assert_eq!(parse_request(bare_lf), Err(RequestError::BareLf));
        let bare_lf_end = b"GET /healthz HTTP/1.1\r\nHost: a\n\n";
        assert_eq!(parse_request(bare_lf_end), Err(RequestError::BareLf));
        let fine = b"POST /api/publish HTTP/1.1\r\nContent-Length:  36 \r\n\r\n";
        let Parse::Complete(req, _) = parse_request(fine).unwrap() else {
            panic!("partial")
        };
        assert_eq!(req.content_length, Some(36));
    }

    #[test]
    fn every_status_has_its_reason_phrase() {
        assert_eq!(reason_phrase(411), "Length Required");
        assert_eq!(reason_phrase(413), "Content Too Large");
        assert_eq!(reason_phrase(429), "Too Many Requests");
        assert_eq!(reason_phrase(418), "Client Error");
        assert!((100..600).all(|s| reason_phrase(s) != "Unknown"));
    }

    #[test]
    fn percent_decoding_keeps_bad_escapes() {
        assert_eq!(percent_decode("a%2Fb%zz%4"), "a/b%zz%4");
        assert_eq!(percent_decode("%"), "%");
    }

    #[test]
    fn rfc6455_accept_key() {
        let resp = String::from_utf8(upgrade_response("dGhlIHNhbXBsZSBub25jZQ==")).unwrap();
        assert!(resp.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
    }

    #[test]
    fn rejects_bad_keys() {
        assert!(!valid_ws_key("short"));
        assert!(!valid_ws_key("dGhlIHNhbXBsZSBub25jZQ=!"));
    }
}
