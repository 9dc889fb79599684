//! The HTTP API (`GET /api/history`, `POST /api/publish`) and the history event: reading the
//! body, parking the socket while Redis answers, and the answers that come back.

use std::sync::Arc;
use std::time::Instant;

use tungstenite::Utf8Bytes;

use super::mode::History;
use super::{CoreLoop, API_WAIT};
use crate::access;
use crate::api::{self, ApiError, Audience};
use crate::backplane::NotQueued;
use crate::bus::{Dispatch, PageError, PageResult, PublishResult};
use crate::connection::{BodyOutcome, Connection};
use crate::handlers::Args;
use crate::history::{self, Offset};
use crate::http::Request;
use crate::metrics::{add, Closed};
use crate::protocol::{self, ErrorCode};

impl CoreLoop {
    /// `GET /api/history?limit=&before=&room=` with the user's token: the user's events (or,
    /// with `room`, the room's messages, for members only), newest first.
    pub(super) fn api_history(&mut self, key: usize, req: Request) {
        let shared = Arc::clone(&self.shared);
        if shared.mode().history().is_none() {
            return self.reply(key, api::json_error(404, "history is off"), &[]);
        }
        let identity = match shared.auth.identify(req.token().as_deref()) {
            Ok(identity) => identity,
            Err(e) => {
                add(&self.metrics().auth_failures, 1);
                return self.reply(key, api::json_error(401, &e.to_string()), &[]);
            }
        };
        // A room's history needs the token's right to read the room (its `rooms`/`rooms_read`
        // claims; none: any room).
        let room = req.query_param("room");
        let grant = identity.grant.as_ref();
        if let Some(room) = room.filter(|r| grant.is_some_and(|g| !g.may_join(r))) {
            let message = format!("this token may not read room {room:?}");
            return self.reply(key, api::json_error(403, &message), &[]);
        }
        // Per user (the token's), on every core: a flood from many addresses or connections
        // of one account shares one bucket.
        if !shared
            .api_history_rates
            .take(&identity.user, 1, Instant::now())
        {
            add(&self.metrics().api_history_rate_limited, 1);
            let body = api::json_error_with(
                429,
                "Retry-After: 1\r\n",
                "too many history requests for this user: retry later",
            );
            return self.reply(key, body, &[]);
        }
        self.history_page(key, &req, identity.user, true);
    }

    /// A page of `user`'s history (or, with `?room=`, of the room's) for `GET /api/history`,
    /// newest first. `members_only`: `user` must be a member of the room (the server API's key
    /// reads any room).
    pub(super) fn history_page(
        &mut self,
        key: usize,
        req: &Request,
        user: crate::UserId,
        members_only: bool,
    ) {
        let shared = Arc::clone(&self.shared);
        let Some(history) = shared.mode().history() else {
            return self.reply(key, api::json_error(404, "history is off"), &[]);
        };
        let (limit, before) = match api::page_query(req, shared.config.history.max_page) {
            Ok(q) => q,
            Err(e) => return self.reply(key, e.response(), &[]),
        };
        let room = match self.page_room(req.query_param("room").as_deref()) {
            Ok(room) => room,
            Err(message) => return self.reply(key, api::json_error(400, &message), &[]),
        };
        let bp = match history {
            History::Embedded(store) => {
                let page = self.embedded_page(store, &user, room, before, limit, members_only);
                let response = match page {
                    Ok(frames) => api::json_ok(&history::page_json(&frames)),
                    Err(_) => api::json_error(403, "not a member of the room"),
                };
                return self.reply(key, response, &[]);
            }
            History::Redis(bp) => bp,
        };
        let serial = self.wait(key);
        let asked = bp.request_page(crate::backplane::PageRequest {
            user,
            room,
            members_only,
            before,
            limit,
            core: self.id,
            key,
            serial,
            ack: None,
            max_bytes: usize::MAX,
        });
        match asked {
            Ok(()) => {}
            Err(NotQueued::Busy) => {
                let body = api::json_error_with(
                    429,
                    "Retry-After: 1\r\n",
                    "too many history reads waiting for this user: retry later",
                );
                self.reply(key, body, &[]);
            }
            Err(NotQueued::Off) => {
                self.reply(key, api::json_error(503, "history unavailable"), &[]);
            }
        }
    }

    /// The room a history page is for: `None` for the user's own history; an error message for
    /// a name that is not a room's (or rooms being off).
    fn page_room(&self, room: Option<&str>) -> Result<Option<crate::rooms::RoomId>, String> {
        let config = &self.shared.config;
        let max = config.rooms.max_room_name_bytes;
        match room {
            None => Ok(None),
            Some(_) if !config.rooms_active() => Err("rooms are off".into()),
            Some(r) if crate::rooms::valid_room(r, max) => Ok(Some(r.into())),
            Some(_) => Err(crate::rooms::bad_room_message(max)),
        }
    }

