// The Connection against a scripted gateway (fake_server.js): request/reply
// correlation, errors with codes, reconnect with backoff, resume (re-join with
// since, history de-duplicated, spends resent with the same key).
import assert from "node:assert/strict";
import { test } from "node:test";

import { CommandError, Connection } from "../tokenchat.js";
import { FAST, FakeServer, sleep, until, welcoming } from "./fake_server.js";

function connect(server, handlers = {}, options = {}, token = "bob") {
  const conn = new Connection("ws://test/ws", token, handlers, {
    ...FAST,
    WebSocket: server.WebSocket,
    ...options,
  });
  conn.start();
  return conn;
}

test("hello with the token and the JSON subprotocol, then ready", async () => {
  const server = new FakeServer(welcoming());
  const seen = [];
  const conn = connect(server, {
    onWelcome: (w, again) => seen.push(["welcome", w.user.id, again]),
    onStatus: (s) => seen.push(["status", s]),
    onReady: (again) => seen.push(["ready", again]),
  });
  await conn.whenReady();
  assert.equal(server.sockets[0].protocol, "tokenchat.v1.json");
  assert.equal(server.sockets[0].binaryType, "arraybuffer");
  assert.deepEqual(server.sent("hello").map((f) => f.token), ["bob"]);
  assert.deepEqual(seen, [
    ["status", "connecting"],
    ["welcome", "bob", false],
    ["status", "online"],
    ["ready", false],
  ]);
  assert.equal(conn.welcome.session, "s0");
  assert.ok(conn.online);
  conn.stop();
  assert.ok(!conn.online);
});

test("replies are matched to their commands by id, in any order", async () => {
  const held = [];
  const server = new FakeServer(welcoming((socket, frame) => held.push([socket, frame])));
  const events = [];
  const conn = connect(server, { onEvent: (e) => events.push(e) });
  await conn.whenReady();
  const a = conn.say("r", "one");
  const b = conn.getBalance();
  const c = conn.kick("r", "eve");
  await until(() => held.length === 3, "three commands");
  const [[socket, fa], [, fb], [, fc]] = held;
  assert.deepEqual([fa.type, fb.type, fc.type], ["say", "balance", "kick"]);
  assert.equal(new Set([fa.id, fb.id, fc.id]).size, 3);
  socket.deliver({ type: "error", re: fc.id, code: "FORBIDDEN", message: "not yours" });
  socket.deliver({ type: "ok", re: 999, balance: -1 }); // answers nothing pending: ignored
  socket.deliver({ type: "ok", re: fb.id, balance: 42 });
  socket.deliver({ type: "error", code: "BAD_REQUEST", message: "undecodable" }); // no re: an event
  socket.deliver({ type: "ok", re: fa.id, offset: "5-0" });
  socket.deliver("not json"); // ignored
  assert.equal(await b, 42);
  assert.deepEqual(await a, { type: "ok", re: fa.id, offset: "5-0" });
  const err = await c.catch((e) => e);
  assert.ok(err instanceof CommandError);
  assert.equal(err.code, "FORBIDDEN");
  assert.equal(err.message, "not yours");
  assert.equal(err.reply.re, fc.id);
  assert.deepEqual(events, [{ type: "error", code: "BAD_REQUEST", message: "undecodable" }]);
  assert.equal(conn.pending.size, 0);
  conn.stop();
});

