// The client against a REAL tokenchat server: run by
// tests/client_demo/test_js_client.py, which starts the server (on the test
// Redis and Postgres, its own key prefix and schema), credits the fan and
// passes, in the environment:
//   TOKENCHAT_WS_URL      the gateway, ws://127.0.0.1:PORT/ws
//   TOKENCHAT_MODEL_TOKEN a model's token (her room is her id)
//   TOKENCHAT_FAN_TOKEN   a fan's token, with TOKENCHAT_FAN_BALANCE tokens
//   TOKENCHAT_MODEL, TOKENCHAT_FAN the two user ids
//   TOKENCHAT_HTTP_URL    the HTTP API (its payment provider is `fake`)
// The name has no ".test." on purpose: `node --test client_demo/js/` (the unit
// tests) does not pick it up without a server. By hand:
//   TOKENCHAT_WS_URL=... node [--experimental-websocket on Node 20] --test client_demo/js/tests/live_server.mjs
import assert from "node:assert/strict";
import { after, test } from "node:test";

import { Connection, HttpApi, newKey } from "../tokenchat.js";

const env = (name) => {
  const value = process.env[name];
  assert.ok(value, `${name} is not set (tests/client_demo/test_js_client.py sets it)`);
  return value;
};
const URL = env("TOKENCHAT_WS_URL");
const HTTP_URL = env("TOKENCHAT_HTTP_URL");
const MODEL = env("TOKENCHAT_MODEL");
const FAN = env("TOKENCHAT_FAN");
const BALANCE = Number(env("TOKENCHAT_FAN_BALANCE"));
// Reconnect fast: the test drops connections on purpose (ms).
const FAST = { backoffFirstMs: 50, backoffMaxMs: 200 };
const WAIT_MS = 5000; // the longest any step may take against a live local server

const opened = [];

/** A started connection that records its events, joins and statuses. */
function open(token) {
  const seen = { events: [], joined: [], statuses: [], fatal: null };
  const conn = new Connection(
    URL,
    token,
    {
      onEvent: (e) => seen.events.push(e),
      onJoined: (room, reply, rejoined) => seen.joined.push({ room, reply, rejoined }),
      onStatus: (s) => seen.statuses.push(s),
      onFatal: (message, close) => (seen.fatal = { message, close }),
    },
    FAST,
  );
  conn.seen = seen;
  opened.push(conn);
  conn.start();
  return conn;
}

