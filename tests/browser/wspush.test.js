// Unit tests of demo/wspush.js in Node.js: a fake WebSocket and a fake clock stand
// in for the browser, so reconnect timing is checked exactly and without waiting.
"use strict";

const { test, beforeEach, afterEach } = require("node:test");
const assert = require("node:assert/strict");
const path = require("node:path");

const WsPush = require(path.resolve(__dirname, "..", "..", "demo", "wspush.js"));

/** Timers that run only when the test advances the clock. */
class FakeClock {
  constructor() {
    this.now = 0;
    this.timers = new Map();
    this.nextId = 1;
  }
  setTimeout(fn, ms) {
    const id = this.nextId++;
    this.timers.set(id, { at: this.now + ms, fn });
    return id;
  }
  clearTimeout(id) {
    this.timers.delete(id);
  }
  /** Runs every timer due within `ms`, in time order. */
  tick(ms) {
    const end = this.now + ms;
    for (;;) {
      let next = null;
      for (const [id, t] of this.timers) if (t.at <= end && (!next || t.at < next[1].at)) next = [id, t];
      if (!next) break;
      this.timers.delete(next[0]);
      this.now = next[1].at;
      next[1].fn();
    }
    this.now = end;
  }
}

/** Records every socket the client opens; the test plays the server's part. */
class FakeWebSocket {
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    this.closedWith = null;
    FakeWebSocket.all.push(this);
  }
  send(data) {
    assert.equal(this.readyState, 1, "send on a socket that is not open");
    this.sent.push(data);
  }
  close(code) {
    this.closedWith = code;
    this.readyState = 3;
  }
  // server side
  accept() {
    this.readyState = 1;
    this.onopen && this.onopen({});
  }
  push(text) {
    this.onmessage && this.onmessage({ data: text });
  }
  drop(code, reason = "") {
    this.readyState = 3;
    this.onclose && this.onclose({ code, reason, wasClean: code !== 1006 });
  }
}

let clock;
let saved;
beforeEach(() => {
  clock = new FakeClock();
  FakeWebSocket.all = [];
  saved = {
    setTimeout: globalThis.setTimeout,
    clearTimeout: globalThis.clearTimeout,
    WebSocket: globalThis.WebSocket,
    random: Math.random,
  };
  globalThis.setTimeout = clock.setTimeout.bind(clock);
  globalThis.clearTimeout = clock.clearTimeout.bind(clock);
  globalThis.WebSocket = FakeWebSocket;
});
afterEach(() => {
  globalThis.setTimeout = saved.setTimeout;
  globalThis.clearTimeout = saved.clearTimeout;
  globalThis.WebSocket = saved.WebSocket;
  Math.random = saved.random;
});

const URL = "ws://127.0.0.1:3210/ws";

function client(opts = {}) {
  const states = [];
  const msgs = [];
  const c = new WsPush({
    url: URL,
    onState: (s, d) => states.push([s, d]),
    onMessage: (m, raw) => msgs.push([m, raw]),
    ...opts,
  });
  return { c, states, msgs };
}

const last = (a) => a[a.length - 1];

test("the URL carries uid, types, expires, token and since", () => {
  const { c } = client({ uid: "7 8", types: " notice, chat,notice,", expires: 1767225600, token: "ab&c" });
  assert.equal(c.buildUrl(), `${URL}?uid=7%208&types=notice,chat&expires=1767225600&token=ab%26c&since=0`);
  assert.equal(client({ resume: false }).c.buildUrl(), URL);
  assert.equal(client({ url: `${URL}?x=1`, uid: "1", resume: false }).c.buildUrl(), `${URL}?x=1&uid=1`);
});

/** A Storage stand-in: what localStorage offers the client. */
function memoryStorage() {
  const m = new Map();
  return { getItem: (k) => (m.has(k) ? m.get(k) : null), setItem: (k, v) => m.set(k, String(v)), map: m };
}

test("reconnects resume from the last id, kept per uid in storage across page loads", () => {
  const storage = memoryStorage();
  const resumes = [];
  const { c, msgs } = client({ uid: "7", storage, onResume: (complete, since) => resumes.push([complete, since]) });
  c.connect();
  assert.match(FakeWebSocket.all[0].url, /[?&]since=0$/, "first visit asks for everything retained");
  FakeWebSocket.all[0].accept();
  FakeWebSocket.all[0].push('{"op":"resumed","complete":true}');
  FakeWebSocket.all[0].push('{"types":"notice","msg":1,"time":"t","id":"a-1"}');
  FakeWebSocket.all[0].push('{"types":"notice","msg":2,"time":"t","id":"a-2"}');
  assert.equal(storage.getItem("wspush:last-id:7"), "a-2");
  FakeWebSocket.all[0].drop(1006);
  clock.tick(60_000);
  assert.match(FakeWebSocket.all[1].url, /[?&]since=a-2$/);
  FakeWebSocket.all[1].accept();
  FakeWebSocket.all[1].push('{"op":"resumed","complete":false}');
  // An overlap between a replay and what arrived before is never shown twice.
  FakeWebSocket.all[1].push('{"types":"notice","msg":2,"time":"t","id":"a-2"}');
  FakeWebSocket.all[1].push('{"types":"notice","msg":3,"time":"t","id":"a-3"}');
  assert.deepEqual(msgs.map(([m]) => m.msg), [1, 2, 3]);
  assert.deepEqual(resumes, [[true, "0"], [false, "a-2"]]);
  // A new page for the same uid starts from the stored id; another uid from 0.
  const again = client({ uid: "7", storage });
  assert.match(again.c.buildUrl(), /[?&]since=a-3$/);
  assert.match(client({ uid: "8", storage }).c.buildUrl(), /[?&]since=0$/);
});

