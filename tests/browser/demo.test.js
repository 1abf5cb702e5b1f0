// Browser test of the demo page (demo/socket.html + demo/wspush.js) against the
// real wspush binary, in headless Chromium driven by playwright-core.
//
//   WSPUSH_BIN=target/debug/wspush node --test tests/browser/*.test.js
//
// Environment: WSPUSH_BIN (the server binary, required), CHROMIUM (default
// /usr/bin/chromium), WSPUSH_ARTIFACTS (screenshot folder, default
// target/browser-artifacts). Every wait polls page state with a time limit.
"use strict";

const { test, after } = require("node:test");
const assert = require("node:assert/strict");
const { spawn } = require("node:child_process");
const fs = require("node:fs");
const path = require("node:path");
const readline = require("node:readline");
const { chromium } = require("playwright-core");

const ROOT = path.resolve(__dirname, "..", "..");
const BIN = process.env.WSPUSH_BIN && path.resolve(ROOT, process.env.WSPUSH_BIN);
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const ARTIFACTS = path.resolve(ROOT, process.env.WSPUSH_ARTIFACTS || "target/browser-artifacts");
const WAIT = 10_000; // longest wait for any one page state

const UID_A = "101";
const UID_B = "202";

const servers = new Set();
let browser = null;

after(async () => {
  if (browser) await browser.close().catch(() => {});
  for (const s of servers) s.proc.kill("SIGKILL");
});

/** Starts wspush and resolves once it prints its listening line. */
function startServer(port = 0) {
  return new Promise((resolve, reject) => {
    const proc = spawn(BIN, [`-port=${port}`, "-bind=127.0.0.1"], {
      stdio: ["ignore", "pipe", "pipe"],
    });
    const server = { proc, port: 0, stderr: "", exited: null };
    server.exited = new Promise((res) => proc.once("exit", (code, signal) => res({ code, signal })));
    servers.add(server);
    proc.stderr.setEncoding("utf8");
    proc.stderr.on("data", (d) => (server.stderr += d));
    const timer = setTimeout(() => {
      proc.kill("SIGKILL");
      reject(new Error(`wspush printed no listening line within ${WAIT} ms; stderr:\n${server.stderr}`));
    }, WAIT);
    proc.once("error", (e) => {
      clearTimeout(timer);
      reject(e);
    });
    server.exited.then(({ code, signal }) => {
      servers.delete(server);
      clearTimeout(timer);
      reject(new Error(`wspush exited (code ${code}, signal ${signal}) before listening; stderr:\n${server.stderr}`));
    });
    readline.createInterface({ input: proc.stdout }).on("line", (line) => {
      const m = /^wspush listening on (\S+) \(queue: (\S+)\)$/.exec(line);
      if (m && !server.port) {
        clearTimeout(timer);
        server.port = Number(m[1].slice(m[1].lastIndexOf(":") + 1));
        resolve(server);
      }
    });
  });
}