async function until(check, what) {
  const end = Date.now() + WAIT_MS;
  while (!check()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

after(() => {
  for (const conn of opened) conn.stop();
});

const model = open(env("TOKENCHAT_MODEL_TOKEN"));
const fan = open(env("TOKENCHAT_FAN_TOKEN"));

test("hello: both welcomed with their ids and balances", async () => {
  await Promise.all([model.whenReady(WAIT_MS), fan.whenReady(WAIT_MS)]);
  assert.equal(model.welcome.user.id, MODEL);
  assert.equal(model.welcome.user.role, "model");
  assert.equal(fan.welcome.user.id, FAN);
  assert.equal(fan.welcome.balance, BALANCE);
  assert.equal(await fan.getBalance(), BALANCE);
  assert.equal((await fan.ping()).type, "ok");
});

test("join, say and the message event, with the id correlation under pipelining", async () => {
  await model.join(MODEL);
  const joined = await fan.join(MODEL);
  assert.equal(joined.room.owner, MODEL);
  // Pipelined: three commands in flight, each reply to its own promise.
  const [said, balance, pong] = await Promise.all([
    model.say(MODEL, "hello from node"),
    fan.getBalance(),
    fan.ping(),
  ]);
  assert.match(said.offset, /^\d+-\d+$/);
  assert.equal(balance, BALANCE);
  assert.equal(pong.type, "ok");
  await until(() => fan.seen.events.some((e) => e.type === "message" && e.offset === said.offset), "the message");
});

test("errors come with their codes, and the session stays usable", async () => {
  const poor = await fan.tip(MODEL, BALANCE + 1).catch((e) => e);
  assert.equal(poor.code, "INSUFFICIENT_FUNDS");
  const nowhere = await fan.join("nobody_here").catch((e) => e);
  assert.equal(nowhere.code, "NOT_FOUND");
  assert.ok(!fan.rooms.has("nobody_here"));
  const own = await model.tip(MODEL, 1).catch((e) => e);
  assert.equal(own.code, "FORBIDDEN");
  const unknown = await fan.request("no_such_command").catch((e) => e);
  assert.equal(unknown.code, "UNKNOWN_COMMAND");
  assert.equal(await fan.getBalance(), BALANCE);
});

test("a tip is charged once, however often its key is sent", async () => {
  const key = newKey();
  const first = await fan.tip(MODEL, 5, { key, text: "for the song" });
  assert.equal(first.balance, BALANCE - 5);
  assert.ok(!first.duplicate);
  const again = await fan.tip(MODEL, 5, { key, text: "for the song" });
  assert.equal(again.duplicate, true);
  assert.equal(again.tx, first.tx);
  const conflict = await fan.tip(MODEL, 6, { key, text: "for the song" }).catch((e) => e);
  assert.equal(conflict.code, "CONFLICT");
  assert.equal(await fan.getBalance(), BALANCE - 5);
  // One tip event, for both the model and the fan (every member, the sender
  // included), named by the reply's tx: a relaying server (delivery mode
  // `relay`) acknowledges a tip without its offset.
  if (process.env.TOKENCHAT_DELIVERY === "relay") assert.equal(first.offset, undefined);
  else assert.match(first.offset, /^\d+-\d+$/);
  for (const who of [model, fan]) {
    await until(() => who.seen.events.some((e) => e.type === "tip" && e.tx === first.tx), "the tip event");
    assert.equal(who.seen.events.filter((e) => e.type === "tip").length, 1);
  }
});

test("after a drop: reconnect, re-join with since, the missed message once", async () => {
  const before = fan.seen.joined.length;
  const last = fan.rooms.get(MODEL);
  assert.ok(last, "an offset was seen in the room");
  fan.drop();
  await until(() => !fan.online, "the drop");
  const missed = await model.say(MODEL, "said while you were away");
  await fan.whenReady(WAIT_MS);
  const rejoin = fan.seen.joined.slice(before).find((j) => j.rejoined);
  assert.ok(rejoin, "re-joined after the reconnect");
  assert.deepEqual(
    rejoin.reply.history.map((e) => e.offset),
    [missed.offset],
    "history holds only what was missed",
  );
  assert.equal(rejoin.reply.recovered, true);
  assert.equal(fan.rooms.get(MODEL), missed.offset);
  assert.ok(fan.seen.statuses.includes("reconnecting"));
  // Live events keep coming, each once.
  const live = await model.say(MODEL, "and now live");
  await until(() => fan.seen.events.some((e) => e.offset === live.offset), "the live message");
  const offsets = fan.seen.events.filter((e) => e.type === "message").map((e) => e.offset);
  assert.equal(new Set(offsets).size, offsets.length, "no event twice");
});

test("a tip sent while offline goes out after the reconnect, charged once", async () => {
  const start = await fan.getBalance();
  fan.drop();
  await until(() => !fan.online, "the drop");
  const tip = fan.tip(MODEL, 3); // waits for the connection
  assert.equal((await fan.say(MODEL, "x").catch((e) => e)).code, "OFFLINE");
  const reply = await tip;
  assert.equal(reply.balance, start - 3);
  assert.equal(await fan.getBalance(), start - 3);
});

test("HTTP: the ledger lists each tip once; a purchase credits once per payment_ref", async () => {
  const api = new HttpApi(HTTP_URL, env("TOKENCHAT_FAN_TOKEN"));
  const { transactions } = await api.transactions({ kind: "tip" });
  assert.deepEqual(transactions.map((t) => t.amount).sort(), [-3, -5]);
  const me = await api.me();
  assert.equal(me.user.id, FAN);
  assert.equal(me.balance, BALANCE - 8);
  const { ws_url } = await new HttpApi(HTTP_URL).config();
  assert.match(ws_url, /^ws:\/\/.+\/ws$/);
  const [smallest] = (await api.bundles()).sort((a, b) => a.tokens - b.tokens);
  const before = await fan.getBalance();
  const ref = `js-${newKey()}`;
  const bought = await api.purchase(smallest.id, ref);
  assert.equal(bought.balance, before + smallest.tokens);
  const again = await api.purchase(smallest.id, ref);
  assert.equal(again.duplicate, true);
  assert.equal(again.tx, bought.tx);
  // The session hears of it: a balance event.
  await until(() => fan.seen.events.some((e) => e.type === "balance" && e.balance === bought.balance), "the balance event");
  assert.equal(await fan.getBalance(), before + smallest.tokens);
  const refused = await api.purchase(smallest.id, "declined-card").catch((e) => e);
  assert.equal(refused.code, "FORBIDDEN");
  const anonymous = await new HttpApi(HTTP_URL).transactions().catch((e) => e);
  assert.equal(anonymous.code, "UNAUTHENTICATED");
});

test("a refused token is fatal: close 4001, no reconnect", async () => {
  const bad = open("not-a-token");
  const refused = await bad.whenReady(WAIT_MS).catch((e) => e);
  assert.equal(refused.code, "OFFLINE");
  assert.equal(bad.seen.fatal.close.code, 4001);
  assert.match(bad.seen.fatal.message, /refused or has expired/);
  assert.ok(!bad.online);
});