test("on Redis Cluster the client keeps the last id of each stream and resumes with both", () => {
  const storage = memoryStorage();
  const { c, msgs } = client({ uid: "7", storage });
  c.connect();
  FakeWebSocket.all[0].accept();
  FakeWebSocket.all[0].push('{"types":"notice","msg":1,"time":"t","id":"u1f-5"}');
  assert.equal(storage.getItem("wspush:last-id:7"), "u1f-5,0");
  FakeWebSocket.all[0].push('{"types":"notice","msg":2,"time":"t","id":"g2e-9"}');
  FakeWebSocket.all[0].push('{"types":"notice","msg":3,"time":"t","id":"u1f-6"}');
  assert.equal(storage.getItem("wspush:last-id:7"), "u1f-6,g2e-9");
  FakeWebSocket.all[0].drop(1006);
  clock.tick(60_000);
  assert.match(FakeWebSocket.all[1].url, /[?&]since=u1f-6%2Cg2e-9$/);
  assert.deepEqual(msgs.map(([m]) => m.msg), [1, 2, 3]);
});

test("backoff doubles from minDelay up to maxDelay, with full jitter and a 100 ms floor", () => {
  const { c } = client({ minDelay: 500, maxDelay: 30000 });
  Math.random = () => 1; // the largest wait: the cap itself
  const caps = [];
  for (c.attempt = 0; c.attempt < 10; c.attempt++) caps.push(c.nextDelay());
  assert.deepEqual(caps, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000]);
  c.attempt = 1e6;
  assert.equal(c.nextDelay(), 30000);
  Math.random = () => 0; // the smallest wait
  assert.equal(c.nextDelay(), 100);
  Math.random = () => 0.5;
  c.attempt = 3;
  assert.equal(c.nextDelay(), 2000);
  Math.random = saved.random;
  for (let i = 0; i < 1000; i++) {
    c.attempt = i % 12;
    const d = c.nextDelay();
    assert.ok(d >= 100 && d <= Math.max(100, Math.min(30000, 500 * 2 ** c.attempt)), `delay ${d}`);
  }
});

test("reconnects after the server goes away, waiting longer each time, and resets once stable", () => {
  Math.random = () => 1;
  const { c, states } = client({ uid: "1", stableAfter: 5000 });
  c.connect();
  assert.deepEqual(last(states), ["connecting", { url: `${URL}?uid=1&since=0`, attempt: 0 }]);
  FakeWebSocket.all[0].accept();
  assert.deepEqual(last(states), ["open", { url: `${URL}?uid=1&since=0` }]);

  FakeWebSocket.all[0].drop(1001, "shutting down");
  assert.deepEqual(last(states), [
    "reconnecting",
    { delay: 500, attempt: 1, code: 1001, reason: "shutting down", wasClean: true },
  ]);
  assert.ok(!states.some(([s]) => s === "closed"), "no closed state while retrying");
  clock.tick(499);
  assert.equal(FakeWebSocket.all.length, 1);
  clock.tick(1);
  assert.equal(FakeWebSocket.all.length, 2);
  assert.equal(FakeWebSocket.all[1].url, `${URL}?uid=1&since=0`);

  // Refused twice: the waits double.
  FakeWebSocket.all[1].drop(1006);
  assert.equal(last(states)[1].delay, 1000);
  clock.tick(1000);
  FakeWebSocket.all[2].drop(1006);
  assert.equal(last(states)[1].delay, 2000);
  clock.tick(2000);

  // Back, but dropped before stableAfter: the backoff goes on.
  FakeWebSocket.all[3].accept();
  clock.tick(4999);
  FakeWebSocket.all[3].drop(1006);
  assert.equal(last(states)[1].delay, 4000);
  clock.tick(4000);

  // Open for stableAfter: the next failure starts over at minDelay.
  FakeWebSocket.all[4].accept();
  clock.tick(5000);
  assert.equal(c.attempt, 0);
  FakeWebSocket.all[4].drop(1001);
  assert.equal(last(states)[1].delay, 500);
});

test("close() stops reconnecting", () => {
  const { c, states } = client();
  c.connect();
  FakeWebSocket.all[0].accept();
  FakeWebSocket.all[0].drop(1006);
  assert.equal(last(states)[0], "reconnecting");
  c.close();
  assert.deepEqual(last(states), ["closed", { code: 1000, reason: "client closed", wasClean: true }]);
  clock.tick(60_000);
  assert.equal(FakeWebSocket.all.length, 1);

  c.connect();
  FakeWebSocket.all[1].accept();
  c.close();
  assert.equal(FakeWebSocket.all[1].closedWith, 1000);
  clock.tick(60_000);
  assert.equal(FakeWebSocket.all.length, 2);
  assert.equal(c.state, "closed");
});

