//! The `switchboard` binary: CLI flags and environment → validated `Config` → run until SIGTERM.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches};
use switchboard::config::{self, AuthMode};
use switchboard::Server;

mod cli;
use cli::{parse_log_level, BackplaneKind, Cli, LogFormat, OnOff};

/// Parses the command line and the environment, then fills what neither set from the
/// `--config` file. Returns the flags and where each value came from.
fn load_cli() -> Result<(Cli, ArgMatches), String> {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    let command = Cli::command();
    let first = command
        .clone()
        .try_get_matches_from(&args)
        .unwrap_or_else(|e| e.exit());
    if let Some(path) = first.get_one::<PathBuf>("config") {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--config {}: {e}", path.display()))?;
        let settings =
            config::file::parse(&text).map_err(|e| format!("--config {}: {e}", path.display()))?;
        for setting in settings {
            let known = command
                .get_arguments()
                .find(|a| a.get_long() == Some(setting.flag.as_str()) && setting.flag != "config");
            let Some(arg) = known else {
                return Err(format!(
                    "--config {}: unknown key {:?} (keys are the flags' names; see --help)",
                    path.display(),
                    setting.flag
                ));
            };
            let source = first.value_source(arg.get_id().as_str());
            if !matches!(
                source,
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            ) {
                args.push(format!("--{}={}", setting.flag, setting.value).into());
            }
        }
    }
    let matches = command
        .try_get_matches_from(&args)
        .unwrap_or_else(|e| e.exit());
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    Ok((cli, matches))
}

