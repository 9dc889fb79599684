//! The application's say over connections: the connect, join and publish hooks (asked through
//! the pool in `crate::hooks`, answered through the inbox), room permissions from the token or
//! the connect hook, `refresh`, session expiry and `POST /api/disconnect`.

use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

use super::CoreLoop;
use crate::access::{self, Access};
use crate::auth::Identity;
use crate::bus::{HookDone, HookResume, HookVerdict};
use crate::connection::Connection;
use crate::handlers::Args;
use crate::hooks::{HookCall, HookKind};
use crate::http::{self, Request};
use crate::metrics::add;
use crate::protocol::{self, CloseReason, ErrorCode};
use crate::rooms::RoomArgs;
use crate::socketio::{ConnectRooms, Namespace};
use crate::UserId;

#[derive(Deserialize)]
struct RefreshArgs {
    token: String,
}

/// A Socket.IO CONNECT not sent to a hook: its `since` and `rooms`, and its identity.
pub(super) type SioConnectResume = ((Option<String>, Option<ConnectRooms>), Identity);

impl CoreLoop {
    /// The connect hook for a native upgrade, checked and authenticated: the request waits
    /// (no 101 yet) until the verdict comes back to [`CoreLoop::on_hook`].
    pub(super) fn ask_connect_hook(
        &mut self,
        key: usize,
        req: Request,
        rest: Vec<u8>,
        identity: Identity,
    ) {
        let Some(hooks) = self.shared.hooks.clone() else {
            return self.admit_upgrade(key, req, rest, Some(identity));
        };
        let body = json!({
            "user": &*identity.user,
            "claims": identity.claims,
            "transport": "websocket",
            "origin": req.origin,
        })
        .to_string();
        let serial = self.wait_until(key, Instant::now() + self.hook_wait());
        let call = HookCall {
            kind: HookKind::Connect,
            body,
            core: self.id,
            key,
            serial,
            resume: HookResume::Upgrade {
                req: Box::new(req),
                rest,
                identity,
            },
        };
        if let Err(done) = hooks.call(call) {
            self.on_hook(*done);
        }
    }

    /// The connect hook for a Socket.IO CONNECT: the namespace is joined (or refused with
    /// CONNECT_ERROR) when the verdict comes back. Without a hook the CONNECT is handed back
    /// (`Err`) for the caller to accept at once.
    pub(super) fn ask_sio_connect_hook(
        &mut self,
        key: usize,
        nsp: &str,
        resume: (Option<String>, Option<ConnectRooms>),
        identity: Identity,
    ) -> Result<(), Box<SioConnectResume>> {
        let (Some(hooks), Some(open), Some(ns)) = (
            self.shared.hooks.clone(),
            self.conns.get_open_mut(key),
            Namespace::from_name(nsp),
        ) else {
            return Err(Box::new((resume, identity)));
        };
        if let Some(session) = open.sio.as_deref_mut() {
            session.connecting.insert(ns);
        }
        let body = json!({
            "user": &*identity.user,
            "claims": identity.claims,
            "transport": "socketio",
            "namespace": nsp,
        })
        .to_string();
        let call = HookCall {
            kind: HookKind::Connect,
            body,
            core: self.id,
            key,
            serial: open.serial,
            resume: HookResume::SioConnect {
                nsp: nsp.to_string(),
                since: resume.0,
                rooms: resume.1,
                identity,
            },
        };
        if let Err(done) = hooks.call(call) {
            self.on_hook(*done);
        }
        Ok(())
    }

    /// How long an upgrade may wait for its connect hook: a call may queue behind others.
    fn hook_wait(&self) -> Duration {
        self.shared.config.hooks.timeout * 2 + Duration::from_secs(1)
    }

