/*
 * wspush.js — tiny browser client for the wspush WebSocket push server, with an
 * EventSource (Server-Sent Events) fallback.
 * No dependencies, no build step. Served by the server at GET /wspush.js.
 *
 * Usage:
 *
 *   <script src="/wspush.js"></script>
 *   <script>
 *     const c = new WsPush({
 *       uid: "7",                      // optional: without it only "all" broadcasts arrive
 *       types: ["notice", "chat"],     // optional: empty / omitted = every type
 *       expires: 1767225600,           // optional, only when the server runs with a secret
 *       token: "ab12…",                //   (both minted by your backend)
 *       onMessage(m, raw) {            // m = {types, msg, time}; non-JSON → {types:null, msg:raw, time:null}
 *         console.log(m.types, m.msg, m.time);
 *       },
 *       onState(state, detail) {       // "connecting" | "open" | "reconnecting" | "closed"
 *         console.log(state, detail);  // see "States" below
 *       },
 *       onResume(complete, since) {    // after every (re)connect, before the replayed messages
 *         if (!complete) refetchFromYourBackend();  // something after `since` may be missing
 *       },
 *     });
 *     c.connect();
 *     c.subscribe(["chat"]);           // change types live; also remembered for reconnects
 *     c.close();                       // close and stop reconnecting
 *   </script>
 *
 * Options: url (default: same origin, ws: or wss: from location.protocol, path /ws),
 * uid, types, expires, token, onMessage, onState, onResume, minDelay = 500,
 * maxDelay = 30000, stableAfter = 5000 (ms a connection must stay open before the
 * backoff resets), resume = true, storage (default: localStorage where the page has it).
 *
 * Resume: every message carries an opaque "id". The client keeps the last one per uid
 * (in `storage`, so it survives a reload) and connects with ?since=<last id>, or since=0
 * the first time, so the server replays what was sent while it was away (within the
 * server's retention) before live messages. The server answers each resume with
 * {"op":"resumed","complete":true|false}; onResume(complete, since) reports it, and
 * complete=false means something after `since` may be missing (trimmed, expired from
 * retention, or a restarted server). A message id seen before is never passed to
 * onMessage twice. `resume: false` connects without since (live messages only).
 * On Redis Cluster ids name their stream (`u…` the uid's, `g…` the broadcasts') and
 * the client keeps the last of each: it resumes with since=<u id>,<g id>.
 *
 * States and their detail object:
 *   connecting    {url, attempt}           opening the WebSocket (attempt 0 = first try)
 *   open          {url}                    connected; messages flow
 *   reconnecting  {delay, attempt, code, reason, wasClean}
 *                                          the connection closed or failed (code 1001 =
 *                                          server restarting, 1006 = unreachable); the next
 *                                          attempt starts in `delay` ms
 *   closed        {code, reason, wasClean} after close(), or when the URL cannot be opened
 *
 * Reconnect: after any close not requested via close(), wait a random delay in
 * [0, min(maxDelay, minDelay * 2^attempt)] (never below 100 ms), then retry.
 * The attempt counter resets once a connection has stayed open for stableAfter ms.
 *
 * EventSource fallback (sse: true by default; sse: false turns it off): when no
 * WebSocket exists, or the first WebSocket fails before it ever opened (a proxy or
 * firewall that does not pass the upgrade), the client switches to GET /sse
 * (sseUrl; default: the WebSocket URL with http:/https: and path /sse) for the rest
 * of its life. The same uid, types, token and since go in the query, the same
 * messages with the same ids arrive, and onState/onMessage/onResume behave as above
 * (detail.transport is "sse"). The browser's EventSource reconnects by itself and
 * sends Last-Event-ID, so the server resumes after the last message; a refusal
 * (401/403/429: the stream is closed for good) falls back to the backoff above.
 * Event streams only carry server → client, so subscribe() reopens the stream with
 * the new types (resuming with since, duplicates dropped by id). `transport` tells
 * which one is in use: "ws" or "sse".
 */
