//! `churn`: does the server's memory stay flat while connections come and go?
//!
//! Holds `--users` × `--devices` connections open, and once all are up closes and reopens
//! `--churn-per-sec` of them every second (random open ones), each reopen a fresh TCP connect
//! and upgrade. Closes take turns between three kinds so every server path is taken: a clean
//! WebSocket close (close frame, then wait for the server's close or EOF), a FIN without a
//! close frame, and a reset (`SO_LINGER` 0). With `--fresh-users`, that share of reopens come
//! back as a user the server has never seen, so per-user state must be dropped, not reused.
//! An optional light `--rate` of `sendMessage`s (random open sender to the user of a random
//! open connection) keeps the server's buffers and history in use.
//!
//! One mio thread drives the sockets; the main thread samples the server every
//! `--sample-every` s: VmRSS and open fds from `/proc/PID` (`--server-pid`), and the
//! connections and users in `/healthz`. The report gives the series, the RSS at the start of
//! the steady state (first sample at or after `--steady-after` s), at the end and at most, and
//! the least-squares slope over the steady samples. Memory is measured, never judged: the exit
//! status only says whether connections failed (1) or the run could not start (2).
//!
//! This file owns the run (start the loop, sample, stop); `churner` the event loop,
//! `report` the figures and their printing.

mod churner;
mod report;

pub use report::{print, ChurnReport, Sample, Tally};

use crate::cli::Args;
use crate::reporting::sysinfo;
use crate::rng::{self, splitmix64};
use churner::{Churner, WAKER};
use mio::{Poll, Waker};
use report::{row, summarize};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The last sample is taken this long after every connection was closed.
const AFTER_CLOSE: Duration = Duration::from_secs(5);

/// Counters the main thread reads while the loop runs.
#[derive(Default)]
struct Live {
    /// Origin-relative ns at which churn started; 0 until every connection was tried.
    churn_start_ns: AtomicU64,
    open: AtomicU64,
    opened: AtomicU64,
    closed: AtomicU64,
    stop: AtomicBool,
}

/// Takes one sample of the server and the generator's counters.
fn sample(args: &Args, live: &Live, t_s: f64) -> Sample {
    let mut conns = Some(0u64);
    let mut users = Some(0u64);
    for addr in &args.addrs {
        let h = sysinfo::healthz(*addr);
        let c = h["connections"].as_u64();
        let u = h["per_core"].as_array().map(|cores| {
            cores
                .iter()
                .filter_map(|c| c["users"].as_u64())
                .sum::<u64>()
        });
        conns = conns.zip(c).map(|(a, b)| a + b);
        users = users.zip(u).map(|(a, b)| a + b);
    }
    Sample {
        t_s,
        rss_kib: sysinfo::rss_total_kib(&args.server_pid),
        fds: sysinfo::fd_total(&args.server_pid),
        server_connections: conns,
        server_users: users,
        open: live.open.load(Ordering::Relaxed),
        opened: live.opened.load(Ordering::Relaxed),
        closed: live.closed.load(Ordering::Relaxed),
    }
}

