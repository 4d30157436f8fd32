// tokenchat: a JavaScript client for the tokenchat wire protocol v1
// (docs/protocol.md), as an ES module for browsers and Node (>= 20.10; Node 20
// needs --experimental-websocket for its global WebSocket, 22 has it on).
//
// One `Connection` is one user's session, kept alive: it reconnects with
// exponential backoff and jitter, says hello again, re-joins every room with
// `since` = the last offset seen there (so the gap fills from history, each
// event once), then resends every spend that got no reply, with the same
// frame, so the same idempotency key: a spend is never charged twice.
//
// The pure parts (codec, offsets, backoff) are exported on their own, and
// unit-tested without a socket (client_demo/js/tests/).

export const VERSION = "0.1.0";
// The JSON subprotocol (docs/protocol.md, "Connection"); msgpack is not spoken here.
export const SUBPROTOCOL = "tokenchat.v1.json";

// Timings, in milliseconds. Overridable per connection (ConnectionOptions).
export const DEFAULTS = Object.freeze({
  // Reconnect backoff: the first retry after ~1 s, doubling up to 15 s, so a
  // server restart is caught within seconds and an outage is not hammered.
  backoffFirstMs: 1000,
  backoffMaxMs: 15000,
  // After close 4029 (rate limited past tolerance) the protocol says to back
  // off for several seconds.
  rateLimitedWaitMs: 8000,
  // A command other than a spend is failed with TIMEOUT after this long
  // without a reply (the server answers every command: this is a lost socket
  // that has not noticed yet).
  replyTimeoutMs: 15000,
  // A spend answered UNAVAILABLE or RATE_LIMITED (nothing applied, or the
  // outcome unknown) is resent with the same key up to this many times.
  spendRetriesMax: 3,
  // A `history` page answered RATE_LIMITED or UNAVAILABLE is asked again
  // after this long, up to historyRetriesMax times for that one page: a full
  // room's history (100 pages) outruns the command burst (40) at 20 a second.
  historyRetryMs: 250,
  historyRetriesMax: 100,
});

// Close codes after which reconnecting as is cannot work (docs/protocol.md, "Close codes").
export const FATAL_CLOSES = new Map([
  [4001, "Your session token was refused or has expired. Sign in again."],
  [4003, "The server refused this connection."],
]);
export const RATE_LIMITED_CLOSE = 4029;
// The `since` of a room joined before any event was seen in it: every event
// the room holds came after (docs/protocol.md, "After a reconnect").
export const BEFORE_ANY_OFFSET = "0-0";
// The client's own close code for "dropped on purpose, reconnecting" (4000-4999: private use).
export const CLIENT_DROP_CLOSE = 4000;

// Commands that carry an idempotency key: they wait for a reconnect instead of
// failing, and are resent with the same frame until they get a reply.
export const SPENDS = new Set(["tip", "dm", "unlock", "request_offer", "private_request", "buy_ticket"]);
// Error codes with which a spend applied nothing (or its outcome is unknown and
// the same key settles it): resent (docs/protocol.md, "UNAVAILABLE and retries").
export const SPEND_RETRY_CODES = new Set(["UNAVAILABLE", "RATE_LIMITED"]);
const REPLIES = new Set(["ok", "error", "welcome"]);

/** An `error` reply, or a client-side failure: OFFLINE (not connected or
 * stopped), TIMEOUT (no reply in time). Branch on `code`. */
export class CommandError extends Error {
  constructor(reply) {
    super(reply.message || reply.code);
    this.name = "CommandError";
    this.code = reply.code;
    this.reply = reply;
  }
}

// --- codec -------------------------------------------------------------------------

const utf8 = new TextDecoder("utf-8", { fatal: true });

/** The text frame of a command: its fields plus `type` and `id`. */
export function encodeFrame(type, fields, id) {
  if (typeof type !== "string" || !type) throw new TypeError("a command needs a type");
  return JSON.stringify({ ...fields, type, id });
}

/** A frame from the server as an object, or null when it is not a JSON object
 * (the server never sends one: a broken proxy might). JSON may also come in a
 * binary frame (ArrayBuffer or a typed array), as UTF-8. */
