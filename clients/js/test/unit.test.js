// The client's rules against a scripted WebSocket (no server): what it sends on connect and
// reconnect, what it drops as repeats, `gap`, the liveness probe, and token refresh.

import assert from 'node:assert/strict';
import { after, test } from 'node:test';

import { compareOffsets, connect, parseOffset } from '../src/index.js';
import { until } from './support.js';

// A WebSocket the test drives: `sockets` holds every one created, newest last.
function fakeSockets() {
  const sockets = [];
  class FakeWebSocket {
    constructor(url) {
      this.url = url;
      this.sent = [];
      this.closed = false;
      sockets.push(this);
    }
    send(text) {
      this.sent.push(JSON.parse(text));
    }
    close() {
      this.closed = true;
    }
    // Test side.
    open() {
      this.onopen?.({});
    }
    deliver(frame) {
      this.onmessage?.({ data: JSON.stringify(frame) });
    }
    drop(code = 1006) {
      this.onclose?.({ code, reason: '' });
    }
  }
  return { sockets, FakeWebSocket };
}

// Every client started, closed at the end even when a test failed (else the process stays up).
const clients = [];
after(() => clients.forEach((c) => c.close()));

function start(options = {}) {
  const { sockets, FakeWebSocket } = fakeSockets();
  const c = connect('ws://example.test', { token: 'u1', WebSocket: FakeWebSocket, backoffMinMs: 1, backoffMaxMs: 5, ...options });
  clients.push(c);
  const seen = { messages: [], gaps: [], recovered: [], events: [], errors: [] };
  c.on('newMessage', (m) => seen.messages.push(m));
  c.on('gap', (g) => seen.gaps.push(g));
  c.on('recovered', (r) => seen.recovered.push(r));
  c.on('notice', (args, offset) => seen.events.push({ args, offset }));
  c.on('error', (e) => seen.errors.push(e));
  return { c, sockets, seen };
}

const msg = (id, offset, text = id) => ({ event: 'newMessage', args: { id, from: 'u2', to: 'u1', text, ts: 1 }, offset });

test('offsets compare as pairs of numbers, not as strings', () => {
  assert.equal(compareOffsets('9-1', '10-0'), -1);
  assert.equal(compareOffsets('10-2', '10-10'), -1);
  assert.equal(compareOffsets('18446744073709551615-1', '18446744073709551615-1'), 0);
  assert.equal(parseOffset('1-x'), null);
});

test('the URL gets /ws and the token; reconnects carry the newest offset as since', async () => {
  const { c, sockets } = start({ since: '5-1' });
  await until('a socket', () => sockets.length === 1);
  const first = new URL(sockets[0].url);
  assert.equal(first.pathname, '/ws');
  assert.equal(first.searchParams.get('token'), 'u1');
  assert.equal(first.searchParams.get('since'), '5-1');
  sockets[0].open();
  sockets[0].deliver(msg('a', '5-2'));
  sockets[0].deliver(msg('b', '10-1'));
  sockets[0].drop();
  await until('a second socket', () => sockets.length === 2);
  assert.equal(new URL(sockets[1].url).searchParams.get('since'), '10-1');
  assert.ok(sockets[0].closed);
  c.close();
});

test('repeats are dropped: by offset already passed, and by id under a new offset', async () => {
  const { c, sockets, seen } = start();
  await until('a socket', () => sockets.length === 1);
  sockets[0].open();
  sockets[0].deliver(msg('a', '1-1'));
  sockets[0].deliver(msg('b', '1-2'));
  sockets[0].deliver(msg('a', '1-1')); // a replay repeats it
  sockets[0].deliver(msg('b', '1-3')); // a retried publication: same id, new offset
  sockets[0].deliver(msg('c', '1-4'));
  assert.deepEqual(seen.messages.map((m) => m.id), ['a', 'b', 'c']);
  assert.equal(c.offset, '1-4');
  // Other events are delivered under their own name, with their offset.
  sockets[0].deliver({ event: 'notice', args: { text: 'x' }, offset: '1-5' });
  sockets[0].deliver({ event: 'notice', args: { text: 'x' }, offset: '1-5' });
  assert.deepEqual(seen.events, [{ args: { text: 'x' }, offset: '1-5' }]);
  c.close();
});

test('recovered is surfaced with what the replay delivered; complete:false is a gap', async () => {
  const { c, sockets, seen } = start({ since: '1-1' });
  await until('a socket', () => sockets.length === 1);
  sockets[0].open();
  sockets[0].deliver(msg('a', '1-2'));
  sockets[0].deliver({ event: 'recovered', args: { complete: true, offset: '1-2' } });
  assert.deepEqual(seen.recovered, [{ complete: true, offset: '1-2', since: '1-1', delivered: 1 }]);
  assert.deepEqual(seen.gaps, []);
  sockets[0].drop();
  await until('a second socket', () => sockets.length === 2);
  sockets[1].open();
  sockets[1].deliver({ event: 'recovered', args: { complete: false, offset: null } });
  assert.deepEqual(seen.gaps, [{ complete: false, offset: null, since: '1-2', delivered: 0 }]);
  c.close();
});

