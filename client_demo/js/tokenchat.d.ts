// Type definitions for tokenchat.js (the tokenchat wire protocol v1, docs/protocol.md).
// Replies and events are typed by their common fields; each command's and
// event's other fields are in docs/protocol.md.

export declare const VERSION: string;
export declare const SUBPROTOCOL: "tokenchat.v1.json";

export interface Timings {
  /** Reconnect backoff: the first retry's delay, doubled per attempt (ms). */
  backoffFirstMs: number;
  /** Reconnect backoff cap (ms). */
  backoffMaxMs: number;
  /** The least wait after close 4029 (ms). */
  rateLimitedWaitMs: number;
  /** A non-spend command fails with TIMEOUT after this long without a reply (ms). */
  replyTimeoutMs: number;
  /** Resends of a spend answered UNAVAILABLE or RATE_LIMITED. */
  spendRetriesMax: number;
  /** Wait before asking again for a history page answered RATE_LIMITED or UNAVAILABLE (ms). */
  historyRetryMs: number;
  /** Such retries in one room's paging. */
  historyRetriesMax: number;
}
export declare const DEFAULTS: Readonly<Timings>;
export declare const FATAL_CLOSES: ReadonlyMap<number, string>;
export declare const RATE_LIMITED_CLOSE: 4029;
export declare const BEFORE_ANY_OFFSET: "0-0";
export declare const CLIENT_DROP_CLOSE: 4000;
export declare const SPENDS: ReadonlySet<string>;
export declare const SPEND_RETRY_CODES: ReadonlySet<string>;

/** The server's error codes (docs/protocol.md, "Error codes"), and the
 * client's own: OFFLINE (not connected, dropped, stopped), TIMEOUT. */
export type ErrorCode =
  | "BAD_REQUEST"
  | "UNKNOWN_COMMAND"
  | "UNAUTHENTICATED"
  | "FORBIDDEN"
  | "NOT_FOUND"
  | "NOT_IN_ROOM"
  | "INSUFFICIENT_FUNDS"
  | "PRICE_CHANGED"
  | "CONFLICT"
  | "LIMIT_EXCEEDED"
  | "SPEND_LIMIT"
  | "SELF_EXCLUDED"
  | "RATE_LIMITED"
  | "UNAVAILABLE"
  | "INTERNAL"
  | "BANNED"
  | "MUTED"
  | "SLOW_MODE"
  /** HTTP only (410): a GET /v1/rooms cursor whose ranking is no longer kept. */
  | "CURSOR_EXPIRED"
  | "OFFLINE"
  | "TIMEOUT";

export interface ErrorReply {
  type?: "error";
  re?: number | string;
  code: ErrorCode | (string & {});
  message?: string;
  /** MUTED, BANNED, SLOW_MODE, SELF_EXCLUDED: until when (ms). */
  until?: number;
  [field: string]: unknown;
}

export declare class CommandError extends Error {
  constructor(reply: ErrorReply);
  readonly name: "CommandError";
  readonly code: ErrorCode | (string & {});
  readonly reply: ErrorReply;
}

/** A frame from the server: a reply or an event, told apart by `type`. */
export interface Frame {
  type: string;
  [field: string]: unknown;
}
export interface Reply extends Frame {
  type: "ok" | "welcome";
  re: number | string;
}
/** The ok reply of a spend. `duplicate`: a retry of an applied spend; the
 * balance is then that of its time. */
export interface SpendReply extends Reply {
  tx: string | null;
  balance: number;
  duplicate?: boolean;
}
/** A tip's reply: `offset` is absent when the server relays tips to rooms
 * (delivery mode `relay`, Redis Cluster): the tip is in the room's history
 * only once its `tip` event, carrying the same `tx`, arrives. */
export interface TipReply extends SpendReply {
  offset?: string;
}
export interface Welcome extends Reply {
  type: "welcome";
  session: string;
  user: { id: string; role: "fan" | "model" | "admin" };
  balance: number;
}
export interface RoomEvent extends Frame {
  room: string;
  offset: string;
  ts: number;
}
export interface JoinReply extends Reply {
  room: { id: string; owner: string; viewers: number; tip_min: number; [field: string]: unknown };
  /** Only the events not seen yet (a re-join asks with `since`): every page
   * of them, read with `history` while the server said `more`. */
  history: RoomEvent[];
  /** false: some events after `since` are gone. */
  recovered?: boolean;
  /** false once every page is read (the client reads them before resolving). */
  more?: boolean;
}

export declare function encodeFrame(
  type: string,
  fields?: Record<string, unknown>,
  id?: number | string,
): string;
export declare function decodeFrame(data: string | ArrayBuffer | ArrayBufferView): Frame | null;
export declare function classify(frame: Frame): "reply" | "event";
export declare function parseOffset(offset: unknown): [bigint, bigint] | null;
export declare function compareOffsets(a: string, b: string): -1 | 0 | 1 | null;
export declare function backoffDelay(
  attempt: number,
  options?: Partial<Pick<Timings, "backoffFirstMs" | "backoffMaxMs">>,
  random?: () => number,
): number;
export declare function newKey(): string;

export type Status = "connecting" | "online" | "reconnecting" | "offline";
export type TokenSource = string | (() => string | Promise<string>);

export interface Handlers {
  onWelcome?(welcome: Welcome, reconnected: boolean): void;
  onJoined?(room: string, reply: JoinReply, rejoined: boolean): void;
  onRoomLost?(room: string, error: CommandError): void;
  onReady?(reconnected: boolean): void;
  onEvent?(event: Frame): void;
  onStatus?(state: Status, detail: string): void;
  onFatal?(message: string, close: { code: number; reason: string } | null): void;
}