test("typed commands send the protocol's fields, spends with a key", async () => {
  const server = new FakeServer(welcoming((socket, frame) => socket.deliver({ type: "ok", re: frame.id })));
  const conn = connect(server);
  await conn.whenReady();
  await conn.tip("mia", 5, { text: "hi", key: "k1" });
  await conn.tipItem("mia", "i1", { maxPrice: 30 });
  await conn.dm("mia", "hello", { maxPrice: 10 });
  await conn.unlock("m_1");
  await conn.requestOffer("mia", "a song", 50);
  await conn.privateRequest("mia", 20);
  await conn.buyTicket("mia", "sh1");
  await conn.ban("mia", "eve");
  await conn.slow("mia", 0);
  const sent = server.frames.slice(1).map(([, { id, ...f }]) => f);
  const keyed = sent.filter((f) => f.key);
  assert.equal(keyed.length, 7);
  assert.equal(new Set(keyed.map((f) => f.key)).size, 7);
  const strip = ({ key, ...f }) => f;
  assert.deepEqual(sent.map(strip), [
    { type: "tip", room: "mia", amount: 5, text: "hi" },
    { type: "tip", room: "mia", item: "i1", max_price: 30 },
    { type: "dm", to: "mia", text: "hello", max_price: 10 },
    { type: "unlock", media: "m_1" },
    { type: "request_offer", model: "mia", text: "a song", amount: 50 },
    { type: "private_request", model: "mia", rate: 20 },
    { type: "buy_ticket", room: "mia", show: "sh1" },
    { type: "ban", room: "mia", user: "eve" },
    { type: "slow", room: "mia", seconds: 0 },
  ]);
  assert.equal(sent[0].key, "k1");
  conn.stop();
});

test("offline: a command fails OFFLINE, a spend waits; no reply in time is TIMEOUT", async () => {
  const server = new FakeServer(welcoming(() => {})); // answers nothing but hello
  const conn = connect(server);
  const early = await conn.say("r", "x").catch((e) => e);
  assert.equal(early.code, "OFFLINE");
  await conn.whenReady();
  const late = await conn.say("r", "x").catch((e) => e);
  assert.equal(late.code, "TIMEOUT");
  const spend = conn.tip("r", 1).catch((e) => e);
  await sleep(FAST.replyTimeoutMs + 50);
  assert.equal(conn.pending.size, 1, "a spend has no reply timeout: it is resent after reconnects");
  conn.stop();
  assert.equal((await spend).code, "OFFLINE");
});

test("a spend answered UNAVAILABLE or RATE_LIMITED is resent with the same key", async () => {
  const answers = ["UNAVAILABLE", "RATE_LIMITED", null];
  const server = new FakeServer(
    welcoming((socket, frame) => {
      const code = answers.shift();
      if (code) socket.deliver({ type: "error", re: frame.id, code, message: "later" });
      else socket.deliver({ type: "ok", re: frame.id, tx: "t1", balance: 95 });
    }),
  );
  const conn = connect(server);
  await conn.whenReady();
  const reply = await conn.tip("mia", 5);
  assert.equal(reply.tx, "t1");
  const tips = server.sent("tip");
  assert.equal(tips.length, 3);
  assert.equal(new Set(tips.map((f) => f.key)).size, 1);
  // A final code is not retried, and after spendRetriesMax the last error stands.
  answers.push("INSUFFICIENT_FUNDS");
  assert.equal((await conn.tip("mia", 500).catch((e) => e)).code, "INSUFFICIENT_FUNDS");
  answers.push("UNAVAILABLE", "UNAVAILABLE", "UNAVAILABLE", "UNAVAILABLE");
  const gaveUp = await conn.tip("mia", 5, {}).catch((e) => e);
  assert.equal(gaveUp.code, "UNAVAILABLE");
  assert.equal(server.sent("tip").length, 3 + 1 + 4);
  conn.stop();
});

