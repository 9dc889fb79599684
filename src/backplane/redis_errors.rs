//! What a Redis error reply means for the command that got it, in one place for every path that
//! writes (the cores' links, the publisher thread, the rooms worker), and the "Redis refuses
//! writes" spell they report to `/readyz` and the log.

use std::sync::atomic::Ordering::SeqCst;

use super::Backplane;

/// An error reply sorted by what the caller must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorReply {
    /// `OOM` (maxmemory with noeviction), `LOADING` (a restarted Redis reading its data),
    /// `MISCONF` (a failed snapshot stops writes), `BUSY` (a script runs too long): Redis will
    /// not write now, and the connection is fine. Fail the command's publications at once
    /// (their senders hear `unavailable`), keep the connection: reconnecting would not help.
    RefusesWrites,
    /// `NOSCRIPT`: the script cache was flushed (`SCRIPT FLUSH`, a restart, a failover to a
    /// node that never loaded it). The script did not run: load it and send the call again.
    NoScript,
    /// `READONLY`, `MASTERDOWN`, `MOVED`, `ASK`, `CLUSTERDOWN`, `TRYAGAIN`: this node does not
    /// take the write (a demoted master, a moved slot). Re-read who does (slot map, Sentinel)
    /// and reconnect; nothing ran, so the publications are kept for that retry.
    WrongNode,
    /// Anything else: drop the connection and retry after the backoff.
    Other,
}

/// Sorts an error reply by its first word (the code Redis puts there, `OOM`, `NOSCRIPT`, ...);
/// the RESP `-` may be included or not.
pub(crate) fn classify(reply: &str) -> ErrorReply {
    let code = reply
        .trim_start_matches('-')
        .split(' ')
        .next()
        .unwrap_or("");
    match code {
        "OOM" | "LOADING" | "MISCONF" | "BUSY" => ErrorReply::RefusesWrites,
        "NOSCRIPT" => ErrorReply::NoScript,
        "READONLY" | "MASTERDOWN" | "MOVED" | "ASK" | "CLUSTERDOWN" | "TRYAGAIN" => {
            ErrorReply::WrongNode
        }
        _ => ErrorReply::Other,
    }
}

/// [`classify`] for an error of the `redis` crate: an error reply by its code, anything else
/// (I/O, a parse error) is [`ErrorReply::Other`].
pub(crate) fn classify_error(e: &redis::RedisError) -> ErrorReply {
    e.code().map_or(ErrorReply::Other, classify)
}

/// How long after the last refusal the backplane counts as refusing writes, unless a write is
/// taken sooner.
const REFUSAL_SPELL: std::time::Duration = std::time::Duration::from_secs(5);

/// The write-refusal spell: any writer may report it, `/readyz` reads it.
impl Backplane {
    /// Redis refused a write (`why`: its reply): `/readyz` answers 503 for a while, and the
    /// first refusal of a spell is logged, once for all the writers.
    pub(crate) fn note_write_refused(&self, why: &str) {
        self.write_refused_at.store(crate::types::now_ms(), SeqCst);
        if !self.write_refusal_logged.swap(true, SeqCst) {
            log::warn!("redis refuses writes ({why}): publications fail with unavailable");
        }
    }

    /// Whether Redis refused a write within the last [`REFUSAL_SPELL`] and took none since:
    /// `/readyz` then answers 503.
    pub(crate) fn refusing_writes(&self) -> bool {
        let refused_at = self.write_refused_at.load(SeqCst);
        refused_at != 0
            && crate::types::now_ms().saturating_sub(refused_at) < REFUSAL_SPELL.as_millis() as u64
    }

    /// Redis took a write: the spell, if any, is over.
    pub(crate) fn note_write_taken(&self) {
        if self.write_refused_at.load(SeqCst) != 0 {
            self.write_refused_at.store(0, SeqCst);
            self.write_refusal_logged.store(false, SeqCst);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn error_replies_are_sorted_by_their_code() {
        let oom = "OOM command not allowed when used memory > 'maxmemory'.";
        assert_eq!(classify(oom), ErrorReply::RefusesWrites);
        // A script's call failing keeps the code first (Redis 7 appends "script: ...").
        let in_script = "OOM command not allowed when used memory > 'maxmemory'. script: f_1";
        assert_eq!(classify(in_script), ErrorReply::RefusesWrites);
        for refusal in [
            "LOADING Redis is loading",
            "MISCONF snapshots",
            "BUSY script",
        ] {
            assert_eq!(classify(refusal), ErrorReply::RefusesWrites, "{refusal}");
        }
        let noscript = "NOSCRIPT No matching script. Please use EVAL.";
        assert_eq!(classify(noscript), ErrorReply::NoScript);
        assert_eq!(classify("-NOSCRIPT"), ErrorReply::NoScript);
        for moved in [
            "READONLY You can't write against a read only replica.",
            "MOVED 3999 127.0.0.1:6381",
            "ASK 3999 127.0.0.1:6381",
            "CLUSTERDOWN The cluster is down",
            "TRYAGAIN",
            "MASTERDOWN Link with MASTER is down",
        ] {
            assert_eq!(classify(moved), ErrorReply::WrongNode, "{moved}");
        }
        // A code is a whole word: `OOMPH` or a message merely mentioning OOM is not one.
        for other in ["ERR unknown command", "OOMPH", "ERR OOM", "WRONGTYPE", ""] {
            assert_eq!(classify(other), ErrorReply::Other, "{other}");
        }
    }

    /// An error of the `redis` crate for a RESP error reply, as a failed command returns it.
    pub(crate) fn reply_error(resp: &[u8]) -> redis::RedisError {
        match redis::parse_redis_value(resp).expect("a RESP reply") {
            redis::Value::ServerError(e) => e.into(),
            other => panic!("not an error reply: {other:?}"),
        }
    }

    #[test]
    fn the_redis_crates_errors_are_sorted_by_their_code() {
        let oom = reply_error(b"-OOM command not allowed when used memory > 'maxmemory'.\r\n");
        assert_eq!(classify_error(&oom), ErrorReply::RefusesWrites);
        let noscript = reply_error(b"-NOSCRIPT No matching script.\r\n");
        assert_eq!(classify_error(&noscript), ErrorReply::NoScript);
        let readonly = reply_error(b"-READONLY You can't write against a read only replica.\r\n");
        assert_eq!(classify_error(&readonly), ErrorReply::WrongNode);
        let io: redis::RedisError = (redis::ErrorKind::Io, "gone").into();
        assert_eq!(classify_error(&io), ErrorReply::Other);
    }
}