/** SIGTERM, then the exit status: a graceful shutdown exits 0. */
async function stopServer(server) {
  server.proc.kill("SIGTERM");
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`wspush did not exit within ${WAIT} ms of SIGTERM`)), WAIT);
  });
  try {
    return await Promise.race([server.exited, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

// Polled on a timer, not on animation frames: a background tab gets none.
/** Headless Debian Chromium, without the background traffic a closed network refuses. */
const launch = () =>
  chromium.launch({
    executablePath: CHROMIUM,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });

const POLL = { timeout: WAIT, polling: 50 };

const stateIs = (page, state) =>
  page.waitForFunction((s) => document.getElementById("state").textContent === s, state, POLL);

const countIs = (page, n) =>
  page.waitForFunction(
    (n) =>
      document.getElementById("count").textContent === String(n) &&
      document.querySelectorAll("#messages li.message").length === n,
    n,
    POLL,
  );

/** The messages a tab shows, newest first. */
const messages = (page) =>
  page.$$eval("#messages li.message", (lis) =>
    lis.map((li) => ({
      types: li.querySelector(".msg-types").textContent,
      time: li.querySelector(".msg-time").textContent,
      body: li.querySelector(".msg-body").textContent,
    })),
  );

/** Fills the page's send form, submits it and waits for the reply it shows. */
async function sendWithForm(page, { topic, ids = "", types, msg, json, timeout = "" }) {
  // A person switches to the tab first; the other tab stays in the background.
  await page.bringToFront();
  await page.selectOption("#topic", topic);
  await page.fill("#topic-ids", ids);
  await page.fill("#send-types", types);
  await page.fill("#send-msg", msg);
  await page.setChecked("#msg-json", json);
  await page.fill("#timeout", timeout);
  await page.$eval("#send-result", (el) => (el.textContent = ""));
  await page.click("#send");
  await page.waitForFunction(
    () => {
      const t = document.getElementById("send-result").textContent;
      return t !== "" && t !== "Sending…";
    },
    null,
    POLL,
  );
  return page.$eval("#send-result", (el) => ({ text: el.textContent, cls: el.className }));
}

async function sendOk(page, form) {
  const r = await sendWithForm(page, form);
  assert.equal(r.cls, "ok", r.text);
  assert.match(r.text, /^200 /);
  assert.match(r.text, /"ok":true/);
  return r;
}

/** Records every state the page shows (with its detail line) from now on. */
const recordStates = (page) =>
  page.evaluate(() => {
    const state = document.getElementById("state");
    const detail = document.getElementById("state-detail");
    window.__states = [];
    const note = () => window.__states.push(`${state.textContent}: ${detail.textContent}`);
    new MutationObserver(note).observe(state, { childList: true, characterData: true, subtree: true });
  });

const TIME = /^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$/;

test("demo page: two uids, send form, reconnect after a server restart", { timeout: 60_000 }, async (t) => {
  assert.ok(BIN, "set WSPUSH_BIN to the wspush binary (make browser-test does)");
  assert.ok(fs.existsSync(BIN), `no wspush binary at ${BIN}`);
  fs.mkdirSync(ARTIFACTS, { recursive: true });

  let server = await startServer();
  const base = `http://127.0.0.1:${server.port}`;

  browser = await launch();
  const context = await browser.newContext({ viewport: { width: 1200, height: 900 } });
  const a = await context.newPage();
  const b = await context.newPage();
  const pageErrors = [];
  for (const p of [a, b]) p.on("pageerror", (e) => pageErrors.push(String(e)));

  try {
    // Both tabs connect from the query string; the page pre-fills its fields.
    await a.goto(`${base}/?uid=${UID_A}&autoconnect=1`);
    await b.goto(`${base}/?uid=${UID_B}&types=&autoconnect=1`);
    await Promise.all([stateIs(a, "open"), stateIs(b, "open")]);
    assert.equal(await a.inputValue("#uid"), UID_A);
    assert.equal(await a.inputValue("#topic-ids"), UID_A);
    assert.match(await a.textContent("#state-detail"), new RegExp(`/ws\\?uid=${UID_A}&since=0$`));
    assert.match(await a.textContent("#resume"), /first visit: nothing missed/);
    assert.equal(await a.textContent("#count"), "0");

    // From tab A to uid B only, msg as JSON.
    await sendOk(a, { topic: "uids", ids: UID_B, types: "chat", msg: '{"text": "to B only"}', json: true });
    await countIs(b, 1);
    let got = await messages(b);
    assert.equal(got[0].types, "chat");
    assert.match(got[0].time, TIME);
    assert.deepEqual(JSON.parse(got[0].body), { text: "to B only" });

    // From tab B to everyone, msg as text, with an expiry a minute away.
    await sendOk(b, { topic: "all", types: "notice", msg: "hello everyone", json: false, timeout: "60" });
    await countIs(b, 2);
    await countIs(a, 1);
    // A saw the broadcast and nothing before it: the message for B never reached A.
    got = await messages(a);
    assert.equal(got.length, 1);
    assert.deepEqual(got[0].types, "notice");
    assert.equal(got[0].body, "hello everyone");
    assert.match(got[0].time, TIME);
    assert.equal((await messages(b))[0].body, "hello everyone");

    // The form reports what it refuses and what the server refuses.
    let r = await sendWithForm(a, { topic: "all", types: "notice", msg: "{not json", json: true });
    assert.equal(r.cls, "err");
    assert.match(r.text, /^Not sent: msg is not valid JSON/);
    r = await sendWithForm(a, { topic: "uids", ids: "", types: "notice", msg: "x", json: false });
    assert.equal(r.cls, "err");
    assert.match(r.text, /^400 /);
    assert.match(r.text, /topic_ids/);

    // A narrows its subscription to "chat": a notice skips it, a chat arrives.
    await a.bringToFront();
    await a.fill("#sub-types", "chat");
    await a.click("#subscribe");
    await a.waitForFunction(
      () => /^Subscribed to chat\./.test(document.getElementById("sub-result").textContent),
      null,
      POLL,
    );
    await sendOk(b, { topic: "all", types: "notice", msg: "notice after subscribe", json: false });
    await sendOk(b, { topic: "all", types: "chat", msg: "chat after subscribe", json: false });
    await countIs(b, 4);
    await countIs(a, 2);
    got = await messages(a);
    assert.deepEqual(
      got.map((m) => [m.types, m.body]),
      [
        ["chat", "chat after subscribe"],
        ["notice", "hello everyone"],
      ],
    );

    // Restart: SIGTERM closes every WebSocket with 1001 and the pages retry.
    await Promise.all([recordStates(a), recordStates(b)]);
    const port = server.port;
    const exit = await stopServer(server);
    assert.deepEqual(exit, { code: 0, signal: null }, `graceful shutdown; stderr:\n${server.stderr}`);
    await Promise.all([stateIs(a, "reconnecting"), stateIs(b, "reconnecting")]);
    for (const p of [a, b]) {
      const states = await p.evaluate(() => window.__states);
      assert.ok(
        states.some((s) => /^reconnecting: retry #1 in .* after code 1001/.test(s)),
        `expected a reconnect after close 1001, saw:\n${states.join("\n")}`,
      );
    }

    server = await startServer(port);
    assert.equal(server.port, port);
    await Promise.all([stateIs(a, "open"), stateIs(b, "open")]);
    // A restarted list node has no history: the pages are told, not left guessing.
    await a.waitForFunction(
      () => /may be missing/.test(document.getElementById("resume").textContent),
      null,
      POLL,
    );

    // After the restart: to uid A (its "chat" subscription kept), then to everyone.
    await sendOk(b, { topic: "uids", ids: UID_A, types: "chat", msg: '{"after":"restart"}', json: true });
    await countIs(a, 3);
    got = await messages(a);
    assert.equal(got[0].types, "chat");
    assert.deepEqual(JSON.parse(got[0].body), { after: "restart" });
    await sendOk(a, { topic: "all", types: "chat", msg: "all after restart", json: false });
    await countIs(b, 5);
    await countIs(a, 4);
    assert.equal((await messages(b))[0].body, "all after restart");
    assert.equal((await messages(a))[0].body, "all after restart");

    assert.deepEqual(pageErrors, []);

    const shot = path.join(ARTIFACTS, "demo.png");
    await a.bringToFront();
    await a.screenshot({ path: shot, fullPage: true });
    t.diagnostic(`screenshot: ${shot}`);
  } catch (e) {
    for (const [name, p] of [
      ["a", a],
      ["b", b],
    ]) {
      const shot = path.join(ARTIFACTS, `failure-${name}.png`);
      await p.screenshot({ path: shot, fullPage: true }).catch(() => {});
      t.diagnostic(`failure screenshot: ${shot}`);
    }
    throw e;
  } finally {
    if (server.proc.exitCode === null) {
      const exit = await stopServer(server);
      assert.equal(exit.code, 0, `graceful shutdown; stderr:\n${server.stderr}`);
    }
  }
});

/** POST /send straight from the test, as a backend would. */
async function backendSend(port, body) {
  const res = await fetch(`http://127.0.0.1:${port}/send`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  assert.equal(res.status, 200, await res.text());
}

test("a reloaded page gets what was sent while it was away, once", { timeout: 60_000 }, async (t) => {
  const server = await startServer();
  const base = `http://127.0.0.1:${server.port}`;
  const own = await launch();
  try {
    const page = await (await own.newContext()).newPage();
    const pageErrors = [];
    page.on("pageerror", (e) => pageErrors.push(String(e)));
    await page.goto(`${base}/?uid=303&autoconnect=1`);
    await stateIs(page, "open");
    await backendSend(server.port, { topic: "uids", topic_ids: ["303"], msg: "before the reload" });
    await countIs(page, 1);

    // Away: the tab is gone while two messages are sent, one of them expiring at once.
    await page.goto("about:blank");
    await backendSend(server.port, { topic: "uids", topic_ids: ["303"], msg: "while away" });
    await backendSend(server.port, { topic: "all", msg: "broadcast while away" });
    const past = Math.floor(Date.now() / 1000) - 1;
    await backendSend(server.port, { topic: "uids", topic_ids: ["303"], msg: "expired", timeout: past });

    // Back: the page resumes from the id it kept in localStorage.
    await page.goto(`${base}/?uid=303&autoconnect=1`);
    await stateIs(page, "open");
    await countIs(page, 2);
    assert.deepEqual(
      (await messages(page)).map((m) => m.body),
      ["broadcast while away", "while away"],
      "what was sent while away, newest first, and not what was seen before the reload",
    );
    assert.match(await page.textContent("#resume"), /resumed from last id .*: nothing missed/);
    assert.match(await page.textContent("#state-detail"), /since=[0-9a-f]+-\d+$/);
    await backendSend(server.port, { topic: "uids", topic_ids: ["303"], msg: "live again" });
    await countIs(page, 3);
    assert.deepEqual(pageErrors, []);
    const shot = path.join(ARTIFACTS, "resume.png");
    await page.screenshot({ path: shot, fullPage: true });
    t.diagnostic(`screenshot: ${shot}`);
  } finally {
    await own.close().catch(() => {});
    const exit = await stopServer(server);
    assert.equal(exit.code, 0, `graceful shutdown; stderr:\n${server.stderr}`);
  }
});

test("without WebSocket the page falls back to EventSource and gets its pushes", { timeout: 60_000 }, async (t) => {
  const server = await startServer();
  const base = `http://127.0.0.1:${server.port}`;
  const own = await launch();
  try {
    const context = await own.newContext();
    // A browser (or a proxy in the way) without WebSocket.
    await context.addInitScript(() => {
      window.WebSocket = undefined;
    });
    const page = await context.newPage();
    const pageErrors = [];
    page.on("pageerror", (e) => pageErrors.push(String(e)));
    await page.goto(`${base}/?uid=404&autoconnect=1`);
    await stateIs(page, "open");
    assert.match(await page.textContent("#state-detail"), /\/sse\?uid=404&since=0$/);
    assert.equal(await page.evaluate(() => typeof window.WebSocket), "undefined");
    await backendSend(server.port, { topic: "uids", topic_ids: ["404"], types: "chat", msg: { text: "over SSE" } });
    await backendSend(server.port, { topic: "all", msg: "broadcast over SSE" });
    await countIs(page, 2);
    let got = await messages(page);
    assert.equal(got[0].body, "broadcast over SSE");
    assert.deepEqual(JSON.parse(got[1].body), { text: "over SSE" });
    assert.equal(got[1].types, "chat");
    assert.match(got[1].time, TIME);

    // subscribe() reopens the stream with the new types, resuming where it was.
    await page.fill("#sub-types", "chat");
    await page.click("#subscribe-form button[type=submit]");
    await page.waitForFunction(
      () => /\/sse\?uid=404&types=chat&since=/.test(document.getElementById("state-detail").textContent) &&
        document.getElementById("state").textContent === "open",
      null,
      POLL,
    );
    await backendSend(server.port, { topic: "uids", topic_ids: ["404"], types: "notice", msg: "filtered out" });
    await backendSend(server.port, { topic: "uids", topic_ids: ["404"], types: "chat", msg: "chat only" });
    await countIs(page, 3);
    got = await messages(page);
    assert.equal(got[0].body, "chat only");
    const stats = await (await fetch(`${base}/stats`)).json();
    assert.equal(stats.sse_opened, 2, "the first stream and the one subscribe() opened");
    assert.equal(stats.ws_opened, 0);
    assert.deepEqual(pageErrors, []);
    const shot = path.join(ARTIFACTS, "sse-fallback.png");
    await page.screenshot({ path: shot, fullPage: true });
    t.diagnostic(`screenshot: ${shot}`);
  } finally {
    await own.close().catch(() => {});
    const exit = await stopServer(server);
    assert.equal(exit.code, 0, `graceful shutdown; stderr:\n${server.stderr}`);
  }
});
