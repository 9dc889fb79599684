//! RESP replies on a subscribed link: what each one means to the subscriber (a publication, a
//! confirmed (un)subscription, a PONG, a moved slot, an error), read without any I/O.

use crate::backplane::resp::{Item, Value};

/// A reply read from a subscribed link, before looking into its items.
#[derive(Debug, PartialEq)]
pub(super) enum Resp<'v, 'a> {
    /// A push or array reply: see [`classify`].
    Items(&'v [Item<'a>]),
    /// `+PONG`: outside subscribed mode (no channel yet) PING answers so.
    Pong,
    /// `+OK` or another status (AUTH).
    Status,
    /// MOVED or ASK: the cluster moved slots.
    Moved,
    /// Any other error, as text.
    ServerError(String),
    /// Nothing the subscriber expects.
    Unexpected(Item<'a>),
}

/// Sorts a reply by its RESP type.
pub(super) fn resp<'v, 'a>(value: &'v Value<'a>) -> Resp<'v, 'a> {
    match value {
        Value::Array(items) => Resp::Items(items),
        Value::Item(Item::Simple(s)) if s.eq_ignore_ascii_case(b"pong") => Resp::Pong,
        Value::Item(Item::Simple(_)) => Resp::Status,
        Value::Item(Item::Error(e)) => {
            if e.starts_with(b"MOVED") || e.starts_with(b"ASK") {
                Resp::Moved
            } else {
                Resp::ServerError(String::from_utf8_lossy(e).into_owned())
            }
        }
        Value::Item(other) => Resp::Unexpected(*other),
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
pub(super) fn classify<'a>(items: &[Item<'a>]) -> Option<Reply<'a>> {
    let kind = match items.first() {
        Some(Item::Bulk(k) | Item::Simple(k)) => *k,
        _ => return None,
    };
    Some(match (kind, items) {
        (b"message" | b"smessage", [_, Item::Bulk(channel), Item::Bulk(payload)])
        | (b"pmessage", [_, _, Item::Bulk(channel), Item::Bulk(payload)]) => {
            Reply::Message { channel, payload }
        }
        (b"subscribe" | b"ssubscribe", [_, Item::Bulk(channel), Item::Int(count)]) => {
            Reply::Subscribed {
                channel,
                count: *count,
            }
        }
        (b"subscribe" | b"unsubscribe" | b"ssubscribe", [_, _, Item::Int(count)]) => {
            Reply::Count(*count)
        }
        (b"sunsubscribe", [_, Item::Bulk(channel), Item::Int(count)]) => Reply::SUnsubscribed {
            channel,
            count: *count,
        },
        (b"pong", _) => Reply::Pong,
        _ => Reply::Ignored(kind),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backplane::resp::parse;

    fn bulk(s: &str) -> Item<'_> {
        Item::Bulk(s.as_bytes())
    }

    fn value(wire: &[u8]) -> Value<'_> {
        parse(wire).unwrap().unwrap().0
    }

    #[test]
    fn replies_are_sorted_by_type() {
        assert_eq!(
            resp(&value(b"+PONG\r\n")),
            Resp::Pong,
            "PING outside subscribed mode"
        );
        assert_eq!(resp(&value(b"+OK\r\n")), Resp::Status);
        assert_eq!(resp(&value(b":1\r\n")), Resp::Unexpected(Item::Int(1)));
        assert_eq!(resp(&value(b"-MOVED 3999 127.0.0.1:6381\r\n")), Resp::Moved);
        assert_eq!(
            resp(&value(b"-LOADING Redis is loading\r\n")),
            Resp::ServerError("LOADING Redis is loading".into())
        );
        let push = value(b">3\r\n$7\r\nmessage\r\n$6\r\nsb:u:a\r\n$1\r\nx\r\n");
        assert_eq!(
            resp(&push),
            Resp::Items(&[bulk("message"), bulk("sb:u:a"), bulk("x")])
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
        let items = [bulk("ssubscribe"), bulk("sb:u:a"), Item::Int(3)];
        assert_eq!(
            classify(&items),
            Some(Reply::Subscribed {
                channel: b"sb:u:a",
                count: 3
            })
        );
        let items = [bulk("unsubscribe"), bulk("sb:u:a"), Item::Int(2)];
        assert_eq!(classify(&items), Some(Reply::Count(2)));
        let items = [bulk("subscribe"), Item::Nil, Item::Int(0)];
        assert_eq!(classify(&items), Some(Reply::Count(0)));
        let items = [bulk("sunsubscribe"), bulk("sb:u:a"), Item::Int(1)];
        assert_eq!(
            classify(&items),
            Some(Reply::SUnsubscribed {
                channel: b"sb:u:a",
                count: 1
            })
        );
        let items = [bulk("pong"), bulk("")];
        assert_eq!(classify(&items), Some(Reply::Pong));
        let items = [Item::Simple(b"punsubscribe"), Item::Int(0)];
        assert_eq!(classify(&items), Some(Reply::Ignored(b"punsubscribe")));
        assert_eq!(classify(&[Item::Int(1)]), None);
        assert_eq!(classify(&[]), None);
    }
}
