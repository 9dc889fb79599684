// Presence churn vs. an unrelated pair's round trip (issue 16, finding 4).
// Usage: node loadtest/presence_churn.js PORT[,PORT2] CHURN(0|1) SECONDS, against a switchboard on
// 127.0.0.1:PORT (embedded, dev auth), or two instances on one Redis (PORT,PORT2: the members
// alternate between them, x's reconnects too, pairA is on the first and pairB on the second).
// 100 members and a user x share 50 rooms; with CHURN=1, x reconnects in a loop (4 at a time)
// while pairA and pairB bounce a message every 20 ms; prints the pair's round trip (p50, p99,
// max), x's connects and refusals, the members' frames.
// Needs the ws package that tests/socketio-client installs (npm ci there).
const WebSocket = require(require('path').join(__dirname, '../tests/socketio-client/node_modules/ws'));
const [ports, churn, seconds] = [process.argv[2].split(','), process.argv[3] === '1', +(process.argv[4] || 10)];
const url = (u, i = 0) => `ws://127.0.0.1:${ports[i % ports.length]}/ws?token=${u}`;
const ROOMS = 50, MEMBERS = 100;
const open = (u, i) => new Promise((res, rej) => { const w = new WebSocket(url(u, i)); w.on('open', () => res(w)); w.on('error', rej); });
let ackN = 0;
function request(w, event, args) {
  return new Promise((res) => {
    const ack = ++ackN;
    const on = (d) => { const v = JSON.parse(d); if (v.ack === ack) { w.off('message', on); res(v); } };
    w.on('message', on);
    w.send(JSON.stringify({ event, args, ack }));
  });
}
let frames = 0, closedMembers = 0;
(async () => {
  const members = [];
  for (let m = 0; m < MEMBERS; m++) {
    const w = await open('m' + m, m);
    w.on('message', () => frames++);
    w.on('close', () => closedMembers++);
    members.push(w);
  }
  for (const w of members) for (let r = 0; r < ROOMS; r++) await request(w, 'joinRoom', { room: 'r' + r });
  const x = await open('x');
  for (let r = 0; r < ROOMS; r++) await request(x, 'joinRoom', { room: 'r' + r });
  x.close();
  const a = await open('pairA', 0), b = await open('pairB', ports.length - 1);
  b.on('message', (d) => { const v = JSON.parse(d); if (v.event === 'newMessage') b.send(JSON.stringify({ event: 'sendMessage', args: { to: 'pairA', text: v.args.text } })); });
  const rtts = [];
  const pending = new Map();
  a.on('message', (d) => { const v = JSON.parse(d); if (v.event === 'newMessage' && pending.has(v.args.text)) { rtts.push(Number(process.hrtime.bigint() - pending.get(v.args.text)) / 1e6); pending.delete(v.args.text); } });
  let stop = false, connects = 0, refused = 0;
  let attempts = 0;
  const loop = async () => {
    while (!stop) {
      try { const w = await open('x', attempts++); connects++; w.close(); await new Promise((r) => w.on('close', r)); }
      catch (e) { refused++; await new Promise((r) => setTimeout(r, 5)); }
    }
  };
  frames = 0;
  const loops = churn ? [loop(), loop(), loop(), loop()] : [];
  let n = 0;
  const timer = setInterval(() => { const t = 'p' + (n++); pending.set(t, process.hrtime.bigint()); a.send(JSON.stringify({ event: 'sendMessage', args: { to: 'pairB', text: t } })); }, 20);
  await new Promise((r) => setTimeout(r, seconds * 1000));
  clearInterval(timer); stop = true; await Promise.all(loops);
  await new Promise((r) => setTimeout(r, 500));
  rtts.sort((p, q) => p - q);
  const pct = (p) => rtts.length ? rtts[Math.min(rtts.length - 1, Math.floor(p * rtts.length))].toFixed(2) : 'n/a';
  console.log(JSON.stringify({ churn, sent: n, answered: rtts.length, p50_ms: pct(0.5), p99_ms: pct(0.99), max_ms: pct(1), x_connects: connects, x_refused: refused, member_frames: frames, members_closed: closedMembers }));
  process.exit(0);
})();
