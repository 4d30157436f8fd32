// The HTTP helpers against a recording fetch (no server).
import assert from "node:assert/strict";
import { test } from "node:test";

import { CommandError, HttpApi, httpRequest } from "../tokenchat.js";

/** A fetch that records its calls and answers with `respond(url, init)`. */
function recording(respond) {
  const calls = [];
  const fetch = async (url, init) => {
    calls.push({ url, ...init, body: init.body === undefined ? undefined : JSON.parse(init.body) });
    return respond(url, init);
  };
  return { calls, fetch };
}

const json = (status, body) => new Response(JSON.stringify(body), { status, headers: { "Content-Type": "application/json" } });

test("a call sends JSON with the bearer token and returns the JSON reply", async () => {
  const { calls, fetch } = recording(() => json(200, { balance: 650, tx: "t1", bundle: "fan", tokens: 550 }));
  const api = new HttpApi("http://h:8000/", "tok", { fetch });
  const reply = await api.purchase("fan", "ref-1");
  assert.equal(reply.balance, 650);
  assert.deepEqual(calls, [
    {
      url: "http://h:8000/v1/purchases",
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: "Bearer tok" },
      body: { bundle: "fan", payment_ref: "ref-1" },
    },
  ]);
});

test("paths and queries are encoded; undefined query values are left out", async () => {
  const { calls, fetch } = recording(() => json(200, { transactions: [], next: null, items: [], bundles: [] }));
  const api = new HttpApi("http://h", null, { fetch });
  await api.transactions({ kind: "tip", limit: 5 });
  await api.transactions();
  await api.menu("a/b c");
  await api.rooms({ sort: "viewers", tag: undefined });
  assert.deepEqual(
    calls.map((c) => c.url),
    [
      "http://h/v1/me/transactions?kind=tip&limit=5",
      "http://h/v1/me/transactions",
      "http://h/v1/users/a%2Fb%20c/menu",
      "http://h/v1/rooms?sort=viewers",
    ],
  );
  assert.ok(calls.every((c) => c.method === "GET" && !c.headers.Authorization && c.body === undefined));
});

test("errors carry the API's code and fields; other failures get their own codes", async () => {
  const cases = [
    [() => json(409, { error: { code: "CONFLICT", message: "used", extra: 1 } }), "CONFLICT"],
    [() => new Response("Method Not Allowed", { status: 405, statusText: "Method Not Allowed" }), "HTTP_405"],
    [
      () => {
        throw new TypeError("fetch failed");
      },
      "OFFLINE",
    ],
  ];
  for (const [respond, code] of cases) {
    const { fetch } = recording(respond);
    const err = await httpRequest("POST", "/x", { body: {}, fetch }).catch((e) => e);
    assert.ok(err instanceof CommandError, code);
    assert.equal(err.code, code);
  }
  const { fetch } = recording(() => json(409, { error: { code: "SPEND_LIMIT", message: "m", window: "daily" } }));
  const err = await httpRequest("GET", "/x", { fetch }).catch((e) => e);
  assert.equal(err.reply.window, "daily");
});
