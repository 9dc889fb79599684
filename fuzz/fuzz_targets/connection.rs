//! Fuzzes a server-side WebSocket connection fed arbitrary bytes through a mock stream that
//! hands them over in small chunks with WouldBlock in between (as a non-blocking socket does),
//! with the server's own limits, each text message going to the envelope parser.
#![no_main]

use std::io::{self, Read, Write};

use libfuzzer_sys::fuzz_target;
use switchboard::protocol::parse_envelope;
use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::{Message, WebSocket};

struct Mock<'a> {
    input: &'a [u8],
    chunk: usize,
    block_next: bool,
    written: usize,
}

impl Read for Mock<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let block = self.block_next;
        self.block_next = !block;
        if block {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        if self.input.is_empty() {
            return Ok(0);
        }
        let n = self.chunk.min(buf.len()).min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

impl Write for Mock<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // A peer that reads slowly: accept at most 7 bytes per call.
        let n = buf.len().min(7);
        self.written += n;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, input)) = data.split_first() else {
        return;
    };
    let config = WebSocketConfig::default()
        .read_buffer_size(256)
        .write_buffer_size(1024)
        .max_write_buffer_size(4096)
        .max_message_size(Some(4096))
        .max_frame_size(Some(4096));
    let mock = Mock {
        input,
        chunk: usize::from(chunk % 64) + 1,
        block_next: false,
        written: 0,
    };
    let mut ws = WebSocket::from_raw_socket(mock, Role::Server, Some(config));
    for _ in 0..10_000 {
        match ws.read() {
            Ok(Message::Text(t)) => {
                let _ = parse_envelope(t.as_str());
                let _ = ws.write(Message::text("{\"event\":\"ack\",\"args\":null}"));
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                let _ = ws.flush();
            }
            Err(_) => break,
        }
    }
});
