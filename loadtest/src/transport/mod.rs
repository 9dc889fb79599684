//! The client side of the wire, shared by every scenario: the WebSocket codec, Socket.IO
//! framing, auth tokens, and the two clients (blocking and non-blocking) built on them.

pub mod codec;
pub mod sio;
pub mod token;
