// One tokenchat session over a WebSocket (docs/protocol.md), kept alive:
// it reconnects with backoff, says hello again, re-joins every room with
// `since` = the last offset seen there (so the gap fills from history), then
// resends every tip and DM that got no reply, with the same key and fields,
// so a spend is never charged twice.

const SUBPROTOCOL = "tokenchat.v1.json";
const BACKOFF_FIRST_MS = 1000;
const BACKOFF_MAX_MS = 15000;
const RATE_LIMITED_CLOSE_WAIT_MS = 8000; // after 4029: back off for several seconds
const REPLY_TIMEOUT_MS = 15000;
const UNAVAILABLE_RETRIES = 3; // a spend answered UNAVAILABLE is retried (same key)
// Close codes after which reconnecting as is cannot work.
const FATAL_CLOSES = new Map([
  [4001, "Your session token was refused or has expired. Sign in again."],
  [4003, "The server refused this connection."],
]);
const SPENDS = new Set(["tip", "dm", "unlock"]);

export class CommandError extends Error {
  constructor(reply) {
    super(reply.message || reply.code);
    this.code = reply.code;
    this.reply = reply;
  }
}

/** Compare two offsets (`<ms>-<seq>`, 64-bit parts): -1, 0 or 1. */
export function compareOffsets(a, b) {
  const [am, as] = a.split("-").map(BigInt);
  const [bm, bs] = b.split("-").map(BigInt);
  if (am !== bm) return am < bm ? -1 : 1;
  if (as !== bs) return as < bs ? -1 : 1;
  return 0;
}

export class Connection {
  /**
   * handlers: onWelcome(welcome, reconnected), onJoined(room, reply, rejoined),
   * onRoomLost(room, error), onReady(reconnected), onEvent(event),
   * onStatus(state, detail), onFatal(message).
   */
  constructor(url, token, handlers) {
    this.url = url;
    this.token = token;
    this.h = handlers;
    this.ws = null;
    this.nextId = 1;
    this.pending = new Map(); // id -> {frame, resolve, reject, spend, ws, timer}
    this.rooms = new Map(); // room -> last offset seen (string) or null
    this.attempt = 0;
    this.stopped = false;
    this.ready = false; // hello answered and rooms re-joined
    this.authError = null; // why the last hello was refused
    this.welcomed = false; // ever welcomed (a later welcome is a reconnect)
    this.retryTimer = null;
    this.onOnline = () => this.reconnectNow();
    window.addEventListener("online", this.onOnline);
  }

  start() {
    this.open();
  }

  stop() {
    this.stopped = true;
    window.removeEventListener("online", this.onOnline);
    clearTimeout(this.retryTimer);
    for (const entry of this.pending.values()) {
      clearTimeout(entry.timer);
      entry.reject(new CommandError({ code: "OFFLINE", message: "signed out" }));
    }
    this.pending.clear();
    if (this.ws) this.ws.close(1000, "bye");
  }

  /** Close the socket as if the network dropped (reconnects by itself). */
  drop() {
    if (this.ws) this.ws.close(4000, "client dropped the connection");
  }

  reconnectNow() {
    if (this.stopped || this.ws) return;
    clearTimeout(this.retryTimer);
    this.open();
  }

  open() {
    this.ready = false;
    this.h.onStatus("connecting", this.attempt ? `attempt ${this.attempt + 1}` : "");
    let ws;
    try {
      ws = new WebSocket(this.url, SUBPROTOCOL);
    } catch (err) {
      this.h.onFatal(`Cannot open ${this.url}: ${err.message}`);
      return;
    }
    this.ws = ws;
    ws.onopen = () => this.greet(ws);
    ws.onmessage = (msg) => this.receive(ws, msg.data);
    ws.onclose = (e) => this.closed(ws, e);
  }

  async greet(ws) {
    try {
      const welcome = await this.call(ws, { type: "hello", token: this.token });
      const reconnected = this.welcomed;
      this.welcomed = true;
      this.h.onWelcome(welcome, reconnected);
      for (const [room, since] of [...this.rooms]) {
        const frame = { type: "join", room };
        if (since) frame.since = since;
        try {
          const reply = await this.call(ws, frame);
          this.acceptHistory(room, reply);
          this.h.onJoined(room, reply, true);
        } catch (err) {
          if (err.code === "UNAVAILABLE" || err.code === "OFFLINE") throw err;
          this.rooms.delete(room);
          this.h.onRoomLost(room, err);
        }
      }
      if (ws !== this.ws) return;
      this.attempt = 0;
      this.ready = true;
      this.h.onStatus("online", "");
      // Spends that got no reply before the drop: the same frame, so the same key.
      for (const [id, entry] of this.pending) {
        if (entry.ws !== ws) this.transmit(ws, id, entry);
      }
      this.h.onReady(reconnected);
    } catch (err) {
      if (ws !== this.ws) return;
      if (err.code === "UNAUTHENTICATED") {
        this.authError = err.message; // the server closes with 4001 next
        return;
      }
      this.h.onStatus("connecting", err.message);
      ws.close(4000, "retrying");
    }
  }

