//! The client side of the wire, shared by every scenario: the WebSocket codec, Socket.IO
//! framing, auth tokens, and the two clients (blocking and non-blocking) built on them.

pub mod blocking;
pub mod codec;
pub mod nonblocking;
pub mod sio;
pub mod token;
