//! Entry point: parses flags, picks the mode (single process, parent of `--workers`, or a
//! worker re-executed by a parent), and prints the final report.
//!
//! Exit status: 0 = run completed clean, 1 = run completed with problems (loss,
//! duplicates, failed connections...), 2 = could not run.

mod cli;
mod orchestration;
mod reporting;
mod rng;
mod scenarios;
#[cfg(test)]
mod testserver;
mod transport;

use clap::Parser;
use cli::{Args, Scenario};
use orchestration::{control, director, engine, fleet, shard};
use population::Shard;
use report::{ConnectReport, IdleReport, PhaseReport, Progress, Report};
use reporting::servercpu::{self, Role};
use reporting::{plot, report, stats, sysinfo};
use scenarios::{churn, population, room, soak};
use shard::{ConnectSummary, PhaseResult};
use std::net::{IpAddr, Ipv4Addr};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};
use transport::{sio, token};

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = args.validate() {
        eprintln!("loadtest: {e}");
        return ExitCode::from(2);
    }
    if args.scenario == Scenario::Soak {
        return run_soak(&args);
    }
    if args.scenario == Scenario::Churn {
        return run_churn(&args);
    }
    if args.scenario == Scenario::Room {
        return run_room(&args);
    }
    let result = if let Some(w) = args.worker_index {
        run_worker(&args, w).map(|()| true)
    } else {
        run_main(&args)
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("loadtest: {e}");
            ExitCode::from(2)
        }
    }
}

/// The room scenario: exit 1 if a delivery was lost or duplicated.
fn run_room(args: &Args) -> ExitCode {
    report(args, room::run(args), room::print, |r| {
        r.lost > 0 || r.duplicated > 0
    })
}

/// The soak scenario: exit 1 if any device lost a message without being told
/// (`recovered` with complete=false), or saw a duplicate.
fn run_soak(args: &Args) -> ExitCode {
    report(args, soak::run(args), soak::print, |r| {
        r.devices_lost_without_incomplete > 0 || r.duplicated > 0
    })
}

/// The churn scenario: exit 1 if connections failed or were dropped; memory is only reported.
fn run_churn(args: &Args) -> ExitCode {
    let ips = source_ips(args, Shard { index: 0, count: 1 });
    report(args, churn::run(args, ips), churn::print, |r| r.errors > 0)
}

