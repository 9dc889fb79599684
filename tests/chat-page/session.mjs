// The chat page's session handling, run in Node against the page's own script (the inline
// <script> of the page the binary serves, switchboard::web::index_html()) with a fake DOM, clock, fetch and WebSocket: with
// `?token_url=` the page fetches a fresh token before the JWT's `exp` and sends `refresh`, and
// after a 4010 close it reconnects with a fresh token; without a token source a 4010 signs it
// out; a 4011 signs it out. Usage: node session.mjs path/to/index.html. Exits non-zero on failure.

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import vm from 'node:vm';

const html = readFileSync(process.argv[2], 'utf8');
const script = html.slice(html.indexOf('<script>') + 8, html.indexOf('</script>'));

function b64url(obj) {
  return Buffer.from(JSON.stringify(obj)).toString('base64url');
}
function jwt(claims) {
  return b64url({ alg: 'HS256', typ: 'JWT' }) + '.' + b64url(claims) + '.sig';
}

// A DOM node that accepts anything: unknown properties are further nodes, calls return nodes.
function node(props = {}) {
  const store = { dataset: {}, textContent: '', value: '', hidden: false, ...props };
  const target = function () {};
  return new Proxy(target, {
    get(_, key) {
      if (key === Symbol.iterator) return function* () {};
      if (key === Symbol.toPrimitive) return () => '';
      if (key === 'then') return undefined; // not a promise
      if (key in store) return store[key];
      if (key === 'classList') return { toggle() {}, add() {}, remove() {}, contains: () => false };
      if (key === 'addEventListener') return () => {};
      return node();
    },
    set(_, key, value) { store[key] = value; return true; },
    apply() { return node(); },
  });
}

// One page load at `search`, with `token` saved in sessionStorage (the page signs in with it).
async function load(search, token, tokenSource) {
  const clock = { now: Date.UTC(2026, 0, 1), timers: [], seq: 0 };
  const elements = new Map();
  const storage = new Map([['switchboard.token', token]]);
  const sockets = [];
  const fetched = [];
  class FakeDate extends Date { static now() { return clock.now; } }
  class FakeSocket {
    constructor(url) { this.url = url; this.sent = []; sockets.push(this); }
    send(data) {
      const msg = JSON.parse(data);
      this.sent.push(msg);
      // The page's liveness probe: answered as the server does (no handler for `ping`).
      if (msg.event === 'ping') {
        const error = { event: 'error', ack: msg.ack, args: { code: 'unknown_event', message: 'x' } };
        queueMicrotask(() => this.onmessage({ data: JSON.stringify(error) }));
      }
    }
    close() { this.closed = true; }
  }
  const sandbox = {
    Date: FakeDate,
    setTimeout(f, ms) { const id = ++clock.seq; clock.timers.push({ id, at: clock.now + (ms || 0), f }); return id; },
    clearTimeout(id) { clock.timers = clock.timers.filter((t) => t.id !== id); },
    document: {
      getElementById(id) { if (!elements.has(id)) elements.set(id, node()); return elements.get(id); },
      createElement() { return node(); },
      addEventListener() {},
      visibilityState: 'visible',
    },
    window: { addEventListener() {} },
    location: { protocol: 'http:', host: '127.0.0.1:8080', search },
    navigator: { onLine: true },
    sessionStorage: {
      getItem: (k) => (storage.has(k) ? storage.get(k) : null),
      setItem: (k, v) => storage.set(k, v),
      removeItem: (k) => storage.delete(k),
    },
    async fetch(url) {
      fetched.push(url);
      if (url.startsWith('/api/history')) {
        return { status: 200, ok: true, json: async () => ({ events: [] }) };
      }
      const fresh = tokenSource();
      return { status: 200, ok: true, text: async () => JSON.stringify({ token: fresh }) };
    },
    WebSocket: FakeSocket,
    crypto: globalThis.crypto, atob, TextDecoder, URL, URLSearchParams, console, queueMicrotask,
  };
  vm.createContext(sandbox);
  vm.runInContext(script, sandbox);
  const settle = async () => { for (let i = 0; i < 20; i++) await new Promise((r) => setImmediate(r)); };
  // Runs every timer due within `ms`, in order, letting promises settle after each.
  const advance = async (ms) => {
    const end = clock.now + ms;
    for (;;) {
      clock.timers.sort((a, b) => a.at - b.at);
      const next = clock.timers[0];
      if (!next || next.at > end) break;
      clock.timers.shift();
      clock.now = next.at;
      next.f();
      await settle();
    }
    clock.now = end;
    await settle();
  };
  await settle();
  return { clock, elements, storage, sockets, fetched, settle, advance };
}

