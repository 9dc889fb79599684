//! What a soak run reports: per-device expected, delivered, lost and duplicated messages,
//! the run's totals, and the human summary (aggregates and the worst devices).

use super::{Device, Sent};
use std::collections::HashSet;
use std::io::Write;

/// Per-device result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceResult {
    pub user: String,
    pub device: u32,
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub reconnects: u64,
    pub resumes_without_offset: u64,
    pub recovered_complete: u64,
    pub recovered_incomplete: u64,
    pub connect_failures: u64,
}

#[derive(Debug, serde::Serialize)]
pub struct SoakReport {
    pub run_id: String,
    /// Messages the sender made (each written at least once, unless its device never had a
    /// connection again).
    pub sent: u64,
    /// Messages whose first write found the device disconnected (they were retried).
    pub send_failed: u64,
    /// Messages the server acknowledged (stored).
    pub acked: u64,
    /// Messages never acknowledged and seen by no device: the sender knows they were not
    /// taken. Not owed, not lost.
    pub unconfirmed: u64,
    /// Writes of a message after its first, for want of an ack.
    pub resent: u64,
    /// `unavailable` errors (the server could not hand a message to Redis).
    pub refused: u64,
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    /// Acknowledged messages that reached no device at all.
    pub lost_everywhere: u64,
    /// The same, by the `--addr` the sender was connected to.
    pub lost_everywhere_by_addr: Vec<u64>,
    /// Send times (s since the first message) of the first and last message that reached
    /// no device.
    pub lost_everywhere_span_s: Option<(f64, f64)>,
    pub duplicated: u64,
    pub reconnects: u64,
    pub devices_with_loss: u64,
    /// Devices that lost something and never got `recovered` with complete=false: the
    /// promise broken.
    pub devices_lost_without_incomplete: u64,
    pub devices: Vec<DeviceResult>,
}

pub(super) fn account(
    run_id: &str,
    user_ids: &[String],
    devices: &[Device],
    sent: &[Sent],
    acked: &HashSet<u64>,
    send_failed: u64,
) -> SoakReport {
    let logs: Vec<_> = devices.iter().map(|d| d.log.lock().unwrap()).collect();
    let mut results = Vec::with_capacity(devices.len());
    let mut lost_everywhere = 0u64;
    let mut by_addr: Vec<u64> = Vec::new();
    let mut span: Option<(f64, f64)> = None;
    // Per message: owed (acknowledged, or stored since some device got it), and acknowledged
    // yet seen by no device. (`span` is in seqs here; `run` scales it.)
    let mut owed = vec![false; sent.len()];
    for (seq, s) in sent.iter().enumerate() {
        let seen = logs.iter().any(|l| l.seen.contains(&(seq as u64)));
        let is_acked = acked.contains(&(seq as u64));
        owed[seq] = seen || is_acked;
        if is_acked && !seen {
            lost_everywhere += 1;
            let v = usize::from(s.via);
            if s.via != u8::MAX {
                if by_addr.len() <= v {
                    by_addr.resize(v + 1, 0);
                }
                by_addr[v] += 1;
            }
            let t = seq as f64;
            span = Some(span.map_or((t, t), |(a, _)| (a, t)));
        }
    }
    for (d, log) in devices.iter().zip(&logs) {
        let mut expected = 0u64;
        let mut delivered = 0u64;
        for (seq, s) in sent.iter().enumerate() {
            if owed[seq] && (s.from == d.user || s.to == d.user) {
                expected += 1;
                if log.seen.contains(&(seq as u64)) {
                    delivered += 1;
                }
            }
        }
        results.push(DeviceResult {
            user: user_ids[d.user as usize].clone(),
            device: d.index,
            expected,
            delivered,
            lost: expected - delivered,
            duplicated: log.duplicates,
            reconnects: log.reconnects,
            resumes_without_offset: log.resumes_without_offset,
            recovered_complete: log.recovered_complete,
            recovered_incomplete: log.recovered_incomplete,
            connect_failures: log.connect_failures,
        });
    }
    let sum = |f: fn(&DeviceResult) -> u64| results.iter().map(f).sum::<u64>();
    SoakReport {
        run_id: run_id.to_owned(),
        sent: sent.len() as u64,
        send_failed,
        acked: (0..sent.len() as u64).filter(|s| acked.contains(s)).count() as u64,
        unconfirmed: owed.iter().filter(|o| !**o).count() as u64,
        resent: 0,
        refused: 0,
        expected: sum(|r| r.expected),
        delivered: sum(|r| r.delivered),
        lost: sum(|r| r.lost),
        lost_everywhere,
        lost_everywhere_by_addr: by_addr,
        lost_everywhere_span_s: span,
        duplicated: sum(|r| r.duplicated),
        reconnects: sum(|r| r.reconnects),
        devices_with_loss: results.iter().filter(|r| r.lost > 0).count() as u64,
        devices_lost_without_incomplete: results
            .iter()
            .filter(|r| r.lost > 0 && r.recovered_incomplete == 0)
            .count() as u64,
        devices: results,
    }
}

