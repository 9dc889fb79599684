//! The delivery scenarios' own part (direct, fanout, idle, ramp): which population a scenario
//! connects, and the message each send writes. The event loops that run them are in
//! `orchestration`.

use crate::cli::{Args, Scenario};
use crate::scenarios::marker;
use crate::scenarios::population::{Population, Shard};
use crate::transport::sio;

/// This shard's users and connections: fanout has one sender and one recipient per shard,
/// the other scenarios `--users` alike (only `--senders` of them sending, if given).
pub fn population(args: &Args, shard: Shard, seed: u64) -> Population {
    let n_addrs = args.addrs.len() as u32;
    match args.scenario {
        Scenario::Fanout => Population::fanout(
            &args.user_prefix,
            args.sender_devices,
            args.devices,
            shard,
            n_addrs,
            seed,
        ),
        _ => {
            let pop = Population::uniform(
                &args.user_prefix,
                args.users,
                args.devices,
                shard,
                n_addrs,
                seed,
            );
            match args.senders {
                Some(n) => pop.with_senders(n, args.users),
                None => pop,
            }
        }
    }
}

/// Appends the text payload of message `seq` to `to`: the marked `sendMessage`, padded to
/// about `pad_to` bytes in all, inside a Socket.IO `message` event when `sio`.
pub fn write_message(
    out: &mut Vec<u8>,
    sio: bool,
    to: &str,
    run_id: &str,
    seq: u64,
    intended_ns: u64,
    pad_to: usize,
) {
    if sio {
        out.extend_from_slice(sio::EVENT_PREFIX);
        let pad_to = pad_to.saturating_sub(sio::EVENT_PREFIX.len() + sio::EVENT_SUFFIX.len());
        marker::write_send_message(out, to, run_id, seq, intended_ns, pad_to);
        out.extend_from_slice(sio::EVENT_SUFFIX);
    } else {
        marker::write_send_message(out, to, run_id, seq, intended_ns, pad_to);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socketio_messages_are_wrapped_and_padded_alike() {
        let mut native = Vec::new();
        write_message(&mut native, false, "u7", "ab12", 9, 1000, 200);
        let mut wrapped = Vec::new();
        write_message(&mut wrapped, true, "u7", "ab12", 9, 1000, 200);
        assert!(wrapped.starts_with(sio::EVENT_PREFIX) && wrapped.ends_with(sio::EVENT_SUFFIX));
        // The wrapping counts towards the padding: both are 200 bytes in all.
        assert_eq!((native.len(), wrapped.len()), (200, 200));
        let inner = &wrapped[sio::EVENT_PREFIX.len()..wrapped.len() - sio::EVENT_SUFFIX.len()];
        let mut shorter = Vec::new();
        write_message(&mut shorter, false, "u7", "ab12", 9, 1000, 200 - 14);
        assert_eq!(inner, shorter.as_slice());
    }
}
