//! Event handlers: the registry from event name to handler, the context a handler runs in, and
//! the built-in chat handler `sendMessage`.
//!
//! A handler runs on the core loop that owns the calling connection, so it must not block. It
//! answers the caller through its return value (sent as the `ack` when the client asked for one)
//! and reaches other users through [`Context::dispatch`], which encodes the event once.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::auth::valid_user_id;
use crate::bus::{encode_dispatch, Dispatch};
use crate::protocol::ErrorCode;
use crate::types::{now_ms, UserId};

/// Identifies one connection in the process: the core that owns it and its slab key there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectionId {
    /// The core loop owning the connection.
    pub core: usize,
    /// The connection's key in that core's slab (reused after the connection closes).
    pub key: usize,
}

/// A handler's failure, sent to the client as `{"event": "error", "args": {code, message}}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct HandlerError {
    /// Machine-readable code, e.g. `bad_args`.
    pub code: Cow<'static, str>,
    /// Human-readable explanation.
    pub message: String,
}

impl HandlerError {
    /// An error with a custom code.
    pub fn new(code: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        HandlerError {
            code: code.into(),
            message: message.into(),
        }
    }

    /// The client's `args` were not what the handler takes.
    pub fn bad_args(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadArgs.as_str(), message)
    }

    /// The handler failed for a reason that is not the client's fault.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal.as_str(), message)
    }
}

/// What a handler returns: the `ack` result on success.
pub type HandlerResult = Result<Value, HandlerError>;

/// The `args` of an envelope, still as raw JSON.
#[derive(Debug, Clone, Copy)]
pub struct Args<'a>(Option<&'a RawValue>);

impl<'a> Args<'a> {
    /// Wraps raw JSON (`None` when the envelope had no `args`).
    pub fn new(raw: Option<&'a RawValue>) -> Self {
        Args(raw)
    }

    /// Deserializes into the handler's own type; failure is a `bad_args` error.
    pub fn parse<T: Deserialize<'a>>(&self) -> Result<T, HandlerError> {
        let raw = self.0.map_or("null", RawValue::get);
        serde_json::from_str(raw).map_err(|e| HandlerError::bad_args(e.to_string()))
    }

    /// The raw JSON text (`null` when absent).
    pub fn raw(&self) -> &'a str {
        self.0.map_or("null", RawValue::get)
    }
}

/// Makes message ids unique across cores and instances: node id, core, per-core sequence.
#[derive(Debug)]
pub struct MessageIds {
    node: u64,
    core: u16,
    seq: u64,
}

impl MessageIds {
    /// Ids for `core` of instance `node`.
    pub fn new(node: u64, core: usize) -> Self {
        MessageIds {
            node,
            core: core as u16,
            seq: 0,
        }
    }

    /// The next id: 32 hex digits, unique as long as node ids are.
    pub fn next_id(&mut self) -> String {
        self.seq += 1;
        format!("{:016x}{:04x}{:012x}", self.node, self.core, self.seq)
    }
}

/// What a handler sees of the world.
pub struct Context<'a> {
    user: &'a UserId,
    connection: ConnectionId,
    outbox: &'a mut Vec<Arc<Dispatch>>,
    ids: &'a mut MessageIds,
}

impl<'a> Context<'a> {
    /// Used by the core loop (and by tests of handlers).
    pub fn new(
        user: &'a UserId,
        connection: ConnectionId,
        outbox: &'a mut Vec<Arc<Dispatch>>,
        ids: &'a mut MessageIds,
    ) -> Self {
        Context {
            user,
            connection,
            outbox,
            ids,
        }
    }

    /// The caller's user id, from its verified token.
    pub fn user(&self) -> &UserId {
        self.user
    }

    /// The calling connection.
    pub fn connection(&self) -> ConnectionId {
        self.connection
    }

    /// A fresh message id, unique across cores and instances.
    pub fn new_message_id(&mut self) -> String {
        self.ids.next_id()
    }

    /// Sends `event` with `args` to every live connection of every user in `users` (each user
    /// once, however often listed). The frame is encoded here, once, and shared by all recipients.
    /// Delivery happens when the handler returns.
    pub fn dispatch(
        &mut self,
        users: impl IntoIterator<Item = UserId>,
        event: &str,
        args: &impl Serialize,
    ) -> Result<(), HandlerError> {
        self.dispatch_with_key(users, event, args, None)
    }

