// The client against two instances of the real binary on a private redis-server: a receiver kept
// through a restart of its instance, and a sender through a kill of its own (possibly between
// storing a message and acknowledging it), lose nothing and get nothing twice.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { client, closeClients, connected, redisPair, texts, until, waitConnected, waitSubscribed } from './support.js';

let pair;
before(async () => {
  pair = await redisPair();
});
after(async () => {
  closeClients();
  await pair.a.stop('SIGKILL');
  await pair.b.stop('SIGKILL');
  await pair.redis.stop();
});

// Sends 40 messages (`PREFIX1`...) with `send`, SIGKILLing and respawning the receiver's
// instance (a) after the 15th and the sender's (b) after the 28th, while sends are out (some
// may be stored with their acks lost); returns the texts once every send is acknowledged.
async function sendThroughRestarts(receiver, send, prefix) {
  const { a, b } = pair;
  const sent = [];
  const acks = [];
  for (let i = 1; i <= 40; i++) {
    const text = `${prefix}${i}`;
    sent.push(text);
    acks.push(send(text));
    if (i === 10) await until('the first ten', () => receiver.messages.length === 10);
    for (const [at, server] of [[15, a], [28, b]]) {
      if (i !== at) continue;
      await server.stop('SIGKILL');
      await server.spawn(server.addr);
      await waitConnected(server);
    }
    await new Promise((r) => setTimeout(r, 10));
  }
  assert.equal((await Promise.all(acks)).length, 40);
  return sent;
}

test('through restarts of both instances: nothing lost, nothing twice, resumed complete', async () => {
  const { a, b } = pair;
  const receiver = client(a.url, 'r-recv');
  const sender = client(b.url, 'r-send', { resendAfterMs: 500 });
  await Promise.all([connected(receiver), connected(sender)]);
  // A user's first connection on an instance is live once the subscription is (PROTOCOL.md §4).
  await waitSubscribed(a, 1);
  await waitSubscribed(b, 1);
  const sent = await sendThroughRestarts(receiver, (text) => sender.send('r-recv', text), 'm');
  await until('all forty', () => receiver.messages.length >= 40);
  await new Promise((r) => setTimeout(r, 300)); // anything extra would come now
  assert.deepEqual(texts(receiver), sent);
  assert.equal(new Set(receiver.messages.map((m) => m.id)).size, 40);
  assert.deepEqual(receiver.gaps, []);
  assert.ok(receiver.recoveries.length >= 1, 'the receiver resumed');
  assert.ok(receiver.recoveries.every((r) => r.complete), JSON.stringify(receiver.recoveries));
  // The history holds each message once: a resend after a lost ack was not stored again.
  const { events } = await receiver.history({ limit: 100 });
  const stored = events.map((e) => e.args.text).reverse();
  assert.deepEqual(stored, sent);
  receiver.close();
  sender.close();
});

test('a room member through restarts of both instances gets every room message once', async () => {
  const { a, b } = pair;
  const member = client(a.url, 'rr-member');
  const sender = client(b.url, 'rr-send', { resendAfterMs: 500 });
  await Promise.all([connected(member), connected(sender)]);
  await member.joinRoom('rr');
  await sender.joinRoom('rr');
  // Each instance routes its user's channel and the room's before the first send.
  await waitSubscribed(a, 2);
  await waitSubscribed(b, 2);
  // The member rejoins the room on the restarted instance with `since` = the room's newest
  // offset it had, and gets what the room got meanwhile.
  const sent = await sendThroughRestarts(member, (text) => sender.sendRoom('rr', text), 'room');
  await until('all forty', () => member.messages.length >= 40);
  await new Promise((r) => setTimeout(r, 300)); // anything extra would come now
  assert.deepEqual(texts(member), sent);
  assert.ok(member.messages.every((m) => m.room === 'rr'));
  assert.equal(new Set(member.messages.map((m) => m.id)).size, 40);
  assert.deepEqual(member.gaps, []);
  const resumed = member.recoveries.filter((r) => r.room === 'rr');
  assert.ok(resumed.length >= 1, `the room was resumed: ${JSON.stringify(member.recoveries)}`);
  assert.ok(resumed.every((r) => r.complete), JSON.stringify(resumed));
  assert.equal(member.roomOffset('rr'), member.messages[39].offset);
  // The room's history holds each message once.
  const { events } = await member.history({ room: 'rr', limit: 100 });
  assert.deepEqual(events.map((e) => e.args.text).reverse(), sent);
  member.close();
  sender.close();
});