export function decodeFrame(data) {
  let text = data;
  try {
    if (typeof data !== "string") {
      if (data instanceof ArrayBuffer || ArrayBuffer.isView(data)) text = utf8.decode(data);
      else return null;
    }
    const frame = JSON.parse(text);
    if (frame === null || typeof frame !== "object" || Array.isArray(frame)) return null;
    if (typeof frame.type !== "string") return null;
    return frame;
  } catch {
    return null;
  }
}

/** "reply" (ok, error, welcome with `re`) or "event" (everything else, and an
 * error without `re`: one about a frame whose id could not be read). */
export function classify(frame) {
  return REPLIES.has(frame.type) && frame.re !== undefined && frame.re !== null ? "reply" : "event";
}

// --- offsets and backoff ----------------------------------------------------------

/** An offset (`<ms>-<seq>`, 64-bit parts) as [ms, seq] BigInts, or null when it
 * has another form (offsets are opaque: another server may use another shape). */
export function parseOffset(offset) {
  if (typeof offset !== "string") return null;
  const match = /^(\d{1,20})-(\d{1,20})$/.exec(offset);
  return match ? [BigInt(match[1]), BigInt(match[2])] : null;
}

/** Compare two offsets: -1, 0 or 1; null when either has an unknown form. */
export function compareOffsets(a, b) {
  const pa = parseOffset(a);
  const pb = parseOffset(b);
  if (!pa || !pb) return null;
  for (let i = 0; i < 2; i += 1) {
    if (pa[i] !== pb[i]) return pa[i] < pb[i] ? -1 : 1;
  }
  return 0;
}

/** Milliseconds before reconnect attempt `attempt` (0 for the first retry):
 * firstMs * 2^attempt capped at maxMs, times a jitter in [0.75, 1.25) so that
 * clients dropped together do not come back together. */
export function backoffDelay(attempt, options = {}, random = Math.random) {
  const firstMs = options.backoffFirstMs ?? DEFAULTS.backoffFirstMs;
  const maxMs = options.backoffMaxMs ?? DEFAULTS.backoffMaxMs;
  const delay = Math.min(maxMs, firstMs * 2 ** Math.min(attempt, 32));
  return Math.round(delay * (0.75 + random() * 0.5));
}

