// Test support: the real `switchboard` binary and a private redis-server as child processes on
// free ports, a proxy that can drop frames from the server, and waits with deadlines.
//
// The binary is $SWITCHBOARD_BIN (tests/js_client.rs sets it), else target/debug/switchboard.

import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import WebSocket from 'ws';

import { compareOffsets, connect } from '../src/index.js';

const here = dirname(fileURLToPath(import.meta.url));
export const BIN = process.env.SWITCHBOARD_BIN || resolve(here, '../../../target/debug/switchboard');
export const DEADLINE_MS = 15000;

/** Until `probe()` returns something truthy, or the deadline passes. */
export async function until(what, probe, deadlineMs = DEADLINE_MS) {
  const deadline = Date.now() + deadlineMs;
  for (;;) {
    const value = await probe();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

export function freePort() {
  return new Promise((ok, fail) => {
    const srv = net.createServer();
    srv.once('error', fail);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => ok(port));
    });
  });
}

/** The binary as a child process; `listen` defaults to a free port it picks. */
export class Server {
  constructor(args) {
    this.args = args;
    this.child = null;
    this.addr = null;
  }

  static async start(args = [], listen = '127.0.0.1:0') {
    const s = new Server(args);
    await s.spawn(listen);
    return s;
  }

  get base() {
    return `http://${this.addr}`;
  }

  get url() {
    return `ws://${this.addr}`;
  }

