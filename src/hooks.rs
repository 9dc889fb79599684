//! The application backend's hooks: `POST {--hook-url}/connect`, `/join`, `/publish`, called by
//! a small pool of worker threads, never by a core loop.
//!
//! A core parks the request (an upgrade waits as `Connection::Waiting`; a client request simply
//! is not answered yet), hands a [`HookCall`] to the pool and goes on with its other
//! connections. A worker posts the JSON body with `--hook-timeout`, reads the answer
//! (`{"allow": bool, "reason"?, "rooms"?, "rooms_read"?, "text"?}`) and sends the verdict to the
//! core's inbox, which wakes it. Bounds: `--hook-concurrency` workers (calls in flight), each
//! with a queue of `--hook-queue` calls; a call that finds its queue full fails at once. A
//! connection's calls always go to the same worker, so its messages keep their order. A failed
//! call (timeout, refused connection, non-2xx, bad JSON, full queue) refuses the request unless
//! `--hook-fail-open`.

use std::fmt::Write as _;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

use serde::Deserialize;

use crate::access::GrantClaims;
use crate::bus::{Bus, CoreMsg, HookDone, HookResume, HookVerdict};
use crate::config::hooks::{HooksConfig, MAX_HOOK_ANSWER_BYTES};

/// Which hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookKind {
    /// Before a connection opens (native: before the 101; Socket.IO: at CONNECT).
    Connect,
    /// Before `joinRoom`.
    Join,
    /// Before `sendRoomMessage` and `sendMessage`.
    Publish,
}

impl HookKind {
    const ALL: [HookKind; 3] = [HookKind::Connect, HookKind::Join, HookKind::Publish];

    /// The label in `/metrics`.
    fn label(self) -> &'static str {
        match self {
            HookKind::Connect => "connect",
            HookKind::Join => "join",
            HookKind::Publish => "publish",
        }
    }

    /// The path under `--hook-url`.
    pub fn path(self) -> &'static str {
        match self {
            HookKind::Connect => "/connect",
            HookKind::Join => "/join",
            HookKind::Publish => "/publish",
        }
    }
}

/// One call to make, and where its verdict goes.
#[derive(Debug)]
pub struct HookCall {
    /// Which hook.
    pub kind: HookKind,
    /// The JSON body.
    pub body: String,
    /// The core owning the connection.
    pub core: usize,
    /// The connection's slab key there.
    pub key: usize,
    /// The connection's serial.
    pub serial: u64,
    /// Where the connection goes on.
    pub resume: HookResume,
}

/// The pool: one bounded queue per worker thread.
pub struct Hooks {
    queues: Vec<SyncSender<HookCall>>,
    fail_open: bool,
    counts: Arc<Counts>,
}

/// Verdicts per hook (`[hook][allow, deny, failed]`), for `/metrics`.
#[derive(Default)]
struct Counts([[AtomicU64; 3]; 3]);

impl Counts {
    const FAILED: usize = 2;

    /// The column of an answered call's verdict.
    fn of(verdict: &HookVerdict) -> usize {
        match verdict {
            HookVerdict::Allow { .. } => 0,
            HookVerdict::Deny(_) => 1,
            HookVerdict::Failed(_) => Self::FAILED,
        }
    }

    fn add(&self, kind: HookKind, column: usize) {
        self.0[kind as usize][column].fetch_add(1, Relaxed);
    }
}

#[derive(Deserialize)]
struct Answer {
    allow: bool,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(flatten)]
    grant: GrantClaims,
}

impl Hooks {
    /// Starts the workers when `--hook-url` is set; `None` otherwise.
    pub fn start(config: &HooksConfig, bus: &Arc<Bus>) -> std::io::Result<Option<Arc<Hooks>>> {
        let Some(base) = config.url.as_deref() else {
            return Ok(None);
        };
        let base = base.trim_end_matches('/').to_string();
        let agent = ureq::AgentBuilder::new()
            .timeout(config.timeout)
            .redirects(0)
            .build();
        let counts = Arc::new(Counts::default());
        let mut queues = Vec::with_capacity(config.concurrency);
        for n in 0..config.concurrency {
            let (tx, rx) = sync_channel(config.queue);
            let (agent, bus, base) = (agent.clone(), Arc::clone(bus), base.clone());
            let (fail_open, counts) = (config.fail_open, Arc::clone(&counts));
            std::thread::Builder::new()
                .name(format!("switchboard-hook-{n}"))
                .spawn(move || work(&agent, &base, &bus, &rx, fail_open, &counts))?;
            queues.push(tx);
        }
        Ok(Some(Arc::new(Hooks {
            queues,
            fail_open: config.fail_open,
            counts,
        })))
    }

