//! The HTTP API's request checks and responses: `GET /api/history`, `POST /api/publish` (to
//! users, a room or everyone), `POST /api/disconnect`, `GET /api/presence`,
//! `GET /api/connections`. The core loop owns the sockets; this module only says what a
//! request asks for, or which 4xx it gets.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::history::{HistoryConfig, Offset};
use crate::http::{self, Request};
use crate::UserId;

/// Events per page when `limit` is absent.
pub const DEFAULT_PAGE: usize = 50;

/// A request the API refuses: the status and the reason sent as `{"error": reason}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {reason}")]
pub struct ApiError {
    /// The HTTP status (4xx, or 503 when Redis could not answer).
    pub status: u16,
    /// Why, for the client.
    pub reason: String,
}

impl ApiError {
    /// An error with `status`.
    pub fn new(status: u16, reason: impl Into<String>) -> Self {
        ApiError {
            status,
            reason: reason.into(),
        }
    }

    /// The whole HTTP response.
    pub fn response(&self) -> Vec<u8> {
        json_error(self.status, &self.reason)
    }
}

/// `{"error": reason}` with `status`.
pub fn json_error(status: u16, reason: &str) -> Vec<u8> {
    json_error_with(status, "", reason)
}

/// `{"error": reason}` with `status` and extra header lines (each ending in CRLF), e.g.
/// `Retry-After` on a 429.
pub fn json_error_with(status: u16, headers: &str, reason: &str) -> Vec<u8> {
    let body = serde_json::json!({ "error": reason }).to_string();
    http::response(status, "application/json", headers, &body)
}

/// A 200 with a JSON body.
pub fn json_ok(body: &str) -> Vec<u8> {
    http::response(200, "application/json", "", body)
}

/// `?limit=&before=` of `GET /api/history`: the page size (at most `max_page`) and the offset
/// the page ends before.
pub fn page_query(req: &Request, max_page: usize) -> Result<(usize, Option<Offset>), ApiError> {
    let limit = match req.query_param("limit") {
        None => DEFAULT_PAGE.min(max_page),
        Some(l) => match l.parse::<usize>() {
            Ok(n) if n > 0 => n.min(max_page),
            _ => return Err(ApiError::new(400, "limit must be a positive integer")),
        },
    };
    let before = match req.query_param("before") {
        None => None,
        Some(b) => Some(
            b.parse::<Offset>()
                .map_err(|_| ApiError::new(400, "before is not an offset"))?,
        ),
    };
    Ok((limit, before))
}

/// The `history` event's args: `{"limit": n, "before": "<offset>", "room": R}`, each optional.
#[derive(Debug, Default, Deserialize)]
pub struct PageArgs<'a> {
    /// Page size.
    pub limit: Option<usize>,
    /// End of the page (exclusive).
    #[serde(borrow)]
    pub before: Option<std::borrow::Cow<'a, str>>,
    /// A room's history instead of the caller's own (members only).
    #[serde(borrow, default)]
    pub room: Option<std::borrow::Cow<'a, str>>,
}

/// Checks `Authorization: Bearer <key>` for the server API routes: 404 when no key is
/// configured (the routes are off), 401 when the key is missing or wrong.
pub fn check_api_key(req: &Request, config: &HistoryConfig) -> Result<(), ApiError> {
    let Some(key) = config.api_key.as_deref() else {
        return Err(ApiError::new(404, "server API disabled: no --api-key set"));
    };
    let given = req.bearer.as_deref().unwrap_or("");
    if !constant_time_eq(given.as_bytes(), key.as_bytes()) {
        return Err(ApiError::new(401, "missing or wrong API key"));
    }
    Ok(())
}

/// Compares without an early exit, so the time taken does not reveal how much of a guessed key
/// was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The body length of a publish request: 411 without `Content-Length`, 413 past the bound.
pub fn publish_body_len(req: &Request, config: &HistoryConfig) -> Result<usize, ApiError> {
    let len = req
        .content_length
        .ok_or_else(|| ApiError::new(411, "Content-Length required"))?;
    if len > config.max_publish_body_bytes {
        return Err(ApiError::new(
            413,
            format!(
                "body over {} bytes (--history max publish body)",
                config.max_publish_body_bytes
            ),
        ));
    }
    Ok(len)
}

#[derive(Deserialize)]
struct PublishBody<'a> {
    #[serde(default)]
    users: Option<Vec<std::borrow::Cow<'a, str>>>,
    #[serde(default, borrow)]
    room: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    everyone: bool,
    #[serde(borrow)]
    event: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    args: &'a RawValue,
}

/// Who a publication goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Audience {
    /// The users listed (the dispatch's users).
    Users,
    /// The members of this room (valid name), looked up before publishing.
    Room(String),
    /// Every user online in the cluster, looked up before publishing.
    Everyone,
}