  closed(ws, event) {
    if (ws !== this.ws) return;
    this.ws = null;
    this.ready = false;
    for (const [id, entry] of this.pending) {
      if (entry.spend) {
        entry.ws = null; // resent after the next hello
      } else {
        clearTimeout(entry.timer);
        this.pending.delete(id);
        entry.reject(new CommandError({ code: "OFFLINE", message: "the connection dropped" }));
      }
    }
    if (this.stopped) {
      this.h.onStatus("offline", "");
      return;
    }
    const fatal = FATAL_CLOSES.get(event.code);
    if (fatal) {
      this.stopped = true;
      this.h.onStatus("offline", "");
      this.h.onFatal(this.authError ? `${fatal} (The server said: ${this.authError}.)` : fatal);
      return;
    }
    let delay = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** this.attempt);
    delay = Math.round(delay * (0.75 + Math.random() * 0.5)); // jitter
    if (event.code === 4029) delay = Math.max(delay, RATE_LIMITED_CLOSE_WAIT_MS);
    this.attempt += 1;
    this.h.onStatus("reconnecting", `in ${Math.ceil(delay / 1000)} s`);
    this.retryTimer = setTimeout(() => this.open(), delay);
  }

  receive(ws, data) {
    if (ws !== this.ws) return;
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }
    const kind = frame.type;
    if (kind === "ok" || kind === "error" || kind === "welcome") {
      const entry = this.pending.get(frame.re);
      if (!entry || entry.ws !== ws) return;
      if (kind === "error" && entry.spend && frame.code === "UNAVAILABLE" && entry.tries < UNAVAILABLE_RETRIES) {
        // Nothing was charged, or the outcome is unknown: the same key settles it.
        entry.tries += 1;
        entry.ws = null;
        setTimeout(() => {
          if (this.pending.get(frame.re) === entry && entry.ws === null && this.ready && this.ws) {
            this.transmit(this.ws, frame.re, entry);
          }
        }, BACKOFF_FIRST_MS * entry.tries);
        return;
      }
      clearTimeout(entry.timer);
      this.pending.delete(frame.re);
      if (kind === "error") entry.reject(new CommandError(frame));
      else entry.resolve(frame);
      return;
    }
    if ((kind === "message" || kind === "tip" || kind === "media") && frame.room) {
      if (!this.rooms.has(frame.room)) return;
      const last = this.rooms.get(frame.room);
      if (last && compareOffsets(frame.offset, last) <= 0) return; // seen already
      this.rooms.set(frame.room, frame.offset);
    }
    if (kind === "presence" && !this.rooms.has(frame.room)) return;
    // Kicked or banned: out of the room, and not re-joined after a reconnect.
    if (kind === "removed" && frame.room) this.rooms.delete(frame.room);
    this.h.onEvent(frame);
  }

  acceptHistory(room, reply) {
    const history = reply.history || [];
    const last = this.rooms.get(room);
    reply.history = history.filter((e) => !last || compareOffsets(e.offset, last) > 0);
    if (reply.history.length) this.rooms.set(room, reply.history[reply.history.length - 1].offset);
  }

  get online() {
    return Boolean(this.ready && this.ws);
  }

  /** Send on the current socket; spends wait for a reconnect instead of failing. */
  request(type, fields = {}) {
    const frame = { type, ...fields };
    const spend = SPENDS.has(type);
    if (!spend && !(this.ready && this.ws)) {
      return Promise.reject(new CommandError({ code: "OFFLINE", message: "not connected" }));
    }
    return new Promise((resolve, reject) => {
      const id = this.nextId++;
      const entry = { frame, resolve, reject, spend, ws: null, tries: 0, timer: null };
      this.pending.set(id, entry);
      if (this.ready && this.ws) this.transmit(this.ws, id, entry);
    });
  }

  async join(room) {
    const fresh = !this.rooms.has(room);
    const frame = { room };
    if (!fresh && this.rooms.get(room)) frame.since = this.rooms.get(room);
    if (fresh) this.rooms.set(room, null); // its live events count from the reply on
    let reply;
    try {
      reply = await this.request("join", frame);
    } catch (err) {
      if (fresh) this.rooms.delete(room);
      throw err;
    }
    this.acceptHistory(room, reply);
    this.h.onJoined(room, reply, false);
    return reply;
  }

  async leave(room) {
    this.rooms.delete(room);
    try {
      await this.request("leave", { room });
    } catch {
      // not in it (anymore), or offline: either way we are out
    }
  }

  // Internals ----------------------------------------------------------------------
  call(ws, frame) {
    return new Promise((resolve, reject) => {
      const id = this.nextId++;
      const entry = { frame, resolve, reject, spend: false, ws: null, tries: 0, timer: null };
      this.pending.set(id, entry);
      this.transmit(ws, id, entry);
    });
  }

  transmit(ws, id, entry) {
    entry.ws = ws;
    clearTimeout(entry.timer);
    if (!entry.spend) {
      entry.timer = setTimeout(() => {
        if (this.pending.get(id) !== entry) return;
        this.pending.delete(id);
        entry.reject(new CommandError({ code: "TIMEOUT", message: "the server did not answer" }));
      }, REPLY_TIMEOUT_MS);
    }
    ws.send(JSON.stringify({ ...entry.frame, id }));
  }
}