/** An idempotency key: a UUID (crypto.randomUUID needs a secure context). */
export function newKey() {
  if (globalThis.crypto?.randomUUID) return globalThis.crypto.randomUUID();
  const b = globalThis.crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

// --- the connection ---------------------------------------------------------------

export class Connection {
  /**
   * url: the gateway (`ws://host:8001/ws`, or /v1/config's `ws_url`).
   * token: a session token, or a function returning one (or a promise of
   * one), called before every hello, so a reconnect can use a fresh token.
   * handlers (all optional): onWelcome(welcome, reconnected),
   * onJoined(room, reply, rejoined), onRoomLost(room, error),
   * onReady(reconnected), onEvent(event), onStatus(state, detail),
   * onFatal(message, close).
   * options: DEFAULTS' timings, `WebSocket` (a constructor; the global one
   * by default), `random` (for the jitter), `failoverUrls` (other gateway
   * nodes of the same deployment: every reconnect attempt dials the next URL
   * of [url, ...failoverUrls] in rotation, after the backoff).
   */
  constructor(url, token, handlers = {}, options = {}) {
    this.url = url; // the URL dialled (or to dial next)
    this.urls = [url, ...(options.failoverUrls ?? [])];
    this.urlIndex = 0;
    this.token = token;
    this.h = handlers;
    this.options = { ...DEFAULTS, ...options };
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this.WebSocket !== "function") {
      throw new TypeError(
        "no WebSocket: Node 20 needs --experimental-websocket (Node 22 has it), or pass options.WebSocket",
      );
    }
    this.random = options.random ?? Math.random;
    this.ws = null;
    this.nextId = 1;
    this.pending = new Map(); // id -> {frame, resolve, reject, spend, ws, tries, timer}
    this.rooms = new Map(); // room -> last offset seen (string) or null
    // Rooms whose history is being paged (a join reply said `more`): their
    // live events, held until the last page is in (docs/protocol.md, "Paging history").
    this.paging = new Map(); // room -> [event]
    this.attempt = 0; // reconnect attempts since the last ready
    this.stopped = false;
    this.ready = false; // hello answered and rooms re-joined
    this.authError = null; // why the last hello was refused
    this.welcome = null; // the last welcome
    this.welcomed = false; // ever welcomed (a later welcome is a reconnect)
    this.retryTimer = null;
    this.readyWaiters = new Set(); // whenReady()'s {resolve, reject, timer}
    // A browser coming back online: reconnect now, not at the end of the backoff.
    this.onOnline = () => this.reconnectNow();
    globalThis.addEventListener?.("online", this.onOnline);
  }

  /** Connect (and keep reconnecting until stop() or a fatal close). */
  start() {
    this.open();
  }

  /** Close for good: pending commands fail with OFFLINE. */
  stop() {
    this.stopped = true;
    this.ready = false;
    globalThis.removeEventListener?.("online", this.onOnline);
    clearTimeout(this.retryTimer);
    const stopped = new CommandError({ code: "OFFLINE", message: "signed out" });
    for (const entry of this.pending.values()) {
      clearTimeout(entry.timer);
      entry.reject(stopped);
    }
    this.pending.clear();
    this.settleReady(stopped);
    if (this.ws) this.ws.close(1000, "bye");
  }

  /** Close the socket as if the network dropped (reconnects by itself). */
  drop() {
    if (this.ws) this.ws.close(CLIENT_DROP_CLOSE, "client dropped the connection");
  }

  reconnectNow() {
    if (this.stopped || this.ws) return;
    clearTimeout(this.retryTimer);
    this.open();
  }

  get online() {
    return Boolean(this.ready && this.ws);
  }

  /** Resolves once connected, welcomed and every room re-joined (at once if
   * so now); rejects on a fatal close, stop() or after `timeoutMs`. */
  whenReady(timeoutMs = this.options.replyTimeoutMs) {
    if (this.online) return Promise.resolve();
    if (this.stopped) return Promise.reject(new CommandError({ code: "OFFLINE", message: "stopped" }));
    return new Promise((resolve, reject) => {
      const waiter = { resolve, reject, timer: null };
      waiter.timer = setTimeout(() => {
        this.readyWaiters.delete(waiter);
        reject(new CommandError({ code: "TIMEOUT", message: "not connected in time" }));
      }, timeoutMs);
      this.readyWaiters.add(waiter);
    });
  }

  // --- commands ---------------------------------------------------------------------

  /** Send a command; resolves with its `ok` (or `welcome`) reply, rejects with
   * a CommandError. Spends wait for a reconnect instead of failing, and are
   * resent with the same frame (same key) until they get a reply. */
  request(type, fields = {}) {
    const frame = { ...fields, type };
    const spend = SPENDS.has(type);
    if (!spend && !this.online) {
      return Promise.reject(new CommandError({ code: "OFFLINE", message: "not connected" }));
    }
    if (this.stopped) {
      return Promise.reject(new CommandError({ code: "OFFLINE", message: "stopped" }));
    }
    return new Promise((resolve, reject) => {
      const id = this.nextId++;
      const entry = { frame, resolve, reject, spend, ws: null, tries: 0, timer: null };
      this.pending.set(id, entry);
      if (this.online) this.transmit(this.ws, id, entry);
    });
  }

  /** Join `room` and keep it across reconnects; the reply's `history` holds
   * only events not seen yet (a re-join asks with `since`), every page of
   * them (read with `history` while the server says `more`). */
  async join(room) {
    const fresh = !this.rooms.has(room);
    const fields = { room };
    if (!fresh) fields.since = this.rooms.get(room) ?? BEFORE_ANY_OFFSET;
    if (fresh) this.rooms.set(room, null); // its live events count from the reply on
    let reply;
    const ws = this.ws;
    try {
      reply = await this.request("join", fields);
    } catch (err) {
      if (fresh) this.rooms.delete(room);
      throw err;
    }
    let held;
    try {
      held = await this.catchUp(ws, room, reply);
    } catch (err) {
      // The pages left unread come again with the re-join after a reconnect.
      if (ws === this.ws) ws.close(CLIENT_DROP_CLOSE, "history not read");
      throw err;
    }
    this.h.onJoined?.(room, reply, false);
    for (const event of held) this.event(event);
    return reply;
  }

  /** Leave `room`: not re-joined any more. Not being in it is no error. */
  async leave(room) {
    this.rooms.delete(room);
    try {
      await this.request("leave", { room });
    } catch {
      // not in it (anymore), or offline: either way we are out
    }
  }

  say(room, text) {
    return this.request("say", { room, text });
  }

  ping() {
    return this.request("ping");
  }

  async getBalance() {
    return (await this.request("balance")).balance;
  }

  tip(room, amount, { text, key } = {}) {
    return this.spend("tip", key, { room, amount, text });
  }

  /** A tip of the room owner's menu item at its price, at most `maxPrice`
   * (PRICE_CHANGED otherwise: pass the price shown). */
  tipItem(room, item, { text, maxPrice, key } = {}) {
    return this.spend("tip", key, { room, item, text, max_price: maxPrice });
  }

  dm(to, text, { maxPrice, key, media } = {}) {
    return this.spend("dm", key, { to, text, max_price: maxPrice, media });
  }

  unlock(media, { maxPrice, key } = {}) {
    return this.spend("unlock", key, { media, max_price: maxPrice });
  }

  postMedia(room, media, text) {
    return this.request("post_media", defined({ room, media, text }));
  }

  // Custom requests (docs/protocol.md, "Custom requests").
  requestOffer(model, text, amount, { key } = {}) {
    return this.spend("request_offer", key, { model, text, amount });
  }

  requestAccept(request) {
    return this.request("request_accept", { request });
  }

  requestDeliver(request, { text, media } = {}) {
    return this.request("request_deliver", defined({ request, text, media }));
  }

  requestDecline(request) {
    return this.request("request_decline", { request });
  }

  requestCancel(request) {
    return this.request("request_cancel", { request });
  }

  async requests() {
    return (await this.request("request_list")).requests;
  }

  // Private shows (docs/protocol.md, "Private shows").
  privateRequest(model, rate, { key } = {}) {
    return this.spend("private_request", key, { model, rate });
  }

  privateAccept(show) {
    return this.request("private_accept", { show });
  }

  privateDecline(show) {
    return this.request("private_decline", { show });
  }

  privateEnd(show) {
    return this.request("private_end", { show });
  }

  // Ticket shows (docs/protocol.md, "Ticket shows").
  buyTicket(room, show, { key } = {}) {
    return this.spend("buy_ticket", key, { room, show });
  }

  showStart(show) {
    return this.request("show_start", { show });
  }

  showEnd(show) {
    return this.request("show_end", { show });
  }

  showCancel(show) {
    return this.request("show_cancel", { show });
  }

  // Moderation (docs/protocol.md, "Moderation"): the room's model and her moderators.
  mute(room, user, seconds) {
    return this.request("mute", { room, user, seconds });
  }

  unmute(room, user) {
    return this.request("unmute", { room, user });
  }

  kick(room, user) {
    return this.request("kick", { room, user });
  }

  /** `seconds` undefined: until unbanned. */
  ban(room, user, { seconds } = {}) {
    return this.request("ban", defined({ room, user, seconds }));
  }

  unban(room, user) {
    return this.request("unban", { room, user });
  }

  clear(room, user) {
    return this.request("clear", { room, user });
  }

  /** At most one line per `seconds` per member (0: off). */
  slow(room, seconds) {
    return this.request("slow", { room, seconds });
  }

  /** A spend with its idempotency key (a new one unless given). */
  spend(type, key, fields) {
    return this.request(type, { ...defined(fields), key: key ?? newKey() });
  }

  // --- internals ----------------------------------------------------------------------

  open() {
    this.ready = false;
    this.status("connecting", this.attempt ? `attempt ${this.attempt + 1}` : "");
    let ws;
    try {
      ws = new this.WebSocket(this.url, SUBPROTOCOL);
    } catch (err) {
      this.fatal(`Cannot open ${this.url}: ${err.message}`, null);
      return;
    }
    ws.binaryType = "arraybuffer"; // JSON may come in binary frames
    this.ws = ws;
    ws.onopen = () => this.greet(ws);
    ws.onmessage = (msg) => this.receive(ws, msg.data);
    ws.onclose = (e) => this.closed(ws, e);
  }

  async greet(ws) {
    try {
      const token = typeof this.token === "function" ? await this.token() : this.token;
      if (ws !== this.ws) return;
      const welcome = await this.call(ws, { type: "hello", token });
      const reconnected = this.welcomed;
      this.welcomed = true;
      this.welcome = welcome;
      this.h.onWelcome?.(welcome, reconnected);
      for (const [room, since] of [...this.rooms]) {
        const frame = { type: "join", room };
        frame.since = since ?? BEFORE_ANY_OFFSET;
        try {
          const reply = await this.call(ws, frame);
          const held = await this.catchUp(ws, room, reply);
          this.h.onJoined?.(room, reply, true);
          for (const event of held) this.event(event);
        } catch (err) {
          if (err.code === "UNAVAILABLE" || err.code === "OFFLINE" || err.code === "TIMEOUT") throw err;
          this.rooms.delete(room);
          this.h.onRoomLost?.(room, err);
        }
      }
      if (ws !== this.ws) return;
      this.attempt = 0;
      this.ready = true;
      this.status("online", "");
      // Spends that got no reply before the drop: the same frame, so the same key.
      for (const [id, entry] of this.pending) {
        if (entry.ws !== ws) this.transmit(ws, id, entry);
      }
      this.settleReady(null);
      this.h.onReady?.(reconnected);
    } catch (err) {
      if (ws !== this.ws) return;
      if (err.code === "UNAUTHENTICATED") {
        this.authError = err.message; // the server closes with 4001 next
        return;
      }
      this.status("connecting", err.message);
      ws.close(CLIENT_DROP_CLOSE, "retrying");
    }
  }

  closed(ws, event) {
    if (ws !== this.ws) return;
    this.ws = null;
    this.ready = false;
    this.paging.clear(); // what they held comes again after the re-joins
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
      this.status("offline", "");
      return;
    }
    const fatal = FATAL_CLOSES.get(event.code);
    if (fatal) {
      const said = this.authError ? `${fatal} (The server said: ${this.authError}.)` : fatal;
      this.fatal(said, { code: event.code, reason: event.reason });
      return;
    }
    let delay = backoffDelay(this.attempt, this.options, this.random);
    if (event.code === RATE_LIMITED_CLOSE) delay = Math.max(delay, this.options.rateLimitedWaitMs);
    this.attempt += 1;
    // The next node of the rotation: the one that dropped us may be gone.
    this.urlIndex = (this.urlIndex + 1) % this.urls.length;
    this.url = this.urls[this.urlIndex];
    this.status("reconnecting", `in ${Math.ceil(delay / 1000)} s`);
    this.retryTimer = setTimeout(() => this.open(), delay);
  }

  fatal(message, close) {
    this.stopped = true;
    globalThis.removeEventListener?.("online", this.onOnline);
    const error = new CommandError({ code: "OFFLINE", message });
    for (const entry of this.pending.values()) {
      clearTimeout(entry.timer);
      entry.reject(error);
    }
    this.pending.clear();
    this.settleReady(error);
    this.status("offline", "");
    this.h.onFatal?.(message, close);
  }

  receive(ws, data) {
    if (ws !== this.ws) return;
    const frame = decodeFrame(data);
    if (!frame) return;
    if (classify(frame) === "reply") {
      this.reply(ws, frame);
      return;
    }
    const held = frame.room && frame.offset !== undefined && this.paging.get(frame.room);
    if (held) held.push(frame); // after the pages still to read
    else this.event(frame);
  }

  /** An event, delivered unless seen already. */
  event(frame) {
    const kind = frame.type;
    // A room event with an offset (message, tip, media, king, show, goal) is
    // in the room's stream: de-duplicated across a re-join by its offset.
    if (frame.room && frame.offset !== undefined) {
      if (!this.rooms.has(frame.room)) return; // left, or a late event of a failed join
      if (!isNewer(frame.offset, this.rooms.get(frame.room))) return; // seen already
      if (parseOffset(frame.offset)) this.rooms.set(frame.room, frame.offset);
    }
    if (kind === "presence" && !this.rooms.has(frame.room)) return;
    // Kicked or banned: out of the room, and not re-joined after a reconnect.
    if (kind === "removed" && frame.room) this.rooms.delete(frame.room);
    this.h.onEvent?.(frame);
  }

  reply(ws, frame) {
    const entry = this.pending.get(frame.re);
    if (!entry || entry.ws !== ws) return; // a reply to a frame of an older socket
    const retry =
      frame.type === "error" &&
      entry.spend &&
      SPEND_RETRY_CODES.has(frame.code) &&
      entry.tries < this.options.spendRetriesMax;
    if (retry) {
      // Nothing was charged, or the outcome is unknown: the same key settles it.
      entry.tries += 1;
      entry.ws = null;
      entry.timer = setTimeout(() => {
        if (this.pending.get(frame.re) === entry && entry.ws === null && this.online) {
          this.transmit(this.ws, frame.re, entry);
        }
      }, this.options.backoffFirstMs * entry.tries);
      return;
    }
    clearTimeout(entry.timer);
    this.pending.delete(frame.re);
    // More history to page: the room's live events, which follow this reply
    // at once, wait for the pages (held from here, before any other frame).
    if (frame.type === "ok" && frame.more && entry.frame.type === "join") {
      this.paging.set(entry.frame.room, []);
    }
    if (frame.type === "error") entry.reject(new CommandError(frame));
    else entry.resolve(frame);
  }

  /** Read the rest of a join's history page by page (while `more`), into
   * `reply.history`; returns the live events held meanwhile. On a failure
   * the room's last offset is as before the join, so its re-join asks for
   * them all again. */
  async catchUp(ws, room, reply) {
    const before = this.rooms.get(room);
    try {
      this.acceptHistory(room, reply);
      let next = reply.next;
      while (reply.more) {
        const page = await this.historyPage(ws, room, next);
        this.acceptHistory(room, page);
        reply.history.push(...page.history);
        if (page.recovered === false) reply.recovered = false;
        reply.more = page.more;
        next = page.next;
      }
      delete reply.next;
    } catch (err) {
      if (this.rooms.has(room)) this.rooms.set(room, before);
      throw err;
    }
    const held = this.paging.get(room) ?? [];
    this.paging.delete(room);
    return held;
  }

  /** The page of `room`'s history after `since` (a reply's `next`) on `ws`,
   * asked again while the server is busy (RATE_LIMITED, UNAVAILABLE). */
  async historyPage(ws, room, since) {
    for (let tries = 0; ; tries++) {
      try {
        return await this.call(ws, { type: "history", room, since });
      } catch (err) {
        const busy = SPEND_RETRY_CODES.has(err.code) && tries < this.options.historyRetriesMax;
        if (!busy || ws !== this.ws) throw err;
        await new Promise((resolve) => setTimeout(resolve, this.options.historyRetryMs));
      }
    }
  }

  /** Drop from a join reply's history what was seen already; note the newest offset. */
  acceptHistory(room, reply) {
    const history = reply.history || [];
    const last = this.rooms.get(room);
    reply.history = history.filter((e) => isNewer(e.offset, last));
    const newest = reply.history.at(-1)?.offset;
    if (parseOffset(newest) && this.rooms.has(room)) this.rooms.set(room, newest);
  }

  /** A command on this very socket (hello and re-joins, before ready). */
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
    entry.timer = null;
    if (!entry.spend) {
      entry.timer = setTimeout(() => {
        if (this.pending.get(id) !== entry) return;
        this.pending.delete(id);
        entry.reject(new CommandError({ code: "TIMEOUT", message: "the server did not answer" }));
      }, this.options.replyTimeoutMs);
    }
    const { type, ...fields } = entry.frame;
    ws.send(encodeFrame(type, fields, id));
  }

  status(state, detail) {
    this.h.onStatus?.(state, detail);
  }

  settleReady(error) {
    for (const waiter of this.readyWaiters) {
      clearTimeout(waiter.timer);
      if (error) waiter.reject(error);
      else waiter.resolve();
    }
    this.readyWaiters.clear();
  }
}