test("subscribe sends the op frame when open, or on open, and keeps the types for reconnects", () => {
  const { c } = client({ uid: "5", types: ["notice"] });
  c.connect();
  assert.equal(c.subscribe(["chat", "notice"]), false, "not open yet");
  FakeWebSocket.all[0].accept();
  assert.deepEqual(FakeWebSocket.all[0].sent.map(JSON.parse), [{ op: "subscribe", types: ["chat", "notice"] }]);
  assert.equal(c.subscribe([]), true);
  assert.deepEqual(JSON.parse(last(FakeWebSocket.all[0].sent)), { op: "subscribe", types: [] });
  assert.equal(c.subscribe("chat"), true);

  FakeWebSocket.all[0].drop(1001);
  clock.tick(60_000);
  assert.equal(FakeWebSocket.all[1].url, `${URL}?uid=5&types=chat&since=0`);
  FakeWebSocket.all[1].accept();
  assert.deepEqual(FakeWebSocket.all[1].sent, [], "the URL already carries the types");
});

test("messages reach onMessage parsed; text that is not a JSON object arrives raw", () => {
  const { c, msgs } = client();
  c.connect();
  FakeWebSocket.all[0].accept();
  FakeWebSocket.all[0].push('{"types":"notice","msg":{"a":1},"time":"2019-12-12 12:12:12"}');
  FakeWebSocket.all[0].push("plain text");
  FakeWebSocket.all[0].push("[1,2]");
  assert.deepEqual(
    msgs.map(([m]) => m),
    [
      { types: "notice", msg: { a: 1 }, time: "2019-12-12 12:12:12" },
      { types: null, msg: "plain text", time: null },
      { types: null, msg: "[1,2]", time: null },
    ],
  );
  assert.equal(msgs[1][1], "plain text");
});

test("a URL the browser refuses ends in closed, without retries", () => {
  globalThis.WebSocket = function () {
    throw new SyntaxError("invalid URL");
  };
  const { c, states } = client();
  c.connect();
  assert.deepEqual(last(states), ["closed", { code: 1006, reason: "invalid URL", wasClean: false }]);
  assert.equal(clock.timers.size, 0);
});

/** An EventSource stand-in: the test plays the server's part. */
class FakeEventSource {
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.listeners = {};
    this.closed = false;
    FakeEventSource.all.push(this);
  }
  addEventListener(name, fn) {
    (this.listeners[name] = this.listeners[name] || []).push(fn);
  }
  close() {
    this.closed = true;
    this.readyState = 2;
  }
  // server side
  accept() {
    this.readyState = 1;
    this.onopen && this.onopen({});
  }
  push(data) {
    this.onmessage && this.onmessage({ data });
  }
  emit(name, data) {
    for (const fn of this.listeners[name] || []) fn({ data });
  }
  fail(fatal) {
    this.readyState = fatal ? 2 : 0;
    this.onerror && this.onerror({});
  }
}

test("a WebSocket that never opens falls back to /sse; subscribe reopens it; sse:false opts out", () => {
  FakeEventSource.all = [];
  globalThis.EventSource = FakeEventSource;
  try {
    const { c, states, msgs } = client({ uid: "5", types: "notice" });
    c.connect();
    FakeWebSocket.all[0].drop(1006);
    assert.equal(c.transport, "sse");
    const es = FakeEventSource.all[0];
    assert.equal(es.url, "http://127.0.0.1:3210/sse?uid=5&types=notice&since=0");
    es.accept();
    assert.equal(last(states)[0], "open");
    assert.equal(last(states)[1].transport, "sse");
    es.push('{"types":"notice","msg":1,"id":"a-1"}');
    es.push('{"types":"notice","msg":1,"id":"a-1"}');
    assert.equal(msgs.length, 1, "a repeated id is dropped");
    c.subscribe(["chat"]);
    assert.ok(es.closed);
    const es2 = FakeEventSource.all[1];
    assert.equal(es2.url, "http://127.0.0.1:3210/sse?uid=5&types=chat&since=a-1");
    // A refusal closes the stream for good: the client backs off and retries.
    es2.fail(true);
    assert.equal(last(states)[0], "reconnecting");
    clock.tick(60_000);
    assert.equal(FakeEventSource.all.length, 3);
    c.close();
    assert.ok(FakeEventSource.all[2].closed);

    const off = client({ sse: false });
    off.c.connect();
    FakeWebSocket.all[FakeWebSocket.all.length - 1].drop(1006);
    assert.equal(off.c.transport, "ws");
    assert.equal(last(off.states)[0], "reconnecting");
    assert.equal(FakeEventSource.all.length, 3);
    off.c.close();
  } finally {
    delete globalThis.EventSource;
  }
});