  async spawn(listen) {
    const child = spawn(BIN, ['--listen', listen, '--cores', '2', '--pin', 'off', ...this.args], {
      env: { ...process.env, RUST_LOG: 'info' },
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    this.child = child;
    this.addr = await new Promise((ok, fail) => {
      const timer = setTimeout(() => fail(new Error('the server did not log its address')), DEADLINE_MS);
      let buffered = '';
      child.stderr.setEncoding('utf8');
      child.stderr.on('data', (chunk) => {
        if (buffered === null) return;
        buffered += chunk;
        const m = /listening on ws:\/\/([^/\s]+)/.exec(buffered);
        if (m) {
          clearTimeout(timer);
          buffered = null;
          ok(m[1]);
        }
      });
      child.once('exit', (code) => fail(new Error(`switchboard exited (${code}) before listening`)));
    });
  }

  /** SIGTERM (graceful) or SIGKILL, and the exit. */
  async stop(signal = 'SIGTERM') {
    const child = this.child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((ok) => child.once('exit', ok));
    child.kill(signal);
    await exited;
  }

  /** Stops and starts again on the same address. */
  async restart(signal = 'SIGTERM') {
    await this.stop(signal);
    await this.spawn(this.addr);
  }

  async json(path) {
    const r = await fetch(this.base + path);
    return { status: r.status, body: await r.json() };
  }
}

/** A private redis-server on a free port (never the one at 6379), in a temp dir. */
export class Redis {
  static async start() {
    const r = new Redis();
    r.port = await freePort();
    r.dir = mkdtempSync(join(tmpdir(), 'switchboard-js-redis-'));
    r.child = spawn('redis-server', ['--port', String(r.port), '--bind', '127.0.0.1', '--save', '', '--dir', r.dir], {
      stdio: 'ignore',
    });
    await until('redis-server to answer', () => ping(r.port));
    return r;
  }

  get url() {
    return `redis://127.0.0.1:${this.port}`;
  }

  async stop() {
    if (this.child.exitCode === null && this.child.signalCode === null) {
      const exited = new Promise((ok) => this.child.once('exit', ok));
      this.child.kill('SIGKILL');
      await exited;
    }
    rmSync(this.dir, { recursive: true, force: true });
  }
}

function ping(port) {
  return new Promise((ok) => {
    const s = net.connect(port, '127.0.0.1');
    s.once('error', () => ok(false));
    s.once('connect', () => s.write('PING\r\n'));
    s.once('data', (d) => {
      s.destroy();
      ok(d.toString().startsWith('+PONG'));
    });
  });
}

/** Two instances on one private Redis, both connected to it. */
export async function redisPair(extra = []) {
  const redis = await Redis.start();
  const args = ['--backplane', 'redis', '--redis-url', redis.url, ...extra];
  const a = await Server.start(args);
  const b = await Server.start(args);
  for (const s of [a, b]) await waitConnected(s);
  return { redis, a, b };
}

export async function waitConnected(server) {
  await until(`${server.addr} to reach Redis`, async () => {
    try {
      const { body } = await server.json('/healthz');
      return body.backplane.state === 'connected';
    } catch (_) {
      return false;
    }
  });
}

/** Waits until `server` routes `n` users' channels (their first connection there is live). */
export async function waitSubscribed(server, n) {
  await until(`${n} subscribed channels on ${server.addr}`, async () => {
    const { body } = await server.json('/healthz');
    return body.backplane.subscribed_channels >= n;
  });
}

const opened = new Set();

/** Closes every client `client` made: a failed test leaves none retrying (the process would not
 * exit). */
export function closeClients() {
  for (const c of opened) c.close();
  opened.clear();
}

/** A client with the test's WebSocket and quick retries; records what it delivered. */
export function client(url, token, options = {}) {
  const c = connect(url, { token, WebSocket, backoffMinMs: 50, backoffMaxMs: 400, ...options });
  opened.add(c);
  c.messages = [];
  c.states = [];
  c.recoveries = [];
  c.gaps = [];
  c.errors = [];
  c.on('newMessage', (m) => c.messages.push(m));
  c.on('roomMessage', (m) => c.messages.push(m));
  c.on('state', (s) => c.states.push(s.state));
  c.on('recovered', (r) => c.recoveries.push(r));
  c.on('gap', (g) => c.gaps.push(g));
  c.on('error', (e) => c.errors.push(e));
  return c;
}

export async function connected(c) {
  await until('the client to connect', () => c.state === 'connected');
}

/** Texts delivered, in order. */
export function texts(c) {
  return c.messages.map((m) => m.text);
}

/**
 * A TCP proxy in front of a server. Client bytes pass as they are; the server's frames (single,
 * unmasked, PROTOCOL.md §2) are parsed after the 101, and each text frame goes through
 * `filter(text)`, which returns 'pass', 'drop' or 'cut' (drop it and cut the connection).
 */
export class Proxy {
  static async start(target) {
    const p = new Proxy();
    p.target = target;
    p.filter = () => 'pass';
    p.connections = 0;
    p.sockets = new Set();
    p.server = net.createServer((downstream) => p.#accept(downstream));
    await new Promise((ok) => p.server.listen(0, '127.0.0.1', ok));
    p.addr = `127.0.0.1:${p.server.address().port}`;
    return p;
  }

  get url() {
    return `ws://${this.addr}`;
  }

  #accept(downstream) {
    this.connections += 1;
    const [host, port] = this.target.split(':');
    const upstream = net.connect(Number(port), host);
    this.sockets.add(downstream);
    const cut = () => {
      downstream.destroy();
      upstream.destroy();
      this.sockets.delete(downstream);
    };
    downstream.on('error', cut).on('close', cut);
    upstream.on('error', cut).on('close', cut);
    downstream.on('data', (d) => upstream.write(d));
    let buf = Buffer.alloc(0);
    let headDone = false;
    upstream.on('data', (d) => {
      buf = Buffer.concat([buf, d]);
      if (!headDone) {
        const end = buf.indexOf('\r\n\r\n');
        if (end < 0) return;
        downstream.write(buf.subarray(0, end + 4));
        buf = buf.subarray(end + 4);
        headDone = true;
      }
      for (;;) {
        const frame = decodeFrame(buf);
        if (!frame) return;
        buf = buf.subarray(frame.length);
        const verdict = frame.opcode === 1 ? this.filter(frame.payload.toString('utf8')) : 'pass';
        if (verdict === 'cut') return cut();
        if (verdict === 'pass') downstream.write(frame.bytes);
      }
    });
  }

  cutAll() {
    for (const s of this.sockets) s.destroy();
  }

  close() {
    this.cutAll();
    this.server.close();
  }
}

function decodeFrame(buf) {
  if (buf.length < 2) return null;
  const opcode = buf[0] & 0x0f;
  let len = buf[1] & 0x7f;
  let at = 2;
  if (len === 126) {
    if (buf.length < 4) return null;
    len = buf.readUInt16BE(2);
    at = 4;
  } else if (len === 127) {
    if (buf.length < 10) return null;
    len = Number(buf.readBigUInt64BE(2));
    at = 10;
  }
  if (buf.length < at + len) return null;
  return { opcode, payload: buf.subarray(at, at + len), bytes: buf.subarray(0, at + len), length: at + len };
}

/** What an application does on `gap`: reload the recent history and merge it (by id, in offset
 * order) with what it has. */
export function reloadOnGap(c) {
  c.reloads = 0;
  c.on('gap', async () => {
    const { events } = await c.history({ limit: 100 });
    const known = new Set(c.messages.map((m) => m.id));
    for (const e of events) {
      if (e.event === 'newMessage' && !known.has(e.args.id)) c.messages.push({ ...e.args, offset: e.offset });
    }
    c.messages.sort((x, y) => compareOffsets(x.offset, y.offset));
    c.reloads += 1;
  });
}
