// A send whose ack is lost is stored once: a proxy between the client and the real server drops
// the ack frame (and, in one case, cuts the connection with it); the client sends again with the
// same clientId and the server recognises it (PROTOCOL.md §3).

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { client, closeClients, connected, Proxy, redisPair, Server, until, waitSubscribed } from './support.js';

let embedded;
let pair;
before(async () => {
  embedded = await Server.start();
  pair = await redisPair();
});
after(async () => {
  closeClients();
  await embedded.stop('SIGKILL');
  await pair.a.stop('SIGKILL');
  await pair.b.stop('SIGKILL');
  await pair.redis.stop();
});

// Drops the first ack the server sends through `proxy`, then `then` ('pass' keeps the connection,
// 'cut' also cuts it); returns a counter of the acks dropped.
function loseFirstAck(proxy, then) {
  const lost = { acks: 0 };
  proxy.filter = (text) => {
    if (lost.acks === 0 && JSON.parse(text).event === 'ack') {
      lost.acks += 1;
      return then === 'cut' ? 'cut' : 'drop';
    }
    return 'pass';
  };
  return lost;
}

async function storedOnce({ sendVia, receiveVia, user, then, beforeSend }) {
  const proxy = await Proxy.start(sendVia.addr);
  try {
    const receiver = client(receiveVia.url, `${user}-to`);
    const sender = client(proxy.url, user, { resendAfterMs: 300 });
    await Promise.all([connected(receiver), connected(sender)]);
    if (beforeSend) await beforeSend();
    const lost = loseFirstAck(proxy, then);
    const ack = await sender.send(`${user}-to`, 'once');
    assert.equal(lost.acks, 1, 'the first ack was dropped');
    await until('the receiver to get it', () => receiver.messages.length === 1);
    await new Promise((r) => setTimeout(r, 300)); // a second copy would come now
    assert.equal(receiver.messages.length, 1);
    const { events } = await receiver.history({ limit: 10 });
    assert.deepEqual(events.map((e) => e.args.text), ['once'], 'stored once');
    // The ack of the resend carries the resend's id, the stored copy the first one's.
    assert.match(ack.id, /^[0-9a-f]{32}$/);
    if (then === 'cut') assert.equal(proxy.connections, 2, 'reconnected through the proxy');
    receiver.close();
    sender.close();
  } finally {
    proxy.close();
  }
}

test('embedded: the ack lost, the connection kept: resent after a while, stored once', async () => {
  await storedOnce({ sendVia: embedded, receiveVia: embedded, user: 'la-keep', then: 'drop' });
});

test('embedded: the ack lost with the connection: resent on the next one, stored once', async () => {
  await storedOnce({ sendVia: embedded, receiveVia: embedded, user: 'la-cut', then: 'cut' });
});

test('two instances on Redis: the ack lost with the connection: stored once', async () => {
  const { a, b } = pair;
  await storedOnce({
    sendVia: a,
    receiveVia: b,
    user: 'la-redis',
    then: 'cut',
    beforeSend: async () => {
      await waitSubscribed(a, 1);
      await waitSubscribed(b, 1);
    },
  });
});
