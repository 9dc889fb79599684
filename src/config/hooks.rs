//! Hook and origin settings: the application backend's HTTP hooks (`--hook-url`) and the
//! origins allowed to open WebSockets and call `/api` from a browser (`--allowed-origins`).

use std::time::Duration;

/// How long one hook call may take (connect, read the answer) before it counts as failed.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(2);
/// Hook calls in flight at once per process (one worker thread each).
pub const DEFAULT_HOOK_CONCURRENCY: usize = 8;
/// Hook calls waiting for a worker, per worker; past it a call fails at once.
pub const DEFAULT_HOOK_QUEUE: usize = 256;
/// Largest hook answer read, in bytes; a longer one counts as failed.
pub const MAX_HOOK_ANSWER_BYTES: u64 = 64 * 1024;

/// The application backend's hooks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HooksConfig {
    /// `--hook-url BASE`: `POST BASE/connect`, `BASE/join`, `BASE/publish`. `None`: no hooks.
    pub url: Option<String>,
    /// `--hook-timeout`: a call not answered within it fails.
    pub timeout: Duration,
    /// `--hook-concurrency`: worker threads, so calls in flight at most.
    pub concurrency: usize,
    /// `--hook-queue`: calls waiting per worker; a call past it fails at once.
    pub queue: usize,
    /// `--hook-fail-open`: a failed call (timeout, error, bad answer, full queue) allows the
    /// request instead of refusing it. Off by default: fail closed.
    pub fail_open: bool,
}

impl Default for HooksConfig {
    fn default() -> Self {
        HooksConfig {
            url: None,
            timeout: DEFAULT_HOOK_TIMEOUT,
            concurrency: DEFAULT_HOOK_CONCURRENCY,
            queue: DEFAULT_HOOK_QUEUE,
            fail_open: false,
        }
    }
}

impl HooksConfig {
    /// Checks the bounds and the URL's scheme.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(url) = &self.url {
            if !url.starts_with("http://") {
                return Err(format!(
                    "--hook-url must be an http:// URL (the backend sits beside the server); got {url:?}"
                ));
            }
        }
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(30) {
            return Err("--hook-timeout must be above zero and at most 30s".into());
        }
        if !(1..=256).contains(&self.concurrency) {
            return Err("--hook-concurrency must be 1 to 256".into());
        }
        if self.queue == 0 {
            return Err("--hook-queue must be at least 1".into());
        }
        Ok(())
    }
}

/// Which browser origins may open a WebSocket or call `/api` (`--allowed-origins`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Origins {
    /// No list given: in dev mode any origin; with JWTs only the page's own origin (the
    /// `Origin` host equal to `Host`). Requests without `Origin` (not from a browser) pass.
    #[default]
    Default,
    /// `*`: every origin.
    Any,
    /// These exact origins (`https://app.example.com`), plus requests without `Origin`.
    List(Vec<String>),
}

impl std::str::FromStr for Origins {
    type Err = String;

    /// `*`, or a comma-separated list of origins (`scheme://host[:port]`).
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(Origins::Default);
        }
        if s == "*" {
            return Ok(Origins::Any);
        }
        let list: Vec<String> = s
            .split(',')
            .map(|o| o.trim().trim_end_matches('/').to_string())
            .filter(|o| !o.is_empty())
            .collect();
        if let Some(bad) = list.iter().find(|o| !o.contains("://")) {
            return Err(format!(
                "--allowed-origins takes * or origins like https://app.example.com; got {bad:?}"
            ));
        }
        Ok(Origins::List(list))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_name_their_flag() {
        HooksConfig::default().validate().unwrap();
        let bad = HooksConfig {
            url: Some("https://x".into()),
            ..HooksConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("--hook-url"));
        let zero = HooksConfig {
            concurrency: 0,
            ..HooksConfig::default()
        };
        assert!(zero.validate().unwrap_err().contains("--hook-concurrency"));
    }

    #[test]
    fn origins_parse() {
        assert_eq!("".parse::<Origins>(), Ok(Origins::Default));
        assert_eq!("*".parse::<Origins>(), Ok(Origins::Any));
        assert_eq!(
            "https://a.example, http://b:8080/".parse::<Origins>(),
            Ok(Origins::List(vec![
                "https://a.example".into(),
                "http://b:8080".into()
            ]))
        );
        assert!("a.example".parse::<Origins>().is_err());
    }
}
