//! Redis Cluster topology for sharded pub/sub: which shard serves a channel's hash slot.
//!
//! With `--redis-cluster`, per-user channels are published with `SPUBLISH` and subscribed with
//! `SSUBSCRIBE` on the primary that owns the channel's slot, so pub/sub traffic spreads over the
//! shards instead of being broadcast to every node of the cluster.

use std::io;
use std::time::Duration;

use redis::Value;

/// Number of hash slots in a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// The hash slot of a key or channel, honouring `{hash tags}` as Redis does.
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter()
                .position(|&b| b == b'}')
                .filter(|&close| close > 0)
                .map(|close| &rest[..close])
        })
        .unwrap_or(key);
    crc16::State::<crc16::XMODEM>::calculate(tagged) % SLOTS
}

/// Slot ranges and the primaries serving them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotMap {
    /// `(first slot, last slot, shard index)`, sorted by first slot.
    ranges: Vec<(u16, u16, usize)>,
    /// Primary address of each shard, `host:port`.
    pub shards: Vec<String>,
}

impl SlotMap {
    /// A single "shard" for a non-cluster Redis.
    pub fn single(addr: String) -> Self {
        SlotMap {
            ranges: vec![(0, SLOTS - 1, 0)],
            shards: vec![addr],
        }
    }

    /// The shard serving `channel`.
    pub fn shard_of(&self, channel: &[u8]) -> usize {
        let s = slot(channel);
        let i = self.ranges.partition_point(|&(first, _, _)| first <= s);
        match i.checked_sub(1).map(|i| self.ranges[i]) {
            Some((_, last, shard)) if s <= last => shard,
            // Uncovered slot (cluster mid-reshard): any shard answers with MOVED, which triggers
            // a topology refresh.
            _ => 0,
        }
    }

    /// Asks the first reachable seed node of `config` for `CLUSTER SLOTS`, over TLS with
    /// `--redis-ca-cert` for a `rediss://` URL and with the URL's credentials.
    pub fn fetch(config: &super::RedisConfig) -> io::Result<Self> {
        let mut last_err = io::Error::other("no cluster seed nodes");
        for seed in &config.cluster {
            match Self::fetch_from(config, seed) {
                Ok(map) => return Ok(map),
                Err(e) => last_err = e,
            }
        }
        Err(last_err)
    }

    fn fetch_from(config: &super::RedisConfig, seed: &str) -> io::Result<Self> {
        let client = config
            .client(&config.node_url(seed))
            .map_err(io::Error::other)?;
        let mut conn = client
            .get_connection_with_timeout(Duration::from_secs(2))
            .map_err(io::Error::other)?;
        conn.set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(io::Error::other)?;
        let reply: Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query(&mut conn)
            .map_err(io::Error::other)?;
        Self::from_cluster_slots(&reply, seed)
    }

    /// Parses a `CLUSTER SLOTS` reply. An empty host means "the node you asked" (`seed`).
    pub fn from_cluster_slots(reply: &Value, seed: &str) -> io::Result<Self> {
        let bad = || io::Error::other("unexpected CLUSTER SLOTS reply");
        let Value::Array(entries) = reply else {
            return Err(bad());
        };
        let seed_host = seed.rsplit_once(':').map_or(seed, |(h, _)| h);
        let mut map = SlotMap {
            ranges: Vec::new(),
            shards: Vec::new(),
        };
        for entry in entries {
            let Value::Array(fields) = entry else {
                return Err(bad());
            };
            let (Some(Value::Int(first)), Some(Value::Int(last)), Some(Value::Array(primary))) =
                (fields.first(), fields.get(1), fields.get(2))
            else {
                return Err(bad());
            };
            let host = match primary.first() {
                Some(Value::BulkString(h)) if !h.is_empty() => {
                    String::from_utf8_lossy(h).into_owned()
                }
                Some(Value::SimpleString(h)) if !h.is_empty() => h.clone(),
                _ => seed_host.to_string(),
            };
            let Some(Value::Int(port)) = primary.get(1) else {
                return Err(bad());
            };
            let addr = format!("{host}:{port}");
            let shard = match map.shards.iter().position(|s| *s == addr) {
                Some(i) => i,
                None => {
                    map.shards.push(addr);
                    map.shards.len() - 1
                }
            };
            map.ranges.push((*first as u16, *last as u16, shard));
        }
        if map.shards.is_empty() {
            return Err(io::Error::other("the cluster serves no slots yet"));
        }
        map.ranges.sort_unstable();
        Ok(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from `CLUSTER KEYSLOT`.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
        assert_eq!(slot(b"123456789"), 0x31C3 % SLOTS);
    }

    #[test]
    fn parses_cluster_slots() {
        let node = |port: i64| {
            Value::Array(vec![
                Value::BulkString(b"127.0.0.1".to_vec()),
                Value::Int(port),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![Value::Int(5461), Value::Int(10922), node(7001)]),
            Value::Array(vec![Value::Int(0), Value::Int(5460), node(7000)]),
            Value::Array(vec![Value::Int(10923), Value::Int(16383), node(7002)]),
        ]);
        let map = SlotMap::from_cluster_slots(&reply, "127.0.0.1:7000").unwrap();
        assert_eq!(map.shards.len(), 3);
        assert_eq!(map.shards[map.shard_of(b"foo")], "127.0.0.1:7002"); // slot 12182
        assert_eq!(map.shards[map.shard_of(b"123456789")], "127.0.0.1:7002"); // 12739
        let s = map.shard_of(b"a");
        assert!(s < 3);
    }
}
