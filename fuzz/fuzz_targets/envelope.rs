//! Fuzzes the client envelope parser and the built-in handlers it leads to: whatever a client
//! sends in a text frame must end in a handler result or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::handlers::{Args, ConnectionId, Context, Handlers, MessageIds};
use switchboard::protocol::{encode_ack, encode_error, parse_envelope};
use switchboard::UserId;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_envelope(text) {
        Err(e) => {
            let _ = encode_error(e.ack, e.code.as_str(), &e.message);
        }
        Ok(env) => {
            let handlers = Handlers::with_builtins();
            let Some(handler) = handlers.get(&env.event) else {
                return;
            };
            let user = UserId::from("fuzzer");
            let mut outbox = Vec::new();
            let mut ids = MessageIds::new(1, 0);
            let mut ctx = Context::new(
                &user,
                ConnectionId { core: 0, key: 0 },
                &mut outbox,
                &mut ids,
            );
            match handler.handle(&mut ctx, Args::new(env.args)) {
                Ok(v) => {
                    let _ = encode_ack(env.ack, &v);
                    for d in &outbox {
                        // Every dispatched frame is JSON text (numbers past f64's range are
                        // valid JSON and pass through verbatim).
                        let raw =
                            serde_json::from_str::<&serde_json::value::RawValue>(d.frame.as_str());
                        assert!(raw.is_ok(), "{}", d.frame.as_str());
                    }
                }
                Err(e) => {
                    let _ = encode_error(env.ack, &e.code, &e.message);
                }
            }
        }
    }
});