test('sends wait for a connection, go again after a drop with the same clientId, and settle once', async () => {
  const { c, sockets } = start();
  const sent = c.send('u2', 'hi');
  await until('a socket', () => sockets.length === 1);
  sockets[0].open();
  const [first] = sockets[0].sent;
  assert.equal(first.event, 'sendMessage');
  assert.match(first.args.clientId, /^[0-9a-f]{24}$/);
  sockets[0].drop();
  await until('a second socket', () => sockets.length === 2);
  sockets[1].open();
  const [again] = sockets[1].sent;
  assert.deepEqual(again.args, first.args);
  // The server refuses the first attempt with `unavailable`: kept; then acknowledges.
  sockets[1].deliver({ event: 'error', ack: again.ack, args: { code: 'unavailable', message: '' } });
  await until('a resend', () => sockets[1].sent.length === 2, 8000);
  const third = sockets[1].sent[1];
  sockets[1].deliver({ event: 'ack', ack: third.ack, args: { id: 'x', ts: 2 } });
  assert.deepEqual(await sent, { id: 'x', ts: 2 });
  c.close();
});

test('rooms are joined again, before the sends still out, on every reconnect', async () => {
  const { c, sockets } = start();
  await until('a socket', () => sockets.length === 1);
  sockets[0].open();
  const joined = c.joinRoom('lobby');
  sockets[0].deliver({ event: 'ack', ack: sockets[0].sent[0].ack, args: { room: 'lobby' } });
  await joined;
  c.sendRoom('lobby', 'hello').catch(() => {});
  sockets[0].drop();
  await until('a second socket', () => sockets.length === 2);
  sockets[1].open();
  assert.deepEqual(sockets[1].sent.map((f) => f.event), ['joinRoom', 'sendRoomMessage']);
  c.close();
});

const roomMsg = (id, room, offset) => ({
  event: 'newMessage',
  args: { id, from: 'u2', room, text: id, ts: 1 },
  room,
  offset,
});

test('per room: the newest offset kept, rejoined with since, repeats dropped, recovered and gap named', async () => {
  const { c, sockets, seen } = start();
  const rooms = [];
  c.on('roomMessage', (m) => rooms.push(m));
  await until('a socket', () => sockets.length === 1);
  sockets[0].open();
  for (const room of ['r1', 'r2', 'r3']) {
    const joined = c.joinRoom(room);
    const join = sockets[0].sent.at(-1);
    assert.deepEqual(join.args, { room });
    sockets[0].deliver({ event: 'ack', ack: join.ack, args: { room } });
    await joined;
  }
  // Each room is a stream of its own: a room's offsets are not the user's, nor another room's.
  sockets[0].deliver(msg('d1', '50-0'));
  sockets[0].deliver(roomMsg('a', 'r1', '7-0'));
  sockets[0].deliver(roomMsg('b', 'r2', '3-0'));
  sockets[0].deliver(roomMsg('c', 'r1', '8-0'));
  sockets[0].deliver(roomMsg('a', 'r1', '7-0')); // repeat by offset
  sockets[0].deliver(roomMsg('b', 'r2', '4-0')); // repeat by id under a new offset
  assert.deepEqual(rooms.map((m) => m.id), ['a', 'b', 'c']);
  assert.equal(c.roomOffset('r1'), '8-0');
  assert.equal(c.roomOffset('r2'), '4-0');
  assert.equal(c.roomOffset('r3'), null);
  assert.equal(c.offset, '50-0');
  sockets[0].drop();
  await until('a second socket', () => sockets.length === 2);
  // The user's stream resumes with `since` in the URL, each room with its join.
  assert.equal(new URL(sockets[1].url).searchParams.get('since'), '50-0');
  assert.equal(new URL(sockets[1].url).searchParams.get('rooms'), null);
  sockets[1].open();
  const joins = sockets[1].sent.filter((f) => f.event === 'joinRoom').map((f) => f.args);
  assert.deepEqual(joins, [
    { room: 'r1', since: '8-0' },
    { room: 'r2', since: '4-0' },
    { room: 'r3' },
  ]);
  // r1's replay repeats what came live, then brings one new; r2's history was trimmed.
  sockets[1].deliver(roomMsg('c', 'r1', '8-0'));
  sockets[1].deliver(roomMsg('e', 'r1', '9-0'));
  sockets[1].deliver({ event: 'recovered', args: { room: 'r1', complete: true, offset: '9-0' } });
  sockets[1].deliver({ event: 'recovered', args: { room: 'r2', complete: false, offset: null } });
  assert.deepEqual(rooms.map((m) => m.id), ['a', 'b', 'c', 'e']);
  assert.deepEqual(seen.recovered, [
    { room: 'r1', complete: true, offset: '9-0', since: '8-0', delivered: 1 },
    { room: 'r2', complete: false, offset: null, since: '4-0', delivered: 0 },
  ]);
  assert.deepEqual(seen.gaps, [{ room: 'r2', complete: false, offset: null, since: '4-0', delivered: 0 }]);
  // A room left is forgotten: not rejoined, its offset gone.
  const left = c.leaveRoom('r1');
  const leave = sockets[1].sent.at(-1);
  sockets[1].deliver({ event: 'ack', ack: leave.ack, args: { room: 'r1' } });
  await left;
  assert.equal(c.roomOffset('r1'), null);
  c.close();
});

