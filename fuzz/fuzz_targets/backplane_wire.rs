//! Fuzzes what the subscriber accepts from Redis channels: anything a foreign publisher sends is
//! either a deliverable frame or skipped, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::backplane::wire::{
    read_history_payload, read_seed_payload, read_user_payload, user_of_channel,
};

/// A frame must be JSON text (by the grammar: numbers past f64's range are valid JSON and are
/// forwarded verbatim) whose `event` is a string.
fn assert_event_frame(frame: &str) {
    #[derive(serde::Deserialize)]
    struct EventOnly {
        #[allow(dead_code)]
        event: String,
    }
    assert!(
        serde_json::from_str::<&serde_json::value::RawValue>(frame).is_ok(),
        "{frame}"
    );
    assert!(serde_json::from_str::<EventOnly>(frame).is_ok(), "{frame}");
}

fuzz_target!(|data: &[u8]| {
    let _ = user_of_channel("switchboard", data);
    if let Ok(frame) = read_user_payload(data, 1) {
        assert_event_frame(frame.as_str());
    }
    if let Ok((_offset, frame)) = read_history_payload(data) {
        assert_event_frame(frame.as_str());
    }
    if let Ok((user, frame)) = read_seed_payload(data) {
        assert!(!user.is_empty());
        assert_event_frame(frame.as_str());
    }
});