/// Prints a self-contained scenario's result (the human summary on stdout, or with `--json`
/// the JSON on stdout and the summary on stderr) and turns it into the exit status.
fn report<R: serde::Serialize>(
    args: &Args,
    result: Result<R, String>,
    print: fn(&R, &mut dyn std::io::Write) -> std::io::Result<()>,
    failed: fn(&R) -> bool,
) -> ExitCode {
    match result {
        Err(e) => {
            eprintln!("loadtest: {e}");
            ExitCode::from(2)
        }
        Ok(r) => {
            if args.json {
                let _ = print(&r, &mut std::io::stderr());
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            } else {
                let _ = print(&r, &mut std::io::stdout());
            }
            if failed(&r) {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
    }
}

/// The connections and tokens of one shard, ready for the event loops.
fn build_shared(
    args: &Args,
    shard: Shard,
    run_id: &str,
    seed: u64,
) -> Result<engine::Shared, String> {
    let pop = scenarios::delivery::population(args, shard, seed);
    if !pop.can_send() {
        return Err(if args.senders.is_some() {
            "this shard has no users or no senders (raise --senders)".into()
        } else {
            "this shard has no users".into()
        });
    }
    let minter = token::Minter::new(args.jwt_secret.as_deref(), args.jwt_ttl);
    let now = token::unix_now_s();
    let mut user_ids = Vec::with_capacity(pop.users.len());
    let mut paths = Vec::with_capacity(pop.users.len());
    let mut sio_connect = Vec::new();
    for u in 0..pop.users.len() as u32 {
        let id = pop.user_id(u);
        let tok = minter.token(&id, now)?;
        match args.protocol {
            cli::Protocol::Native => paths.push(token::native_path(args.ws_path(), &tok)),
            cli::Protocol::Socketio => {
                paths.push(sio::upgrade_path(args.ws_path(), &tok));
                sio_connect.push(sio::connect_packet(&tok));
            }
        }
        user_ids.push(id);
    }
    let source_ips = source_ips(args, shard);
    Ok(engine::Shared {
        open: (0..pop.conns.len())
            .map(|_| AtomicBool::new(false))
            .collect(),
        pop,
        paths,
        sio_connect,
        user_ids,
        addrs: args.addrs.clone(),
        run_id: run_id.to_owned(),
        origin: Instant::now(),
        threads: args.threads,
        pad_to: args.size,
        connect_timeout: Duration::from_secs_f64(args.connect_timeout),
        connect_concurrency: (args.connect_concurrency / args.threads as usize).max(1),
        source_ips,
        wbuf_cap: args.write_buffer_cap,
        cpu_pids: if shard.index == 0 {
            cpu_pids(args)
        } else {
            Vec::new()
        },
    })
}

/// The processes whose CPU counts as the server side's: `--server-pid`s, then `--redis-pid`s.
fn cpu_pids(args: &Args) -> Vec<(u32, Role)> {
    let server = args.server_pid.iter().map(|&p| (p, Role::Server));
    let redis = args.redis_pid.iter().map(|&p| (p, Role::Redis));
    server.chain(redis).collect()
}

/// Loopback source addresses to spread connections over. With thousands of sockets to one
/// server port, the kernel's ephemeral-port search in connect() turns linear (it was 65% of
/// the generator's CPU and stalled the loop for ~1 s at 15k connections); binding to many
/// 127.x addresses with IP_BIND_ADDRESS_NO_PORT keeps each search short. Each worker gets
/// its own third octet.
fn source_ips(args: &Args, shard: Shard) -> Vec<IpAddr> {
    let loopback_v4 = args
        .addrs
        .iter()
        .all(|a| a.ip().is_loopback() && a.is_ipv4());
    if !loopback_v4 || args.source_spread == 0 {
        return Vec::new();
    }
    let third = 1 + (shard.index % 250) as u8;
    (0..args.source_spread.min(250))
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, third, 1 + i as u8)))
        .collect()
}

fn run_worker(args: &Args, index: u32) -> Result<(), String> {
    let run_id = args.run_id.clone().ok_or("worker without --run-id")?;
    let seed = args.seed.ok_or("worker without --seed")?;
    let shard = Shard {
        index,
        count: args.workers,
    };
    let shared = build_shared(args, shard, &run_id, seed)?;
    let mut ctl = control::Worker::new(index, args.quiet);
    let outcome = shard::run(shared, &mut ctl)?;
    ctl.done(&control::WorkerDone {
        cpu_total_s: outcome.cpu_total_s,
    });
    Ok(())
}

struct Collected {
    connect: ConnectSummary,
    phases: Vec<PhaseResult>,
    ramp: director::RampOutcome,
    cpu_total_s: f64,
    rss_connected_kib: Option<u64>,
    rss_end_kib: Option<u64>,
    healthz_connected: Vec<serde_json::Value>,
}