const t0 = Date.UTC(2026, 0, 1) / 1000;

// 1. With a token source: refresh at 3/4 of the token's life, then again for the new token.
{
  const first = jwt({ sub: 'alice', exp: t0 + 60 });
  const second = jwt({ sub: 'alice', exp: t0 + 45 + 120 });
  const page = await load('?token_url=/token', first, () => second);
  assert.equal(page.sockets.length, 1, 'connected');
  const ws = page.sockets[0];
  assert.match(ws.url, /token=/);
  ws.onopen();
  await page.advance(44_000);
  assert.equal(ws.sent.filter((m) => m.event === 'refresh').length, 0, 'not before 3/4 of the life');
  await page.advance(1_000);
  assert.deepEqual(page.fetched.filter((u) => u === '/token'), ['/token'], 'asked the token source');
  const refresh = ws.sent.find((m) => m.event === 'refresh');
  assert.ok(refresh, 'sent refresh: ' + JSON.stringify(ws.sent));
  assert.equal(refresh.args.token, second);
  ws.onmessage({ data: JSON.stringify({ event: 'ack', ack: refresh.ack, args: { exp: t0 + 165 } }) });
  await page.settle();
  assert.equal(page.storage.get('switchboard.token'), second, 'kept the new token');
  // The next refresh is planned for the new token: 3/4 of its 120 s.
  await page.advance(89_000);
  assert.equal(ws.sent.filter((m) => m.event === 'refresh').length, 1);
  await page.advance(1_000);
  assert.equal(ws.sent.filter((m) => m.event === 'refresh').length, 2, 'refreshed again');
}

// 2. With a token source, a 4010 close: a fresh token, then a reconnect with it.
{
  const fresh = jwt({ sub: 'alice', exp: t0 + 600 });
  const page = await load('?token_url=/token', jwt({ sub: 'alice', exp: t0 + 60 }), () => fresh);
  const ws = page.sockets[0];
  ws.onopen();
  await ws.onclose({ code: 4010 });
  await page.advance(20_000);
  assert.equal(page.sockets.length, 2, 'reconnected');
  assert.ok(page.sockets[1].url.includes('token=' + encodeURIComponent(fresh)), page.sockets[1].url);
}

// 3. Without a token source, a 4010 close signs out and says why; a 4011 too.
for (const [code, reason] of [[4010, /Session expired/], [4011, /Disconnected by the server/]]) {
  const page = await load('', jwt({ sub: 'alice', exp: t0 + 60 }), () => assert.fail('no source'));
  const ws = page.sockets[0];
  ws.onopen();
  await page.advance(50_000);
  assert.equal(ws.sent.filter((m) => m.event === 'refresh').length, 0, 'nothing to refresh with');
  await ws.onclose({ code });
  await page.advance(30_000);
  assert.equal(page.sockets.length, 1, code + ': no reconnect');
  assert.equal(page.storage.has('switchboard.token'), false, code + ': signed out');
  assert.match(String(page.elements.get('signin-error').textContent), reason);
}

// 4. A token source off this origin is not used.
{
  const page = await load('?token_url=//evil.example/t', jwt({ sub: 'alice', exp: t0 + 60 }),
    () => assert.fail('must not fetch'));
  page.sockets[0].onopen();
  await page.advance(50_000);
  assert.equal(page.fetched.filter((u) => !u.startsWith('/api/')).length, 0);
}

console.log('chat page session handling: ok');
