//! The subscriber's shards: the Redis Cluster topology (one shard without a cluster) and, per
//! shard, its [`RedisLink`] while connected, the reconnect backoff, and the channel count Redis
//! confirmed on it.

use std::io;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use mio::{Registry, Token};

use super::link::RedisLink;
use crate::backplane::cluster::SlotMap;
use crate::backplane::endpoint::plain_words;
use crate::backplane::{Backoff, Backplane};

/// One shard: its address, its link while connected, and when to reconnect.
struct ShardLink {
    addr: String,
    link: Option<RedisLink>,
    backoff: Backoff,
    retry_at: Instant,
    /// Channels Redis confirmed on this link.
    confirmed: u64,
}

/// Every shard, shard `i`'s socket registered as `Token(i)`, and the topology that
/// lists the shards (one shard without a Redis Cluster).
pub(super) struct Links {
    sharded: bool,
    topology: Option<SlotMap>,
    shards: Vec<ShardLink>,
    topology_retry_at: Instant,
    topology_backoff: Backoff,
    ever_connected: bool,
    outage_logged: bool,
}

impl Links {
    pub fn new(bp: &Backplane) -> Self {
        Links {
            sharded: bp.config.sharded(),
            topology: None,
            shards: Vec::new(),
            topology_retry_at: Instant::now(),
            topology_backoff: Backoff::new(
                bp.config.reconnect_min,
                bp.config.reconnect_max,
                bp.node_id,
            ),
            ever_connected: false,
            outage_logged: false,
        }
    }

    /// Number of shards (0 while the topology is unknown).
    pub fn len(&self) -> usize {
        self.shards.len()
    }

    /// When the loop must wake at the latest to retry what is down.
    pub fn wake_at(&self, now: Instant) -> Instant {
        let mut wake_at = now + Duration::from_secs(1);
        if self.topology.is_none() {
            wake_at = wake_at.min(self.topology_retry_at);
        }
        for shard in self.shards.iter().filter(|s| s.link.is_none()) {
            wake_at = wake_at.min(shard.retry_at);
        }
        wake_at
    }

    /// Fetches the topology when unknown and its retry time came. Returns whether it is known.
    pub fn ensure_topology(&mut self, bp: &Backplane, now: Instant) -> bool {
        if self.topology.is_some() {
            return true;
        }
        if now < self.topology_retry_at {
            return false;
        }
        match bp.topology() {
            Ok(map) => {
                self.topology_backoff.reset();
                self.shards = map
                    .shards
                    .iter()
                    .enumerate()
                    .map(|(i, addr)| ShardLink {
                        addr: addr.clone(),
                        link: None,
                        backoff: Backoff::new(
                            bp.config.reconnect_min,
                            bp.config.reconnect_max,
                            bp.node_id ^ (i as u64 + 1),
                        ),
                        retry_at: now,
                        confirmed: 0,
                    })
                    .collect();
                self.topology = Some(map);
                true
            }
            Err(e) => {
                if !self.outage_logged {
                    log::warn!(
                        "redis subscriber cannot reach redis: {}; retrying with backoff",
                        plain_words(&e.to_string())
                    );
                    self.outage_logged = true;
                }
                self.topology_retry_at = now + self.topology_backoff.next_delay();
                false
            }
        }
    }

    /// Whether shard `i` is down and its retry time came.
    pub fn due(&self, i: usize, now: Instant) -> bool {
        self.shards[i].link.is_none() && now >= self.shards[i].retry_at
    }

    /// Connects shard `i`. Returns `false` (and schedules a retry) when that failed.
    pub fn connect(&mut self, i: usize, bp: &Backplane, registry: &Registry) -> bool {
        let url = bp.node_url(&self.shards[i].addr);
        match RedisLink::open(&url, bp.redis_tls.as_ref(), registry, Token(i)) {
            Ok(link) => {
                if self.ever_connected {
                    bp.stats.reconnects.fetch_add(1, Relaxed);
                    log::info!("redis subscriber reconnected to {}", self.shards[i].addr);
                }
                self.ever_connected = true;
                self.outage_logged = false;
                self.shards[i].backoff.reset();
                self.shards[i].link = Some(link);
                true
            }
            Err(e) => {
                if !self.outage_logged {
                    log::warn!(
                        "redis subscriber cannot connect to {}: {}; retrying with backoff",
                        self.shards[i].addr,
                        plain_words(&e.to_string())
                    );
                    self.outage_logged = true;
                }
                let shard = &mut self.shards[i];
                shard.retry_at = Instant::now() + shard.backoff.next_delay();
                false
            }
        }
    }