/// Human summary: aggregates and the worst devices.
pub fn print(r: &SoakReport, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(out, "soak run {}", r.run_id)?;
    writeln!(
        out,
        "sent {}  acked {}  unconfirmed {}  resent {}  refused {}  send_failed {}  \
         expected deliveries {}  delivered {}  lost {}  (acked messages reaching no device: {})  \
         duplicated {}  reconnects {}",
        r.sent,
        r.acked,
        r.unconfirmed,
        r.resent,
        r.refused,
        r.send_failed,
        r.expected,
        r.delivered,
        r.lost,
        r.lost_everywhere,
        r.duplicated,
        r.reconnects
    )?;
    if let Some((a, b)) = r.lost_everywhere_span_s {
        writeln!(
            out,
            "acked messages reaching no device: sent between {a:.2} s and {b:.2} s; by the sender's \
             --addr: {:?}",
            r.lost_everywhere_by_addr
        )?;
    }
    writeln!(
        out,
        "devices with loss {} of {}; of those without any recovered complete=false: {}",
        r.devices_with_loss,
        r.devices.len(),
        r.devices_lost_without_incomplete
    )?;
    let mut worst: Vec<_> = r.devices.iter().collect();
    worst.sort_by_key(|d| std::cmp::Reverse((d.lost, d.duplicated, d.reconnects)));
    writeln!(
        out,
        "{:<10} {:>3} {:>8} {:>9} {:>5} {:>5} {:>6} {:>7} {:>8} {:>10}",
        "user",
        "dev",
        "expected",
        "delivered",
        "lost",
        "dup",
        "reconn",
        "no_off",
        "rec_ok",
        "rec_incompl"
    )?;
    for d in worst.iter().take(10) {
        writeln!(
            out,
            "{:<10} {:>3} {:>8} {:>9} {:>5} {:>5} {:>6} {:>7} {:>8} {:>10}",
            d.user,
            d.device,
            d.expected,
            d.delivered,
            d.lost,
            d.duplicated,
            d.reconnects,
            d.resumes_without_offset,
            d.recovered_complete,
            d.recovered_incomplete
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenarios::soak::DeviceLog;
    use std::sync::Mutex;

    #[test]
    fn accounting_counts_lost_duplicated_and_unowed() {
        let dev = |user, index| Device {
            user,
            index,
            writer: Mutex::new(None),
            log: Mutex::new(DeviceLog::default()),
        };
        let devices = vec![dev(0, 0), dev(0, 1), dev(1, 0), dev(2, 0)];
        // seq 0: u0 -> u1, not acked but seen (so stored: owed); seq 1: u1 -> u1, neither acked
        // nor seen (unconfirmed: not owed); seq 2: u2 -> u2, acked, seen by nobody; seq 3:
        // u1 -> u2, acked and delivered everywhere.
        let msg = |from, to, via| Sent { from, to, via };
        let sent = vec![msg(0, 1, 0), msg(1, 1, u8::MAX), msg(2, 2, 1), msg(1, 2, 0)];
        let acked: HashSet<u64> = [2, 3].into();
        devices[0].log.lock().unwrap().seen.insert(0);
        devices[2].log.lock().unwrap().seen.extend([0, 3]);
        devices[3].log.lock().unwrap().seen.insert(3);
        devices[2].log.lock().unwrap().duplicates = 1;
        devices[1].log.lock().unwrap().recovered_incomplete = 1;
        let ids: Vec<String> = (0..3).map(|u| format!("u{u}")).collect();
        let r = account("r", &ids, &devices, &sent, &acked, 1);
        assert_eq!(
            (r.sent, r.send_failed, r.acked, r.unconfirmed),
            (4, 1, 2, 1)
        );
        let lost: Vec<u64> = r.devices.iter().map(|d| d.lost).collect();
        // u0/1 missed seq 0 (told: complete=false); u2/0 missed seq 2 (not told).
        assert_eq!(lost, [0, 1, 0, 1]);
        assert_eq!((r.expected, r.delivered, r.duplicated), (6, 4, 1));
        assert_eq!((r.lost_everywhere, r.devices_with_loss), (1, 2));
        assert_eq!(r.devices_lost_without_incomplete, 1);
        assert_eq!(r.lost_everywhere_by_addr, [0, 1]);
        assert_eq!(r.lost_everywhere_span_s, Some((2.0, 2.0)));
    }
}