/// Runs the scenario; `source_ips` as for the other scenarios (empty: the kernel chooses).
pub fn run(args: &Args, source_ips: Vec<IpAddr>) -> Result<ChurnReport, String> {
    let seed = args.seed.unwrap_or_else(rng::random_u64);
    let run_id = format!("{:08x}", splitmix64(seed) as u32);
    let total = (args.users * u64::from(args.devices)) as usize;
    let poll = Poll::new().map_err(|e| format!("poll: {e}"))?;
    let waker = Waker::new(poll.registry(), WAKER).map_err(|e| format!("waker: {e}"))?;
    let live = Arc::new(Live::default());
    let churner = Churner::new(args, poll, Arc::clone(&live), seed, &run_id, source_ips);
    let rss_before_kib = sysinfo::rss_total_kib(&args.server_pid);
    if !args.server_pid.is_empty() && rss_before_kib.is_none() {
        eprintln!("loadtest: warning: cannot read VmRSS of the server pid");
    }
    eprintln!(
        "loadtest churn: run {run_id}, {total} connections, {} closed and reopened/s, {} \
         messages/s, {} s",
        args.churn_per_sec, args.rate, args.duration
    );
    let t0 = Instant::now();
    let handle = std::thread::Builder::new()
        .name("lt-churn".into())
        .spawn(move || churner.run())
        .map_err(|e| format!("spawn: {e}"))?;
    let stop = |live: &Live| {
        live.stop.store(true, Ordering::Relaxed);
        let _ = waker.wake();
    };

    // Open the population (every connection tried at least once).
    let waves = total / args.connect_concurrency.max(1) + 1;
    let deadline = t0 + Duration::from_secs_f64(args.connect_timeout * waves as f64 + 30.0);
    while live.churn_start_ns.load(Ordering::Relaxed) == 0 {
        if Instant::now() > deadline || handle.is_finished() {
            stop(&live);
            let _ = handle.join();
            return Err("the initial connections did not resolve in time".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let connect_s = t0.elapsed().as_secs_f64();
    eprintln!(
        "loadtest churn: {} of {total} open after {connect_s:.2} s; churning",
        live.open.load(Ordering::Relaxed)
    );

    // Sample at 0, every --sample-every, and at the end.
    let start = Instant::now();
    let duration = Duration::from_secs_f64(args.duration);
    let every = Duration::from_secs_f64(args.sample_every);
    let mut samples = Vec::new();
    let mut next = Duration::ZERO;
    loop {
        let s = sample(args, &live, start.elapsed().as_secs_f64());
        if !args.quiet {
            eprintln!("{}", row(&s, samples.first()));
        }
        samples.push(s);
        if next >= duration {
            break;
        }
        next = (next + every).min(duration);
        std::thread::sleep(next.saturating_sub(start.elapsed()));
    }
    stop(&live);
    let tally = handle
        .join()
        .map_err(|_| "the churn thread panicked".to_owned())?;
    // Give the server time to reap the final closes (its close grace is 2 s).
    std::thread::sleep(AFTER_CLOSE);
    let after_close = sample(args, &live, start.elapsed().as_secs_f64());
    Ok(ChurnReport {
        run_id,
        addrs: args.addrs.iter().map(ToString::to_string).collect(),
        server_pids: args.server_pid.clone(),
        connections: total as u64,
        churn_per_sec: args.churn_per_sec,
        fresh_users: args.fresh_users,
        rate: args.rate,
        duration_s: args.duration,
        sample_every_s: args.sample_every,
        rss_before_kib,
        connect_s,
        memory: summarize(&samples, args.steady_after),
        samples,
        after_close,
        errors: tally.errors(),
        tally,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testserver;
    use clap::Parser;

    #[test]
    fn churns_against_a_stand_in_server() {
        let addr = testserver::start(10_000, testserver::Faults::default());
        let args = Args::try_parse_from([
            "loadtest",
            "churn",
            "--addr",
            &addr.to_string(),
            "--users",
            "10",
            "--devices",
            "2",
            "--churn-per-sec",
            "60",
            "--fresh-users",
            "0.5",
            "--rate",
            "50",
            "--duration",
            "1.5",
            "--sample-every",
            "0.5",
            "--steady-after",
            "0",
            "--server-pid",
            &std::process::id().to_string(),
            "--quiet",
        ])
        .unwrap();
        args.validate().unwrap();
        let r = run(&args, Vec::new()).unwrap();
        let t = &r.tally;
        assert_eq!(t.opened_initial, 20);
        assert!(t.closed_total() >= 80, "{:?}", t.closed);
        for kind in ["clean", "fin", "reset"] {
            assert!(t.closed[kind] >= 25, "{:?}", t.closed);
        }
        // Every close was reopened, bar those still reconnecting at the end.
        assert!(
            t.opened + 20 >= t.opened_initial + t.closed_total(),
            "{t:?}"
        );
        assert!(t.messages_sent >= 60 && t.deliveries > 0, "{t:?}");
        assert_eq!(r.errors, 0, "{t:?}");
        assert_eq!(r.samples.len(), 4);
        assert!(r
            .samples
            .iter()
            .all(|s| s.rss_kib.is_some() && s.fds.is_some()));
        // Read from the stand-in's /healthz (churn may have one or two in flight).
        assert!(r.samples[0].server_connections.is_some_and(|c| c >= 15));
        assert_eq!(r.samples[0].server_users, Some(0));
        assert!(r.memory.slope_kib_per_min.is_some());
    }
}