    /// A page of embedded history: the user's own, or a room's for a member (for anyone
    /// without `members_only`).
    fn embedded_page(
        &self,
        store: &history::MemoryHistory,
        user: &crate::UserId,
        room: Option<crate::rooms::RoomId>,
        before: Option<Offset>,
        limit: usize,
        members_only: bool,
    ) -> Result<Vec<Utf8Bytes>, PageError> {
        let now = crate::types::now_ms();
        let page = match room {
            None => store.page(user, before, limit, now),
            Some(room) => {
                let shared = &self.shared;
                let member = !members_only
                    || shared
                        .rooms
                        .as_ref()
                        .is_some_and(|r| r.is_member(user, &room));
                match (&shared.room_history, member) {
                    (Some(rooms), true) => rooms.page(&room, before, limit, now),
                    _ => return Err(PageError::NotMember),
                }
            }
        };
        Ok(page.into_iter().map(|(_, f)| f).collect())
    }

    /// Parks an HTTP connection until another thread answers; returns the serial to answer to.
    pub(super) fn wait(&mut self, key: usize) -> u64 {
        self.wait_until(key, Instant::now() + API_WAIT)
    }

    /// [`CoreLoop::wait`] with its own deadline (past it the sweep answers 503).
    pub(super) fn wait_until(&mut self, key: usize, deadline: Instant) -> u64 {
        let serial = self.next_serial;
        self.next_serial += 1;
        self.conns
            .replace(key, |conn| conn.into_waiting(serial, deadline));
        serial
    }

    /// `POST /api/publish` and `POST /api/disconnect` with the API key: checks the head, then
    /// reads the body.
    pub(super) fn api_publish_head(&mut self, key: usize, req: Request, rest: Vec<u8>) {
        let config = &self.shared.config;
        let len = api::check_api_key(&req, &config.history)
            .and_then(|()| api::publish_body_len(&req, &config.history));
        let len = match len {
            Ok(len) => len,
            Err(e) => {
                if e.status == 401 {
                    add(&self.metrics().auth_failures, 1);
                }
                return self.reply(key, e.response(), &[]);
            }
        };
        let replaced = self.conns.replace(key, |conn| {
            let Connection::Request(pending) = conn else {
                return conn;
            };
            Connection::Body(pending.into_body(req, rest, len))
        });
        if replaced {
            self.api_publish_body(key);
        }
    }

    /// Reads the body of `POST /api/publish` (then publishes it) or `POST /api/disconnect`.
    pub(super) fn api_publish_body(&mut self, key: usize) {
        let Some(Connection::Body(b)) = self.conns.get_mut(key) else {
            return;
        };
        match b.read_body() {
            BodyOutcome::Incomplete => return,
            BodyOutcome::Closed => return self.remove(key, Closed::Reset),
            BodyOutcome::Complete => {}
        }
        if b.request.path == "/api/disconnect" {
            return match api::parse_disconnect(&b.body) {
                Ok(user) => self.api_disconnect(key, user),
                Err(e) => self.reply(key, e.response(), &[]),
            };
        }
        let parsed = api::parse_publish(&b.body, &self.shared.config.history);
        match parsed {
            Ok((Audience::Users, dispatch)) => self.api_publish_dispatch(key, Arc::new(dispatch)),
            Ok((audience, dispatch)) => self.api_publish_to(key, audience, dispatch),
            Err(e) => self.reply(key, e.response(), &[]),
        }
    }

