// A scripted stand-in for the gateway, for the unit tests: a WebSocket class
// whose sockets hand every command to `respond(socket, frame)`. Not a test
// file itself (no .test. in its name): node --test does not run it.

export class FakeServer {
  constructor(respond) {
    this.respond = respond;
    this.sockets = [];
    this.frames = []; // every command received, across sockets: [socketIndex, frame]
    const server = this;
    this.WebSocket = class FakeSocket {
      constructor(url, protocol) {
        this.url = url;
        this.protocol = protocol;
        this.binaryType = "blob";
        this.closedWith = null;
        this.index = server.sockets.length;
        server.sockets.push(this);
        setTimeout(() => this.onopen?.({}), 0);
      }

      send(data) {
        const frame = JSON.parse(data);
        server.frames.push([this.index, frame]);
        server.respond(this, frame);
      }

      /** The client closing: its onclose comes next, as in a browser. */
      close(code = 1005, reason = "") {
        if (this.closedWith) return;
        this.closedWith = { code, reason };
        setTimeout(() => this.onclose?.({ code, reason }), 0);
      }

      /** The server sending a frame (an object, or raw data as is). */
      deliver(frame) {
        const data = typeof frame === "string" || frame instanceof ArrayBuffer ? frame : JSON.stringify(frame);
        this.onmessage?.({ data });
      }

      /** The server closing the connection. */
      serverClose(code, reason = "") {
        this.close(code, reason);
      }
    };
  }

  /** The commands of one type, in order. */
  sent(type) {
    return this.frames.filter(([, f]) => f.type === type).map(([i, f]) => ({ socket: i, ...f }));
  }
}

/** Answers hello with a welcome; everything else goes to `rest`. */
export function welcoming(rest = () => {}) {
  return (socket, frame) => {
    if (frame.type === "hello") {
      socket.deliver({
        type: "welcome",
        re: frame.id,
        user: { id: frame.token, role: "fan" },
        balance: 100,
        session: `s${socket.index}`,
      });
      return;
    }
    rest(socket, frame);
  };
}

/** Resolves after `ms` milliseconds. */
export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Polls `check` until it is true, or fails after `timeoutMs`. */
export async function until(check, what, timeoutMs = 2000) {
  const end = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(2);
  }
}

// Fast timings for the tests (ms).
export const FAST = { backoffFirstMs: 5, backoffMaxMs: 20, replyTimeoutMs: 200, rateLimitedWaitMs: 8000 };
