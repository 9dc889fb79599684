//! The server API under `/api` (the application's backend, with `--api-key`): routing and CORS,
//! publishing to a room or to everyone, `POST /api/disconnect`, `GET /api/presence`,
//! `GET /api/connections` and a user's history. Embedded, the answers come from this process
//! at once; with Redis, the rooms worker asks Redis and the answer comes back through the inbox
//! (`CoreMsg::Api`) while the HTTP connection waits.

use std::sync::Arc;

use super::CoreLoop;
use crate::api::{self, ApiError, Audience};
use crate::backplane::{ApiQuery, ApiTarget, RoomJob};
use crate::bus::{ApiAnswer, ApiData, CoreMsg, Dispatch};
use crate::connection::Connection;
use crate::http::{self, Request};
use crate::metrics::add;
use crate::rooms::RoomId;
use crate::UserId;

/// Most users `"everyone": true` publishes to; past it the request gets 413 (publish to rooms
/// instead). Each user's copy is one history append.
pub(super) const MAX_EVERYONE: usize = 100_000;

impl CoreLoop {
    /// Every `/api/...` request: the CORS preflight and headers, then the route.
    pub(super) fn api_route(&mut self, key: usize, req: Request, rest: Vec<u8>) {
        let cors = http::cors_headers(&self.shared.config.allowed_origins, &req);
        if req.method == "OPTIONS" {
            let response = match cors {
                Some(headers) => http::response(204, "text/plain", &headers, ""),
                None => api::json_error(403, "origin not allowed (--allowed-origins)"),
            };
            return self.reply(key, response, &rest);
        }
        if let Some(headers) = cors {
            self.cors.insert(key, headers);
        }
        let method = match req.path.as_str() {
            "/api/history" | "/api/presence" | "/api/connections" => "GET",
            "/api/publish" | "/api/disconnect" => "POST",
            _ => return self.reply(key, api::json_error(404, "not found"), &rest),
        };
        if req.method != method {
            return self.reply(key, api::json_error(405, "method not allowed"), &rest);
        }
        match req.path.as_str() {
            "/api/history" if self.api_key_history(&req) => self.api_user_history(key, req),
            "/api/history" => self.api_history(key, req),
            "/api/presence" => self.api_presence(key, &req),
            "/api/connections" => self.api_connections(key, &req),
            _ => self.api_publish_head(key, req, rest),
        }
    }

    /// Checks the API key; a refusal is answered (and `false` returned).
    fn api_key_ok(&mut self, key: usize, req: &Request) -> bool {
        match api::check_api_key(req, &self.shared.config.history) {
            Ok(()) => true,
            Err(e) => {
                if e.status == 401 {
                    add(&self.metrics().auth_failures, 1);
                }
                self.reply(key, e.response(), &[]);
                false
            }
        }
    }

    /// Whether `GET /api/history` is the server API's (`?user=`, or `?room=` with the API key)
    /// rather than a user's with its own token.
    fn api_key_history(&self, req: &Request) -> bool {
        req.query_param("user").is_some()
            || (req.query_param("room").is_some()
                && api::check_api_key(req, &self.shared.config.history).is_ok())
    }

    /// `GET /api/history?user=` with the API key: any user's history; `?room=`: any room's,
    /// members or not.
    fn api_user_history(&mut self, key: usize, req: Request) {
        if !self.api_key_ok(key, &req) {
            return;
        }
        if req.query_param("room").is_some() {
            // The room's history, whoever asks: the user (if named) is not checked for
            // membership.
            let user = req.query_param("user").unwrap_or_default();
            return self.history_page(key, &req, UserId::from(user), false);
        }
        match api::required_param(&req, "user") {
            Ok(user) if crate::auth::valid_user_id(&user) => {
                self.history_page(key, &req, UserId::from(user), false)
            }
            Ok(_) => self.reply(key, api::json_error(400, "invalid user id"), &[]),
            Err(e) => self.reply(key, e.response(), &[]),
        }
    }

    /// `GET /api/presence?room=`: the room's members online.
    fn api_presence(&mut self, key: usize, req: &Request) {
        if !self.api_key_ok(key, req) {
            return;
        }
        let room = match api::required_param(req, "room") {
            Ok(room) => room,
            Err(e) => return self.reply(key, e.response(), &[]),
        };
        let shared = Arc::clone(&self.shared);
        if let Some(rooms) = &shared.rooms {
            let members = rooms.online_in(&room);
            let names: Vec<&str> = members.iter().map(|u| &**u).collect();
            let body = serde_json::json!({ "room": room, "online": names }).to_string();
            return self.reply(key, api::json_ok(&body), &[]);
        }
        self.api_ask_redis(key, ApiQuery::Presence(RoomId::from(room.as_str())), None);
    }

