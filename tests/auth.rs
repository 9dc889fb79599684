//! Authentication at the upgrade: every refusal is HTTP 401 with a one-line reason, and the user
//! id comes only from the verified token (JWT `sub`, or the token itself in dev mode).

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use switchboard::{AuthMode, Config};
use tungstenite::client::IntoClientRequest;

const SECRET: &str = "0123456789abcdef0123456789abcdef";

fn jwt_config(audience: Option<&str>) -> Config {
    Config {
        auth: AuthMode::Jwt {
            secret: SECRET.into(),
            audience: audience.map(String::from),
            issuer: None,
            leeway: Duration::ZERO,
        },
        ..test_config()
    }
}

fn token_for(sub: &str) -> String {
    jwt(SECRET, json!({"sub": sub, "exp": now_secs() + 300}))
}

/// Minimal unpadded base64url, to forge tokens the jsonwebtoken crate refuses to make.
fn b64url(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// `who` sends to `peer`; returns the `from` the peer sees.
fn from_seen_by(peer: &mut Client, who: &mut Client, peer_user: &str) -> String {
    who.send_message(peer_user, "who am i");
    let m = peer.recv_event("newMessage");
    assert_eq!(m["args"]["text"], "who am i");
    m["args"]["from"].as_str().unwrap().to_string()
}

#[test]
fn refusals_are_401_with_a_one_line_reason() {
    let server = TestServer::with_config(jwt_config(None));
    let expired = jwt(SECRET, json!({"sub": "u1", "exp": now_secs() - 60}));
    let forged = jwt(
        "another-secret-of-enough-length",
        json!({"sub": "u1", "exp": now_secs() + 300}),
    );
    let no_exp = jwt(SECRET, json!({"sub": "u1"}));
    let cases = [
        ("/ws".to_string(), "missing token\n"),
        ("/ws?token=".to_string(), "missing token\n"),
        ("/ws?token=garbage".to_string(), "malformed token\n"),
        ("/ws?token=a.b.c".to_string(), "malformed token\n"),
        (format!("/ws?token={expired}"), "token expired\n"),
        (format!("/ws?token={forged}"), "invalid signature\n"),
        (
            format!("/ws?token={no_exp}"),
            "invalid token: missing required claim\n",
        ),
    ];
    for (path, reason) in cases {
        assert_eq!(
            try_upgrade(server.addr, &path, ""),
            (401, reason.to_string()),
            "{path}"
        );
    }
    assert_eq!(metric(server.addr, "switchboard_auth_failures_total"), 7);
    assert_eq!(metric(server.addr, "switchboard_connections_open"), 0);
}

#[test]
fn alg_none_and_other_algorithms_are_refused() {
    let server = TestServer::with_config(jwt_config(None));
    let claims = b64url(format!(r#"{{"sub":"u1","exp":{}}}"#, now_secs() + 300).as_bytes());
    // `none` is not an algorithm the verifier knows: the header itself is unreadable.
    for (header, reason) in [
        (r#"{"alg":"none","typ":"JWT"}"#, "malformed token\n"),
        (
            r#"{"alg":"HS512","typ":"JWT"}"#,
            "invalid token: algorithm not allowed\n",
        ),
    ] {
        let token = format!("{}.{claims}.", b64url(header.as_bytes()));
        assert_eq!(
            try_upgrade(server.addr, &format!("/ws?token={token}"), ""),
            (401, reason.to_string()),
            "{header}"
        );
    }
    // HS512 signed with the right secret is still refused: only HS256 is accepted.
    let hs512 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
        &json!({"sub": "u1", "exp": now_secs() + 300}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    assert_eq!(
        try_upgrade(server.addr, &format!("/ws?token={hs512}"), ""),
        (401, "invalid token: algorithm not allowed\n".to_string())
    );
}

#[test]
fn audience_is_checked_when_configured() {
    let server = TestServer::with_config(jwt_config(Some("switchboard")));
    let exp = now_secs() + 300;
    let wrong = jwt(SECRET, json!({"sub": "u1", "exp": exp, "aud": "other"}));
    assert_eq!(
        try_upgrade(server.addr, &format!("/ws?token={wrong}"), ""),
        (401, "invalid token: wrong audience\n".to_string())
    );
    let missing = jwt(SECRET, json!({"sub": "u1", "exp": exp}));
    assert_eq!(
        try_upgrade(server.addr, &format!("/ws?token={missing}"), ""),
        (401, "invalid token: missing required claim\n".to_string())
    );
    let right = jwt(
        SECRET,
        json!({"sub": "u1", "exp": exp, "aud": "switchboard"}),
    );
    assert_eq!(
        try_upgrade(server.addr, &format!("/ws?token={right}"), "").0,
        101
    );
}

#[test]
fn a_good_jwt_makes_the_connection_its_sub() {
    let server = TestServer::with_config(jwt_config(None));
    let mut peer = Client::connect(server.addr, &token_for("peer"));
    let mut alice = Client::connect(server.addr, &token_for("alice"));
    assert_eq!(from_seen_by(&mut peer, &mut alice, "peer"), "alice");
    // And the other way: a message to "alice" reaches the connection whose token says so.
    peer.send_message("alice", "hi alice");
    let m = loop {
        let m = alice.recv_event("newMessage");
        if m["args"]["text"] == "hi alice" {
            break m;
        }
    };
    assert_eq!(
        (m["args"]["from"].as_str(), m["args"]["to"].as_str()),
        (Some("peer"), Some("alice"))
    );
}

#[test]
fn the_user_id_comes_only_from_the_token() {
    let server = TestServer::with_config(jwt_config(None));
    let mut peer = Client::connect(server.addr, &token_for("peer"));
    let token = token_for("alice");
    for query in [
        format!("user=mallory&token={token}&sub=mallory"),
        format!("token={token}&user=mallory"),
        format!("sub=mallory&from=mallory&token={token}"),
    ] {
        let url = format!("ws://{}/ws?{query}", server.addr);
        let mut c = Client::connect_url(&url, "alice");
        assert_eq!(from_seen_by(&mut peer, &mut c, "peer"), "alice", "{query}");
        c.close();
    }

    let dev = TestServer::start();
    let mut peer = dev.connect("peer");
    let url = format!("ws://{}/ws?user=mallory&token=bob&sub=mallory", dev.addr);
    let mut bob = Client::connect_url(&url, "bob");
    assert_eq!(from_seen_by(&mut peer, &mut bob, "peer"), "bob");
}

#[test]
fn dev_mode_takes_the_token_as_the_user_id() {
    let server = TestServer::start();
    let mut peer = server.connect("peer");
    let mut carol = server.connect("carol");
    assert_eq!(from_seen_by(&mut peer, &mut carol, "peer"), "carol");
    // Query values are percent-decoded.
    let url = format!("ws://{}/ws?token=d%C3%A9v%20user", server.addr);
    let mut spaced = Client::connect_url(&url, "dév user");
    assert_eq!(from_seen_by(&mut peer, &mut spaced, "peer"), "dév user");
    // Dev mode still refuses a missing token and unusable user ids.
    assert_eq!(
        try_upgrade(server.addr, "/ws", ""),
        (401, "missing token\n".to_string())
    );
    assert_eq!(
        try_upgrade(server.addr, "/ws?token=a%0Ab", ""),
        (401, "malformed token\n".to_string())
    );
    let long = "x".repeat(257);
    assert_eq!(
        try_upgrade(server.addr, &format!("/ws?token={long}"), ""),
        (401, "malformed token\n".to_string())
    );
}

fn bearer_request(
    addr: std::net::SocketAddr,
    query: &str,
    token: &str,
) -> tungstenite::handshake::client::Request {
    let mut req = format!("ws://{addr}/ws{query}")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    req
}

#[test]
fn bearer_header_works_and_wins_over_the_query() {
    let server = TestServer::with_config(jwt_config(None));
    let mut peer = Client::connect(server.addr, &token_for("peer"));

    let mut alice = Client::connect_request(
        bearer_request(server.addr, "", &token_for("alice")),
        "alice",
    );
    assert_eq!(from_seen_by(&mut peer, &mut alice, "peer"), "alice");

    // Both given: the header wins, even over a valid query token for someone else.
    let query = format!("?token={}", token_for("mallory"));
    let mut both = Client::connect_request(
        bearer_request(server.addr, &query, &token_for("alice")),
        "alice",
    );
    assert_eq!(from_seen_by(&mut peer, &mut both, "peer"), "alice");

    // ... and a bad header is not rescued by a good query token.
    let header = "Authorization: Bearer garbage\r\n";
    assert_eq!(
        try_upgrade(
            server.addr,
            &format!("/ws?token={}", token_for("alice")),
            header
        ),
        (401, "malformed token\n".to_string())
    );
    // The scheme is case-insensitive.
    let header = format!("Authorization: bearer {}\r\n", token_for("alice"));
    assert_eq!(try_upgrade(server.addr, "/ws", &header).0, 101);
}

/// Without a JWT secret, a non-loopback address needs `--dev-auth`: the binary refuses to start
/// with one line saying how, and starts once asked.
#[test]
fn dev_auth_off_loopback_needs_the_flag() {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["--listen", "0.0.0.0:0", "--cores", "1"])
        .env_remove("SWITCHBOARD_JWT_SECRET")
        .env_remove("SWITCHBOARD_DEV_AUTH")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run switchboard");
    // It must exit by itself; one that serves instead is killed and the test fails.
    let deadline = std::time::Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server started without a JWT secret on 0.0.0.0");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(2));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(
        stderr.contains("--jwt-secret") && stderr.contains("--dev-auth"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    let asked = ChildServer::spawn_on("0.0.0.0:0", &["--dev-auth"]);
    let port = asked.addr.port();
    let (status, _) = http_get(([127, 0, 0, 1], port).into(), "/healthz");
    assert_eq!(status, 200);
}