fn run_main(args: &Args) -> Result<bool, String> {
    let run_id = rng::run_id();
    let seed = args.seed.unwrap_or_else(rng::random_u64);
    let healthz_before: Vec<_> = args.addrs.iter().map(|a| sysinfo::healthz(*a)).collect();
    let rss_before_kib = sysinfo::rss_total_kib(&args.server_pid);
    if !args.server_pid.is_empty() && rss_before_kib.is_none() {
        eprintln!("loadtest: warning: cannot read VmRSS of the server pid");
    }
    for (pid, role) in cpu_pids(args) {
        if servercpu::sample_pid(pid).stat.is_none() {
            eprintln!("loadtest: warning: cannot read /proc/{pid}/stat ({role:?} pid): its CPU is unknown");
        }
    }
    eprintln!(
        "loadtest {:?}: run {run_id}, {} connections to {} address(es), {} worker(s) x {} thread(s)",
        args.scenario,
        args.total_conns(),
        args.addrs.len(),
        args.workers,
        args.threads
    );
    let mut progress = Progress::new(args.quiet);
    let c = if args.workers > 1 {
        let f = fleet::run(args, &run_id, seed, &mut progress)?;
        Collected {
            connect: f.connect,
            phases: f.phases,
            ramp: f.ramp,
            cpu_total_s: f.cpu_total_s,
            rss_connected_kib: f.rss_connected_kib,
            rss_end_kib: f.rss_end_kib,
            healthz_connected: f.healthz_connected,
        }
    } else {
        let shared = build_shared(args, Shard { index: 0, count: 1 }, &run_id, seed)?;
        let mut ctl = control::Local {
            director: director::Director::new(args),
            progress,
            server_pids: args.server_pid.clone(),
            rss_connected_kib: None,
            rss_end_kib: None,
            addrs: args.addrs.clone(),
            healthz_connected: Vec::new(),
        };
        let o = shard::run(shared, &mut ctl)?;
        progress = ctl.progress;
        Collected {
            connect: o.connect,
            phases: o.phases,
            ramp: ctl.director.ramp,
            cpu_total_s: o.cpu_total_s,
            rss_connected_kib: ctl.rss_connected_kib,
            rss_end_kib: ctl.rss_end_kib,
            healthz_connected: ctl.healthz_connected,
        }
    };
    // Give the server a moment to reap our closes, so its count shows leaks, not lag.
    std::thread::sleep(Duration::from_secs(1));
    let healthz_after: Vec<_> = args.addrs.iter().map(|a| sysinfo::healthz(*a)).collect();
    let idle = (!args.server_pid.is_empty()).then(|| IdleReport {
        server_pids: args.server_pid.clone(),
        rss_before_kib,
        rss_connected_kib: c.rss_connected_kib,
        rss_end_kib: c.rss_end_kib,
        rss_per_connection_bytes: report::rss_per_conn(
            rss_before_kib,
            c.rss_connected_kib,
            c.connect.established,
        ),
    });
    let mut rep = Report {
        scenario: format!("{:?}", args.scenario).to_lowercase(),
        run_id,
        addrs: args.addrs.iter().map(ToString::to_string).collect(),
        users: if args.scenario == Scenario::Fanout {
            2 * u64::from(args.workers)
        } else {
            args.users
        },
        devices: args.devices,
        connections: args.total_conns(),
        threads: args.threads,
        workers: args.workers,
        connect: ConnectReport::of(&c.connect),
        phases: c.phases.iter().map(PhaseReport::of).collect(),
        ramp: (args.scenario == Scenario::Ramp).then_some(c.ramp),
        idle,
        generator_cpu_s: c.cpu_total_s,
        generator_cpu_us_per_delivery: None,
        healthz_before,
        healthz_connected: c.healthz_connected,
        healthz_after,
        timeline: progress.timeline,
        clean: false,
    };
    rep.finish();
    if let Some(path) = &args.plot {
        let mut all = stats::new_hist();
        for p in &c.phases {
            stats::merge_hist(&mut all, &p.latency());
        }
        let title = format!("switchboard {}", rep.scenario);
        match plot::write_svg(path, &title, &rep.timeline, &all) {
            Ok(()) => eprintln!("plot written to {}", path.display()),
            Err(e) => eprintln!("loadtest: {e}"),
        }
    }
    if args.json {
        eprint!("{}", rep.human());
        println!(
            "{}",
            serde_json::to_string_pretty(&rep).map_err(|e| e.to_string())?
        );
    } else {
        print!("{}", rep.human());
    }
    Ok(rep.clean)
}