    /// Room permissions and the join/publish hooks for a client request. `true`: go on now;
    /// `false`: refused (answered) or parked until the hook's verdict.
    pub(super) fn authorize(
        &mut self,
        key: usize,
        user: &UserId,
        event: &str,
        args: Args<'_>,
        ack: Option<u64>,
    ) -> bool {
        let rooms = self.shared.config.rooms_active();
        let room_event = rooms && matches!(event, "joinRoom" | "sendRoomMessage");
        // Only a session with room permissions pays for reading the room here.
        let held = self.conns.get_open(key).and_then(|o| o.access.as_deref());
        let refused_room = match held.filter(|a| room_event && a.grant.is_some()) {
            Some(access) => args.parse::<RoomArgs<'_>>().ok().and_then(|a| {
                let allowed = if event == "joinRoom" {
                    access::may_join(Some(access), &a.room)
                } else {
                    access::may_send(Some(access), &a.room)
                };
                (!allowed).then(|| super::frames::truncate(&a.room, 64).to_string())
            }),
            None => None,
        };
        if let Some(room) = refused_room {
            let verb = if event == "joinRoom" {
                "join"
            } else {
                "send to"
            };
            let message = format!("this session may not {verb} room {room:?}");
            self.refuse_request(key, ack, ErrorCode::Forbidden, &message);
            return false;
        }
        let Some(hooks) = self.shared.hooks.clone() else {
            return true;
        };
        let kind = match event {
            "joinRoom" if rooms => HookKind::Join,
            "sendRoomMessage" if rooms => HookKind::Publish,
            "sendMessage" => HookKind::Publish,
            _ => return true,
        };
        let Some(serial) = self.conns.get_open(key).map(|o| o.serial) else {
            return false;
        };
        let raw = RawValue::from_string(args.raw().to_string()).ok();
        let body = json!({ "user": &**user, "event": event, "args": raw }).to_string();
        let call = HookCall {
            kind,
            body,
            core: self.id,
            key,
            serial,
            resume: HookResume::Request {
                event: event.to_string(),
                args: raw,
                ack,
            },
        };
        if let Err(done) = hooks.call(call) {
            self.on_hook(*done);
        }
        false
    }

    fn refuse_request(&mut self, key: usize, ack: Option<u64>, code: ErrorCode, message: &str) {
        add(&self.metrics().client_errors, 1);
        self.answer(key, ack, |a| {
            protocol::encode_error(a, code.as_str(), message)
        });
    }

    /// A hook's verdict: the parked upgrade, CONNECT or request goes on, or is refused.
    pub(super) fn on_hook(&mut self, done: HookDone) {
        let HookDone {
            key,
            serial,
            verdict,
            resume,
        } = done;
        match resume {
            HookResume::Upgrade {
                req,
                rest,
                mut identity,
            } => {
                match self.conns.get(key) {
                    Some(Connection::Waiting(w)) if w.serial == serial => {}
                    _ => return,
                }
                match verdict {
                    HookVerdict::Allow { grant, .. } => {
                        let from_hook = grant.is_some();
                        if from_hook {
                            identity.grant = grant;
                        }
                        let deadline = Instant::now() + self.shared.config.handshake_timeout;
                        self.conns.replace(key, |c| c.into_request(deadline));
                        self.admit_upgrade(key, *req, rest, Some(identity));
                        if from_hook {
                            self.mark_hook_grant(key);
                        }
                    }
                    HookVerdict::Deny(reason) => {
                        add(&self.metrics().handshake_failures, 1);
                        let body = format!("{}\n", one_line(&reason));
                        let response = http::response(403, "text/plain; charset=utf-8", "", &body);
                        self.reply(key, response, &[]);
                    }
                    HookVerdict::Failed(why) => {
                        add(&self.metrics().handshake_failures, 1);
                        let reason = format!("connect hook unavailable: {}", one_line(&why));
                        self.reply(key, http::error_response(503, &reason), &[]);
                    }
                }
            }
            HookResume::SioConnect {
                nsp,
                since,
                rooms,
                mut identity,
            } => {
                let Some(open) = self.conns.get_open_mut(key).filter(|o| o.serial == serial) else {
                    return;
                };
                if let (Some(session), Some(ns)) =
                    (open.sio.as_deref_mut(), Namespace::from_name(&nsp))
                {
                    session.connecting.remove(ns);
                }
                match verdict {
                    HookVerdict::Allow { grant, .. } => {
                        let from_hook = grant.is_some();
                        if from_hook {
                            identity.grant = grant;
                        }
                        self.sio_connected(key, &nsp, since, rooms, identity);
                        if from_hook {
                            self.mark_hook_grant(key);
                        }
                    }
                    HookVerdict::Deny(reason) => self.sio_refuse_connect(key, &nsp, &reason),
                    HookVerdict::Failed(why) => {
                        let reason = format!("connect hook unavailable: {why}");
                        self.sio_refuse_connect(key, &nsp, &reason);
                    }
                }
            }
            HookResume::Request { event, args, ack } => {
                let Some(user) = self
                    .conns
                    .get_open_serial(key, serial)
                    .map(|o| o.user.clone())
                else {
                    return;
                };
                match verdict {
                    HookVerdict::Allow { text, .. } => {
                        let args = match text {
                            Some(text) => with_text(args.as_deref(), text),
                            None => args,
                        };
                        self.run_request(key, &user, &event, Args::new(args.as_deref()), ack);
                    }
                    HookVerdict::Deny(reason) => {
                        self.refuse_request(key, ack, ErrorCode::Forbidden, &reason);
                    }
                    HookVerdict::Failed(why) => {
                        let message = format!("hook unavailable: {why}");
                        self.refuse_request(key, ack, ErrorCode::HookUnavailable, &message);
                    }
                }
            }
        }
    }

    /// The connection's rooms came from the connect hook: they stay for its life.
    fn mark_hook_grant(&mut self, key: usize) {
        let access = self.conns.get_open_mut(key).and_then(|o| o.access.as_mut());
        if let Some(access) = access {
            access.hook_grant = true;
        }
    }

    /// `refresh {token}`: a valid token for the same user extends the session to its `exp`
    /// (and its room claims, when it has them, replace the session's, unless the connect hook
    /// set those).
    pub(super) fn on_refresh(&mut self, key: usize, ack: Option<u64>, args: Args<'_>) {
        let token = match args.parse::<RefreshArgs>() {
            Ok(a) => a.token,
            Err(e) => return self.refuse_request(key, ack, ErrorCode::BadArgs, &e.message),
        };
        let identity = match self.shared.auth.identify(Some(&token)) {
            Ok(identity) => identity,
            Err(e) => {
                add(&self.metrics().auth_failures, 1);
                return self.refuse_request(key, ack, ErrorCode::BadToken, &e.to_string());
            }
        };
        let leeway = self.shared.auth.leeway_secs();
        let Some(open) = self.conns.get_open_mut(key) else {
            return;
        };
        if open.user != identity.user {
            let message = "the token is for another user";
            return self.refuse_request(key, ack, ErrorCode::BadToken, message);
        }
        let (kept, hook_grant) = match open.access.take() {
            Some(a) => (a.grant, a.hook_grant),
            None => (None, false),
        };
        let grant = if hook_grant {
            kept
        } else {
            identity.grant.or(kept)
        };
        open.access = Access::new(identity.exp, leeway, grant);
        if let Some(access) = open.access.as_mut() {
            access.hook_grant = hook_grant;
        }
        if ack.is_some() {
            let result = json!({ "exp": identity.exp });
            self.answer(key, ack, |a| protocol::encode_ack(a, &result));
        }
    }

    /// Closes every connection of `user` on this core with 4011.
    pub(super) fn disconnect_user(&mut self, user: &UserId) {
        for key in self.conns.user_keys(user) {
            self.close(key, CloseReason::Disconnected);
        }
    }
}

/// `args` with its `text` replaced (the publish hook rewrote it). Args that are not an object
/// are kept as they are: the handler refuses them anyway.
fn with_text(args: Option<&RawValue>, text: String) -> Option<Box<RawValue>> {
    let raw = args.map_or("null", RawValue::get);
    let mut value: serde_json::Value = serde_json::from_str(raw).ok()?;
    if let Some(obj) = value.as_object_mut() {
        obj.insert("text".into(), serde_json::Value::String(text));
    }
    RawValue::from_string(value.to_string()).ok()
}

/// A reason safe for a one-line HTTP body.
fn one_line(reason: &str) -> String {
    reason
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewritten_text_replaces_only_the_text() {
        let raw = RawValue::from_string(r#"{"room":"r","text":"bad word"}"#.into()).unwrap();
        let out = with_text(Some(&raw), "*** ****".into()).unwrap();
        let v: serde_json::Value = serde_json::from_str(out.get()).unwrap();
        assert_eq!(v, json!({"room": "r", "text": "*** ****"}));
        assert_eq!(one_line("a\r\nb"), "ab");
    }
}