test('a silent connection is probed and dropped when the probe gets no answer', async () => {
  const { c, sockets } = start({ probeAfterMs: 20, probeTimeoutMs: 30, probeTickMs: 10 });
  await until('a socket', () => sockets.length === 1);
  sockets[0].open();
  await until('a probe', () => sockets[0].sent.some((f) => f.event === 'ping'));
  await until('a new socket', () => sockets.length === 2);
  assert.ok(sockets[0].closed);
  // An answer, even an error, keeps the connection.
  sockets[1].open();
  await until('a probe', () => sockets[1].sent.some((f) => f.event === 'ping'));
  const ping = sockets[1].sent.find((f) => f.event === 'ping');
  sockets[1].deliver({ event: 'error', ack: ping.ack, args: { code: 'unknown_event', message: '' } });
  await new Promise((r) => setTimeout(r, 25));
  assert.equal(sockets.length, 2);
  c.close();
});

test('token refresh: `refresh` with a new token from getToken before exp; stops where unknown', async () => {
  const jwt = (exp) => `h.${Buffer.from(JSON.stringify({ sub: 'u1', exp })).toString('base64url')}.s`;
  let calls = 0;
  const soon = Math.floor(Date.now() / 1000) + 2;
  const { c, sockets, seen } = start({
    token: undefined,
    getToken: async () => jwt(soon + calls++),
    refreshBeforeExpiryMs: 60000, // at once (the floor is one second)
  });
  await until('a socket', () => sockets.length === 1);
  assert.equal(new URL(sockets[0].url).searchParams.get('token'), jwt(soon));
  sockets[0].open();
  await until('a refresh', () => sockets[0].sent.some((f) => f.event === 'refresh'), 5000);
  const refresh = sockets[0].sent.find((f) => f.event === 'refresh');
  assert.deepEqual(refresh.args, { token: jwt(soon + 1) });
  sockets[0].deliver({ event: 'error', ack: refresh.ack, args: { code: 'unknown_event', message: '' } });
  await new Promise((r) => setTimeout(r, 1200));
  assert.equal(sockets[0].sent.filter((f) => f.event === 'refresh').length, 1, 'no refresh after unknown_event');
  assert.deepEqual(seen.errors, []);
  c.close();
});

test('close 4009 (device limit) stops reconnecting', async () => {
  const { c, sockets, seen } = start();
  await until('a socket', () => sockets.length === 1);
  sockets[0].open();
  sockets[0].drop(4009);
  assert.equal(c.state, 'closed');
  assert.equal(seen.errors[0].code, 'device_limit');
  await new Promise((r) => setTimeout(r, 30));
  assert.equal(sockets.length, 1);
});

test('close 4011 (disconnected by the application) and 4010 without getToken stop reconnecting', async () => {
  for (const [code, expected] of [[4011, 'server_disconnect'], [4010, 'session_expired']]) {
    const { c, sockets, seen } = start();
    await until('a socket', () => sockets.length === 1);
    sockets[0].open();
    sockets[0].drop(code);
    assert.equal(c.state, 'closed', `${code} closes the client`);
    assert.equal(seen.errors[0].code, expected);
    await new Promise((r) => setTimeout(r, 30));
    assert.equal(sockets.length, 1, `${code}: no reconnect`);
  }
});

test('close 4010 with getToken: reconnects with a token asked for as expired', async () => {
  const reasons = [];
  const { c, sockets } = start({
    token: undefined,
    getToken: async (reason) => {
      reasons.push(reason);
      return reason === 'expired' ? 'fresh' : 'old';
    },
  });
  await until('a socket', () => sockets.length === 1);
  sockets[0].open();
  sockets[0].drop(4010);
  await until('a reconnect', () => sockets.length === 2);
  assert.equal(new URL(sockets[1].url).searchParams.get('token'), 'fresh');
  sockets[1].drop(1006);
  await until('another reconnect', () => sockets.length === 3);
  assert.deepEqual(reasons, ['connect', 'expired', 'connect']);
  c.close();
});
