//! Redis Sentinel: which server is the master now. With `--redis-sentinel`, a thread asks the
//! sentinels (`SENTINEL get-master-addr-by-name`) at start and then every
//! [`POLL_INTERVAL`]; every connection the backplane opens (the cores' links, the subscriber,
//! the workers) goes to the master named last. After a failover the old master's clients are
//! cut off by Sentinel, they reconnect after their backoff, and by then the new master is known;
//! the outage rules (acks only once stored, the resync after the subscriber's outage) do the
//! rest.

use std::io;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::Backplane;

/// How often the sentinels are asked who the master is.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How long one sentinel may take to answer.
const SENTINEL_TIMEOUT: Duration = Duration::from_secs(1);

/// Where the backplane's connections go, with or without Sentinel.
impl Backplane {
    /// The URL every connection to the (single) Redis uses: `url`, or with Sentinel, `url`
    /// pointed at the master the sentinels named last.
    pub(crate) fn redis_url(&self) -> String {
        if self.config.sentinels.is_empty() {
            return self.config.url.clone();
        }
        let master = self.master.lock().unwrap_or_else(|e| e.into_inner());
        match master.as_deref() {
            Some(addr) => with_addr(&self.config.url, addr),
            // Unknown yet: a port nothing listens on fails fast and is retried.
            None => with_addr(&self.config.url, "127.0.0.1:0"),
        }
    }

    /// With Sentinel: whether the master moved since the calling thread last asked. Each
    /// thread owns one connection to Redis (a core's link, the subscriber's, a worker's), and
    /// drops it when this says so: after a failover the old master may stay up, writable,
    /// until Sentinel turns it into a replica, and nothing written there survives.
    pub(crate) fn master_moved(&self) -> bool {
        thread_local! {
            static SEEN: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
        }
        if self.config.sentinels.is_empty() {
            return false;
        }
        let now = self.master_epoch.load(SeqCst);
        SEEN.with(|seen| seen.replace(now) != now)
    }

    /// The URL for the node at `addr` (a cluster's shard), or [`Backplane::redis_url`].
    pub(crate) fn node_url(&self, addr: &str) -> String {
        if self.config.cluster.is_empty() {
            self.redis_url()
        } else {
            self.config.node_url(addr)
        }
    }

    /// The initial topology: the cluster's slot map, or the one server (with Sentinel, the
    /// master as known now).
    pub(crate) fn topology(&self) -> std::io::Result<super::cluster::SlotMap> {
        if self.config.sentinels.is_empty() {
            return self.config.topology();
        }
        let master = self.master.lock().unwrap_or_else(|e| e.into_inner());
        match master.as_deref() {
            Some(addr) => Ok(super::cluster::SlotMap::single(addr.to_string())),
            None => Err(std::io::Error::other("redis sentinel named no master yet")),
        }
    }
}

/// Asks each sentinel in turn for the master's `host:port`; the first answer wins.
pub(crate) fn ask(bp: &Backplane) -> io::Result<String> {
    let config = &bp.config;
    let name = config.sentinel_master.as_deref().unwrap_or_default();
    let mut last = io::Error::other("no sentinel configured");
    for sentinel in &config.sentinels {
        let url = format!("{}{sentinel}", config.scheme());
        let answer = config.client(&url).and_then(|client| {
            let mut conn = client.get_connection_with_timeout(SENTINEL_TIMEOUT)?;
            conn.set_read_timeout(Some(SENTINEL_TIMEOUT))?;
            if let Some(password) = &config.sentinel_password {
                redis::cmd("AUTH").arg(password).query::<()>(&mut conn)?;
            }
            redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(name)
                .query::<Option<(String, u16)>>(&mut conn)
        });
        match answer {
            Ok(Some((host, port))) => return Ok(format!("{host}:{port}")),
            Ok(None) => {
                last = io::Error::other(format!(
                    "sentinel {sentinel} knows no master named {name:?}"
                ))
            }
            Err(e) => last = io::Error::other(format!("sentinel {sentinel}: {e}")),
        }
    }
    Err(last)
}

/// `url` with its `host:port` replaced by `addr` (credentials, database and scheme kept).
pub(crate) fn with_addr(url: &str, addr: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let creds = authority.rsplit_once('@').map(|(c, _)| c);
    match creds {
        Some(creds) => format!("{scheme}://{creds}@{addr}{path}"),
        None => format!("{scheme}://{addr}{path}"),
    }
}

/// Asks once (so the first connections go to the master), then starts the thread that keeps
/// asking until the backplane stops.
pub(crate) fn start(bp: &Arc<Backplane>) -> io::Result<JoinHandle<()>> {
    refresh(bp);
    let bp = Arc::clone(bp);
    std::thread::Builder::new()
        .name("switchboard-redis-sentinel".into())
        .spawn(move || {
            while !bp.stop.load(Relaxed) {
                std::thread::park_timeout(POLL_INTERVAL);
                refresh(&bp);
            }
        })
}

/// Asks the sentinels and records the master; logs when it changed or cannot be learnt.
fn refresh(bp: &Backplane) {
    let answer = ask(bp);
    let mut master = bp.master.lock().unwrap_or_else(|e| e.into_inner());
    match answer {
        Ok(addr) if master.as_deref() != Some(addr.as_str()) => {
            match master.as_deref() {
                None => log::info!("redis sentinel: the master is {addr}"),
                Some(old) => log::warn!("redis sentinel: the master moved from {old} to {addr}"),
            }
            *master = Some(addr);
            bp.master_epoch
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(_) => {}
        Err(e) => {
            if master.is_none() {
                log::warn!("redis sentinel: no master yet: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_is_replaced_and_the_rest_kept() {
        assert_eq!(
            with_addr("redis://127.0.0.1:6379", "10.0.0.2:6380"),
            "redis://10.0.0.2:6380"
        );
        assert_eq!(
            with_addr("rediss://u:p@w@old:1/2", "new:2"),
            "rediss://u:p@w@new:2/2"
        );
        assert_eq!(with_addr("redis://:pw@old:1", "new:2"), "redis://:pw@new:2");
    }
}