test("after a drop: backoff, hello again, re-join with since, gap filled once, spend resent", async () => {
  let dropTip = true;
  const server = new FakeServer(
    welcoming((socket, frame) => {
      if (frame.type === "join") {
        const history =
          socket.index === 0
            ? [{ type: "message", room: "mia", text: "a", offset: "1-0" }]
            : [
                { type: "message", room: "mia", text: "b", offset: "2-0" }, // seen live already
                { type: "tip", room: "mia", amount: 5, offset: "3-0" }, // missed while away
              ];
        socket.deliver({ type: "ok", re: frame.id, room: { id: "mia" }, history, recovered: true });
      } else if (frame.type === "tip") {
        if (dropTip) {
          // Applied, but the connection dies before the reply.
          dropTip = false;
          socket.serverClose(1012, "restarting");
        } else {
          socket.deliver({ type: "ok", re: frame.id, tx: "t1", balance: 95, duplicate: true });
        }
      }
    }),
  );
  const joined = [];
  const events = [];
  const statuses = [];
  const ready = [];
  const conn = connect(server, {
    onJoined: (room, reply, rejoined) => joined.push([room, reply.history.map((e) => e.offset), rejoined]),
    onEvent: (e) => events.push(e.offset ?? e.type),
    onStatus: (s, d) => statuses.push(`${s}${d ? ` ${d}` : ""}`),
    onReady: (again) => ready.push(again),
  });
  await conn.whenReady();
  await conn.join("mia");
  server.sockets[0].deliver({ type: "message", room: "mia", text: "b", offset: "2-0" });
  server.sockets[0].deliver({ type: "message", room: "mia", text: "b", offset: "2-0" }); // a repeat
  server.sockets[0].deliver({ type: "message", room: "elsewhere", text: "z", offset: "9-0" }); // not joined
  assert.equal(conn.rooms.get("mia"), "2-0");
  const key = "tip-key-1";
  const tip = conn.tip("mia", 5, { key });
  const reply = await tip;
  assert.equal(reply.tx, "t1");
  assert.equal(reply.duplicate, true);
  assert.equal(server.sockets.length, 2);
  assert.deepEqual(server.sent("hello").map((f) => f.socket), [0, 1]);
  const joins = server.sent("join");
  assert.deepEqual(
    joins.map((f) => [f.socket, f.room, f.since]),
    [
      [0, "mia", undefined],
      [1, "mia", "2-0"],
    ],
  );
  const tips = server.sent("tip");
  assert.deepEqual(tips.map((f) => f.socket), [0, 1]);
  assert.deepEqual(tips[0], { ...tips[1], socket: 0 }, "the same frame, so the same key and id");
  assert.equal(tips[1].key, key);
  assert.deepEqual(joined, [
    ["mia", ["1-0"], false],
    ["mia", ["3-0"], true], // 2-0 came live before the drop: not again
  ]);
  assert.deepEqual(events, ["2-0"]);
  assert.equal(conn.rooms.get("mia"), "3-0");
  assert.deepEqual(ready, [false, true]);
  assert.ok(statuses.some((s) => /^reconnecting in \d+ s$/.test(s)), statuses.join(", "));
  conn.stop();
});

test("the token function is asked again at every hello", async () => {
  const server = new FakeServer(welcoming());
  let n = 0;
  const conn = connect(server, {}, {}, async () => `t${++n}`);
  await conn.whenReady();
  conn.drop();
  await until(() => server.sent("hello").length === 2, "a second hello");
  await conn.whenReady();
  assert.deepEqual(server.sent("hello").map((f) => f.token), ["t1", "t2"]);
  assert.equal(server.sockets[0].closedWith.code, 4000);
  conn.stop();
});

test("a refused token (4001) is fatal: no reconnect, the server's reason said", async () => {
  const server = new FakeServer((socket, frame) => {
    socket.deliver({ type: "error", re: frame.id, code: "UNAUTHENTICATED", message: "token expired" });
    socket.serverClose(4001, "bad token");
  });
  let fatal = null;
  const conn = connect(server, { onFatal: (message, close) => (fatal = { message, close }) });
  const ready = await conn.whenReady().catch((e) => e);
  assert.equal(ready.code, "OFFLINE");
  assert.match(fatal.message, /refused or has expired.*token expired/);
  assert.deepEqual(fatal.close, { code: 4001, reason: "bad token" });
  await sleep(3 * FAST.backoffMaxMs);
  assert.equal(server.sockets.length, 1, "no reconnect after 4001");
  assert.equal((await conn.tip("r", 1).catch((e) => e)).code, "OFFLINE");
});

test("close 4029 waits at least rateLimitedWaitMs before reconnecting", async () => {
  const server = new FakeServer(welcoming());
  const statuses = [];
  const conn = connect(server, { onStatus: (s, d) => statuses.push(`${s} ${d}`.trim()) });
  await conn.whenReady();
  server.sockets[0].serverClose(4029, "rate limited");
  await until(() => statuses.at(-1).startsWith("reconnecting"), "reconnecting");
  assert.equal(statuses.at(-1), "reconnecting in 8 s");
  await sleep(3 * FAST.backoffMaxMs);
  assert.equal(server.sockets.length, 1, "no reconnect before the rate-limit wait");
  conn.reconnectNow(); // a browser's `online` event does this
  await conn.whenReady();
  assert.equal(server.sockets.length, 2);
  conn.stop();
});

