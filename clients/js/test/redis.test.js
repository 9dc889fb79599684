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

test('through restarts of both instances: nothing lost, nothing twice, resumed complete', async () => {
  const { a, b } = pair;
  const receiver = client(a.url, 'r-recv');
  const sender = client(b.url, 'r-send', { resendAfterMs: 500 });
  await Promise.all([connected(receiver), connected(sender)]);
  // A user's first connection on an instance is live once the subscription is (PROTOCOL.md §4).
  await waitSubscribed(a, 1);
  await waitSubscribed(b, 1);
  const sent = [];
  const acks = [];
  for (let i = 1; i <= 40; i++) {
    const text = `m${i}`;
    sent.push(text);
    acks.push(sender.send('r-recv', text));
    if (i === 10) await until('the first ten', () => receiver.messages.length === 10);
    // The receiver's instance goes away with no goodbye, and comes back on the same port.
    if (i === 15) {
      await a.stop('SIGKILL');
      await a.spawn(a.addr);
      await waitConnected(a);
    }
    // Then the sender's, while its sends are out: some may be stored and their acks lost.
    if (i === 28) {
      await b.stop('SIGKILL');
      await b.spawn(b.addr);
      await waitConnected(b);
    }
    await new Promise((r) => setTimeout(r, 10));
  }
  const results = await Promise.all(acks);
  assert.equal(results.length, 40);
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
