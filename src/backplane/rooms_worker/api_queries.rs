//! The server API's questions to Redis (run by the rooms worker on its own connection): who in
//! a room is online, a user's live connections, a room's members, everyone online, and the
//! cluster-wide disconnect. Keys are the rooms worker's (see `rooms_worker.rs`).

use redis::Script;

use crate::backplane::wire;
use crate::bus::ApiData;
use crate::rooms::RoomId;
use crate::UserId;

/// What a server API request asks Redis.
#[derive(Debug)]
pub(crate) enum ApiQuery {
    /// The members of the room with a live connection.
    Presence(RoomId),
    /// The user's live connections in the cluster.
    Connections(UserId),
    /// The room's members (to publish to).
    Members(RoomId),
    /// Every user with a live connection (to publish to).
    Online,
    /// Close the user's connections on every instance.
    Disconnect(UserId),
}

/// Where the answer to a server API request goes: a waiting HTTP connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ApiTarget {
    pub core: usize,
    pub key: usize,
    pub serial: u64,
}

/// ARGV: prefix, node, room. The room's members with a live connection, sorted.
const ROOM_ONLINE: &str = concat!(
    presence_lib!(),
    r#"
local out = {}
for _, m in ipairs(redis.call('SMEMBERS', p .. ':rm:' .. ARGV[3])) do
  if live(m) > 0 then out[#out + 1] = m end
end
table.sort(out)
return out
"#
);

/// ARGV: prefix, node, user. The user's live connections in the cluster.
const CONNECTIONS: &str = concat!(presence_lib!(), "return live(ARGV[3])\n");

/// ARGV: prefix, node. Every user counted by an instance whose heartbeat exists (this one
/// always), sorted and distinct.
const EVERYONE: &str = r#"
local p, node = ARGV[1], ARGV[2]
local seen, out = {}, {}
local nodes = redis.call('SMEMBERS', p .. ':nodes')
nodes[#nodes + 1] = node
for _, n in ipairs(nodes) do
  if n == node or redis.call('EXISTS', p .. ':n:' .. n) == 1 then
    for _, u in ipairs(redis.call('SMEMBERS', p .. ':n:' .. n .. ':users')) do
      if not seen[u] then seen[u] = true; out[#out + 1] = u end
    end
  end
end
table.sort(out)
return out
"#;

/// Runs `query` on `conn` (prefix `p`, this instance's node id `n`).
pub(super) fn run(
    conn: &mut redis::Connection,
    p: &str,
    n: &str,
    query: &ApiQuery,
) -> redis::RedisResult<ApiData> {
    Ok(match query {
        ApiQuery::Presence(room) => {
            let online: Vec<String> = Script::new(ROOM_ONLINE)
                .arg(p)
                .arg(n)
                .arg(&**room)
                .invoke(conn)?;
            let body = serde_json::json!({ "room": &**room, "online": online });
            ApiData::Json(body.to_string())
        }
        ApiQuery::Connections(user) => {
            let count: i64 = Script::new(CONNECTIONS)
                .arg(p)
                .arg(n)
                .arg(&**user)
                .invoke(conn)?;
            let body = serde_json::json!({ "user": &**user, "connections": count.max(0) });
            ApiData::Json(body.to_string())
        }
        ApiQuery::Members(room) => {
            let mut members: Vec<String> = redis::cmd("SMEMBERS")
                .arg(format!("{p}:rm:{room}"))
                .query(conn)?;
            members.sort_unstable();
            ApiData::Users(members.into_iter().map(UserId::from).collect())
        }
        ApiQuery::Online => {
            let users: Vec<String> = Script::new(EVERYONE).arg(p).arg(n).invoke(conn)?;
            ApiData::Users(users.into_iter().map(UserId::from).collect())
        }
        ApiQuery::Disconnect(user) => {
            let node = u64::from_str_radix(n, 16).unwrap_or_default();
            let instances: i64 = redis::cmd("PUBLISH")
                .arg(format!("{p}:u:{user}"))
                .arg(wire::disconnect_payload(node))
                .query(conn)?;
            let body = serde_json::json!({ "user": &**user, "instances": instances });
            ApiData::Json(body.to_string())
        }
    })
}
