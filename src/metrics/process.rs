//! The process's own gauges for `/metrics`, Prometheus's standard `process_*` names, read from
//! `/proc/self` (Linux; elsewhere they are left out), and the build's identity.

use std::fmt::Write as _;

/// Writes `switchboard_build_info` and the `process_*` families.
pub fn render(out: &mut String) {
    let _ = writeln!(
        out,
        "# HELP switchboard_build_info The running build (always 1).\n\
         # TYPE switchboard_build_info gauge\n\
         switchboard_build_info{{version=\"{}\",tls=\"rustls\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    let Some(stat) = read_stat() else {
        return;
    };
    let ticks = clock_ticks_per_second();
    let mut gauge = |name: &str, kind: &str, help: &str, value: String| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    gauge(
        "process_cpu_seconds_total",
        "counter",
        "User and system CPU time spent, in seconds.",
        format!("{}", (stat.utime + stat.stime) as f64 / ticks),
    );
    gauge(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        (stat.rss_pages * page_size()).to_string(),
    );
    gauge(
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
        stat.vsize.to_string(),
    );
    gauge(
        "process_threads",
        "gauge",
        "Threads in the process.",
        stat.threads.to_string(),
    );
    if let Some(boot) = boot_time() {
        gauge(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since the Unix epoch, in seconds.",
            format!("{}", boot as f64 + stat.starttime as f64 / ticks),
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        gauge(
            "process_open_fds",
            "gauge",
            "Open file descriptors.",
            fds.count().to_string(),
        );
    }
    if let Ok((soft, _)) = rlimit::Resource::NOFILE.get() {
        gauge(
            "process_max_fds",
            "gauge",
            "The open-file limit.",
            soft.to_string(),
        );
    }
}

/// The fields of `/proc/self/stat` used here.
#[derive(Debug, PartialEq, Eq)]
struct Stat {
    utime: u64,
    stime: u64,
    threads: u64,
    starttime: u64,
    vsize: u64,
    rss_pages: u64,
}

fn read_stat() -> Option<Stat> {
    parse_stat(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

/// Parses `/proc/<pid>/stat`: the fields after the command name (which may hold spaces and
/// parentheses, so the split is at its last `)`).
fn parse_stat(text: &str) -> Option<Stat> {
    let after = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state); field n is f[n - 3].
    let field = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        utime: field(14)?,
        stime: field(15)?,
        threads: field(20)?,
        starttime: field(22)?,
        vsize: field(23)?,
        rss_pages: field(24)?,
    })
}

/// `btime` of `/proc/stat`: when the machine booted, in seconds since the epoch.
fn boot_time() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// Linux reports CPU times in clock ticks of 1/100 s on every architecture it runs on today
/// (USER_HZ); reading it needs libc's sysconf, which this crate does not link.
fn clock_ticks_per_second() -> f64 {
    100.0
}

/// The page size: 4 KiB on x86-64 and most arm64 kernels; read from the kernel where it says.
fn page_size() -> u64 {
    // `/proc/self/smaps` would tell per mapping; KernelPageSize of the first one is the base.
    std::fs::read_to_string("/proc/self/smaps")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("KernelPageSize:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(4096, |kib| kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_found_past_a_command_with_spaces() {
        let line = "1234 (a (b) c) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 75 0 0 20 0 7 0 \
                    99000 123456789 2048 18446744073709551615";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                utime: 250,
                stime: 75,
                threads: 7,
                starttime: 99000,
                vsize: 123456789,
                rss_pages: 2048,
            })
        );
    }

    #[test]
    fn this_process_is_described() {
        let mut out = String::new();
        render(&mut out);
        assert!(out.contains("switchboard_build_info{version="), "{out}");
        if cfg!(target_os = "linux") {
            assert!(out.contains("\nprocess_resident_memory_bytes "), "{out}");
            assert!(out.contains("\nprocess_open_fds "), "{out}");
        }
    }
}
