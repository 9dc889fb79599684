// The real socket.io-client v4 against switchboard, one scenario per run:
//   node scenarios.js <scenario> '<json config>'
// Driven by tests/socketio.rs, which starts the servers, passes their addresses in the config
// and reads the JSON lines this prints on stdout ({"step": ...}); the last one is the result.
// Every wait has a deadline: a scenario that hangs prints {"error": ...} and exits 1.
'use strict';

const { io } = require('socket.io-client');

const [scenario, rawConfig] = process.argv.slice(2);
const config = JSON.parse(rawConfig || '{}');
const DEADLINE_MS = config.deadline_ms || 10000;

const say = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');
const fail = (message) => {
  say({ error: message });
  process.exit(1);
};
setTimeout(() => fail(`${scenario}: deadline passed`), 4 * DEADLINE_MS).unref();

// Options every socket uses: the websocket transport only (switchboard serves no polling),
// fast reconnects so the restart scenario is quick.
const options = (extra) => ({
  transports: ['websocket'],
  reconnectionDelay: 100,
  reconnectionDelayMax: 500,
  timeout: DEADLINE_MS,
  ...extra,
});

// Resolves with the value of `fn` once it is truthy, polled every 10 ms, or rejects at the deadline.
const until = (what, fn) =>
  new Promise((resolve, reject) => {
    const deadline = Date.now() + DEADLINE_MS;
    const tick = async () => {
      let v;
      try {
        v = await fn();
      } catch (e) {
        v = undefined;
      }
      if (v) return resolve(v);
      if (Date.now() > deadline) return reject(new Error(`timed out waiting for ${what}`));
      setTimeout(tick, 10);
    };
    tick();
  });

const connected = (socket) =>
  new Promise((resolve, reject) => {
    if (socket.connected) return resolve(socket);
    socket.once('connect', () => resolve(socket));
    socket.once('connect_error', (err) => reject(new Error(`connect_error: ${err.message}`)));
  });

const connectError = (socket) =>
  new Promise((resolve) => {
    socket.once('connect', () => resolve({ connected: true }));
    socket.once('connect_error', (err) => resolve({ message: err.message }));
  });

const health = async (addr) => (await fetch(`http://${addr}/healthz`)).json();

// Every `message` event a socket receives, in order.
const record = (socket) => {
  const got = [];
  socket.on('message', (msg) => got.push(msg));
  return got;
};

