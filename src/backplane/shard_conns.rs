//! Blocking connections to the Redis that holds a key: on a Redis Cluster one per shard, picked
//! by the key's slot; on one Redis the one connection. For the workers that read and write
//! history (`history_worker`), each command of which touches one key's slot.

use std::time::Duration;

use super::cluster::SlotMap;
use super::Backplane;

const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// The topology and a connection per shard, opened when first needed; any failure forgets the
/// topology too (a shard that stopped answering may have failed over: `MOVED` or a refused
/// connection both mean asking again).
#[derive(Default)]
pub(super) struct ShardConns {
    topology: Option<SlotMap>,
    conns: Vec<Option<redis::Connection>>,
    /// Per shard, the SHA1 of the append script once loaded there (a new connection may face a
    /// restarted Redis with an empty script cache, so it is forgotten with the connection).
    shas: Vec<Option<String>>,
}

fn io_error(e: std::io::Error) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Io, "topology", e.to_string()))
}

impl ShardConns {
    /// The connection to the shard owning `key` (any key on one Redis), and the index of the
    /// shard.
    pub fn for_key(
        &mut self,
        bp: &Backplane,
        key: &[u8],
    ) -> redis::RedisResult<(usize, &mut redis::Connection)> {
        // With Sentinel, a failover moved the master: every connection goes to the new one.
        if bp.master_moved() {
            self.reset();
        }
        if self.topology.is_none() {
            let map = bp.topology().map_err(io_error)?;
            self.conns = (0..map.shards.len()).map(|_| None).collect();
            self.shas = vec![None; map.shards.len()];
            self.topology = Some(map);
        }
        let Some(map) = self.topology.as_ref() else {
            return Err((redis::ErrorKind::Io, "no topology").into());
        };
        let shard = map.shard_of(key);
        if self.conns[shard].is_none() {
            // TLS with `rediss://` (and `--redis-ca-cert`); the master Sentinel names.
            let url = bp.node_url(&map.shards[shard]);
            let c = bp
                .config
                .client(&url)?
                .get_connection_with_timeout(IO_TIMEOUT)?;
            c.set_read_timeout(Some(IO_TIMEOUT))?;
            c.set_write_timeout(Some(IO_TIMEOUT))?;
            self.conns[shard] = Some(c);
            self.shas[shard] = None;
        }
        match self.conns[shard].as_mut() {
            Some(c) => Ok((shard, c)),
            None => Err((redis::ErrorKind::Io, "not connected").into()),
        }
    }

    /// The connection for `key` with `script` loaded there; returns its SHA1 too.
    pub fn with_script(
        &mut self,
        bp: &Backplane,
        key: &[u8],
        script: &str,
    ) -> redis::RedisResult<(String, &mut redis::Connection)> {
        let (shard, _) = self.for_key(bp, key)?;
        let sha = match self.shas[shard].clone() {
            Some(sha) => sha,
            None => {
                let conn = self.conns[shard].as_mut();
                let conn = conn.ok_or((redis::ErrorKind::Io, "not connected"))?;
                let sha: String = redis::cmd("SCRIPT").arg("LOAD").arg(script).query(conn)?;
                self.shas[shard] = Some(sha.clone());
                sha
            }
        };
        let conn = self.conns[shard].as_mut();
        Ok((sha, conn.ok_or((redis::ErrorKind::Io, "not connected"))?))
    }

    /// After a failure: every connection and the topology are opened afresh next time.
    pub fn reset(&mut self) {
        *self = ShardConns::default();
    }
}
