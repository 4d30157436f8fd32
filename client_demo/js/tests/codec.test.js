// The pure parts: codec, offsets, backoff, keys (no socket).
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  backoffDelay,
  classify,
  compareOffsets,
  DEFAULTS,
  decodeFrame,
  encodeFrame,
  newKey,
  parseOffset,
} from "../tokenchat.js";

test("encodeFrame writes the fields, the type and the id", () => {
  assert.deepEqual(JSON.parse(encodeFrame("tip", { room: "mia", amount: 5, key: "k" }, 7)), {
    room: "mia",
    amount: 5,
    key: "k",
    type: "tip",
    id: 7,
  });
  // A field named type cannot change the command; no id means none sent.
  assert.deepEqual(JSON.parse(encodeFrame("ping", { type: "tip" })), { type: "ping" });
  assert.throws(() => encodeFrame("", {}, 1), TypeError);
});

test("decodeFrame reads JSON objects from text and binary frames", () => {
  const frame = { type: "ok", re: 1, balance: 5 };
  const text = JSON.stringify(frame);
  assert.deepEqual(decodeFrame(text), frame);
  const bytes = new TextEncoder().encode(text);
  assert.deepEqual(decodeFrame(bytes), frame);
  assert.deepEqual(decodeFrame(bytes.buffer), frame);
  // Unicode survives the binary path.
  assert.equal(decodeFrame(new TextEncoder().encode('{"type":"message","text":"héllo ✓"}')).text, "héllo ✓");
});

test("decodeFrame refuses what is not a typed JSON object", () => {
  for (const bad of ["", "{", "[]", "null", "5", '"ok"', '{"re":1}', '{"type":5}']) {
    assert.equal(decodeFrame(bad), null, bad);
  }
  assert.equal(decodeFrame(new Uint8Array([0xff, 0xfe, 0x7b])), null); // not UTF-8
  assert.equal(decodeFrame({ type: "ok" }), null); // not a frame's data
  assert.equal(decodeFrame(undefined), null);
});

test("classify tells replies from events by type and re", () => {
  assert.equal(classify({ type: "ok", re: 1 }), "reply");
  assert.equal(classify({ type: "welcome", re: "a" }), "reply");
  assert.equal(classify({ type: "error", re: 0, code: "X" }), "reply");
  // An error about a frame whose id could not be read has no re: an event.
  assert.equal(classify({ type: "error", code: "BAD_REQUEST" }), "event");
  assert.equal(classify({ type: "error", re: null, code: "BAD_REQUEST" }), "event");
  assert.equal(classify({ type: "message", room: "r", offset: "1-0" }), "event");
});

test("offsets compare as two 64-bit numbers", () => {
  assert.equal(compareOffsets("1-0", "1-0"), 0);
  assert.equal(compareOffsets("1-0", "1-1"), -1);
  assert.equal(compareOffsets("2-0", "1-9"), 1);
  assert.equal(compareOffsets("10-0", "9-0"), 1); // numeric, not string order
  // Beyond 2^53 a Number would round these to the same value.
  assert.equal(compareOffsets("9007199254740993-0", "9007199254740992-0"), 1);
  assert.equal(compareOffsets("1-18446744073709551615", "1-18446744073709551614"), 1);
  assert.deepEqual(parseOffset("12-3"), [12n, 3n]);
  for (const other of ["", "1", "1-", "-1", "a-b", "1-2-3", " 1-2", 5, null, undefined]) {
    assert.equal(parseOffset(other), null, String(other));
  }
  assert.equal(compareOffsets("x", "1-0"), null);
});

test("backoff doubles from the first delay up to the cap, with jitter of ±25 %", () => {
  const low = () => 0;
  const high = () => 0.999999;
  const options = { backoffFirstMs: 1000, backoffMaxMs: 15000 };
  assert.deepEqual(
    [0, 1, 2, 3, 4, 5, 40].map((n) => backoffDelay(n, options, () => 0.5)),
    [1000, 2000, 4000, 8000, 15000, 15000, 15000],
  );
  assert.equal(backoffDelay(0, options, low), 750);
  assert.equal(backoffDelay(0, options, high), 1250);
  assert.equal(backoffDelay(10, options, low), 11250);
  // The defaults are the page's: about 1 s first.
  const first = backoffDelay(0);
  assert.ok(first >= DEFAULTS.backoffFirstMs * 0.75 && first <= DEFAULTS.backoffFirstMs * 1.25, first);
  // Random jitter spreads clients out.
  const spread = new Set(Array.from({ length: 50 }, () => backoffDelay(3, options)));
  assert.ok(spread.size > 10, `jitter too narrow: ${[...spread]}`);
});

test("newKey makes distinct UUIDs, with or without randomUUID", () => {
  const uuid = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;
  const keys = new Set(Array.from({ length: 100 }, newKey));
  assert.equal(keys.size, 100);
  for (const key of keys) assert.match(key, uuid);
  const saved = Object.getOwnPropertyDescriptor(globalThis.crypto, "randomUUID");
  Object.defineProperty(globalThis.crypto, "randomUUID", { value: undefined, configurable: true });
  try {
    assert.match(newKey(), uuid); // the getRandomValues path (an insecure context)
  } finally {
    if (saved) Object.defineProperty(globalThis.crypto, "randomUUID", saved);
    else delete globalThis.crypto.randomUUID;
  }
});