const scenarios = {
  // u1 on instance A (namespace /) and B (/socket), u2 on B; u2 sends to u1. Each socket must
  // get the event exactly once (the native u1 on A is checked by the Rust side).
  async fanout() {
    const { a, b, text, channels_a, channels_b } = config;
    const u1a = io(`ws://${a}`, options({ auth: { token: 'u1' } }));
    const u1b = io(`ws://${b}/socket`, options({ auth: { token: 'u1' } }));
    // Another user: its own connection (one Engine.IO connection carries one user).
    const u2 = io(`ws://${b}`, options({ auth: { token: 'u2' } , forceNew: true }));
    const sockets = { u1a, u1b, u2 };
    const got = Object.fromEntries(Object.entries(sockets).map(([k, s]) => [k, record(s)]));
    await Promise.all(Object.values(sockets).map(connected));
    // Redis must have confirmed each instance's subscriptions before the send.
    await until('subscriptions on A', async () => (await health(a)).backplane.subscribed_channels >= channels_a);
    await until('subscriptions on B', async () => (await health(b)).backplane.subscribed_channels >= channels_b);
    const answer = await u2.timeout(DEADLINE_MS).emitWithAck('message', {
      event: 'sendMessage',
      args: { to: 'u1', text },
    });
    const mine = (k) => got[k].filter((m) => m.event === 'newMessage' && m.args.text === text);
    await until('every socket got the event', () => Object.keys(got).every((k) => mine(k).length > 0));
    // Room for a duplicate to show up.
    await new Promise((r) => setTimeout(r, 500));
    const counts = Object.fromEntries(Object.keys(got).map((k) => [k, mine(k).length]));
    const sample = mine('u1a')[0];
    Object.values(sockets).forEach((s) => s.disconnect());
    say({ step: 'done', answer, counts, sample });
  },

  // A token the server refuses: connect_error with the native 401 reason, no connection.
  async bad_token() {
    const { addr, tokens } = config;
    const results = [];
    for (const token of tokens) {
      const auth = token === null ? {} : { token };
      const socket = io(`ws://${addr}`, options({ auth, forceNew: true, reconnection: false }));
      results.push(await connectError(socket));
      socket.close();
    }
    say({ step: 'done', results });
  },

  // Acks round-trip: a handler's result, an unknown event's error, and an error without ack.
  async acks() {
    const { addr } = config;
    const socket = io(`ws://${addr}`, options({ auth: { token: 'u1' } }));
    const got = record(socket);
    await connected(socket);
    const ask = (message) => socket.timeout(DEADLINE_MS).emitWithAck('message', message);
    const ok = await ask({ event: 'sendMessage', args: { to: 'u2', text: 'hi' } });
    const unknown = await ask({ event: 'noSuchEvent', args: {} });
    const badArgs = await ask({ event: 'sendMessage', args: { text: 'no to' } });
    // The same through a callback, the way older frontends write it.
    const callback = await new Promise((resolve) =>
      socket.emit('message', { event: 'sendMessage', args: { to: 'u1', text: 'cb' } }, resolve),
    );
    socket.emit('message', { event: 'sendMessage', args: {} });
    await until('the error event', () => got.find((m) => m.event === 'error'));
    await until('the message to self', () => got.find((m) => m.event === 'newMessage'));
    socket.disconnect();
    say({ step: 'done', ok, unknown, badArgs, callback, events: got });
  },

  // The client reconnects on its own after the server restarts on the same port.
  async reconnect() {
    const { addr } = config;
    const socket = io(`ws://${addr}`, options({ auth: { token: 'u1' } }));
    const got = record(socket);
    await connected(socket);
    const first = socket.id;
    const reasons = [];
    socket.on('disconnect', (reason) => reasons.push(reason));
    const back = new Promise((resolve) => socket.io.once('reconnect', resolve));
    say({ step: 'connected', id: first });
    const attempts = await back;
    await connected(socket);
    const answer = await socket
      .timeout(DEADLINE_MS)
      .emitWithAck('message', { event: 'sendMessage', args: { to: 'u1', text: 'after restart' } });
    await until('the message after the restart', () =>
      got.find((m) => m.event === 'newMessage' && m.args.text === 'after restart'),
    );
    const result = { step: 'done', first, second: socket.id, attempts, reasons: [...reasons], answer };
    socket.disconnect();
    say(result);
  },

  // Namespaces / and /socket multiplexed on one Engine.IO connection; /admin is refused.
  async namespaces() {
    const { addr } = config;
    const root = io(`ws://${addr}`, options({ auth: { token: 'u1' } }));
    const socket = io(`ws://${addr}/socket`, options({ auth: { token: 'u1' } }));
    const got = { root: record(root), socket: record(socket) };
    await Promise.all([connected(root), connected(socket)]);
    const admin = await connectError(io(`ws://${addr}/admin`, options({ auth: { token: 'u1' } })));
    const engines = (await health(addr)).connections;
    const answer = await socket
      .timeout(DEADLINE_MS)
      .emitWithAck('message', { event: 'sendMessage', args: { to: 'u1', text: 'both' } });
    const mine = (k) => got[k].filter((m) => m.event === 'newMessage' && m.args.text === 'both');
    await until('both namespaces got the event', () => mine('root').length && mine('socket').length);
    await new Promise((r) => setTimeout(r, 300));
    const counts = { root: mine('root').length, socket: mine('socket').length };
    root.io.engine.close();
    say({ step: 'done', engines, admin, answer, counts, same_engine: root.io === socket.io });
  },

  // A room resumed through the CONNECT payload: `auth: {token, rooms: {room: offset}}`.
  async room_resume() {
    const { addr } = config;
    const u1 = io(`ws://${addr}`, options({ auth: { token: 'u1' } }));
    const u2 = io(`ws://${addr}`, options({ auth: { token: 'u2' } }));
    const got = record(u1);
    await Promise.all([connected(u1), connected(u2)]);
    const ask = (socket, message) => socket.timeout(DEADLINE_MS).emitWithAck('message', message);
    await ask(u1, { event: 'joinRoom', args: { room: 'r' } });
    await ask(u2, { event: 'joinRoom', args: { room: 'r' } });
    const say2 = (text) => ask(u2, { event: 'sendRoomMessage', args: { room: 'r', text } });
    await say2('m1');
    const first = await until('m1', () => got.find((m) => m.event === 'newMessage'));
    u1.disconnect();
    await say2('m2');
    await say2('m3');
    const back = io(`ws://${addr}`, options({ forceNew: true, auth: { token: 'u1', rooms: { r: first.offset } } }));
    const replay = record(back);
    await connected(back);
    const recovered = await until('recovered', () => replay.find((m) => m.event === 'recovered'));
    const texts = replay.filter((m) => m.event === 'newMessage').map((m) => m.args.text);
    back.disconnect();
    u2.disconnect();
    say({ step: 'done', first_room: first.room, texts, recovered });
  },
};

const run = scenarios[scenario];
if (!run) fail(`unknown scenario ${scenario}`);
run()
  .then(() => process.exit(0))
  .catch((e) => fail(`${scenario}: ${e.message}`));