(function (root) {
  "use strict";

  var MIN_FLOOR = 100;

  function normTypes(types) {
    if (types == null) return [];
    if (typeof types === "string") types = types.split(",");
    var out = [];
    for (var i = 0; i < types.length; i++) {
      var t = String(types[i]).trim();
      if (t && out.indexOf(t) < 0) out.push(t);
    }
    return out;
  }

  function defaultUrl() {
    if (typeof location === "undefined") throw new Error("WsPush: opts.url is required outside a browser");
    return (location.protocol === "https:" ? "wss:" : "ws:") + "//" + location.host + "/ws";
  }

  function WsPush(opts) {
    if (!(this instanceof WsPush)) return new WsPush(opts);
    opts = opts || {};
    this.url = opts.url || null;
    this.uid = opts.uid == null ? "" : String(opts.uid);
    this.types = normTypes(opts.types);
    this.expires = opts.expires == null ? "" : String(opts.expires);
    this.token = opts.token == null ? "" : String(opts.token);
    this.onMessage = opts.onMessage || null;
    this.onState = opts.onState || null;
    this.minDelay = opts.minDelay > 0 ? opts.minDelay : 500;
    this.maxDelay = opts.maxDelay > 0 ? opts.maxDelay : 30000;
    this.stableAfter = opts.stableAfter > 0 ? opts.stableAfter : 5000;
    this.state = "closed";
    this.attempt = 0;
    this._ws = null;
    this._stopped = true;
    this._retryTimer = null;
    this._stableTimer = null;
    this._urlTypes = "";
    this.onResume = opts.onResume || null;
    this.resume = opts.resume !== false;
    this._storage = opts.storage !== undefined ? opts.storage : defaultStorage();
    this._lastId = null;
    this._seen = [];
    this._seenSet = Object.create(null);
    this.sse = opts.sse !== false;
    this.sseUrl = opts.sseUrl || null;
    this.transport = "ws";
    this._es = null;
    this._wsOpened = false;
  }

  function hasEventSource() {
    return typeof EventSource !== "undefined";
  }

  function hasWebSocket() {
    return typeof WebSocket !== "undefined" && !!WebSocket;
  }

  /** Ids remembered to drop a message seen twice (a replay overlapping what arrived). */
  var SEEN_MAX = 1024;

  function defaultStorage() {
    try {
      if (typeof localStorage !== "undefined" && localStorage) return localStorage;
    } catch (e) { /* storage blocked (privacy mode, sandboxed frame) */ }
    return null;
  }

  WsPush.prototype._storageKey = function () {
    return "wspush:last-id:" + this.uid;
  };

  /** The id of the last message received for this uid, or null. */
  WsPush.prototype.lastId = function () {
    if (this._lastId != null) return this._lastId;
    if (this._storage) {
      try { return this._storage.getItem(this._storageKey()); } catch (e) { /* ignore */ }
    }
    return null;
  };

  /**
   * The resume position after message `id`: the id itself, except on Redis Cluster,
   * whose ids name their stream (`u…` the uid's, `g…` the broadcasts'), each
   * numbered apart: there it is the last of each, "<u id>,<g id>" ("0" for none).
   */
  function nextSince(prev, id) {
    var lane = /^([ug])[0-9a-f]+-\d+$/.exec(id);
    if (!lane) return id;
    var parts = (prev || "").split(",");
    var u = "0", g = "0";
    for (var i = 0; i < parts.length; i++) {
      if (parts[i].charAt(0) === "u") u = parts[i];
      else if (parts[i].charAt(0) === "g") g = parts[i];
    }
    if (lane[1] === "u") u = id; else g = id;
    return u + "," + g;
  }

  WsPush.prototype._remember = function (id) {
    if (this._seenSet[id]) return false;
    this._seenSet[id] = true;
    this._seen.push(id);
    if (this._seen.length > SEEN_MAX) delete this._seenSet[this._seen.shift()];
    id = nextSince(this.lastId(), id);
    this._lastId = id;
    if (this._storage) {
      try { this._storage.setItem(this._storageKey(), id); } catch (e) { /* quota: keep it in memory */ }
    }
    return true;
  };

  /** The /sse URL: sseUrl, or the WebSocket URL turned into http(s) with path /sse. */
  WsPush.prototype._sseBase = function () {
    if (this.sseUrl) return this.sseUrl;
    var ws = this.url || defaultUrl();
    var m = /^(wss?):\/\/([^/?#]*)([^?#]*)/.exec(ws);
    if (!m) return "/sse";
    var path = m[3].replace(/\/ws$/, "/sse");
    if (path === m[3]) path = "/sse";
    return (m[1] === "wss" ? "https:" : "http:") + "//" + m[2] + path;
  };

  /** The full /ws (or, on the fallback, /sse) URL with uid, types, expires, token and since. */
  WsPush.prototype.buildUrl = function () {
    var base = this.transport === "sse" ? this._sseBase() : this.url || defaultUrl();
    var q = [];
    if (this.uid) q.push("uid=" + encodeURIComponent(this.uid));
    if (this.types.length) q.push("types=" + this.types.map(encodeURIComponent).join(","));
    if (this.expires) q.push("expires=" + encodeURIComponent(this.expires));
    if (this.token) q.push("token=" + encodeURIComponent(this.token));
    if (this.resume) q.push("since=" + encodeURIComponent(this.lastId() || "0"));
    if (!q.length) return base;
    return base + (base.indexOf("?") < 0 ? "?" : "&") + q.join("&");
  };

  WsPush.prototype._setState = function (state, detail) {
    this.state = state;
    if (this.onState) this.onState(state, detail || {});
  };

  WsPush.prototype._clearTimers = function () {
    clearTimeout(this._retryTimer);
    clearTimeout(this._stableTimer);
    this._retryTimer = this._stableTimer = null;
  };

  /** Open the connection (no-op if already connecting or open). */
  WsPush.prototype.connect = function () {
    if (this._ws || this._es) return this;
    this._stopped = false;
    this._clearTimers();
    this._open();
    return this;
  };

  WsPush.prototype._open = function () {
    if (this.transport === "ws" && !hasWebSocket() && this.sse && hasEventSource()) this.transport = "sse";
    if (this.transport === "sse") return this._openSse();
    var self = this;
    var since = this.resume ? this.lastId() || "0" : null;
    var url = this.buildUrl();
    this._urlTypes = this.types.join(",");
    this._setState("connecting", { url: url, attempt: this.attempt });
    var ws;
    try {
      ws = new WebSocket(url);
    } catch (e) {
      // A malformed URL or a blocked scheme (ws: from an https: page): retrying cannot help.
      this._stopped = true;
      this._clearTimers();
      this._setState("closed", { code: 1006, reason: String((e && e.message) || e), wasClean: false });
      return;
    }
    this._ws = ws;
    ws.binaryType = "arraybuffer";

    var opened = false;
    ws.onopen = function () {
      if (self._ws !== ws) return;
      opened = self._wsOpened = true;
      self._stableTimer = setTimeout(function () { self.attempt = 0; }, self.stableAfter);
      self._setState("open", { url: url });
      // types changed via subscribe() while connecting: apply them now
      if (self.types.join(",") !== self._urlTypes) self._sendSubscribe();
    };

    ws.onmessage = function (ev) {
      if (self._ws !== ws) return;
      var raw = ev.data;
      if (typeof raw !== "string") {
        try { raw = new TextDecoder().decode(raw); } catch (e) { raw = String(raw); }
      }
      var m;
      try { m = JSON.parse(raw); } catch (e) { m = null; }
      if (!m || typeof m !== "object" || Array.isArray(m)) m = { types: null, msg: raw, time: null };
      if (m.op === "resumed" && m.msg === undefined) {
        if (self.onResume) self.onResume(m.complete === true, since);
        return;
      }
      self._deliver(m, raw);
    };

    ws.onerror = function () { /* a close event always follows */ };

    ws.onclose = function (ev) {
      if (self._ws !== ws) return;
      self._ws = null;
      // The first WebSocket never opened: something on the way does not pass it.
      if (!opened && !self._wsOpened && self.sse && hasEventSource() && !self._stopped) {
        self.transport = "sse";
        self._clearTimers();
        self._openSse();
        return;
      }
      self._afterClose({ code: ev.code, reason: ev.reason || "", wasClean: ev.wasClean });
    };
  };

  /** A push for onMessage, unless its id was seen already. */
  WsPush.prototype._deliver = function (m, raw) {
    if (typeof m.id === "string" && !this._remember(m.id)) return;
    if (this.onMessage) this.onMessage(m, raw);
  };

  /** The fallback: one EventSource on /sse, which reconnects by itself. */
  WsPush.prototype._openSse = function () {
    var self = this;
    var since = this.resume ? this.lastId() || "0" : null;
    var url = this.buildUrl();
    this._urlTypes = this.types.join(",");
    this._setState("connecting", { url: url, attempt: this.attempt, transport: "sse" });
    var es;
    try {
      es = new EventSource(url);
    } catch (e) {
      this._stopped = true;
      this._clearTimers();
      this._setState("closed", { code: 1006, reason: String((e && e.message) || e), wasClean: false });
      return;
    }
    this._es = es;
    es.onopen = function () {
      if (self._es !== es) return;
      self._clearTimers();
      self._stableTimer = setTimeout(function () { self.attempt = 0; }, self.stableAfter);
      self._setState("open", { url: url, transport: "sse" });
    };
    es.onmessage = function (ev) {
      if (self._es !== es) return;
      var m;
      try { m = JSON.parse(ev.data); } catch (e) { m = null; }
      if (!m || typeof m !== "object" || Array.isArray(m)) m = { types: null, msg: ev.data, time: null };
      self._deliver(m, ev.data);
    };
    es.addEventListener("resumed", function (ev) {
      if (self._es !== es) return;
      var r;
      try { r = JSON.parse(ev.data); } catch (e) { r = {}; }
      // EventSource resumes by itself after the last id it saw: report from there.
      if (self.onResume) self.onResume(r.complete === true, self.lastId() || since);
    });
    es.onerror = function () {
      if (self._es !== es) return;
      if (es.readyState === 2) {
        // Closed for good (a refusal, or not an event stream): back off and retry.
        self._es = null;
        self._afterClose({ code: 1006, reason: "event stream failed", wasClean: false });
      } else {
        self._setState("reconnecting", { delay: 0, attempt: self.attempt, code: 1006, reason: "", wasClean: false, transport: "sse" });
      }
    };
  };

  /** The connection ended without close(): schedule the next attempt. */
  WsPush.prototype._afterClose = function (info) {
    this._clearTimers();
    if (this._stopped) {
      this._setState("closed", info);
      return;
    }
    var self = this;
    var delay = this.nextDelay();
    this.attempt++;
    this._retryTimer = setTimeout(function () {
      self._retryTimer = null;
      if (!self._stopped && !self._ws && !self._es) self._open();
    }, delay);
    this._setState("reconnecting", {
      delay: delay, attempt: this.attempt, code: info.code, reason: info.reason, wasClean: info.wasClean
    });
  };

  /**
   * The wait before the next attempt: "full jitter", uniform in
   * [0, min(maxDelay, minDelay * 2^attempt)], never below 100 ms.
   */
  WsPush.prototype.nextDelay = function () {
    var cap = Math.min(this.maxDelay, this.minDelay * Math.pow(2, Math.min(this.attempt, 30)));
    return Math.max(MIN_FLOOR, Math.round(Math.random() * cap));
  };

  /** Close the connection and stop reconnecting. */
  WsPush.prototype.close = function () {
    var wasActive = !this._stopped || this._ws || this._es;
    this._stopped = true;
    this._clearTimers();
    this.attempt = 0;
    var es = this._es;
    this._es = null;
    if (es) es.close();
    var ws = this._ws;
    this._ws = null;
    if (ws) {
      ws.onmessage = ws.onclose = ws.onerror = null;
      if (ws.readyState === 0) {
        // closing a CONNECTING socket makes browsers log a warning; close it once it opens
        ws.onopen = function () { ws.close(1000); };
      } else {
        ws.onopen = null;
        if (ws.readyState === 1) ws.close(1000, "client closed");
      }
    }
    if (wasActive) this._setState("closed", { code: 1000, reason: "client closed", wasClean: true });
    return this;
  };

  /**
   * Replace the subscribed types (empty array = every type). Sends the op frame
   * now if open; the set is remembered and used in the URL on reconnect.
   * Returns true when the frame was sent right away.
   */
  WsPush.prototype.subscribe = function (types) {
    this.types = normTypes(types);
    if (this._es) {
      // An event stream cannot carry the op: reopen it with the new types.
      var es = this._es;
      this._es = null;
      es.close();
      this._clearTimers();
      this._openSse();
      return true;
    }
    return this._sendSubscribe();
  };

  WsPush.prototype._sendSubscribe = function () {
    var ws = this._ws;
    if (!ws || ws.readyState !== 1) return false;
    ws.send(JSON.stringify({ op: "subscribe", types: this.types }));
    this._urlTypes = this.types.join(",");
    return true;
  };

  if (root) root.WsPush = WsPush;
  if (typeof module !== "undefined" && module && module.exports) module.exports = WsPush;
})(typeof globalThis !== "undefined" ? globalThis : typeof self !== "undefined" ? self : this);