test("a room lost at re-join is left and reported; a removed event leaves the room", async () => {
  const server = new FakeServer(
    welcoming((socket, frame) => {
      if (frame.type !== "join") return;
      if (socket.index > 0 && frame.room === "gone") {
        socket.deliver({ type: "error", re: frame.id, code: "NOT_FOUND", message: "no such room" });
      } else {
        socket.deliver({ type: "ok", re: frame.id, room: { id: frame.room }, history: [] });
      }
    }),
  );
  const lost = [];
  const conn = connect(server, { onRoomLost: (room, err) => lost.push([room, err.code]) });
  await conn.whenReady();
  await conn.join("gone");
  await conn.join("kept");
  await conn.join("kicked");
  server.sockets[0].deliver({ type: "removed", room: "kicked", reason: "kick" });
  conn.drop();
  await until(() => server.sockets.length === 2 && conn.online, "reconnected");
  assert.deepEqual(lost, [["gone", "NOT_FOUND"]]);
  assert.deepEqual([...conn.rooms.keys()], ["kept"]);
  assert.deepEqual(server.sent("join").filter((f) => f.socket === 1).map((f) => f.room), ["gone", "kept"]);
  conn.stop();
});

test("every room event with an offset counts as seen (king, goal, show too)", async () => {
  const server = new FakeServer(
    welcoming((socket, frame) => {
      if (frame.type !== "join") return;
      const history =
        socket.index === 0
          ? []
          : [
              { type: "king", room: "mia", king: { user: "bob", tokens: 5 }, offset: "4-0" }, // seen live
              { type: "goal", room: "mia", goal: { id: "g_1" }, offset: "5-0" },
            ];
      socket.deliver({ type: "ok", re: frame.id, room: { id: "mia" }, history });
    }),
  );
  const joined = [];
  const events = [];
  const conn = connect(server, {
    onJoined: (room, reply) => joined.push(reply.history.map((e) => e.type)),
    onEvent: (e) => events.push(e.type),
  });
  await conn.whenReady();
  await conn.join("mia");
  server.sockets[0].deliver({ type: "king", room: "mia", king: { user: "bob", tokens: 5 }, offset: "4-0" });
  server.sockets[0].deliver({ type: "presence", room: "mia", viewers: 2 });
  server.sockets[0].deliver({ type: "balance", balance: 7 }); // a user event: no room
  assert.equal(conn.rooms.get("mia"), "4-0");
  conn.drop();
  await until(() => server.sockets.length === 2 && conn.online, "reconnected");
  assert.equal(server.sent("join").at(-1).since, "4-0");
  assert.deepEqual(joined, [[], ["goal"]]);
  assert.deepEqual(events, ["king", "presence", "balance"]);
  conn.stop();
});

test("failoverUrls: every reconnect attempt dials the next URL, in rotation", async () => {
  const server = new FakeServer(welcoming());
  const conn = connect(server, {}, { failoverUrls: ["ws://b/ws", "ws://c/ws"] });
  await conn.whenReady();
  assert.deepEqual(conn.urls, ["ws://test/ws", "ws://b/ws", "ws://c/ws"]);
  for (const [i, next] of ["ws://b/ws", "ws://c/ws", "ws://test/ws"].entries()) {
    server.sockets[i].serverClose(1012, "node going away");
    await until(() => server.sockets.length === i + 2, "a reconnect");
    await conn.whenReady();
    assert.equal(server.sockets[i + 1].url, next);
    assert.equal(conn.url, next);
  }
  conn.stop();
});

