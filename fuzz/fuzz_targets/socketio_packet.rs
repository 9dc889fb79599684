//! Fuzzes the Socket.IO / Engine.IO packet parser and what the core loop does with a parsed
//! packet (CONNECT auth, the `["message", {...}]` event shape, the native envelope inside): any
//! text frame a client sends must end in a value or an error, never a panic, and what the
//! server encodes for the namespace and ack id it read must parse back to the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::protocol::parse_envelope;
use switchboard::socketio::{
    ack, connect_auth, connect_error, event_message, parse_engine, parse_packet, tag_ack,
    untag_ack, EnginePacket, Namespace, PacketType,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(EnginePacket::Message(message)) = parse_engine(text) else {
        return;
    };
    let Ok(packet) = parse_packet(message) else {
        return;
    };
    match packet.kind {
        PacketType::Connect => {
            if let Err(reason) = connect_auth(packet.data) {
                // The refusal names the namespace as sent, and parses back.
                let refusal = connect_error(packet.nsp, reason);
                // Without the Engine.IO message type `4`.
                let back = parse_packet(&refusal[1..]).expect("connect_error parses");
                assert_eq!(back.kind, PacketType::ConnectError);
                assert_eq!(back.nsp, packet.nsp, "{refusal}");
            }
        }
        PacketType::Event => {
            if let Ok(message) = event_message(packet.data) {
                let _ = parse_envelope(message.get());
            }
        }
        _ => {}
    }
    if let (Some(ns), Some(id)) = (Namespace::from_name(packet.nsp), packet.id) {
        assert_eq!(untag_ack(tag_ack(ns, id)), (ns, id));
        let answer = ack(ns, id, "{}");
        let back = parse_packet(&answer.as_str()[1..]).expect("ack parses");
        assert_eq!((back.kind, back.id), (PacketType::Ack, Some(id)));
        assert_eq!(Namespace::from_name(back.nsp), Some(ns));
    }
});