export interface WebSocketLike {
  binaryType: string;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

export interface ConnectionOptions extends Partial<Timings> {
  WebSocket?: new (url: string, protocols?: string | string[]) => WebSocketLike;
  random?: () => number;
  /** Other gateway nodes: each reconnect attempt dials the next of [url, ...these]. */
  failoverUrls?: string[];
}

export interface SpendOptions {
  /** The idempotency key (a new UUID by default). Reuse it to retry the same spend. */
  key?: string;
}

export declare class Connection {
  constructor(url: string, token: TokenSource, handlers?: Handlers, options?: ConnectionOptions);
  /** The URL dialled, or to dial at the next attempt. */
  readonly url: string;
  readonly urls: string[];
  token: TokenSource;
  /** The rooms joined, each with the last offset seen (null: none yet). */
  readonly rooms: Map<string, string | null>;
  readonly welcome: Welcome | null;
  readonly online: boolean;
  start(): void;
  stop(): void;
  drop(): void;
  reconnectNow(): void;
  whenReady(timeoutMs?: number): Promise<void>;

  request<R extends Reply = Reply>(type: string, fields?: Record<string, unknown>): Promise<R>;
  join(room: string): Promise<JoinReply>;
  leave(room: string): Promise<void>;
  say(room: string, text: string): Promise<Reply>;
  ping(): Promise<Reply>;
  getBalance(): Promise<number>;
  tip(room: string, amount: number, options?: SpendOptions & { text?: string }): Promise<TipReply>;
  tipItem(
    room: string,
    item: string,
    options?: SpendOptions & { text?: string; maxPrice?: number },
  ): Promise<TipReply & { item: string; price: number }>;
  dm(
    to: string,
    text: string,
    options?: SpendOptions & { maxPrice?: number; media?: string },
  ): Promise<SpendReply>;
  unlock(
    media: string,
    options?: SpendOptions & { maxPrice?: number },
  ): Promise<SpendReply & { url: string; already?: boolean }>;
  postMedia(room: string, media: string, text?: string): Promise<Reply>;
  requestOffer(model: string, text: string, amount: number, options?: SpendOptions): Promise<SpendReply & { request: string }>;
  requestAccept(request: string): Promise<Reply>;
  requestDeliver(request: string, options?: { text?: string; media?: string }): Promise<Reply>;
  requestDecline(request: string): Promise<Reply>;
  requestCancel(request: string): Promise<Reply>;
  requests(): Promise<Frame[]>;
  privateRequest(model: string, rate: number, options?: SpendOptions): Promise<Reply & { show: string }>;
  privateAccept(show: string): Promise<Reply & { room: string }>;
  privateDecline(show: string): Promise<Reply>;
  privateEnd(show: string): Promise<Reply>;
  buyTicket(room: string, show: string, options?: SpendOptions): Promise<SpendReply & { already?: boolean }>;
  showStart(show: string): Promise<Reply>;
  showEnd(show: string): Promise<Reply>;
  showCancel(show: string): Promise<Reply>;
  mute(room: string, user: string, seconds: number): Promise<Reply>;
  unmute(room: string, user: string): Promise<Reply>;
  kick(room: string, user: string): Promise<Reply>;
  ban(room: string, user: string, options?: { seconds?: number }): Promise<Reply>;
  unban(room: string, user: string): Promise<Reply>;
  clear(room: string, user: string): Promise<Reply>;
  slow(room: string, seconds: number): Promise<Reply>;
  spend<R extends Reply = SpendReply>(
    type: string,
    key: string | undefined,
    fields: Record<string, unknown>,
  ): Promise<R>;
}

// --- the HTTP API ---------------------------------------------------------------------

export type Fetch = (url: string, init: RequestInit) => Promise<Response>;

/** One HTTP API call: the JSON reply, or a CommandError with the reply's
 * `error`, `OFFLINE` (unreachable) or `HTTP_<status>` (not the API's JSON). */
export declare function httpRequest<T = unknown>(
  method: string,
  url: string,
  options?: { body?: unknown; token?: string | null; fetch?: Fetch },
): Promise<T>;

export interface MenuItem {
  id: string;
  label: string;
  price: number;
}
export interface Bundle {
  id: string;
  tokens: number;
  price_cents: number;
  discount_pct: number;
}
export interface Transaction {
  tx: string;
  kind: string;
  ts: number;
  /** Signed: negative for what the caller paid. */
  amount: number;
  counterparty: string;
  [field: string]: unknown;
}

export declare class HttpApi {
  constructor(baseUrl: string, token?: string | null, options?: { fetch?: Fetch });
  readonly baseUrl: string;
  token: string | null;
  call<T = unknown>(method: string, path: string, body?: unknown): Promise<T>;
  config(): Promise<{ ws_url: string; dev_mode: boolean }>;
  devToken(user: string, role?: "fan" | "model"): Promise<string>;
  me(): Promise<{ user: { id: string; role: string }; balance: number }>;
  rooms(params?: Record<string, string | number | undefined>): Promise<{ rooms: Frame[]; [field: string]: unknown }>;
  prices(user: string): Promise<{ dm: number; private_rate: number; private_min_s: number }>;
  menu(user: string): Promise<MenuItem[]>;
  bundles(): Promise<Bundle[]>;
  purchase(
    bundle: string,
    paymentRef: string,
  ): Promise<{ balance: number; tx: string; bundle: string; tokens: number; duplicate?: boolean }>;
  transactions(options?: {
    kind?: string;
    before?: string;
    limit?: number;
  }): Promise<{ transactions: Transaction[]; next: string | null }>;
  receipt(tx: string): Promise<Transaction & Record<string, unknown>>;
  mediaUrl(media: string): Promise<{ url: string; [field: string]: unknown }>;
}
