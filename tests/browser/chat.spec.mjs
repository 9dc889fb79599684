// The chat page in headless Chromium, on two switchboard instances that share one Redis.
//
//   node chat.spec.mjs http://127.0.0.1:PORT_A http://127.0.0.1:PORT_B
//
// Environment: CHROMIUM (default /usr/bin/chromium), SCREENSHOTS (folder, default ./screenshots).
// Prints one JSON line: {"ok": true, ...} or {"ok": false, "step": ..., "error": ...}; exits 1 on
// failure. tests/browser.rs starts the servers and Redis, runs this, and checks the line.
//
// Scenario: u1 on instance A, u1 on instance B, u2 on instance B. u2 sends; both u1 pages show
// it. Then the u1 page on A goes offline (context.setOffline), u2 sends three messages, the page
// comes back online and shows them, in order, once each, without a reload. Last, a fourth page
// (u1 on A) whose `offline` listener is unplugged goes offline: only its liveness probe can notice
// the dead socket, and it catches up the same way.

import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const [baseA, baseB] = process.argv.slice(2);
const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
const shots = process.env.SCREENSHOTS || join(process.cwd(), 'screenshots');
const WAIT = 10_000; // every single wait below; a step that takes longer fails the test

let step = 'start';
const result = { ok: false, screenshots: [], errors: [] };

function fail(message) {
  throw new Error(message);
}

// A counter from /metrics.
async function metric(base, name) {
  const body = await (await fetch(base + '/metrics')).text();
  const line = body.split('\n').find((l) => l.startsWith(name + ' '));
  return line ? Number(line.split(' ')[1]) : NaN;
}

async function healthz(base) {
  const r = await fetch(base + '/healthz');
  return r.json();
}

