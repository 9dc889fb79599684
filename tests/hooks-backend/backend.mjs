// An application backend for switchboard's hooks, as its own process (node, no dependencies):
// `POST /hooks/connect`, `/hooks/join`, `/hooks/publish` answered with the rules below. It
// listens on 127.0.0.1 on a free port and prints `listening PORT` once ready. Used by
// tests/hooks.rs (`a_backend_process_decides_connects_joins_and_publishes`).
//
// Rules: `mallory` may not connect; `alice` may use rooms `ok:*` only; joining `secret` is
// refused; texts with `darn` are rewritten to `****`; the text `forbidden words` is refused.
import http from 'node:http';

function decide(path, body) {
  if (path === '/hooks/connect') {
    if (body.user === 'mallory') return { allow: false, reason: 'banned' };
    if (body.user === 'alice') return { allow: true, rooms: ['ok:*'] };
    return { allow: true };
  }
  if (path === '/hooks/join' && body.args && body.args.room === 'secret') {
    return { allow: false, reason: 'members only' };
  }
  if (path === '/hooks/publish') {
    const text = (body.args && body.args.text) || '';
    if (text === 'forbidden words') return { allow: false };
    if (text.includes('darn')) return { allow: true, text: text.replaceAll('darn', '****') };
  }
  return { allow: true };
}

const server = http.createServer((req, res) => {
  let raw = '';
  req.setEncoding('utf8');
  req.on('data', (chunk) => { raw += chunk; });
  req.on('end', () => {
    let answer;
    try {
      answer = decide(req.url, JSON.parse(raw));
    } catch (e) {
      res.writeHead(400, { 'content-type': 'text/plain' });
      res.end(String(e));
      return;
    }
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify(answer));
  });
});
server.listen(0, '127.0.0.1', () => {
  console.log(`listening ${server.address().port}`);
});
