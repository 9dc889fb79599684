//! RESP replies on a subscribed link: what each one means to the subscriber (a publication, a
//! confirmed (un)subscription, a PONG, a moved slot, an error), read without any I/O.

use redis::Value;

/// A reply read from a subscribed link, before looking into its items.
#[derive(Debug, PartialEq)]
pub(super) enum Resp {
    /// A push or array reply: see [`classify`].
    Items(Vec<Value>),
    /// `+PONG`: outside subscribed mode (no channel yet) PING answers so.
    Pong,
    /// `+OK` or another status (AUTH).
    Status,
    /// MOVED or ASK: the cluster moved slots.
    Moved,
    /// Any other error, as text.
    ServerError(String),
    /// Nothing the subscriber expects.
    Unexpected(Value),
}

/// Sorts a reply by its RESP type.
pub(super) fn resp(value: Value) -> Resp {
    match value {
        Value::Array(items) => Resp::Items(items),
        Value::Push { kind, mut data } => {
            data.insert(0, Value::BulkString(kind.to_string().into_bytes()));
            Resp::Items(data)
        }
        Value::SimpleString(s) if s.eq_ignore_ascii_case("pong") => Resp::Pong,
        Value::Okay | Value::SimpleString(_) => Resp::Status,
        Value::ServerError(e) => {
            let text = format!("{e:?}");
            if text.contains("MOVED") || text.contains("ASK") {
                Resp::Moved
            } else {
                Resp::ServerError(text)
            }
        }
        other => Resp::Unexpected(other),
    }
}

/// What a push or array reply means.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Reply<'a> {
    /// A publication (`message`, `smessage` or `pmessage`).
    Message {
        channel: &'a [u8],
        payload: &'a [u8],
    },
    /// Redis confirmed a (shard) subscription to `channel`; `count` channels are subscribed.
    Subscribed { channel: &'a [u8], count: i64 },
    /// A (un)subscription with only its count to act on.
    Count(i64),
    /// Redis dropped a shard channel: asked for, or its slot moved.
    SUnsubscribed { channel: &'a [u8], count: i64 },
    /// A PONG in subscribed mode.
    Pong,
    /// Any other kind: ignored.
    Ignored(&'a [u8]),
}

/// Reads the items of a push or array reply; `None` when there is no kind to go by.
pub(super) fn classify(items: &[Value]) -> Option<Reply<'_>> {
    let kind = match items.first() {
        Some(Value::BulkString(k)) => k.as_slice(),
        Some(Value::SimpleString(k)) => k.as_bytes(),
        _ => return None,
    };
    Some(match (kind, items) {
        (b"message" | b"smessage", [_, Value::BulkString(ch), Value::BulkString(payload)]) => {
            Reply::Message {
                channel: ch,
                payload,
            }
        }
        (b"pmessage", [_, _, Value::BulkString(ch), Value::BulkString(payload)]) => {
            Reply::Message {
                channel: ch,
                payload,
            }
        }
        (b"subscribe" | b"ssubscribe", [_, Value::BulkString(ch), Value::Int(count)]) => {
            Reply::Subscribed {
                channel: ch,
                count: *count,
            }
        }
        (b"subscribe" | b"unsubscribe" | b"ssubscribe", [_, _, Value::Int(count)]) => {
            Reply::Count(*count)
        }
        (b"sunsubscribe", [_, Value::BulkString(ch), Value::Int(count)]) => Reply::SUnsubscribed {
            channel: ch,
            count: *count,
        },
        (b"pong", _) => Reply::Pong,
        _ => Reply::Ignored(kind),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn replies_are_sorted_by_type() {
        assert_eq!(
            resp(Value::SimpleString("PONG".into())),
            Resp::Pong,
            "PING outside subscribed mode"
        );
        assert_eq!(resp(Value::Okay), Resp::Status);
        assert_eq!(resp(Value::Int(1)), Resp::Unexpected(Value::Int(1)));
        let push = resp(Value::Push {
            kind: redis::PushKind::Message,
            data: vec![bulk("sb:u:a"), bulk("x")],
        });
        assert_eq!(
            push,
            Resp::Items(vec![bulk("message"), bulk("sb:u:a"), bulk("x")])
        );
    }

    #[test]
    fn items_say_what_redis_did() {
        let items = [bulk("message"), bulk("sb:u:a"), bulk("p")];
        assert_eq!(
            classify(&items),
            Some(Reply::Message {
                channel: b"sb:u:a",
                payload: b"p"
            })
        );
        let items = [bulk("smessage"), bulk("sb:u:a"), bulk("p")];
        assert!(matches!(classify(&items), Some(Reply::Message { .. })));
        let items = [bulk("pmessage"), bulk("sb:*"), bulk("sb:u:a"), bulk("p")];
        assert_eq!(
            classify(&items),
            Some(Reply::Message {
                channel: b"sb:u:a",
                payload: b"p"
            })
        );
        let items = [bulk("ssubscribe"), bulk("sb:u:a"), Value::Int(3)];
        assert_eq!(
            classify(&items),
            Some(Reply::Subscribed {
                channel: b"sb:u:a",
                count: 3
            })
        );
        let items = [bulk("unsubscribe"), bulk("sb:u:a"), Value::Int(2)];
        assert_eq!(classify(&items), Some(Reply::Count(2)));
        let items = [bulk("subscribe"), Value::Nil, Value::Int(0)];
        assert_eq!(classify(&items), Some(Reply::Count(0)));
        let items = [bulk("sunsubscribe"), bulk("sb:u:a"), Value::Int(1)];
        assert_eq!(
            classify(&items),
            Some(Reply::SUnsubscribed {
                channel: b"sb:u:a",
                count: 1
            })
        );
        let items = [bulk("pong"), bulk("")];
        assert_eq!(classify(&items), Some(Reply::Pong));
        let items = [Value::SimpleString("punsubscribe".into()), Value::Int(0)];
        assert_eq!(classify(&items), Some(Reply::Ignored(b"punsubscribe")));
        assert_eq!(classify(&[Value::Int(1)]), None);
        assert_eq!(classify(&[]), None);
    }
}