/// Whether a flag was set (on the command line, in the environment or in the config file),
/// rather than left at its default.
fn given(matches: &ArgMatches, id: &str) -> bool {
    matches!(
        matches.value_source(id),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

/// Flags that would be ignored are an error naming the flag they need.
fn reject_ignored(cli: &Cli, matches: &ArgMatches) -> Result<(), String> {
    let redis = cli.backplane == BackplaneKind::Redis;
    let jwt = cli.jwt_secret.is_some();
    let rates = cli.rate_limit > 0;
    let history = cli.history == OnOff::On;
    let cluster = redis && !cli.redis_cluster.is_empty();
    let sentinel = redis && !cli.redis_sentinel.is_empty();
    let hooks = cli.hook_url.is_some();
    let needs: &[(&str, bool, &str)] = &[
        ("redis_url", redis, "--backplane redis"),
        ("routing", redis, "--backplane redis"),
        ("publish_queue", redis, "--backplane redis"),
        ("publish_batch_window", redis, "--backplane redis"),
        ("publish_pace", redis, "--backplane redis"),
        ("redis_reconnect_max", redis, "--backplane redis"),
        ("redis_cluster", redis, "--backplane redis"),
        ("redis_prefix", redis, "--backplane redis"),
        ("redis_ca_cert", redis, "--backplane redis"),
        ("redis_sentinel", redis, "--backplane redis"),
        ("redis_sentinel_master", redis, "--backplane redis"),
        ("redis_sentinel_password", sentinel, "--redis-sentinel"),
        ("jwt_audience", jwt, "--jwt-secret"),
        ("jwt_issuer", jwt, "--jwt-secret"),
        ("jwt_leeway", jwt, "--jwt-secret"),
        ("rate_limit_burst", rates, "--rate-limit above 0"),
        ("history_max_len", history, "--history on"),
        ("history_max_age", history, "--history on"),
        ("history_max_page", history, "--history on"),
        ("dedupe_window", history, "--history on"),
        (
            "history_workers",
            history && redis,
            "--history on with --backplane redis",
        ),
        (
            "history_reads_per_user",
            history && redis,
            "--history on with --backplane redis",
        ),
        (
            "history_read_queue_per_user",
            history && redis,
            "--history on with --backplane redis",
        ),
        ("api_history_rate", history, "--history on"),
        ("api_history_burst", history, "--history on"),
        (
            "history_max_total_bytes",
            history && !redis,
            "--history on without Redis",
        ),
        ("sender_bytes_per_minute", history, "--history on"),
        ("max_room_queue", redis, "--backplane redis"),
        ("redis_wait_replicas", cluster, "--redis-cluster"),
        ("redis_wait_timeout", cluster, "--redis-cluster"),
        ("room_history_max_len", history, "--history on"),
        ("room_history_max_age", history, "--history on"),
        ("room_history_max_bytes", history, "--history on"),
        ("hook_timeout", hooks, "--hook-url"),
        ("hook_concurrency", hooks, "--hook-url"),
        ("hook_queue", hooks, "--hook-url"),
        ("hook_fail_open", hooks, "--hook-url"),
        ("tls_key", cli.tls_cert.is_some(), "--tls-cert"),
        ("tls_cert", cli.tls_key.is_some(), "--tls-key"),
    ];
    for &(id, ok, need) in needs {
        if !ok && given(matches, id) {
            return Err(format!("--{} needs {need}", id.replace('_', "-")));
        }
    }
    if let Some(cores) = cli.cores.filter(|_| cli.pin == config::Pin::Auto) {
        let cpus = core_affinity::get_core_ids().map_or(0, |ids| ids.len());
        if cpus > 0 && cores > cpus {
            return Err(format!(
                "--cores {cores}: this process may use {cpus} CPUs, and core threads past that \
                 only take turns on them; give --pin off (or a CPU list) to run them anyway"
            ));
        }
    }
    if let Some(max) = cli.max_connections {
        let limit = config::raise_nofile_limit();
        let headroom = config::fd_headroom(limit);
        let room = limit.saturating_sub(headroom);
        if max as u64 > room {
            return Err(format!(
                "--max-connections {max}: the open-file limit is {limit}, less {} kept for \
                 listeners, Redis and logs leaves {room}; raise the limit (ulimit -n, \
                 LimitNOFILE= in systemd) or lower --max-connections",
                headroom
            ));
        }
    }
    Ok(())
}

/// Sets up the logger: `--log-level` (or RUST_LOG) and `--log-format`.
fn init_logging(cli: &Cli) -> Result<(), String> {
    let mut builder = env_logger::Builder::new();
    builder.parse_filters(&cli.log_level);
    if let Ok(filter) = std::env::var("RUST_LOG") {
        parse_log_level(&filter).map_err(|e| format!("RUST_LOG: {e}"))?;
        builder.parse_filters(&filter);
    }
    match cli.log_format {
        LogFormat::Text => {
            builder.format_timestamp_millis();
        }
        LogFormat::Json => {
            builder.format(|buf, record| {
                use std::io::Write;
                let line = serde_json::json!({
                    "ts": buf.timestamp_millis().to_string(),
                    "level": record.level().as_str(),
                    "target": record.target(),
                    "msg": record.args().to_string(),
                });
                writeln!(buf, "{line}")
            });
        }
    }
    builder.init();
    Ok(())
}

fn main() -> ExitCode {
    let (cli, matches) = match load_cli() {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("switchboard: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = reject_ignored(&cli, &matches).and_then(|()| init_logging(&cli)) {
        eprintln!("switchboard: {e}");
        return ExitCode::from(2);
    }
    let dev_auth_asked = cli.dev_auth;
    let config = cli.into_config();
    if let Err(e) = config::check_dev_auth(&config, dev_auth_asked) {
        eprintln!("switchboard: {e}");
        return ExitCode::from(2);
    }
    if let Err(e) = config.validate() {
        eprintln!("switchboard: {e}");
        return ExitCode::from(2);
    }
    if config.history.enabled && !config.history_active() {
        log::warn!(
            "history is off: it needs per-user routing (on one Redis or a cluster) or no \
             Redis; --routing seed does not support it"
        );
    }
    if !config.rooms_active() {
        log::warn!(
            "rooms, presence and --max-devices are off: they need per-user routing (on one \
             Redis or a cluster) or no Redis; --routing seed does not support them"
        );
    }
    if config.auth == AuthMode::Dev {
        log::warn!(
            "dev auth: the token is taken as the user id, unverified. Set --jwt-secret \
             (or SWITCHBOARD_JWT_SECRET) in production"
        );
    }
    let (cores, max_connections) = (config.cores, config.max_connections);
    let backplane_desc = match &config.backplane {
        None => "none".to_string(),
        Some(r) => format!("redis routing={:?}", r.routing),
    };
    let history_desc = if config.history_active() { "on" } else { "off" };
    // Installed before the server starts (and logs "listening"), so a signal sent as soon as
    // the port answers is handled gracefully rather than killing the process.
    let mut signals = match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("switchboard: cannot install signal handlers: {e}");
            return ExitCode::from(1);
        }
    };
    let handle = match Server::new(config).start() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("switchboard: {e}");
            return ExitCode::from(1);
        }
    };
    let scheme = if handle.tls().is_some() { "wss" } else { "ws" };
    log::info!(
        "listening on {scheme}://{}/ws cores={cores} max_connections={max_connections} backplane={backplane_desc} history={history_desc} node={:016x}",
        handle.local_addr(),
        handle.node_id()
    );
    if let Some(addr) = handle.metrics_addr() {
        log::info!("metrics on http://{addr}/metrics (and /healthz, /readyz)");
    }
    let stopper = handle.stopper();
    let tls = handle.tls().cloned();

    std::thread::spawn(move || {
        let mut draining = false;
        for sig in signals.forever() {
            if sig == signal_hook::consts::SIGHUP {
                match &tls {
                    Some(tls) => match tls.reload() {
                        Ok(()) => log::info!("SIGHUP: TLS certificate reloaded"),
                        Err(e) => log::error!("SIGHUP: TLS certificate kept: {e}"),
                    },
                    None => log::info!("SIGHUP: nothing to reload (no --tls-cert)"),
                }
            } else if !draining {
                log::info!(
                    "signal {sig}: draining (a second signal closes every connection at once)"
                );
                stopper.drain();
                draining = true;
            } else {
                log::info!("signal {sig}: closing every connection now");
                stopper.stop();
                return;
            }
        }
    });
    let clean = handle.join();
    if clean {
        log::info!("stopped");
        ExitCode::SUCCESS
    } else {
        log::error!("a core failed");
        ExitCode::from(1)
    }
}