// Until `pred(value)` holds for `probe()`'s value, or WAIT passes.
async function until(what, probe, pred) {
  const deadline = Date.now() + WAIT;
  let last;
  for (;;) {
    last = await probe();
    if (pred(last)) return last;
    if (Date.now() > deadline) fail(`timed out waiting for ${what}: last ${JSON.stringify(last)}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

// The page with its liveness probe sped up and its `offline` listener unplugged, so that only the
// probe can notice a dead connection. Served without the CSP header (the script's hash changes).
async function quickProbeRoute(route) {
  try {
    await rewritePage(route);
  } catch (e) {
    // Thrown here it would escape main(): record it, fail the load, and let the run report it.
    result.errors.push(`quick-probe page: ${e.message}`);
    await route.abort();
  }
}

async function rewritePage(route) {
  const response = await route.fetch();
  let body = await response.text();
  const edits = [
    ['const PROBE_AFTER_MS = 30000;', 'const PROBE_AFTER_MS = 1000;'],
    ['const PROBE_TIMEOUT_MS = 10000;', 'const PROBE_TIMEOUT_MS = 1000;'],
    ['const PROBE_TICK_MS = 5000;', 'const PROBE_TICK_MS = 250;'],
    ["window.addEventListener('offline',", "window.addEventListener('unplugged-by-the-test',"],
  ];
  for (const [from, to] of edits) {
    if (!body.includes(from)) fail(`the page no longer contains ${from}`);
    body = body.replace(from, to);
  }
  const headers = { ...response.headers() };
  delete headers['content-security-policy'];
  delete headers['content-length'];
  await route.fulfill({ status: response.status(), headers, body });
}

async function openPage(browser, base, user, viewport, quickProbe) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  if (quickProbe) await page.route(base + '/', quickProbeRoute);
  const p = { context, page, user, base, sockets: [], navigations: 0 };
  page.on('console', (m) => {
    if (m.type() === 'error') result.errors.push(`${user}@${base}: console: ${m.text()}`);
  });
  page.on('pageerror', (e) => result.errors.push(`${user}@${base}: ${e.message}`));
  page.on('websocket', (ws) => p.sockets.push(ws.url()));
  page.on('framenavigated', (f) => { if (f === page.mainFrame()) p.navigations += 1; });
  await page.goto(base + '/', { timeout: WAIT });
  // Keyboard only: focus is on the token field at load, Enter submits.
  await page.keyboard.type(user);
  await page.keyboard.press('Enter');
  await page.locator('#state[data-state="online"]').waitFor({ timeout: WAIT });
  return p;
}

async function texts(p) {
  return p.page.locator('#messages li.msg .text').allTextContents();
}

async function send(p, text) {
  await p.page.locator('#text').fill(text);
  await p.page.locator('#text').press('Enter');
  // The input is cleared once the server acknowledged the message.
  await p.page.waitForFunction(() => document.getElementById('text').value === '', null, { timeout: WAIT });
}

async function shot(p, name) {
  const path = join(shots, name);
  await p.page.screenshot({ path, fullPage: true });
  result.screenshots.push(path);
}

async function main() {
  if (!baseA || !baseB) fail('usage: node chat.spec.mjs BASE_URL_A BASE_URL_B');
  mkdirSync(shots, { recursive: true });
  step = 'launch';
  // Local Network Access checks off: a page fulfilled by page.route (the quick-probe one) has no
  // address, and Chromium would refuse its WebSocket to 127.0.0.1 as a public-to-local request.
  const args = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--disable-features=LocalNetworkAccessChecks'];
  const browser = await chromium.launch({ executablePath, args, timeout: WAIT * 3 });
  result.browser = browser.version();
  try {
    const desktop = { width: 1100, height: 720 };
    step = 'open pages';
    const u1a = await openPage(browser, baseA, 'u1', desktop);
    const u1b = await openPage(browser, baseB, 'u1', desktop);
    const u2b = await openPage(browser, baseB, 'u2', desktop);

    // A user's first connection on an instance gets live messages once that instance's Redis
    // subscription is confirmed (docs/PROTOCOL.md §4): wait for it, as a person would not notice.
    step = 'subscriptions';
    await until('A subscribed to u1', () => healthz(baseA), (h) => h.backplane.subscribed_channels === 1);
    await until('B subscribed to u1 and u2', () => healthz(baseB), (h) => h.backplane.subscribed_channels === 2);

    step = 'u2 sends to u1';
    await u2b.page.locator('#peer').fill('u1');
    await u2b.page.locator('#peer').press('Enter');
    await send(u2b, 'hello from u2');
    for (const p of [u1a, u1b, u2b]) {
      await p.page.locator('#messages li.msg .text', { hasText: 'hello from u2' }).waitFor({ timeout: WAIT });
    }
    for (const p of [u1a, u1b]) {
      const title = await p.page.locator('#chat-title').textContent();
      if (title !== 'Chat with u2') fail(`${p.base}: conversation title ${title}`);
    }
    await send(u1b, 'hi u2, u1 here');
    for (const p of [u1a, u1b, u2b]) {
      await p.page.locator('#messages li.msg .text', { hasText: 'u1 here' }).waitFor({ timeout: WAIT });
    }
    await shot(u1a, 'chat-u1-instance-a.png');
    await shot(u2b, 'chat-u2-instance-b.png');

    step = 'offline';
    await u1a.page.evaluate(() => { window.__sameDocument = true; });
    const navigationsBefore = u1a.navigations;
    const socketsBefore = u1a.sockets.length;
    const recoveriesBefore = await metric(baseA, 'switchboard_recoveries_complete_total');
    // Chromium's offline emulation does not close an open WebSocket: it holds its frames and
    // delivers them once back online. The page closes its socket itself on the `offline` event
    // (and ignores whatever that socket still delivers), so what it missed can only come back
    // through the new connection's `since` replay, which the recovery counter below proves.
    await u1a.context.setOffline(true);
    await u1a.page.locator('#state[data-state="offline"]').waitFor({ timeout: WAIT });
    const missed = ['missed 1', 'missed 2', 'missed 3'];
    for (const text of missed) await send(u2b, text);
    // The other u1 page, still online, has them: they were sent and delivered.
    await u1b.page.locator('#messages li.msg .text', { hasText: 'missed 3' }).waitFor({ timeout: WAIT });
    const whileOffline = await texts(u1a);
    if (whileOffline.some((t) => t.startsWith('missed'))) {
      fail(`the offline page showed messages sent while it was offline: ${JSON.stringify(whileOffline)}`);
    }
    result.offline_texts = whileOffline;
    await shot(u1a, 'chat-offline.png');

    step = 'back online';
    await u1a.context.setOffline(false);
    await u1a.page.locator('#state[data-state="online"]').waitFor({ timeout: WAIT });
    await u1a.page.locator('#messages li.msg .text', { hasText: 'missed 3' }).waitFor({ timeout: WAIT });
    const expected = ['hello from u2', 'hi u2, u1 here', ...missed];
    const after = await texts(u1a);
    if (JSON.stringify(after) !== JSON.stringify(expected)) {
      fail(`after resume: ${JSON.stringify(after)}, expected ${JSON.stringify(expected)}`);
    }
    const sameDocument = await u1a.page.evaluate(() => window.__sameDocument === true);
    if (!sameDocument || u1a.navigations !== navigationsBefore) fail('the page was reloaded');
    const resumedWith = u1a.sockets.slice(socketsBefore);
    if (resumedWith.length === 0 || !resumedWith.every((u) => /[?&]since=\d+-\d+/.test(u))) {
      fail(`reconnected without since: ${JSON.stringify(resumedWith)}`);
    }
    const recoveries = await metric(baseA, 'switchboard_recoveries_complete_total');
    if (recoveries !== recoveriesBefore + 1) {
      fail(`instance A answered ${recoveries - recoveriesBefore} complete resumes, expected 1`);
    }
    result.resumed_with = resumedWith.map((u) => u.replace(/^.*\/ws\?/, '/ws?'));
    result.after_resume = after;
    result.notice = await u1a.page.locator('#notice').textContent();
    const other = await texts(u1b);
    if (JSON.stringify(other) !== JSON.stringify(expected)) {
      fail(`the page that stayed online: ${JSON.stringify(other)}`);
    }
    await shot(u1a, 'chat.png');

    // A connection that dies without the browser saying so: only the page's probe can tell.
    step = 'silent drop';
    const hb = await openPage(browser, baseA, 'u1', desktop, true);
    await hb.page.locator('#messages li.msg .text', { hasText: 'missed 3' }).waitFor({ timeout: WAIT });
    const hbSockets = hb.sockets.length;
    const hbRecoveries = await metric(baseA, 'switchboard_recoveries_complete_total');
    await hb.context.setOffline(true);
    await hb.page.locator('#state[data-state="offline"]').waitFor({ timeout: WAIT });
    await send(u2b, 'missed 4');
    await u1b.page.locator('#messages li.msg .text', { hasText: 'missed 4' }).waitFor({ timeout: WAIT });
    if ((await texts(hb)).includes('missed 4')) fail('the silently dropped page got a message while offline');
    await hb.context.setOffline(false);
    await hb.page.locator('#messages li.msg .text', { hasText: 'missed 4' }).waitFor({ timeout: WAIT });
    const hbAfter = await texts(hb);
    if (JSON.stringify(hbAfter) !== JSON.stringify([...expected, 'missed 4'])) {
      fail(`after the silent drop: ${JSON.stringify(hbAfter)}`);
    }
    const hbResumed = hb.sockets.slice(hbSockets);
    if (hbResumed.length !== 1 || !/[?&]since=\d+-\d+/.test(hbResumed[0])) {
      fail(`after the silent drop, reconnected with ${JSON.stringify(hbResumed)}`);
    }
    if (await metric(baseA, 'switchboard_recoveries_complete_total') !== hbRecoveries + 1) {
      fail('after the silent drop, no complete resume on instance A');
    }
    result.silent_drop = hbAfter;
    await hb.context.close();

    step = 'phone width';
    await u1b.page.setViewportSize({ width: 360, height: 740 });
    const overflow = await u1b.page.evaluate(() => document.documentElement.scrollWidth);
    if (overflow > 360) fail(`the page is ${overflow}px wide at a 360px viewport`);
    await shot(u1b, 'chat-phone.png');

    // Rooms and presence (joinRoom, sendRoomMessage, presence, presenceChanged) are not on every
    // server: on one without them the page must say so; on one with them, they must work.
    step = 'rooms';
    await u1b.page.setViewportSize(desktop);
    await u2b.page.locator('#peer').fill('#lobby');
    await u2b.page.locator('#peer').press('Enter');
    const outcome = await u2b.page.waitForFunction(() => {
      if (!document.getElementById('leave').hidden) return 'supported';
      if (/no rooms/.test(document.getElementById('notice').textContent)) return 'unsupported';
      return false;
    }, null, { timeout: WAIT }).then((h) => h.jsonValue());
    result.rooms = outcome;
    await u1b.page.locator('#peer').fill('#lobby');
    await u1b.page.locator('#peer').press('Enter');
    if (outcome === 'supported') {
      // u2 joined first, so u1's `presence` answer lists both.
      await u1b.page.locator('#leave').waitFor({ state: 'visible', timeout: WAIT });
      await u1b.page.locator('#online li', { hasText: 'u2' }).waitFor({ timeout: WAIT });
      await send(u2b, 'hello room');
      await u1b.page.locator('#messages li.msg .text', { hasText: 'hello room' }).waitFor({ timeout: WAIT });
      // Membership is per user: u1's other window gets the room too.
      await u1a.page.locator('#convs button[data-key="#lobby"]').waitFor({ timeout: WAIT });
      result.presence = await u1b.page.locator('#online li').allTextContents();
    } else {
      await u1b.page.locator('#notice', { hasText: 'no rooms' }).waitFor({ timeout: WAIT });
      const note = await u1b.page.locator('#online-note').textContent();
      if (!/rooms/.test(note)) fail(`presence panel without a note: ${note}`);
    }
    await shot(u1b, 'chat-room.png');
    if (outcome === 'supported') {
      // u2's only window closes: u1 sees u2 go offline in the room.
      step = 'presence offline';
      await u2b.context.close();
      await u1b.page.waitForFunction(() => ![...document.querySelectorAll('#online li')]
        .some((li) => li.textContent === 'u2'), null, { timeout: WAIT });
    }

    step = 'console';
    if (result.errors.length > 0) fail(`console errors: ${result.errors.join(' | ')}`);
    result.ok = true;
  } finally {
    await browser.close();
  }
}

try {
  await main();
} catch (e) {
  result.ok = false;
  result.step = step;
  result.error = String(e && e.message ? e.message : e).split('\n')[0];
}
process.stdout.write(JSON.stringify(result) + '\n');
process.exit(result.ok ? 0 : 1);