    /// Dispatches a checked publication like a handler's dispatch and answers with the offsets.
    pub(super) fn api_publish_dispatch(&mut self, key: usize, dispatch: Arc<Dispatch>) {
        let shared = Arc::clone(&self.shared);
        add(&self.metrics().dispatches, 1);
        let bp = match shared.mode().history() {
            None => {
                // No offsets without history: the event goes out as a handler's would.
                self.outbox.push(dispatch);
                self.flush_outbox(None);
                return self.reply(key, api::json_ok(r#"{"offsets":{}}"#), &[]);
            }
            Some(History::Embedded(store)) => {
                let offsets = self.append_embedded(store, &dispatch);
                return self.reply(key, api::json_ok(&api::offsets_json(&offsets)), &[]);
            }
            Some(History::Redis(bp)) => bp,
        };
        let serial = self.wait(key);
        let asked = bp.request_publish(crate::backplane::PublishRequest {
            dispatch,
            core: self.id,
            key,
            serial,
        });
        if !asked {
            self.reply(key, api::json_error(503, "publishing unavailable"), &[]);
        }
    }

    pub(super) fn on_page(&mut self, page: PageResult) {
        match self.conns.get(page.key) {
            Some(Connection::Open(open)) if open.serial == page.serial => {
                let Some(ack) = page.ack else {
                    return;
                };
                match page.result {
                    Ok(frames) => {
                        let max = self.answer_budget();
                        self.answer(page.key, Some(ack), |a| {
                            history::encode_page_ack(a, &frames, max)
                        })
                    }
                    Err(PageError::NotMember) => {
                        add(&self.metrics().client_errors, 1);
                        self.answer(page.key, Some(ack), |a| {
                            let code = ErrorCode::NotMember.as_str();
                            protocol::encode_error(a, code, "not a member of the room")
                        })
                    }
                    Err(PageError::Unavailable(e)) => {
                        let message = format!("history unavailable: {e}");
                        self.answer(page.key, Some(ack), |a| {
                            protocol::encode_error(a, ErrorCode::Internal.as_str(), &message)
                        })
                    }
                }
            }
            Some(Connection::Waiting(w)) if w.serial == page.serial => {
                let response = match page.result {
                    Ok(frames) => api::json_ok(&history::page_json(&frames)),
                    Err(PageError::NotMember) => api::json_error(403, "not a member of the room"),
                    Err(PageError::Unavailable(e)) => {
                        ApiError::new(503, format!("history unavailable: {e}")).response()
                    }
                };
                self.reply(page.key, response, &[]);
            }
            _ => {}
        }
    }

    pub(super) fn on_published(&mut self, published: PublishResult) {
        let Some(Connection::Waiting(w)) = self.conns.get(published.key) else {
            return;
        };
        if w.serial != published.serial {
            return;
        }
        let response = match published.result {
            Ok(offsets) => api::json_ok(&api::offsets_json(&offsets)),
            Err(e) => ApiError::new(503, format!("not published: {e}")).response(),
        };
        self.reply(published.key, response, &[]);
    }

    /// The largest answer (a `history` page, a `presence` list) one frame may carry: half the
    /// outbound bound, so an answer never makes its requester a slow consumer by itself.
    pub(super) fn answer_budget(&self) -> usize {
        self.shared.config.max_outbound_bytes / 2
    }

    /// `history {limit, before, room}` with an ack: the user's events (or the room's, for a
    /// member), newest first, in the ack.
    pub(super) fn on_history(
        &mut self,
        key: usize,
        user: &crate::UserId,
        ack: Option<u64>,
        args: Args<'_>,
    ) {
        let shared = Arc::clone(&self.shared);
        let error = |this: &mut Self, message: &str| {
            add(&this.metrics().client_errors, 1);
            this.answer(key, ack, |a| {
                protocol::encode_error(a, ErrorCode::BadArgs.as_str(), message)
            });
        };
        let Some(ack) = ack else {
            return error(self, "history answers through an ack: send one");
        };
        let raw = args.raw();
        let parsed = if raw == "null" {
            Ok(api::PageArgs::default())
        } else {
            args.parse::<api::PageArgs<'_>>()
        };
        let page_args = match parsed {
            Ok(a) => a,
            Err(e) => return error(self, &e.message),
        };
        let limit = match page_args.limit {
            Some(0) => return error(self, "limit must be positive"),
            Some(n) => n.min(shared.config.history.max_page),
            None => api::DEFAULT_PAGE.min(shared.config.history.max_page),
        };
        let before = match page_args.before.as_deref().map(str::parse::<Offset>) {
            None => None,
            Some(Ok(b)) => Some(b),
            Some(Err(_)) => return error(self, "before is not an offset"),
        };
        let room = match self.page_room(page_args.room.as_deref()) {
            Ok(room) => room,
            Err(message) => {
                add(&self.metrics().client_errors, 1);
                return self.answer(key, Some(ack), |a| {
                    protocol::encode_error(a, ErrorCode::BadRoom.as_str(), &message)
                });
            }
        };
        let access = self.conns.get_open(key).and_then(|o| o.access.as_deref());
        if let Some(room) = room.as_ref().filter(|r| !access::may_read(access, r)) {
            add(&self.metrics().client_errors, 1);
            let message = format!("this session may not read room {:?}", &**room);
            return self.answer(key, Some(ack), |a| {
                protocol::encode_error(a, ErrorCode::Forbidden.as_str(), &message)
            });
        }
        let bp = match shared.mode().history() {
            Some(History::Embedded(store)) => {
                let result = self.embedded_page(store, user, room, before, limit, true);
                return self.on_page(PageResult {
                    key,
                    serial: self.conns.get_open(key).map_or(0, |o| o.serial),
                    ack: Some(ack),
                    result,
                });
            }
            Some(History::Redis(bp)) => Some(bp),
            None => None,
        };
        let Some(open) = self.conns.get_open(key) else {
            return;
        };
        let serial = open.serial;
        let asked = bp.map_or(Err(NotQueued::Off), |bp| {
            bp.request_page(crate::backplane::PageRequest {
                user: user.clone(),
                room,
                members_only: true,
                before,
                limit,
                core: self.id,
                key,
                serial,
                ack: Some(ack),
                max_bytes: self.answer_budget(),
            })
        });
        let (code, message) = match asked {
            Ok(()) => return,
            Err(NotQueued::Busy) => (
                ErrorCode::RateLimited,
                "too many history reads waiting for this user: retry later",
            ),
            Err(NotQueued::Off) => (ErrorCode::Internal, "history unavailable"),
        };
        add(&self.metrics().client_errors, 1);
        self.answer(key, Some(ack), |a| {
            protocol::encode_error(a, code.as_str(), message)
        });
    }
}
