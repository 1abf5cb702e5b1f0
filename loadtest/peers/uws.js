// uWebSockets.js doing wspush's job, for loadtest/bench.py: GET /ws?uid=U subscribes
// to topics `u:<U>` and `all`; POST /send takes wspush's JSON (one object or an array)
// and pushes {"types","msg","time"} with app.publish; GET /stats gives "connections".
// Usage: node uws.js [PORT]  (0 picks a free port; the port is printed as wspush does).
'use strict';
const uWS = require('uwebsockets');

const MAX_BODY = 1 << 20;
let connections = 0;
let stamp = '', stampSecond = -1;

// wspush's "time": local time, formatted once per second.
function now() {
  const d = new Date(), s = Math.floor(d.getTime() / 1000);
  if (s !== stampSecond) {
    const p = (n) => String(n).padStart(2, '0');
    stamp = `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ` +
      `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
    stampSecond = s;
  }
  return stamp;
}

function reply(res, status, body) {
  res.cork(() => res.writeStatus(status).writeHeader('Content-Type', 'application/json')
    .end(JSON.stringify(body)));
}

// Checks the whole batch first: one bad element publishes nothing, as in wspush.
function publish(app, text) {
  const batch = [].concat(JSON.parse(text));
  const out = batch.map((m) => {
    if (!m || (m.topic !== 'all' && m.topic !== 'uids')) throw new Error('topic: want "uids" or "all"');
    if (!('msg' in m)) throw new Error('msg: missing');
    if (m.topic === 'uids' && !(Array.isArray(m.topic_ids) && m.topic_ids.length)) throw new Error('topic_ids: want a non-empty array');
    const frame = JSON.stringify({ types: m.types || 'notice', msg: m.msg, time: m.time || now() });
    return [m.topic === 'all' ? ['all'] : m.topic_ids.map((u) => 'u:' + u), frame];
  });
  for (const [topics, frame] of out) for (const t of topics) app.publish(t, frame, false);
  return batch.length;
}

const app = uWS.App().ws('/ws', {
  idleTimeout: 0, // wspush runs the kit with pings and idle timeouts pushed past the run
  maxBackpressure: 1 << 20, // wspush's -max-backlog default
  maxPayloadLength: 64 * 1024,
  upgrade: (res, req, ctx) => {
    res.upgrade({ uid: req.getQuery('uid') }, req.getHeader('sec-websocket-key'),
      req.getHeader('sec-websocket-protocol'), req.getHeader('sec-websocket-extensions'), ctx);
  },
  open: (ws) => {
    connections++;
    const uid = ws.getUserData().uid;
    if (uid) ws.subscribe('u:' + uid);
    ws.subscribe('all');
  },
  close: () => { connections--; },
}).post('/send', (res) => {
  const chunks = [];
  let size = 0, done = false;
  res.onAborted(() => { done = true; });
  res.onData((chunk, last) => {
    if (done) return;
    size += chunk.byteLength;
    if (size > MAX_BODY) { done = true; return reply(res, '413 Payload Too Large', { ok: false, error: 'body too large' }); }
    chunks.push(Buffer.from(chunk.slice(0)));
    if (!last) return;
    done = true;
    try {
      reply(res, '200 OK', { ok: true, accepted: publish(app, Buffer.concat(chunks).toString()) });
    } catch (e) {
      reply(res, '400 Bad Request', { ok: false, error: e.message });
    }
  });
}).get('/stats', (res) => reply(res, '200 OK', { connections }))
  .any('/*', (res) => reply(res, '404 Not Found', { ok: false, error: 'not found' }))
  .listen('127.0.0.1', Number(process.argv[2] || 0), (token) => {
    if (!token) { console.error('uws: cannot listen'); process.exit(1); }
    console.log(`uws listening on 127.0.0.1:${uWS.us_socket_local_port(token)}`);
  });

process.on('SIGTERM', () => process.exit(0));