test("a re-join with more pages history until more is false, live events after the pages", async () => {
  // The room's stream: 1-0 .. 250-0. Before the drop the client saw 1-0; 251-0
  // and 252-0 come live right after the re-join's reply, before any page.
  const stream = Array.from({ length: 250 }, (_, i) => ({ type: "message", room: "mia", text: `m${i + 1}`, offset: `${i + 1}-0` }));
  const after = (since) => stream.filter((e) => BigInt(e.offset.split("-")[0]) > BigInt(since.split("-")[0]));
  let limited = 1; // the first `history` page is answered RATE_LIMITED once
  const server = new FakeServer(
    welcoming((socket, frame) => {
      if (frame.type === "join") {
        if (socket.index === 0) {
          socket.deliver({ type: "ok", re: frame.id, room: { id: "mia" }, history: [stream[0]], recovered: true, more: false });
          return;
        }
        const rest = after(frame.since);
        socket.deliver({ type: "ok", re: frame.id, room: { id: "mia" }, history: rest.slice(0, 100), recovered: true, more: true, next: rest[99].offset });
        socket.deliver({ type: "message", room: "mia", text: "live1", offset: "251-0" });
        socket.deliver({ type: "message", room: "mia", text: "live2", offset: "252-0" });
      } else if (frame.type === "history") {
        const rest = after(frame.since);
        if (rest.length < 150 && limited) {
          limited -= 1;
          socket.deliver({ type: "error", re: frame.id, code: "RATE_LIMITED", message: "too many commands" });
          return;
        }
        const page = rest.slice(0, 100);
        const more = rest.length > 100;
        // Events of a ticket show without a ticket are left out: `next` still moves on.
        const shown = page.filter((e) => e.offset !== "150-0");
        socket.deliver({ type: "ok", re: frame.id, room: "mia", history: shown, recovered: true, more, next: more ? page.at(-1).offset : undefined });
      }
    }),
  );
  const joined = [];
  const events = [];
  const conn = connect(server, {
    onJoined: (room, reply, rejoined) => joined.push([reply.history.map((e) => e.text), reply.more, rejoined]),
    onEvent: (e) => events.push(e.text),
  }, { historyRetryMs: 1 });
  await conn.whenReady();
  await conn.join("mia");
  conn.drop();
  await until(() => server.sockets.length === 2 && conn.online, "reconnected");
  assert.deepEqual(
    server.sent("history").map((f) => [f.room, f.since]),
    [["mia", "101-0"], ["mia", "101-0"], ["mia", "201-0"]],
  );
  assert.equal(joined.length, 2);
  const [texts, more, rejoined] = joined[1];
  const visible = stream.slice(1).filter((e) => e.offset !== "150-0");
  assert.deepEqual(texts, visible.map((e) => e.text)); // every missed event, once, in order
  assert.equal(more, false);
  assert.equal(rejoined, true);
  assert.deepEqual(events, ["live1", "live2"]); // after the pages, not among them
  assert.equal(conn.rooms.get("mia"), "252-0");
  conn.stop();
});

test("a page that fails for good drops the socket; the re-join asks for the pages again", async () => {
  let failing = true;
  const server = new FakeServer(
    welcoming((socket, frame) => {
      if (frame.type === "join") {
        const first = { type: "message", room: "mia", text: "a", offset: "1-0" };
        socket.deliver({ type: "ok", re: frame.id, room: { id: "mia" }, history: [first], recovered: true, more: true, next: "1-0" });
        socket.deliver({ type: "message", room: "mia", text: "live", offset: "9-0" });
      } else if (frame.type === "history") {
        if (failing) {
          failing = false;
          socket.deliver({ type: "error", re: frame.id, code: "NOT_IN_ROOM", message: "kicked meanwhile" });
          return;
        }
        const rest = [{ type: "message", room: "mia", text: "b", offset: "2-0" }];
        socket.deliver({ type: "ok", re: frame.id, room: "mia", history: rest, recovered: true, more: false });
      }
    }),
  );
  const events = [];
  const conn = connect(server, { onEvent: (e) => events.push(e.text) });
  await conn.whenReady();
  const err = await conn.join("mia").catch((e) => e);
  assert.equal(err.code, "NOT_IN_ROOM");
  await until(() => server.sockets.length === 2 && conn.online, "reconnected");
  assert.equal(server.sockets[0].closedWith.code, 4000);
  // Held on the first socket and dropped with it; delivered once, after the re-join's pages.
  assert.deepEqual(events, ["live"]);
  // Nothing was delivered before: the re-join reads the room from its first event.
  assert.equal(server.sent("join").at(-1).since, "0-0");
  conn.stop();
});
