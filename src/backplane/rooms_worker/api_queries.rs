//! The server API's questions to Redis (run by the rooms worker on its own connections): who in
//! a room is online, a user's live connections, a room's members, everyone online, and the
//! cluster-wide disconnect. Keys are the rooms worker's (see `rooms_worker.rs`).

use super::Worker;
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

impl Worker {
    /// Runs `query`, each read on the shard owning its keys.
    pub(super) fn api(&mut self, query: &ApiQuery) -> redis::RedisResult<ApiData> {
        Ok(match query {
            ApiQuery::Presence(room) => {
                let online = self.room_online(room, None)?.unwrap_or_default();
                let body = serde_json::json!({ "room": &**room, "online": online });
                ApiData::Json(body.to_string())
            }
            ApiQuery::Connections(user) => {
                let count = self.counts_of(&[user.to_string()])?[0];
                let body = serde_json::json!({ "user": &**user, "connections": count.max(0) });
                ApiData::Json(body.to_string())
            }
            ApiQuery::Members(room) => {
                let key = wire::room_members_key(&self.prefix, room);
                let mut members: Vec<String> =
                    self.on(&key, |c, _| redis::cmd("SMEMBERS").arg(&key).query(c))?;
                members.sort_unstable();
                ApiData::Users(members.into_iter().map(UserId::from).collect())
            }
            ApiQuery::Online => {
                let r = &self.registry;
                let (nodes, beats, users) = (r.nodes(), r.heartbeat_prefix(), r.users_prefix());
                let node = self.node.clone();
                let everyone: Vec<String> = self.on(&nodes, |c, s| {
                    s.everyone
                        .key(&nodes)
                        .arg(&node)
                        .arg(&beats)
                        .arg(&users)
                        .invoke(c)
                })?;
                ApiData::Users(everyone.into_iter().map(UserId::from).collect())
            }
            ApiQuery::Disconnect(user) => {
                let channel = wire::user_channel(&self.prefix, user);
                let payload = wire::disconnect_payload(self.bp.node_id);
                let publish = self.publish;
                let instances: i64 = self.on(&channel, |c, _| {
                    redis::cmd(publish).arg(&channel).arg(&payload).query(c)
                })?;
                let body = serde_json::json!({ "user": &**user, "instances": instances });
                ApiData::Json(body.to_string())
            }
        })
    }
}
