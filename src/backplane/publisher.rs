//! The publisher thread: drains the publication queue into pipelined `PUBLISH` commands.
//!
//! Whatever queued while the previous pipeline was in flight goes out in the next one, so the
//! number of round trips per message falls as load rises. A failed pipeline is kept and sent
//! again after reconnecting (at-least-once: Redis may have accepted part of it), while cores keep
//! queueing; past the queue bound the oldest publications are dropped and counted.

use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::wire;
use super::{Backoff, Backplane, Publication, Routing};

/// Most publications in one pipeline.
const MAX_BATCH: usize = 4096;
/// Connect and I/O timeout for the publisher connection.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the publisher sleeps when the queue is empty (it is unparked on new work).
const IDLE_PARK: Duration = Duration::from_millis(500);
/// How long a stopping publisher keeps trying to flush what is queued.
const STOP_FLUSH: Duration = Duration::from_secs(1);

/// The fingerprint of a seed payload, shared with the subscriber to recognise our own.
pub(crate) fn payload_hash(payload: &[u8]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    payload.hash(&mut h);
    h.finish()
}

/// Runs until [`Backplane::stop`].
pub(crate) fn run(bp: Arc<Backplane>) {
    let client = match redis::Client::open(bp.config.url.as_str()) {
        Ok(c) => c,
        Err(e) => {
            log::error!("redis publisher: bad url: {e}");
            return;
        }
    };
    let mut backoff = Backoff::new(
        bp.config.reconnect_min,
        bp.config.reconnect_max,
        bp.node_id ^ 0x9e37,
    );
    let mut conn: Option<redis::Connection> = None;
    let mut batch: Vec<Publication> = Vec::with_capacity(MAX_BATCH);
    let mut scratch = Vec::with_capacity(256);
    let mut ever_connected = false;
    let mut outage_logged = false;
    let mut stop_deadline: Option<Instant> = None;
    loop {
        if bp.stop.load(Relaxed) {
            let deadline = *stop_deadline.get_or_insert_with(|| Instant::now() + STOP_FLUSH);
            if Instant::now() >= deadline || (batch.is_empty() && bp.publications.is_empty()) {
                break;
            }
        }
        if batch.is_empty() {
            while batch.len() < MAX_BATCH {
                match bp.publications.pop() {
                    Some(p) => batch.push(p),
                    None => break,
                }
            }
        }
        if batch.is_empty() {
            std::thread::park_timeout(IDLE_PARK);
            continue;
        }
        let Some(c) = conn.as_mut() else {
            match client.get_connection_with_timeout(IO_TIMEOUT) {
                Ok(c) => {
                    let _ = c.set_read_timeout(Some(IO_TIMEOUT));
                    let _ = c.set_write_timeout(Some(IO_TIMEOUT));
                    if ever_connected {
                        bp.stats.reconnects.fetch_add(1, Relaxed);
                        log::info!(
                            "redis publisher reconnected; {} publications waiting",
                            batch.len() + bp.queue_depth()
                        );
                        settle_after_outage(&bp);
                    }
                    ever_connected = true;
                    outage_logged = false;
                    backoff.reset();
                    bp.stats.publisher_connected.store(1, Relaxed);
                    conn = Some(c);
                }
                Err(e) => {
                    if !outage_logged {
                        log::warn!("redis publisher cannot connect: {e}; retrying with backoff");
                        outage_logged = true;
                    }
                    if bp.stop.load(Relaxed) {
                        break;
                    }
                    std::thread::sleep(backoff.next_delay());
                }
            }
            continue;
        };
        let mut pipe = redis::Pipeline::with_capacity(batch.len());
        for p in &batch {
            scratch.clear();
            match bp.config.routing {
                Routing::PerUser => {
                    wire::write_user_payload(&mut scratch, bp.node_id, p.dispatch.frame.as_str());
                    pipe.cmd("PUBLISH")
                        .arg(wire::user_channel(&bp.config.channel_prefix, &p.user))
                        .arg(&scratch[..])
                        .ignore();
                }
                Routing::Seed => {
                    wire::write_seed_payload(&mut scratch, &p.dispatch, &p.user);
                    // Announce it before Redis can echo it back to our subscriber.
                    bp.own_payloads.push(payload_hash(&scratch));
                    pipe.cmd("PUBLISH")
                        .arg(wire::SEED_CHANNEL)
                        .arg(&scratch[..])
                        .ignore();
                }
            }
        }
        match pipe.exec(c) {
            Ok(()) => {
                bp.stats.published.fetch_add(batch.len() as u64, Relaxed);
                batch.clear();
            }
            Err(e) => {
                bp.stats.publish_errors.fetch_add(1, Relaxed);
                bp.stats.publisher_connected.store(0, Relaxed);
                log::warn!(
                    "redis publish failed: {e}; {} publications kept for retry",
                    batch.len()
                );
                conn = None;
                outage_logged = true;
                if !bp.stop.load(Relaxed) {
                    std::thread::sleep(backoff.next_delay());
                }
            }
        }
    }
    bp.stats.publisher_connected.store(0, Relaxed);
}

/// After an outage, other instances' subscribers re-subscribe on their own backoff schedule.
/// Publications queued during the outage wait until this instance's subscriber is back and one
/// more maximum backoff interval has passed, so the backlog is not published to channels nobody
/// has re-subscribed to yet.
fn settle_after_outage(bp: &Backplane) {
    let deadline = Instant::now() + bp.config.reconnect_max * 3;
    while !bp.subscriber_ready.load(SeqCst) && Instant::now() < deadline && !bp.stop.load(Relaxed) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let settle = Instant::now() + bp.config.reconnect_max;
    while Instant::now() < settle && !bp.stop.load(Relaxed) {
        std::thread::sleep(Duration::from_millis(10));
    }
}