    /// `GET /api/connections?user=`: the user's open connections in the cluster.
    fn api_connections(&mut self, key: usize, req: &Request) {
        if !self.api_key_ok(key, req) {
            return;
        }
        let user = match api::required_param(req, "user") {
            Ok(user) => user,
            Err(e) => return self.reply(key, e.response(), &[]),
        };
        let shared = Arc::clone(&self.shared);
        if let Some(rooms) = &shared.rooms {
            let count = rooms.devices(&user);
            let body = serde_json::json!({ "user": user, "connections": count }).to_string();
            return self.reply(key, api::json_ok(&body), &[]);
        }
        self.api_ask_redis(key, ApiQuery::Connections(UserId::from(user)), None);
    }

    /// `POST /api/disconnect {"user"}`: every connection of the user, on every instance, is
    /// closed with 4011.
    pub(super) fn api_disconnect(&mut self, key: usize, user: UserId) {
        let shared = Arc::clone(&self.shared);
        if shared.backplane.is_none() || !shared.config.rooms_active() {
            // This process is all there is (or, on a Redis Cluster or with seed routing, all
            // this request can reach): every core closes its own.
            for core in 0..shared.bus.cores() {
                shared.bus.send(core, CoreMsg::Disconnect(user.clone()));
            }
            let cluster = shared.backplane.is_some();
            let body = serde_json::json!({ "user": &*user, "instanceOnly": cluster });
            return self.reply(key, api::json_ok(&body.to_string()), &[]);
        }
        self.api_ask_redis(key, ApiQuery::Disconnect(user), None);
    }

    /// `POST /api/publish` to a room's members or to everyone online: looked up, then published
    /// like a list of users.
    pub(super) fn api_publish_to(&mut self, key: usize, audience: Audience, dispatch: Dispatch) {
        let shared = Arc::clone(&self.shared);
        if !shared.config.rooms_active() {
            let e = ApiError::new(404, "rooms are off (they need per-user routing)");
            return self.reply(key, e.response(), &[]);
        }
        if let Some(rooms) = &shared.rooms {
            let users = match &audience {
                Audience::Room(room) => rooms.members(room),
                _ => rooms.online_users(),
            };
            return self.api_publish_users(key, &dispatch, users);
        }
        let query = match audience {
            Audience::Room(room) => ApiQuery::Members(RoomId::from(room.as_str())),
            _ => ApiQuery::Online,
        };
        self.api_ask_redis(key, query, Some(Arc::new(dispatch)));
    }

    /// Publishes `template`'s frame to `users` (sorted, distinct) and answers with the offsets.
    fn api_publish_users(&mut self, key: usize, template: &Dispatch, users: Vec<UserId>) {
        if users.len() > MAX_EVERYONE {
            let e = ApiError::new(
                413,
                format!("more than {MAX_EVERYONE} users to publish to: publish to rooms"),
            );
            return self.reply(key, e.response(), &[]);
        }
        if users.is_empty() {
            return self.reply(key, api::json_ok(r#"{"offsets":{}}"#), &[]);
        }
        let dispatch = Dispatch {
            users: users.into_boxed_slice(),
            frame: template.frame.clone(),
            args_at: template.args_at,
            sio: Default::default(),
            dedupe: None,
        };
        self.api_publish_dispatch(key, Arc::new(dispatch));
    }

    /// Parks the HTTP connection and hands `query` to the rooms worker.
    fn api_ask_redis(&mut self, key: usize, query: ApiQuery, pending: Option<Arc<Dispatch>>) {
        let shared = Arc::clone(&self.shared);
        let Some(bp) = shared
            .backplane
            .as_ref()
            .filter(|_| shared.config.rooms_active())
        else {
            let e = ApiError::new(404, "rooms are off (they need per-user routing)");
            return self.reply(key, e.response(), &[]);
        };
        let serial = self.wait(key);
        let target = ApiTarget {
            core: self.id,
            key,
            serial,
        };
        if !bp.room_request(RoomJob::Api {
            query,
            target,
            pending,
        }) {
            self.reply(key, api::json_error(503, "redis unavailable"), &[]);
        }
    }

    /// The rooms worker's answer for a waiting server API request.
    pub(super) fn on_api_answer(&mut self, answer: ApiAnswer) {
        match self.conns.get(answer.key) {
            Some(Connection::Waiting(w)) if w.serial == answer.serial => {}
            _ => return,
        }
        match (answer.result, answer.pending) {
            (Ok(ApiData::Json(body)), _) => self.reply(answer.key, api::json_ok(&body), &[]),
            (Ok(ApiData::Users(users)), Some(template)) => {
                // Back to a plain request, so the publication can park it again.
                let deadline = std::time::Instant::now() + super::API_WAIT;
                self.conns.replace(answer.key, |c| c.into_request(deadline));
                self.api_publish_users(answer.key, &template, users);
            }
            (Ok(ApiData::Users(_)), None) => {
                self.reply(answer.key, api::json_error(500, "nothing to publish"), &[]);
            }
            (Err(e), _) => {
                let e = ApiError::new(503, format!("redis unavailable: {e}"));
                self.reply(answer.key, e.response(), &[]);
            }
        }
    }
}
