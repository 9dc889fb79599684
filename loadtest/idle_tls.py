#!/usr/bin/env python3
"""Memory per idle connection, plain ws:// or TLS wss://: starts a fresh `--cores 2` release
switchboard (with a self-signed P-256 certificate made by openssl for TLS), opens N WebSocket
connections (the upgrade written by hand; Python's ssl for TLS), and prints the server's VmRSS
before and after, divided by N.

Usage: python3 loadtest/idle_tls.py N plain|tls [BINARY]   (default target/release/switchboard)
Needs openssl on PATH for `tls`, and `ulimit -n` above N + 600.
"""
import os
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import time

N = int(sys.argv[1])
TLS = sys.argv[2] == "tls"
BINARY = sys.argv[3] if len(sys.argv) > 3 else "target/release/switchboard"

tmp = tempfile.mkdtemp(prefix="switchboard-idle-")
cert, key = os.path.join(tmp, "c.pem"), os.path.join(tmp, "k.pem")
args = [BINARY, "--listen", "127.0.0.1:0", "--cores", "2"]
if TLS:
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", key, "-out", cert, "-subj", "/CN=localhost", "-days", "2",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-addext", "basicConstraints=critical,CA:FALSE"],
        check=True, capture_output=True)
    args += ["--tls-cert", cert, "--tls-key", key]
server = subprocess.Popen(args, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "RUST_LOG": "info"})
port = None
for line in server.stderr:
    m = re.search(r"listening on wss?://127\.0\.0\.1:(\d+)/", line)
    if m:
        port = int(m.group(1))
        break


def rss_kib():
    with open(f"/proc/{server.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])


time.sleep(0.5)
before = rss_kib()
ctx = ssl.create_default_context(cafile=cert) if TLS else None
conns = []
for i in range(N):
    s = socket.create_connection(("127.0.0.1", port))
    if TLS:
        s = ctx.wrap_socket(s, server_hostname="localhost")
    s.sendall((f"GET /ws?token=u{i} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
               "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head
    conns.append(s)
time.sleep(1.0)
after = rss_kib()
kind = "tls" if TLS else "plain"
print(f"{kind} N={N}: VmRSS {before} KiB -> {after} KiB = "
      f"{(after - before) * 1024 / N:.0f} bytes per idle connection")
server.terminate()
server.wait()