    /// [`Context::dispatch`] with an idempotency key: with history on, a later dispatch with the
    /// same key (from a client resending what it was never acknowledged for) is stored and
    /// delivered to each user only once within the dedupe window (`--dedupe-window`). The key
    /// must identify the sender too (handlers usually prefix the caller's user id): keys are
    /// compared per recipient, across all senders.
    pub fn dispatch_once(
        &mut self,
        users: impl IntoIterator<Item = UserId>,
        event: &str,
        args: &impl Serialize,
        key: &str,
    ) -> Result<(), HandlerError> {
        self.dispatch_with_key(users, event, args, Some(key))
    }

    fn dispatch_with_key(
        &mut self,
        users: impl IntoIterator<Item = UserId>,
        event: &str,
        args: &impl Serialize,
        key: Option<&str>,
    ) -> Result<(), HandlerError> {
        let mut users: Vec<UserId> = users.into_iter().collect();
        users.sort_unstable();
        users.dedup();
        if users.is_empty() {
            return Ok(());
        }
        let mut dispatch = encode_dispatch(users, event, args)
            .map_err(|e| HandlerError::internal(e.to_string()))?;
        dispatch.dedupe = key.map(Box::from);
        self.outbox.push(Arc::new(dispatch));
        Ok(())
    }
}

/// An event handler. Closures `Fn(&mut Context, Args) -> HandlerResult` implement it.
pub trait Handler: Send + Sync + 'static {
    /// Handles one event from the connection in `ctx`.
    fn handle(&self, ctx: &mut Context<'_>, args: Args<'_>) -> HandlerResult;
}

impl<F> Handler for F
where
    F: Fn(&mut Context<'_>, Args<'_>) -> HandlerResult + Send + Sync + 'static,
{
    fn handle(&self, ctx: &mut Context<'_>, args: Args<'_>) -> HandlerResult {
        self(ctx, args)
    }
}

/// Event name → handler. Built before the server starts, then shared read-only by every core.
#[derive(Clone, Default)]
pub struct Handlers {
    map: HashMap<String, Arc<dyn Handler>>,
}

impl Handlers {
    /// A registry with no handlers at all.
    pub fn empty() -> Self {
        Handlers::default()
    }

    /// A registry with the built-in handlers (`sendMessage`).
    pub fn with_builtins() -> Self {
        let mut h = Handlers::empty();
        h.register("sendMessage", SendMessage);
        h
    }

    /// Registers (or replaces) the handler for `event`.
    pub fn register(&mut self, event: impl Into<String>, handler: impl Handler) -> &mut Self {
        self.map.insert(event.into(), Arc::new(handler));
        self
    }

    /// The handler for `event`.
    pub fn get(&self, event: &str) -> Option<&dyn Handler> {
        self.map.get(event).map(|h| h.as_ref())
    }
}

/// `sendMessage {to, text, clientId?}` → `newMessage {id, from, to, text, ts}` to every device
/// of `to` and of the sender. Acks with `{id, ts}`.
///
/// `clientId` (1 to [`MAX_CLIENT_ID_BYTES`] of `A-Z a-z 0-9 - _ .`) makes a resend safe: with
/// history on, a message whose `clientId` the sender already used within the dedupe window is
/// stored and delivered once.
pub struct SendMessage;

/// Longest `clientId` of `sendMessage`.
pub const MAX_CLIENT_ID_BYTES: usize = 64;

#[derive(Deserialize)]
struct SendMessageArgs<'a> {
    #[serde(borrow)]
    to: Cow<'a, str>,
    #[serde(borrow)]
    text: Cow<'a, str>,
    #[serde(borrow, default, rename = "clientId")]
    client_id: Option<Cow<'a, str>>,
}

#[derive(Serialize)]
struct NewMessage<'a> {
    id: &'a str,
    from: &'a str,
    to: &'a str,
    text: &'a str,
    ts: u64,
}