    /// Queues `call` for its connection's worker. When that queue is full the call is not made
    /// and its verdict is returned at once (failed, or allowed with `--hook-fail-open`).
    pub fn call(&self, call: HookCall) -> Result<(), Box<HookDone>> {
        let worker = (call.core.wrapping_mul(31).wrapping_add(call.key)) % self.queues.len();
        match self.queues[worker].try_send(call) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(call) | TrySendError::Disconnected(call)) => {
                let verdict = failed("hook queue full".into(), self.fail_open);
                self.counts.add(call.kind, Counts::FAILED);
                Err(Box::new(HookDone {
                    key: call.key,
                    serial: call.serial,
                    verdict,
                    resume: call.resume,
                }))
            }
        }
    }

    /// Appends `switchboard_hook_calls_total{hook, verdict}` to a `/metrics` body. A failed call
    /// counts as `failed` whether it then refused or, with `--hook-fail-open`, allowed.
    pub fn render_prometheus(&self, out: &mut String) {
        out.push_str(
            "# HELP switchboard_hook_calls_total Hook calls by hook and verdict.\n\
             # TYPE switchboard_hook_calls_total counter\n",
        );
        for kind in HookKind::ALL {
            for (column, verdict) in ["allow", "deny", "failed"].iter().enumerate() {
                let n = self.counts.0[kind as usize][column].load(Relaxed);
                let _ = writeln!(
                    out,
                    "switchboard_hook_calls_total{{hook=\"{}\",verdict=\"{verdict}\"}} {n}",
                    kind.label()
                );
            }
        }
    }
}

fn failed(why: String, fail_open: bool) -> HookVerdict {
    if fail_open {
        log::warn!("hook failed ({why}): allowed (--hook-fail-open)");
        HookVerdict::Allow {
            grant: None,
            text: None,
        }
    } else {
        log::warn!("hook failed ({why}): refused");
        HookVerdict::Failed(why)
    }
}

/// A worker: calls until the pool is dropped.
fn work(
    agent: &ureq::Agent,
    base: &str,
    bus: &Bus,
    rx: &Receiver<HookCall>,
    fail_open: bool,
    counts: &Counts,
) {
    while let Ok(call) = rx.recv() {
        let url = format!("{base}{}", call.kind.path());
        let verdict = match ask(agent, &url, &call.body) {
            Ok(verdict) => {
                counts.add(call.kind, Counts::of(&verdict));
                verdict
            }
            Err(why) => {
                counts.add(call.kind, Counts::FAILED);
                failed(format!("{url}: {why}"), fail_open)
            }
        };
        let done = HookDone {
            key: call.key,
            serial: call.serial,
            verdict,
            resume: call.resume,
        };
        // A full inbox loses the verdict: the connection's wait (or its client) times out.
        let _ = bus.send(call.core, CoreMsg::Hook(Box::new(done)));
    }
}

fn ask(agent: &ureq::Agent, url: &str, body: &str) -> Result<HookVerdict, String> {
    let response = agent
        .post(url)
        .set("Content-Type", "application/json")
        .send_string(body)
        .map_err(|e| match e {
            ureq::Error::Status(code, _) => format!("status {code}"),
            ureq::Error::Transport(t) => t.to_string(),
        })?;
    // Redirects are not followed (`redirects(0)`): a 3xx is a failed call too.
    if !(200..300).contains(&response.status()) {
        return Err(format!("status {}", response.status()));
    }
    let mut text = Vec::new();
    response
        .into_reader()
        .take(MAX_HOOK_ANSWER_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX_HOOK_ANSWER_BYTES {
        return Err(format!("answer over {MAX_HOOK_ANSWER_BYTES} bytes"));
    }
    parse_answer(&text)
}

/// Reads a hook's answer.
pub fn parse_answer(text: &[u8]) -> Result<HookVerdict, String> {
    let answer: Answer = serde_json::from_slice(text)
        .map_err(|e| format!("answer is not {{\"allow\": bool}}: {e}"))?;
    Ok(if answer.allow {
        HookVerdict::Allow {
            grant: answer.grant.grant(),
            text: answer.text,
        }
    } else {
        HookVerdict::Deny(
            answer
                .reason
                .unwrap_or_else(|| "refused by the application".into()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_allow_deny_or_fail() {
        assert_eq!(
            parse_answer(br#"{"allow": true}"#),
            Ok(HookVerdict::Allow {
                grant: None,
                text: None
            })
        );
        let Ok(HookVerdict::Allow { grant, text }) =
            parse_answer(br#"{"allow": true, "rooms": ["a:*"], "text": "hi"}"#)
        else {
            panic!("not allowed");
        };
        assert!(grant.unwrap().may_send("a:1"));
        assert_eq!(text.as_deref(), Some("hi"));
        assert_eq!(
            parse_answer(br#"{"allow": false, "reason": "banned"}"#),
            Ok(HookVerdict::Deny("banned".into()))
        );
        assert!(parse_answer(b"{}").is_err());
        assert!(parse_answer(b"yes").is_err());
    }

    #[test]
    fn a_full_queue_fails_closed_or_open_at_once() {
        for fail_open in [false, true] {
            // A pool whose one worker never takes anything: its queue of one fills.
            let (tx, _rx) = sync_channel(1);
            let hooks = Hooks {
                queues: vec![tx],
                fail_open,
                counts: Arc::default(),
            };
            let call = |n| HookCall {
                kind: HookKind::Join,
                body: "{}".into(),
                core: 0,
                key: n,
                serial: 0,
                resume: HookResume::Request {
                    event: "joinRoom".into(),
                    args: None,
                    ack: None,
                },
            };
            assert!(hooks.call(call(1)).is_ok());
            let done = hooks.call(call(2)).unwrap_err();
            assert_eq!(done.key, 2);
            assert_eq!(matches!(done.verdict, HookVerdict::Allow { .. }), fail_open);
            let mut metrics = String::new();
            hooks.render_prometheus(&mut metrics);
            let failed_joins = r#"switchboard_hook_calls_total{hook="join",verdict="failed"} 1"#;
            assert!(metrics.contains(failed_joins), "{metrics}");
        }
    }
}