    /// Drops shard `i`'s link and schedules its reconnect.
    pub fn disconnect(&mut self, i: usize, registry: &Registry, why: &str) {
        let shard = &mut self.shards[i];
        if let Some(link) = shard.link.take() {
            link.deregister(registry);
            log::warn!(
                "redis subscriber disconnected from {}: {}",
                shard.addr,
                plain_words(why)
            );
        }
        shard.confirmed = 0;
        shard.retry_at = Instant::now() + shard.backoff.next_delay();
        self.outage_logged = true;
    }

    /// Drops every link and the topology: the next turn fetches it again.
    /// Like [`Links::clear`], the topology fetched again only after the topology backoff: a
    /// shard that cannot be reached, on a cluster, may have failed over.
    pub fn forget_topology(&mut self, registry: &Registry) {
        self.clear(registry);
        self.topology_retry_at = Instant::now() + self.topology_backoff.next_delay();
    }

    pub fn clear(&mut self, registry: &Registry) {
        for shard in &mut self.shards {
            if let Some(link) = shard.link.take() {
                link.deregister(registry);
            }
        }
        self.shards.clear();
        self.topology = None;
        self.topology_retry_at = Instant::now();
    }

    /// The shard serving `channel` (0 without a Redis Cluster).
    pub fn shard_of(&self, channel: &str) -> usize {
        match &self.topology {
            Some(map) if self.sharded => map.shard_of(channel.as_bytes()),
            _ => 0,
        }
    }

    pub fn link(&mut self, i: usize) -> Option<&mut RedisLink> {
        self.shards.get_mut(i).and_then(|s| s.link.as_mut())
    }

    pub fn is_connected(&self, i: usize) -> bool {
        self.shards.get(i).is_some_and(|s| s.link.is_some())
    }

    /// Every shard is connected.
    pub fn all_connected(&self) -> bool {
        !self.shards.is_empty() && self.shards.iter().all(|s| s.link.is_some())
    }

    /// Every shard is connected and Redis processed its re-subscription.
    pub fn all_ready(&self) -> bool {
        self.all_connected()
            && self
                .shards
                .iter()
                .all(|s| s.link.as_ref().is_some_and(|l| !l.state.awaiting_ready()))
    }

    /// Records the channel count Redis reported on shard `i`.
    pub fn set_confirmed(&mut self, i: usize, count: i64) {
        self.shards[i].confirmed = count.max(0) as u64;
    }

    /// Channels confirmed over all shards.
    pub fn confirmed(&self) -> u64 {
        self.shards.iter().map(|s| s.confirmed).sum()
    }

    /// Queues `command` for `channels` on shard `i`, if connected.
    pub fn write_channels(&mut self, i: usize, command: &str, channels: &[String]) {
        if let Some(link) = self.link(i) {
            link.state.write_channels(command, channels);
        }
    }

    /// Queues a PING on shard `i`, if connected.
    pub fn ping(&mut self, i: usize) {
        if let Some(link) = self.link(i) {
            link.state.ping(Instant::now());
        }
    }

    /// Writes shard `i`'s queued bytes (nothing when it is down).
    pub fn flush(&mut self, i: usize) -> io::Result<()> {
        self.link(i).map_or(Ok(()), RedisLink::flush)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backplane::RedisConfig;

    #[test]
    fn before_the_topology_there_is_no_shard_and_the_fetch_is_due() {
        let bp = Backplane::new(RedisConfig::new("redis://127.0.0.1:1"), 1);
        let mut links = Links::new(&bp);
        let now = Instant::now();
        assert_eq!(links.len(), 0);
        assert!(!links.all_connected() && !links.all_ready());
        assert!(links.wake_at(now) <= now, "the topology fetch is due now");
        assert_eq!(links.shard_of("sb:u:a"), 0);
        assert_eq!(links.confirmed(), 0);
        assert!(!links.is_connected(0));
        // Commands for a shard that is not there are dropped: the reconnect sends everything.
        links.write_channels(0, "SUBSCRIBE", &["sb:u:a".to_string()]);
        links.ping(0);
        assert!(links.flush(0).is_ok());
    }
}
