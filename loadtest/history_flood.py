#!/usr/bin/env python3
"""History memory under the flood of issue 16, finding 1: starts a fresh `--cores 2` release
switchboard (embedded, dev auth) with the given extra flags, and one connection sends 60 KB
`sendMessage`s to made-up user ids at RATE messages/s (190: within the default rate limit of
200/s) for SECONDS seconds, its own copies read and dropped by a thread. Prints the server's
VmRSS before and after (and its peak), the answers the sender got (acks, `quota_exceeded`), and
the server's `switchboard_history_bytes` / `switchboard_history_evicted_total`.

Usage: python3 loadtest/history_flood.py SECONDS RATE [FLAGS...]
   e.g. python3 loadtest/history_flood.py 8 190                       (the defaults)
        python3 loadtest/history_flood.py 8 190 --sender-bytes-per-minute 0
Env BINARY: the server (default target/release/switchboard).
"""
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

SECONDS, RATE = float(sys.argv[1]), float(sys.argv[2])
FLAGS = sys.argv[3:]
BINARY = os.environ.get("BINARY", "target/release/switchboard")

server = subprocess.Popen(
    [BINARY, "--listen", "127.0.0.1:0", "--cores", "2", *FLAGS],
    stderr=subprocess.PIPE, text=True)
port = None
for line in server.stderr:
    m = re.search(r"listening on ws://[^:]+:(\d+)", line)
    if m:
        port = int(m.group(1))
        break
threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()


def status_kib(field):
    with open(f"/proc/{server.pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])


def metric(name):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    body = b""
    while chunk := s.recv(65536):
        body += chunk
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return int(line.split()[1])
    return None


def frame(payload):
    """A masked text frame (mask of zeros: the XOR leaves the payload as it is)."""
    n = len(payload)
    if n < 126:
        head = bytes([0x81, 0x80 | n])
    elif n < 65536:
        head = bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x81, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


sock = socket.create_connection(("127.0.0.1", port))
sock.sendall(b"GET /ws?token=attacker HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
             b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
head = b""
while b"\r\n\r\n" not in head:
    head += sock.recv(4096)
assert head.startswith(b"HTTP/1.1 101"), head

counts = {"ack": 0, "quota_exceeded": 0, "other_error": 0}


def reader():
    buf = b""
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except OSError:
            return
        if not chunk:
            return
        buf += chunk
        while len(buf) >= 2:
            n, at = buf[1] & 0x7F, 2
            if n == 126:
                n, at = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                n, at = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < at + n:
                break
            payload, buf = buf[at:at + n], buf[at + n:]
            if b'"ack":' in payload[:200] or b'"event":"error"' in payload[:40]:
                v = json.loads(payload)
                if v.get("event") == "ack":
                    counts["ack"] += 1
                elif v.get("args", {}).get("code") == "quota_exceeded":
                    counts["quota_exceeded"] += 1
                elif v.get("event") == "error":
                    counts["other_error"] += 1


threading.Thread(target=reader, daemon=True).start()
time.sleep(0.5)
before = status_kib("VmRSS")
text = "x" * 60_000
start, sent = time.monotonic(), 0
while time.monotonic() - start < SECONDS:
    msg = {"event": "sendMessage", "args": {"to": f"made-up-{sent}", "text": text}, "ack": sent + 1}
    sock.sendall(frame(json.dumps(msg).encode()))
    sent += 1
    delay = start + sent / RATE - time.monotonic()
    if delay > 0:
        time.sleep(delay)
deadline = time.monotonic() + 30
while sum(counts.values()) < sent and time.monotonic() < deadline:
    time.sleep(0.05)
after = status_kib("VmRSS")
peak = status_kib("VmHWM")
print(f"flags: {' '.join(FLAGS) or '(defaults)'}")
print(f"sent {sent} x 60 KB in {SECONDS:.0f} s; answers: {counts}")
print(f"VmRSS before {before / 1024:.1f} MiB, after {after / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB")
print(f"switchboard_history_bytes {metric('switchboard_history_bytes')}, "
      f"switchboard_history_evicted_total {metric('switchboard_history_evicted_total')}")
server.terminate()
server.wait()