/// Parses and checks a publish body: JSON with exactly one of `users` (1 to
/// `max_publish_users` valid ids), `room` (a room name) or `"everyone": true`, plus `event`
/// (non-empty) and `args`. Nothing is dispatched unless all of it is valid. The dispatch's
/// users are sorted and distinct (empty for a room or everyone, filled once looked up); its
/// frame is encoded once.
pub fn parse_publish(
    body: &[u8],
    config: &HistoryConfig,
) -> Result<(Audience, crate::bus::Dispatch), ApiError> {
    let p: PublishBody<'_> =
        serde_json::from_slice(body).map_err(|e| ApiError::new(400, format!("bad body: {e}")))?;
    if p.event.is_empty() || p.event.len() > 256 {
        return Err(ApiError::new(400, "event must be 1 to 256 bytes"));
    }
    let targets =
        usize::from(p.users.is_some()) + usize::from(p.room.is_some()) + usize::from(p.everyone);
    if targets != 1 {
        return Err(ApiError::new(
            400,
            "give exactly one of users, room or \"everyone\": true",
        ));
    }
    let (audience, users) = match (p.users, p.room) {
        (Some(users), _) => (Audience::Users, users),
        (None, Some(room)) => {
            if !crate::rooms::valid_room(&room, 200) {
                return Err(ApiError::new(400, "invalid room name"));
            }
            (Audience::Room(room.into_owned()), Vec::new())
        }
        (None, None) => (Audience::Everyone, Vec::new()),
    };
    if audience == Audience::Users && users.is_empty() {
        return Err(ApiError::new(400, "users must not be empty"));
    }
    if let Some(bad) = users.iter().find(|u| !crate::auth::valid_user_id(u)) {
        return Err(ApiError::new(
            400,
            format!(
                "invalid user id {:?}",
                bad.chars().take(64).collect::<String>()
            ),
        ));
    }
    let mut users: Vec<UserId> = users.iter().map(|u| UserId::from(u.as_ref())).collect();
    users.sort_unstable();
    users.dedup();
    // Distinct users count: a repeated id costs one delivery.
    if users.len() > config.max_publish_users {
        return Err(ApiError::new(
            400,
            format!("more than {} users", config.max_publish_users),
        ));
    }
    let dispatch = crate::bus::encode_dispatch(users, &p.event, p.args)
        .map_err(|e| ApiError::new(400, format!("cannot encode: {e}")))?;
    Ok((audience, dispatch))
}

#[derive(Deserialize)]
struct DisconnectBody<'a> {
    #[serde(borrow)]
    user: std::borrow::Cow<'a, str>,
}

/// Parses `{"user": "..."}` of `POST /api/disconnect`.
pub fn parse_disconnect(body: &[u8]) -> Result<UserId, ApiError> {
    let d: DisconnectBody<'_> =
        serde_json::from_slice(body).map_err(|e| ApiError::new(400, format!("bad body: {e}")))?;
    if !crate::auth::valid_user_id(&d.user) {
        return Err(ApiError::new(400, "invalid user id"));
    }
    Ok(UserId::from(d.user.as_ref()))
}

/// The query parameter `name`, required: 400 naming it when absent or empty.
pub fn required_param(req: &Request, name: &str) -> Result<String, ApiError> {
    req.query_param(name)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ApiError::new(400, format!("?{name}= is required")))
}

/// `{"offsets":{"u1":"A-B",...}}`.
pub fn offsets_json(offsets: &[(UserId, Offset)]) -> String {
    let map: serde_json::Map<String, serde_json::Value> = offsets
        .iter()
        .map(|(u, o)| (u.to_string(), serde_json::Value::String(o.to_string())))
        .collect();
    serde_json::json!({ "offsets": map }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> HistoryConfig {
        HistoryConfig {
            enabled: true,
            api_key: Some("0123456789abcdef".into()),
            max_publish_users: 2,
            ..HistoryConfig::default()
        }
    }

    #[test]
    fn publish_bodies_are_checked_before_anything_goes_out() {
        let c = config();
        let (audience, ok) =
            parse_publish(br#"{"users":["b","a","b"],"event":"e","args":{"x":1}}"#, &c).unwrap();
        assert_eq!(audience, Audience::Users);
        assert_eq!(&*ok.users, &[UserId::from("a"), UserId::from("b")]);
        assert_eq!(ok.frame.as_str(), r#"{"event":"e","args":{"x":1}}"#);
        for bad in [
            &b"not json"[..],
            br#"{"event":"e","args":1}"#,
            br#"{"users":["a"],"args":1}"#,
            br#"{"users":["a"],"event":"e"}"#,
            br#"{"users":[],"event":"e","args":1}"#,
            br#"{"users":["a","b","c"],"event":"e","args":1}"#,
            br#"{"users":[""],"event":"e","args":1}"#,
            br#"{"users":["a"],"event":"","args":1}"#,
            br#"{"users":"a","event":"e","args":1}"#,
            br#"{"users":["a"],"room":"r","event":"e","args":1}"#,
            br#"{"room":"bad room","event":"e","args":1}"#,
            br#"{"everyone":false,"event":"e","args":1}"#,
        ] {
            let e = parse_publish(bad, &c).unwrap_err();
            assert_eq!(e.status, 400, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn rooms_everyone_and_disconnect_bodies() {
        let c = config();
        let (audience, d) =
            parse_publish(br#"{"room":"team:1","event":"e","args":1}"#, &c).unwrap();
        assert_eq!(audience, Audience::Room("team:1".into()));
        assert!(d.users.is_empty());
        let (audience, _) =
            parse_publish(br#"{"everyone":true,"event":"e","args":1}"#, &c).unwrap();
        assert_eq!(audience, Audience::Everyone);
        assert_eq!(&*parse_disconnect(br#"{"user":"u1"}"#).unwrap(), "u1");
        assert_eq!(parse_disconnect(br#"{"user":""}"#).unwrap_err().status, 400);
        assert_eq!(parse_disconnect(b"{}").unwrap_err().status, 400);
    }

    #[test]
    fn keys_compare_whole() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