fn valid_client_id(id: &str) -> bool {
    (1..=MAX_CLIENT_ID_BYTES).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The idempotency key of a message `user` sent with `client_id`: `bad_args` when the
/// `clientId` is not usable, `None` without one. The sender's id keeps two senders' clientIds
/// apart; its length keeps the split unambiguous (user ids may contain any printable character).
pub(crate) fn idempotency_key(
    user: &str,
    client_id: Option<&str>,
) -> Result<Option<String>, HandlerError> {
    match client_id {
        None => Ok(None),
        Some(c) if valid_client_id(c) => Ok(Some(format!("{}:{user}:{c}", user.len()))),
        Some(_) => Err(HandlerError::bad_args(format!(
            "\"clientId\" must be 1 to {MAX_CLIENT_ID_BYTES} of A-Z a-z 0-9 - _ ."
        ))),
    }
}

impl Handler for SendMessage {
    fn handle(&self, ctx: &mut Context<'_>, args: Args<'_>) -> HandlerResult {
        let a: SendMessageArgs<'_> = args.parse()?;
        if !valid_user_id(&a.to) {
            return Err(HandlerError::bad_args("\"to\" is not a valid user id"));
        }
        let key = idempotency_key(ctx.user(), a.client_id.as_deref())?;
        let id = ctx.new_message_id();
        let ts = now_ms();
        let from = ctx.user().clone();
        let msg = NewMessage {
            id: &id,
            from: &from,
            to: &a.to,
            text: &a.text,
            ts,
        };
        let users = [UserId::from(a.to.as_ref()), from.clone()];
        match key {
            Some(key) => ctx.dispatch_once(users, "newMessage", &msg, &key)?,
            None => ctx.dispatch(users, "newMessage", &msg)?,
        }
        Ok(serde_json::json!({ "id": id, "ts": ts }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(event: &str, args: &str) -> (HandlerResult, Vec<Arc<Dispatch>>) {
        let handlers = Handlers::with_builtins();
        let user: UserId = "u2".into();
        let mut outbox = Vec::new();
        let mut ids = MessageIds::new(1, 0);
        let raw: Box<RawValue> = serde_json::from_str(args).unwrap();
        let mut ctx = Context::new(
            &user,
            ConnectionId { core: 0, key: 0 },
            &mut outbox,
            &mut ids,
        );
        let res = handlers
            .get(event)
            .unwrap()
            .handle(&mut ctx, Args::new(Some(&raw)));
        (res, outbox)
    }

    #[test]
    fn send_message_dispatches_once_to_both_users() {
        let (res, outbox) = run("sendMessage", r#"{"to":"u1","text":"hi"}"#);
        let ack = res.unwrap();
        assert_eq!(outbox.len(), 1);
        let d = &outbox[0];
        assert_eq!(&*d.users, &[UserId::from("u1"), UserId::from("u2")]);
        let v: Value = serde_json::from_str(d.frame.as_str()).unwrap();
        assert_eq!(v["event"], "newMessage");
        assert_eq!(v["args"]["from"], "u2");
        assert_eq!(v["args"]["to"], "u1");
        assert_eq!(v["args"]["text"], "hi");
        assert_eq!(v["args"]["id"], ack["id"]);
    }

    #[test]
    fn send_to_self_lists_the_user_once() {
        let (_, outbox) = run("sendMessage", r#"{"to":"u2","text":"note"}"#);
        assert_eq!(&*outbox[0].users, &[UserId::from("u2")]);
    }

    #[test]
    fn wrong_args_are_bad_args() {
        for args in [
            r#"{"to":5,"text":"x"}"#,
            r#"{"text":"x"}"#,
            "null",
            r#"{"to":"","text":"x"}"#,
        ] {
            let (res, outbox) = run("sendMessage", args);
            assert_eq!(res.unwrap_err().code, "bad_args", "{args}");
            assert!(outbox.is_empty());
        }
    }

    #[test]
    fn client_id_becomes_the_idempotency_key() {
        let (res, outbox) = run("sendMessage", r#"{"to":"u1","text":"hi","clientId":"m-1"}"#);
        assert!(res.is_ok());
        assert_eq!(outbox[0].dedupe.as_deref(), Some("2:u2:m-1"));
        let (_, outbox) = run("sendMessage", r#"{"to":"u1","text":"hi"}"#);
        assert_eq!(outbox[0].dedupe, None);
        for bad in ["", "a b", "x:y", &"z".repeat(65)] {
            let args = serde_json::json!({"to": "u1", "text": "t", "clientId": bad}).to_string();
            let (res, outbox) = run("sendMessage", &args);
            assert_eq!(res.unwrap_err().code, "bad_args", "{bad:?}");
            assert!(outbox.is_empty());
        }
    }

    #[test]
    fn message_ids_are_unique_per_core() {
        let mut a = MessageIds::new(7, 0);
        let mut b = MessageIds::new(7, 1);
        assert_ne!(a.next_id(), b.next_id());
        assert_ne!(a.next_id(), a.next_id());
    }
}