// --- the HTTP API ------------------------------------------------------------------

/** One HTTP API call (docs/protocol.md, "HTTP API"): the JSON reply, or a
 * CommandError with the reply's `error` (code, message and its fields), with
 * OFFLINE when the server cannot be reached, or `HTTP_<status>` when the
 * reply is not the API's JSON (a proxy's page, a plain-text 405). */
export async function httpRequest(method, url, { body, token, fetch = globalThis.fetch } = {}) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (token) headers.Authorization = `Bearer ${token}`;
  let response;
  try {
    response = await fetch(url, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch {
    throw new CommandError({ code: "OFFLINE", message: "the server cannot be reached" });
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    // not JSON (a 405, a proxy's page): the status says enough
  }
  if (!response.ok) {
    throw new CommandError(data?.error ?? { code: `HTTP_${response.status}`, message: response.statusText });
  }
  return data;
}

/** The HTTP API of one server, as one user (token null: anonymous). Typed
 * methods for what a chat client needs; `call` for the rest. */
export class HttpApi {
  constructor(baseUrl, token = null, { fetch } = {}) {
    this.baseUrl = String(baseUrl).replace(/\/+$/, "");
    this.token = token;
    this.fetch = fetch ?? globalThis.fetch;
  }

  call(method, path, body) {
    return httpRequest(method, `${this.baseUrl}${path}`, { body, token: this.token, fetch: this.fetch });
  }

  /** `{ws_url, dev_mode}`: the WebSocket URL to dial. */
  config() {
    return this.call("GET", "/v1/config");
  }

  /** Dev mode only: a token for `user` (`fan` or `model`). */
  async devToken(user, role = "fan") {
    return (await this.call("POST", "/v1/dev/token", { user, role })).token;
  }

  /** `{user: {id, role}, balance}`. */
  me() {
    return this.call("GET", "/v1/me");
  }

  /** The live rooms; `params`: sort, tag, ... (docs/protocol.md, "Discovery"). */
  rooms(params = {}) {
    return this.call("GET", `/v1/rooms${query(params)}`);
  }

  /** A user's prices: `{dm, private_rate, private_min_s}`. */
  prices(user) {
    return this.call("GET", `/v1/users/${encodeURIComponent(user)}/prices`);
  }

  async menu(user) {
    return (await this.call("GET", `/v1/users/${encodeURIComponent(user)}/menu`)).items;
  }

  async bundles() {
    return (await this.call("GET", "/v1/bundles")).bundles;
  }

  /** Buy a bundle. `paymentRef` is the payment provider's reference and the
   * purchase's idempotency key: retrying with it (within 24 h) credits once. */
  purchase(bundle, paymentRef) {
    return this.call("POST", "/v1/purchases", { bundle, payment_ref: paymentRef });
  }

  /** The caller's ledger transactions, newest first: `{transactions, next}`. */
  transactions({ kind, before, limit } = {}) {
    return this.call("GET", `/v1/me/transactions${query({ kind, before, limit })}`);
  }

  receipt(tx) {
    return this.call("GET", `/v1/me/transactions/${encodeURIComponent(tx)}`);
  }

  /** A new signed URL of media the caller owns or unlocked. */
  mediaUrl(media) {
    return this.call("GET", `/v1/media/${encodeURIComponent(media)}/url`);
  }
}

/** `?a=1&b=2` of the defined values ("" when none). */
function query(params) {
  const defined_ = Object.entries(params).filter(([, v]) => v !== undefined && v !== null);
  return defined_.length ? `?${new URLSearchParams(defined_.map(([k, v]) => [k, String(v)]))}` : "";
}

/** Whether an event at `offset` comes after `last` (the last seen; null: none).
 * An offset of an unknown form is never taken for a duplicate. */
function isNewer(offset, last) {
  if (!last) return true;
  const order = compareOffsets(offset, last);
  return order === null || order > 0;
}

/** `fields` without its undefined values (an optional field is left out). */
function defined(fields) {
  return Object.fromEntries(Object.entries(fields).filter(([, v]) => v !== undefined));
}
