//! An in-memory stream for the state tests: scripted reads and writes, with WouldBlock and short
//! writes where the script says, as a non-blocking socket gives them.

use std::collections::VecDeque;
use std::io::{self, Read, Write};

use tungstenite::protocol::Role;
use tungstenite::{Message, WebSocket};

/// One step of what the peer sends.
pub enum In {
    /// Bytes, handed over as far as the reader's buffer goes.
    Data(Vec<u8>),
    /// The socket is empty now.
    Block,
    /// The peer closed its side (every later read returns 0).
    Eof,
}

/// One step of what the socket accepts.
pub enum Out {
    /// At most this many bytes in one write.
    Take(usize),
    /// The send buffer is full now.
    Block,
}

/// A scripted stream; with an empty script a read blocks and a write takes everything.
#[derive(Default)]
pub struct Mock {
    reads: VecDeque<In>,
    writes: VecDeque<Out>,
    /// Every byte written.
    pub written: Vec<u8>,
    /// Read calls made.
    pub read_calls: usize,
}

impl Mock {
    pub fn new(reads: impl IntoIterator<Item = In>, writes: impl IntoIterator<Item = Out>) -> Self {
        Mock {
            reads: reads.into_iter().collect(),
            writes: writes.into_iter().collect(),
            ..Mock::default()
        }
    }

    /// Queues more input.
    pub fn push(&mut self, step: In) {
        self.reads.push_back(step);
    }
}

impl Read for Mock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_calls += 1;
        match self.reads.pop_front() {
            None | Some(In::Block) => Err(io::ErrorKind::WouldBlock.into()),
            Some(In::Eof) => {
                self.reads.push_front(In::Eof);
                Ok(0)
            }
            Some(In::Data(mut data)) => {
                let n = buf.len().min(data.len());
                buf[..n].copy_from_slice(&data[..n]);
                if n < data.len() {
                    self.reads.push_front(In::Data(data.split_off(n)));
                }
                Ok(n)
            }
        }
    }
}

impl Write for Mock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = match self.writes.pop_front() {
            None => buf.len(),
            Some(Out::Block) => return Err(io::ErrorKind::WouldBlock.into()),
            Some(Out::Take(n)) => n.min(buf.len()),
        };
        self.written.extend_from_slice(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The bytes a client sends for `messages` (masked, as a client must).
pub fn client_bytes(messages: impl IntoIterator<Item = Message>) -> Vec<u8> {
    let mut ws = WebSocket::from_raw_socket(io::Cursor::new(Vec::new()), Role::Client, None);
    for message in messages {
        ws.write(message).unwrap();
    }
    ws.flush().unwrap();
    ws.get_ref().get_ref().clone()
}

/// The messages a client reads from what the server wrote.
pub fn server_messages(bytes: &[u8]) -> Vec<Message> {
    let cursor = io::Cursor::new(bytes.to_vec());
    let mut ws = WebSocket::from_raw_socket(cursor, Role::Client, None);
    let mut messages = Vec::new();
    while let Ok(message) = ws.read() {
        messages.push(message);
    }
    messages
}
