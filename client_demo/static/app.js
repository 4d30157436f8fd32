// The tokenchat demo page: sign in, live rooms, chat, tips, tip menus, paid
// private messages, a model's earnings, prices and tip menu. Plain DOM, no framework. Every
// text from the network goes through textContent, never innerHTML.

// The JavaScript client package (client_demo/js), served at /js/.
import { CommandError, Connection, httpRequest, newKey } from "../js/tokenchat.js";
import { burst } from "./effects.js";

const $ = (id) => document.getElementById(id);
const ROOMS_REFRESH_MS = 5000;
const LOG_MAX = 200; // chat lines kept per room
const TOKEN_STORAGE = "tokenchat.token"; // per tab: two tabs can be two users
const TOAST_MS = { info: 5000, success: 3500, error: 9000 };
// A tip menu's limits (protocol/limits.py): items per menu, label length.
const MENU_ITEMS_MAX = 50;
const MENU_LABEL_LEN_MAX = 40;

const state = {
  config: { ws_url: null, dev_mode: false },
  token: null,
  me: null, // {id, role}
  balance: null,
  conn: null,
  room: null, // the room on screen
  rooms: new Map(), // room id -> {id, owner, viewers, tip_min} from the list or a join
  following: new Set(), // models this user follows (GET /v1/me/follows)
  logs: new Map(), // room id -> chat entries
  dm: null, // {to, price, key, signature}
  earned: 0,
  counted: new Set(), // tips already counted as earnings, by transaction (offset if none)
  unlocked: new Map(), // media id -> the content's signed URL (owned or unlocked here)
  menus: new Map(), // room id -> its owner's tip menu [{id, label, price}], as last read
  roomsTimer: null,
  roomsCursor: null, // the grid's next page (GET /v1/rooms next_cursor), null: all shown
  roomsShown: 0, // cards on the grid: a refresh re-reads as many
  roomsSeq: 0, // the newest grid read: an older reply arriving late is dropped
  requests: new Map(), // request id -> the request, as listed and in `request` events
  show: null, // the private show on the card (the newest one seen), as in `private` events
  privatePrice: null, // {model, rate, min_s}: the rate shown in the model's room
  shows: new Map(), // room id -> {show, ticket}: its ticket show (join, `show` events)
  kings: new Map(), // room id -> its king {user, tokens} or null (join, `king` events)
  tiers: [], // [{tier, name, min_tokens}] from GET /v1/tiers: an event's `tier` indexes it
  goals: new Map(), // room id -> its tip goal {id, title, target, progress, state, ...} (join, `goal` events)
};
// For the console and the browser test: the state, and a way to drop the socket.
window.tokenchat = state;

// --- small helpers ----------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function plural(n, one, many = `${one}s`) {
  return `${n.toLocaleString()} ${n === 1 ? one : many}`;
}

function tokens(n) {
  return plural(n, "token");
}

function clock(ts) {
  return new Date(ts || Date.now()).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function api(method, path, body, { auth = true } = {}) {
  return httpRequest(method, path, { body, token: auth ? state.token : null });
}

// --- messages for people ----------------------------------------------------------------
function sentence(text) {
  const t = String(text || "").trim();
  if (!t) return "";
  const s = t[0].toUpperCase() + t.slice(1);
  return /[.!?…]$/.test(s) ? s : `${s}.`;
}

/** A clear sentence for a failed action (`what`: "this tip", "saving prices"...). */
function explain(err, what) {
  const code = err.code || "ERROR";
  const said = sentence(err.message);
  switch (code) {
    case "INSUFFICIENT_FUNDS":
      return `Not enough tokens for ${what}. ${said}${
        state.config.dev_mode && state.me?.role === "fan" ? " Use “Buy” to add some." : ""
      }`;
    case "RATE_LIMITED":
      return "You are going too fast: the server allows about 20 actions a second. Wait a moment, then try again.";
    case "PRICE_CHANGED":
      return `The price changed before ${what} went out. ${said} Check the new price and send again.`;
    case "OFFLINE":
      return `Not connected (${err.message}); the page is reconnecting. Try ${what} again in a moment.`;
    case "TIMEOUT":
      return `The server did not answer ${what} in time. Try again.`;
    case "NOT_IN_ROOM":
      return "You are not in this room any more. Open it again from the list.";
    case "UNAVAILABLE":
      return `The service is having trouble right now. ${said} Try again shortly.`;
    case "LIMIT_EXCEEDED":
      return `A limit was reached. ${said}`;
    case "SPEND_LIMIT":
      return showLimitRefusal(spendLimitText(err.reply || err));
    case "SELF_EXCLUDED":
      return showLimitRefusal(
        `You excluded yourself from spending and buying until ${when(err.reply?.until)}. Nothing was charged.`,
      );
    case "FORBIDDEN":
      return `Not allowed. ${said}`;
    case "NOT_FOUND":
      return `Not found. ${said}`;
    case "UNAUTHENTICATED":
      return `You are signed out. ${said} Sign in again.`;
    case "BAD_REQUEST":
      return `That did not work: ${said}`;
    case "MUTED":
    case "BANNED":
    case "SLOW_MODE":
      return sentence(`${err.message}${untilText(err.reply?.until)}`);
    default:
      return `${what[0].toUpperCase()}${what.slice(1)} failed: ${said} (${code})`;
  }
}

function toast(text, kind = "info") {
  const region = kind === "error" ? $("toasts-alert") : $("toasts-polite");
  const close = el("button", { type: "button", class: "toast-close", "aria-label": "Dismiss" }, "×");
  const item = el("div", { class: `toast ${kind}` }, el("p", { text }), close);
  const remove = () => item.remove();
  close.addEventListener("click", remove);
  region.append(item);
  while (region.children.length > 3) region.firstElementChild.remove();
  setTimeout(remove, TOAST_MS[kind] ?? TOAST_MS.info);
}

function confirmDialog(title, body, okLabel) {
  const dialog = $("confirm");
  $("confirm-title").textContent = title;
  $("confirm-body").textContent = body;
  $("confirm-ok").textContent = okLabel;
  dialog.returnValue = "";
  dialog.showModal();
  $("confirm-ok").focus();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
  });
}

// --- balance ------------------------------------------------------------------------
function setBalance(balance) {
  if (typeof balance !== "number") return;
  const box = $("balance-box");
  const before = state.balance;
  state.balance = balance;
  $("balance").textContent = balance.toLocaleString();
  if (before !== null && before !== balance) {
    box.classList.remove("up", "down");
    void box.offsetWidth; // restart the animation
    box.classList.add(balance > before ? "up" : "down");
  }
}

async function refreshBalance() {
  try {
    setBalance((await state.conn.request("balance")).balance);
  } catch {
    // the next welcome or balance event brings it
  }
}

// A `balance` event travels through Redis pub/sub, a path apart from the
// replies: on a busy node the event of a purchase can arrive after the reply
// of a tip made since, and its older figure would stand. Each event is shown
// at once and then checked with a `balance` request, whose reply is newer than
// both; at most one request is in flight, and one more follows if events came
// meanwhile, so a model tipped many times a second asks about twice.
let balanceCheck = null;
let balanceCheckAgain = false;
function checkBalanceSoon() {
  if (balanceCheck) {
    balanceCheckAgain = true;
    return;
  }
  balanceCheck = refreshBalance().finally(() => {
    balanceCheck = null;
    if (balanceCheckAgain) {
      balanceCheckAgain = false;
      checkBalanceSoon();
    }
  });
}

/** The balance from a spend's reply; a duplicate carries the balance of its time. */
function balanceFromReply(reply) {
  if (reply.duplicate) refreshBalance();
  else setBalance(reply.balance);
}

// --- signing in and out ---------------------------------------------------------------
async function init() {
  try {
    state.config = await api("GET", "/v1/config", undefined, { auth: false });
  } catch (err) {
    toast(`Cannot load the page's settings: ${err.message}`, "error");
    return;
  }
  if (state.config.dev_mode) {
    $("dev-form").hidden = false;
    $("dev-user").value = `fan_${Math.random().toString(36).slice(2, 7)}`;
  } else {
    $("token-details").open = true;
  }
  const saved = sessionStorage.getItem(TOKEN_STORAGE);
  if (saved) signIn(saved);
}

async function devSignIn(user, role) {
  try {
    const { token } = await api("POST", "/v1/dev/token", { user, role }, { auth: false });
    signIn(token);
  } catch (err) {
    toast(explain(err, "signing in"), "error");
  }
}

function signIn(token) {
  if (state.conn) state.conn.stop();
  state.token = token;
  sessionStorage.setItem(TOKEN_STORAGE, token);
  state.conn = new Connection(state.config.ws_url, token, {
    onWelcome,
    onReady,
    onJoined,
    onRoomLost,
    onEvent,
    onStatus,
    onFatal,
  });
  state.conn.start();
}

function signOut(message) {
  if (state.conn) state.conn.stop();
  state.conn = null;
  state.token = null;
  state.me = null;
  state.balance = null;
  state.room = null;
  state.rooms.clear();
  state.following = new Set();
  state.logs.clear();
  state.dm = null;
  state.earned = 0;
  state.counted.clear();
  state.menus.clear();
  $("menu-rows").replaceChildren();
  state.requests.clear();
  state.show = null;
  $("private-show").hidden = true;
  $("private-empty").hidden = false;
  state.shows.clear();
  $("requests").replaceChildren();
  $("requests-empty").hidden = false;
  state.unlocked.clear();
  clearInterval(state.roomsTimer);
  state.roomsShown = 0;
  state.roomsCursor = null;
  $("rooms").replaceChildren();
  $("rooms-more").hidden = true;
  sessionStorage.removeItem(TOKEN_STORAGE);
  document.body.classList.remove("signed-in", "in-room", "is-model");
  $("account").hidden = true;
  $("layout").hidden = true;
  $("signin").hidden = false;
  $("chat").replaceChildren();
  $("dms").replaceChildren();
  $("earnings").replaceChildren();
  $("earned-total").textContent = "0";
  $("dms-empty").hidden = false;
  closeDm();
  showRoom(null);
  if (message) toast(message, "error");
}

function onWelcome(welcome) {
  state.me = welcome.user;
  setBalance(welcome.balance);
  $("me-name").textContent = welcome.user.id;
  $("me-role").textContent = welcome.user.role;
  $("buy").hidden = !(state.config.dev_mode && welcome.user.role === "fan");
  document.body.classList.add("signed-in");
  document.body.classList.toggle("is-model", welcome.user.role === "model");
  $("account").hidden = false;
  $("signin").hidden = true;
  $("layout").hidden = false;
}

async function onReady(reconnected) {
  loadRequests();
  loadPrivates();
  loadTransactions();
  loadLimits();
  if (reconnected) {
    toast("Reconnected. Caught up with the rooms you are in.", "success");
    return;
  }
  await loadFollows();
  refreshRooms();
  clearInterval(state.roomsTimer);
  state.roomsTimer = setInterval(() => {
    if (!document.hidden) refreshRooms();
  }, ROOMS_REFRESH_MS);
  if (state.me.role === "model") {
    $("studio").hidden = false;
    await openRoom(state.me.id);
    loadPrices();
    loadMenuEditor();
    openPayouts();
    loadMyProfile();
  } else {
    $("studio").hidden = true;
    $("main").focus();
  }
}

function onStatus(kind, detail) {
  const labels = {
    online: "Online",
    connecting: "Connecting…",
    reconnecting: `Reconnecting ${detail}`.trim(),
    offline: "Offline",
  };
  const box = $("conn-status");
  box.dataset.state = kind;
  box.textContent = labels[kind] ?? kind;
  // Before the first welcome the account bar is hidden: say it on the sign-in card.
  $("signin-status").textContent =
    state.me || kind === "online" || kind === "offline"
      ? ""
      : `${labels[kind] ?? kind} (${state.config.ws_url}) ${kind === "connecting" ? detail : ""}`.trim();
}

function onFatal(message) {
  signOut(message);
}

// --- the discovery grid (issue #13) ---------------------------------------------------------
// The first screen: a card per model's room (GET /v1/rooms), sorted and
// filtered, a page at a time ("Show more": the cursor continues the ranking
// page 1 was read from, so no card repeats or goes missing while ranks move).
const ROOMS_PAGE = 24; // cards a page adds: whole rows of 2, 3, 4 or 6 columns
const ROOMS_LIMIT_MAX = 200; // GET /v1/rooms's largest page: a refresh re-reads the cards shown in one call

function roomsParams() {
  const params = new URLSearchParams({ sort: $("rooms-sort").value });
  const tag = $("rooms-tag").value.trim().toLowerCase();
  const q = $("rooms-q").value.trim();
  if (tag) params.set("tag", tag);
  if (q) params.set("q", q);
  return params;
}

async function refreshRooms() {
  const params = roomsParams();
  params.set("limit", String(Math.min(ROOMS_LIMIT_MAX, Math.max(ROOMS_PAGE, state.roomsShown))));
  const seq = ++state.roomsSeq;
  let data;
  try {
    data = await api("GET", `/v1/rooms?${params}`, undefined, { auth: false });
  } catch (err) {
    if (seq === state.roomsSeq) $("rooms-note").textContent = `Could not load the rooms: ${err.message}`;
    return;
  }
  if (seq === state.roomsSeq) renderRooms(data, false);
}

async function moreRooms() {
  const cursor = state.roomsCursor;
  if (!cursor) return;
  const params = roomsParams();
  params.set("limit", String(ROOMS_PAGE));
  params.set("cursor", cursor);
  const seq = ++state.roomsSeq;
  const button = $("rooms-more");
  button.disabled = true;
  let data;
  try {
    data = await api("GET", `/v1/rooms?${params}`, undefined, { auth: false });
  } catch (err) {
    if (err.code === "CURSOR_EXPIRED") {
      // The ranking the grid was read from is no longer kept: read it afresh,
      // one page more than was shown.
      state.roomsShown += ROOMS_PAGE;
      toast("The room list changed while you were away: here it is afresh.", "info");
      refreshRooms();
    } else if (seq === state.roomsSeq) {
      toast(explain(err, "loading more rooms"), "error");
    }
    return;
  } finally {
    button.disabled = false;
  }
  if (seq === state.roomsSeq) renderRooms(data, true);
}

function renderRooms(data, append) {
  const list = $("rooms");
  const shown = new Set(append ? [...list.querySelectorAll(".room-card")].map((li) => li.dataset.card) : []);
  const cards = data.rooms.filter((room) => !shown.has(room.id)).map(roomCard);
  if (append) list.append(...cards);
  else if (cards.length) list.replaceChildren(...cards);
  else {
    const filtered = $("rooms-tag").value.trim() || $("rooms-q").value.trim();
    const text = filtered ? "No room matches." : "No rooms yet: sign in as a model to open one.";
    list.replaceChildren(el("li", { class: "hint empty", text }));
  }
  state.roomsCursor = data.next_cursor;
  state.roomsShown = list.querySelectorAll(".room-card").length;
  $("rooms-more").hidden = !data.next_cursor;
  const more = data.next_cursor ? " (more below)" : "";
  $("rooms-note").textContent = `${plural(state.roomsShown, "room")}${more}, updated ${clock()}.`;
}

function roomCard(room) {
  const known = state.rooms.get(room.id);
  state.rooms.set(room.id, { ...known, ...room });
  const own = room.id === state.me?.id;
  const name = room.display_name || room.id;
  // `live`: she is in her room; an older server without it: someone is watching.
  const live = room.live ?? room.viewers > 0;
  const parts = [
    avatar(room, name),
    el("span", { class: "room-name", text: name }),
    el("span", {
      class: "room-meta",
      text: `${own ? "your room · " : ""}${name !== room.id ? `@${room.id} · ` : ""}min tip ${room.tip_min}`,
    }),
    el("span", { class: "count", text: plural(room.viewers, "viewer") }),
  ];
  if (live) parts.push(el("span", { class: "live-badge", text: "Live" }));
  if (room.trending > 0) parts.push(el("span", { class: "room-trend", text: `▲ ${tokens(room.trending)} tipped lately` }));
  parts.push(el("span", { class: "room-tags", text: (room.tags || []).map((t) => `#${t}`).join(" ") }));
  const open = el("button", { type: "button", class: "room-item", "data-room": room.id }, ...parts);
  if (room.id === state.room) open.setAttribute("aria-current", "true");
  open.addEventListener("click", () => openRoom(room.id));
  const card = el("li", { class: "room-card", "data-card": room.id, "data-live": String(live) }, open);
  if (!own && state.me) {
    const follow = el("button", { type: "button", class: "card-follow secondary small", "data-follow": room.id, "aria-label": `Follow ${name}` });
    setFollowButton(follow, state.following.has(room.id));
    follow.addEventListener("click", () => toggleFollow(room.id));
    card.append(follow);
  }
  return card;
}

function avatar(room, name) {
  const box = el("span", { class: "avatar", "aria-hidden": "true" });
  // A hue of her own, from her id, behind her initial.
  let hue = 0;
  for (const ch of room.id) hue = (hue * 31 + ch.charCodeAt(0)) % 360;
  box.style.setProperty("--hue", String(hue));
  const initial = el("span", { class: "initial", text: [...name][0]?.toUpperCase() || "?" });
  // The page loads images from its own origin only (its CSP): a third-party
  // avatar would tell that host who browses the grid, so it shows the initial.
  if (room.avatar && sameOrigin(room.avatar)) {
    const img = el("img", { src: room.avatar, alt: "", loading: "lazy" });
    img.addEventListener("error", () => img.replaceWith(initial));
    box.append(img);
  } else {
    box.append(initial);
  }
  return box;
}

function sameOrigin(url) {
  try {
    return new URL(url, location.href).origin === location.origin;
  } catch {
    return false;
  }
}

let roomsFilterTimer = null;
function refreshRoomsSoon() {
  clearTimeout(roomsFilterTimer);
  roomsFilterTimer = setTimeout(refreshRooms, 250);
}

/** Another sort or filter: a new listing, from its first page. */
function newRoomsQuery(soon) {
  state.roomsShown = 0;
  state.roomsCursor = null;
  $("rooms-more").hidden = true;
  if (soon) refreshRoomsSoon();
  else refreshRooms();
}

// --- profiles, follows and live notifications (issue #13) -----------------------------------
async function loadProfile(roomId) {
  const box = $("room-profile");
  const followButton = $("room-follow");
  box.hidden = true;
  followButton.hidden = true;
  if (roomId.startsWith("p:")) return;
  let profile;
  try {
    profile = await api("GET", `/v1/models/${encodeURIComponent(roomId)}`, undefined, { auth: false });
  } catch {
    return; // no profile: the room still works
  }
  if (state.room !== roomId) return;
  $("profile-name").textContent = profile.display_name || roomId;
  $("profile-status").textContent = profile.online_status;
  $("profile-bio").textContent = profile.bio;
  $("profile-tags").textContent = profile.tags.map((t) => `#${t}`).join(" ");
  const prices = [`DM ${profile.prices.dm ? tokens(profile.prices.dm) : "free"}`];
  if (profile.prices.private_rate) prices.push(`private ${tokens(profile.prices.private_rate)}/min`);
  prices.push(plural(profile.followers, "follower"));
  $("profile-prices").textContent = prices.join(" · ");
  box.hidden = false;
  if (roomId !== state.me.id) {
    followButton.hidden = false;
    renderFollow(roomId, state.following.has(roomId));
  }
}

function renderFollow(roomId, following) {
  const button = $("room-follow");
  button.dataset.model = roomId;
  setFollowButton(button, following);
}

function setFollowButton(button, following) {
  button.textContent = following ? "Following ✓" : "Follow";
  button.setAttribute("aria-pressed", String(following));
}

/** Every follow button of `model` (her room's, her card's) says the same. */
function renderFollows(model) {
  const following = state.following.has(model);
  if ($("room-follow").dataset.model === model) setFollowButton($("room-follow"), following);
  for (const button of document.querySelectorAll(".card-follow")) {
    if (button.dataset.follow === model) setFollowButton(button, following);
  }
}

async function loadFollows() {
  try {
    const page = await api("GET", "/v1/me/follows?limit=200");
    state.following = new Set(page.follows.map((f) => f.model));
  } catch {
    state.following = new Set();
  }
}

async function toggleFollow(model) {
  const following = state.following.has(model);
  try {
    await api(following ? "DELETE" : "PUT", `/v1/me/follows/${encodeURIComponent(model)}`);
  } catch (err) {
    toast(explain(err, following ? "unfollowing" : "following"), "error");
    return;
  }
  if (following) state.following.delete(model);
  else state.following.add(model);
  renderFollows(model);
  if (state.room === model) loadProfile(model); // her follower count
  toast(following ? `You no longer follow ${model}.` : `You follow ${model}: you will hear when she goes live.`, "success");
}

function onLive(event) {
  toast(`${event.model} is live now`, "success");
  const item = el("button", { type: "button", class: "live-toast", "data-testid": "live", "data-model": event.model }, `${event.model} is live: join`);
  item.addEventListener("click", () => {
    item.remove();
    openRoom(event.model);
  });
  $("live-notes").replaceChildren(item);
  refreshRoomsSoon();
}

async function loadMyProfile() {
  try {
    const profile = await api("GET", `/v1/models/${encodeURIComponent(state.me.id)}`, undefined, { auth: false });
    if ($("profile-form").dataset.dirty) return; // she started typing: keep what she typed
    $("profile-display-name").value = profile.display_name;
    $("profile-bio-input").value = profile.bio;
    $("profile-tags-input").value = profile.tags.join(", ");
    $("profile-status-input").value = profile.online_status;
  } catch {
    // a new model: the form starts empty
  }
}

async function saveProfile(event) {
  event.preventDefault();
  const tags = $("profile-tags-input").value.split(/[,\s]+/).map((t) => t.trim().toLowerCase()).filter(Boolean);
  try {
    await api("PUT", "/v1/me/profile", {
      display_name: $("profile-display-name").value.trim(),
      bio: $("profile-bio-input").value,
      tags,
      online_status: $("profile-status-input").value,
    });
  } catch (err) {
    toast(explain(err, "saving your profile"), "error");
    return;
  }
  toast("Profile saved.", "success");
  refreshRooms();
  if (state.room === state.me.id) loadProfile(state.me.id);
}

// --- a room ------------------------------------------------------------------------------
async function openRoom(roomId) {
  const previous = state.room;
  if (previous === roomId) {
    showRoom(roomId);
    return;
  }
  try {
    await state.conn.join(roomId);
  } catch (err) {
    toast(explain(err, `joining ${roomId}`), "error");
    return;
  }
  // A fan watches one room at a time; a model stays in her own room to see her tips.
  if (previous && previous !== state.me.id) state.conn.leave(previous);
  showRoom(roomId);
  if (roomId !== state.me.id && !roomId.startsWith("p:")) loadMenu(roomId); // no menu in a private show
  $("room-title").focus();
}

function showRoom(roomId) {
  state.room = roomId;
  document.body.classList.toggle("in-room", Boolean(roomId));
  $("room-empty").hidden = Boolean(roomId);
  $("room-open").hidden = !roomId;
  for (const button of document.querySelectorAll(".room-item")) {
    if (button.dataset.room === roomId) button.setAttribute("aria-current", "true");
    else button.removeAttribute("aria-current");
  }
  if (!roomId) return;
  const info = state.rooms.get(roomId) || { id: roomId, viewers: 0, tip_min: 1 };
  const own = roomId === state.me.id;
  $("room-title").textContent = own ? `Your room` : roomId;
  $("room-leave").hidden = own;
  $("tip-form").hidden = own;
  $("dm-room-owner").parentElement.hidden = own;
  const isPrivate = roomId.startsWith("p:");
  $("tip-form").hidden = own || isPrivate;
  $("dm-room-owner").parentElement.hidden = own || isPrivate;
  $("request-form").hidden = own || isPrivate || state.me.role !== "fan";
  $("private-form").hidden = own || isPrivate || state.me.role !== "fan";
  if (!$("private-form").hidden) loadPrivatePrice(roomId);
  if (isPrivate) $("room-title").textContent = "Private show";
  $("request-model").textContent = roomId;
  $("dm-room-owner").textContent = `✉ Message ${roomId} privately`;
  $("tip-room").textContent = roomId;
  renderMenu(roomId);
  loadProfile(roomId);
  updateRoomInfo(info);
  $("room-tip-min").hidden = roomId.startsWith("p:"); // no tips in a private show
  renderShow(roomId);
  renderKing(roomId);
  loadLeaderboard(roomId);
  renderGoal(roomId);
  const chat = $("chat");
  chat.replaceChildren(...(state.logs.get(roomId) || []).map(renderLine));
  if (!chat.children.length) chat.append(el("li", { class: "note", text: "No messages yet. Say hi!" }));
  chat.scrollTop = chat.scrollHeight;
}

function updateRoomInfo(info) {
  $("room-viewers-n").textContent = info.viewers;
  $("tip-min-note").textContent = info.tip_min > 1 ? `(minimum ${tokens(info.tip_min)})` : "";
  $("room-tip-min").textContent = `min tip ${tokens(info.tip_min)}`;
  $("tip-amount").min = String(info.tip_min);
}

function onJoined(roomId, reply, rejoined) {
  state.rooms.set(roomId, { ...state.rooms.get(roomId), ...reply.room });
  const log = state.logs.get(roomId) || [];
  state.logs.set(roomId, log);
  if (reply.recovered === false) {
    log.push({ type: "note", text: "Some messages were missed while you were away." });
  } else if (rejoined && reply.history.length) {
    log.push({ type: "note", text: `Caught up ${plural(reply.history.length, "message")} sent while you were away.` });
  }
  setShow(roomId, reply.room.show, reply.ticket);
  state.kings.set(roomId, reply.room.king ?? null);
  setGoal(roomId, reply.room.goal);
  for (const event of reply.history) {
    // The banners show the current ones.
    if (event.type === "show" || event.type === "king" || event.type === "goal") continue;
    log.push(event);
    // Tips sent while the connection was down are news; older history is not.
    if (rejoined && event.type === "tip") countEarning(event);
  }
  log.splice(0, Math.max(0, log.length - LOG_MAX));
  if (roomId === state.room) showRoom(roomId);
  if (roomId === state.me?.id) $("price-tip-min").value ||= reply.room.tip_min;
}

function onRoomLost(roomId, err) {
  toast(explain(err, `rejoining ${roomId}`), "error");
  if (roomId === state.room) showRoom(null);
}

function renderLine(entry) {
  if (entry.type === "note") return el("li", { class: "note", text: entry.text });
  const mine = entry.from === state.me?.id;
  const who = tierName(el("span", { class: "from", text: mine ? "You" : entry.from }), entry.tier);
  if (!mine && canModerate(entry.room, entry.from)) {
    who.classList.add("moderatable");
    who.tabIndex = 0;
    who.setAttribute("role", "button");
    who.title = `Moderate ${entry.from}`;
    who.dataset.user = entry.from;
  }
  const time = el("time", { datetime: new Date(entry.ts).toISOString(), text: clock(entry.ts) });
  if (entry.type === "tip") {
    const line = el(
      "li",
      { class: `line tip${mine ? " mine" : ""}`, "data-amount": entry.amount },
      el("span", { class: "coin", "aria-hidden": "true" }),
      who,
      ` tipped `,
      el("strong", { text: tokens(entry.amount) }),
    );
    if (entry.item) line.append(" for ", el("span", { class: "tip-item", text: entry.item.label }));
    if (entry.text) line.append(el("span", { class: "tip-text", text: ` “${entry.text}”` }));
    line.append(time);
    return line;
  }
  if (entry.type === "media") {
    const what = entry.media.kind === "video" ? "a video" : "a photo";
    const line = el("li", { class: `line media${mine ? " mine" : ""}` }, who, ` posted ${what}`);
    if (entry.text) line.append(el("span", { class: "text", text: `: ${entry.text}` }));
    line.append(time, mediaCard(entry.media, entry.from));
    return line;
  }
  return el("li", { class: `line${mine ? " mine" : ""}` }, who, el("span", { class: "text", text: entry.text }), time);
}

// --- locked media --------------------------------------------------------------------------
/** A card for locked media: its preview and an unlock button, or, once it is
 * the viewer's (her own, or unlocked), the photo or video itself. */
function mediaCard(media, owner) {
  const card = el("div", { class: "media-card locked", "data-media": media.id });
  const what = media.kind === "video" ? "video" : "photo";
  const preview = media.preview || {};
  const cover =
    preview.kind === "image"
      ? el("img", { class: "preview", src: preview.url, alt: `Preview of a locked ${what}` })
      : el("p", { class: "preview-text", text: preview.text || `A locked ${what}` });
  card.append(cover);
  const mine = owner === state.me?.id;
  if (mine || state.unlocked.has(media.id)) {
    showContent(card, media, state.unlocked.get(media.id));
    return card;
  }
  const button = el("button", { type: "button", class: "accent unlock" }, `Unlock ${what} for ${tokens(media.price)}`);
  button.addEventListener("click", () => unlock(card, media));
  card.append(button);
  return card;
}

/** Replace a card's lock with the content, from `url` or a new signed URL. */
async function showContent(card, media, url) {
  let src = url;
  if (!src) {
    try {
      ({ url: src } = await api("GET", `/v1/media/${encodeURIComponent(media.id)}/url`));
    } catch (err) {
      toast(explain(err, "opening this media"), "error");
      return;
    }
  }
  const content =
    media.kind === "video"
      ? el("video", { class: "content", src, controls: "", preload: "metadata", playsinline: "" })
      : el("img", { class: "content", src, alt: "Unlocked photo" });
  card.classList.remove("locked");
  card.classList.add("open");
  card.replaceChildren(content);
}

async function unlock(card, media) {
  const what = media.kind === "video" ? "video" : "photo";
  const after = (state.balance ?? 0) - media.price;
  const ok = await confirmDialog(
    `Unlock for ${tokens(media.price)}?`,
    `This ${what} costs ${tokens(media.price)}, once: it stays yours. ` +
      (after >= 0 ? `Your balance will be ${tokens(after)}.` : `You have only ${tokens(state.balance ?? 0)}.`),
    `Pay ${media.price} and unlock`,
  );
  if (!ok) return;
  // One key per unlock; the connection resends the same frame after a drop.
  const fields = { media: media.id, key: newKey(), max_price: media.price };
  try {
    const reply = await state.conn.request("unlock", fields);
    balanceFromReply(reply);
    state.unlocked.set(media.id, reply.url);
    for (const other of document.querySelectorAll(`.media-card[data-media="${CSS.escape(media.id)}"]`)) {
      showContent(other, media, reply.url);
    }
    toast(reply.already ? `This ${what} was yours already: nothing charged.` : `Unlocked for ${tokens(reply.price)}.`, "success");
  } catch (err) {
    toast(explain(err, `unlocking this ${what}`), "error");
  }
}

async function uploadMedia(event) {
  event.preventDefault();
  const file = $("media-file").files[0];
  if (!file) return;
  const form = new FormData();
  form.append("file", file);
  form.append("price", String(Number($("media-price").value)));
  const previewText = $("media-preview-text").value.trim();
  if (previewText) form.append("preview_text", previewText);
  const previewImage = $("media-preview").files[0];
  if (previewImage) form.append("preview", previewImage);
  $("media-submit").disabled = true;
  try {
    let response;
    try {
      response = await fetch("/v1/media", {
        method: "POST",
        headers: { Authorization: `Bearer ${state.token}` },
        body: form,
      });
    } catch {
      throw new CommandError({ code: "OFFLINE", message: "the server cannot be reached" });
    }
    const data = await response.json().catch(() => null);
    if (!response.ok) {
      throw new CommandError(data?.error ?? { code: `HTTP_${response.status}`, message: response.statusText });
    }
    const fields = { room: state.me.id, media: data.media.id };
    const caption = $("media-caption").value.trim();
    if (caption) fields.text = caption;
    await state.conn.request("post_media", fields);
    $("media-form").reset();
    $("media-price").value = String(data.media.price);
    toast(`Posted: fans unlock it for ${tokens(data.media.price)}.`, "success");
  } catch (err) {
    toast(explain(err, "the upload"), "error");
  } finally {
    $("media-submit").disabled = false;
  }
}

function addLine(roomId, entry) {
  const log = state.logs.get(roomId) || [];
  state.logs.set(roomId, log);
  log.push(entry);
  log.splice(0, Math.max(0, log.length - LOG_MAX));
  if (roomId !== state.room) return;
  const chat = $("chat");
  chat.querySelector(":scope > .note:only-child")?.remove();
  const atBottom = chat.scrollHeight - chat.scrollTop - chat.clientHeight < 40;
  chat.append(renderLine(entry));
  while (chat.children.length > LOG_MAX) chat.firstElementChild.remove();
  if (atBottom || entry.from === state.me?.id) chat.scrollTop = chat.scrollHeight;
}

// --- events ---------------------------------------------------------------------------------
function onEvent(event) {
  switch (event.type) {
    case "message":
      addLine(event.room, event);
      break;
    case "media":
      addLine(event.room, event);
      break;
    case "tip":
      addLine(event.room, event);
      if (event.room === state.room) burst($("fx"), event.amount, event.from, event.item?.label);
      countEarning(event);
      if (event.room === state.room) refreshLeaderboardSoon(event.room);
      break;
    case "king":
      onKing(event);
      break;
    case "live":
      onLive(event);
      break;
    case "presence": {
      const info = state.rooms.get(event.room);
      if (info) info.viewers = event.viewers;
      if (event.room === state.room) updateRoomInfo(info || event);
      break;
    }
    case "dm":
      addDm({ ...event, incoming: true });
      if (event.price > 0) earn("dm", event.from, event.price, event.text, event.ts);
      break;
    case "balance":
      setBalance(event.balance);
      checkBalanceSoon();
      break;
    case "private":
      onPrivate(event);
      break;
    case "show":
      onShowEvent(event);
      break;
    case "clear":
      onClear(event);
      break;
    case "removed":
      onRemoved(event);
      break;
    case "goal":
      onGoalEvent(event);
      break;
    case "reality_check":
      onRealityCheck(event);
      break;
    case "request":
      showRequest(event);
      if (event.state === "delivered" && event.to === state.me?.id) {
        earn("request", event.from, event.amount, event.text, event.ts);
      }
      break;
    default:
      break;
  }
}

function countEarning(tip) {
  if (state.me?.role !== "model" || tip.room !== state.me.id || tip.from === state.me.id) return;
  // By transaction: the one identity a tip keeps however it was delivered
  // (relayed, replayed from history); servers without `tx` give the offset.
  const seen = tip.tx ?? tip.offset;
  if (state.counted.has(seen)) return;
  state.counted.add(seen);
  if (state.counted.size > LOG_MAX) state.counted.delete(state.counted.values().next().value);
  earn("tip", tip.from, tip.amount, tip.text, tip.ts, tip.item?.label);
}

function earn(kind, from, amount, text, ts, itemLabel = "") {
  state.earned += amount;
  $("earned-total").textContent = state.earned.toLocaleString();
  const label = { tip: "tip", dm: "private message", request: "custom request" }[kind] ?? kind;
  const item = el(
    "li",
    { class: `earning ${kind}` },
    el("span", { class: "plus", text: `+${amount.toLocaleString()}` }),
    el("span", { class: "what", text: ` ${label} from ${from}` }),
  );
  if (itemLabel) item.append(el("span", { class: "what", text: ` for ${itemLabel}` }));
  if (text) item.append(el("span", { class: "quote", text: ` “${text}”` }));
  item.append(el("time", { text: clock(ts) }));
  const list = $("earnings");
  list.prepend(item);
  while (list.children.length > 50) list.lastElementChild.remove();
}

// --- chat and tips ---------------------------------------------------------------------------
async function say(event) {
  event.preventDefault();
  const input = $("say-text");
  const text = input.value.trim();
  if (!text || !state.room) return;
  try {
    await state.conn.request("say", { room: state.room, text });
    input.value = "";
  } catch (err) {
    toast(explain(err, "your message"), "error");
  }
}

async function tip(amount) {
  const room = state.room;
  const info = state.rooms.get(room) || { tip_min: 1 };
  if (!Number.isInteger(amount) || amount < 1 || amount > 1000000) {
    toast("Enter a whole number of tokens between 1 and 1,000,000.", "error");
    return;
  }
  if (amount < info.tip_min) {
    toast(`The smallest tip in ${room} is ${tokens(info.tip_min)}.`, "error");
    return;
  }
  const text = $("tip-text").value.trim();
  // One key per tip; the connection resends the very same frame after a drop.
  const fields = { room, amount, key: newKey() };
  if (text) fields.text = text;
  if (!state.conn.online) toast(`Offline: your ${amount}-token tip goes out once the connection is back.`);
  try {
    const reply = await state.conn.request("tip", fields);
    balanceFromReply(reply);
    $("tip-text").value = "";
    if (Number($("tip-amount").value) === amount) $("tip-amount").value = "";
    toast(`You tipped ${room} ${tokens(amount)}.`, "success");
  } catch (err) {
    toast(explain(err, `this ${amount}-token tip`), "error");
  }
}

// --- tip menus -------------------------------------------------------------------------------
/** Read the tip menu of a room's owner (anyone may) and show it if that room is on screen. */
async function loadMenu(roomId) {
  try {
    const { items } = await api("GET", `/v1/users/${encodeURIComponent(roomId)}/menu`, undefined, {
      auth: false,
    });
    state.menus.set(roomId, items);
  } catch (err) {
    state.menus.delete(roomId);
    toast(explain(err, `loading the tip menu of ${roomId}`), "error");
  }
  if (roomId === state.room) renderMenu(roomId);
}

function renderMenu(roomId) {
  const items = roomId === state.me?.id ? [] : state.menus.get(roomId) || [];
  $("tip-menu").hidden = !items.length;
  $("menu-items").replaceChildren(
    ...items.map((item) => {
      const button = el(
        "button",
        { type: "button", class: "menu-item", "data-item": item.id, "data-price": String(item.price) },
        el("span", { class: "menu-label", text: item.label }),
        el("span", { class: "menu-price", text: tokens(item.price) }),
      );
      button.addEventListener("click", () => tipItem(roomId, item));
      return el("li", {}, button);
    }),
  );
}

/** Tip a menu item at most at the price shown: a higher price is refused, not charged. */
async function tipItem(room, item) {
  const fields = { room, item: item.id, max_price: item.price, key: newKey() };
  const text = $("tip-text").value.trim();
  if (text) fields.text = text;
  if (!state.conn.online) toast(`Offline: your tip for “${item.label}” goes out once the connection is back.`);
  try {
    const reply = await state.conn.request("tip", fields);
    balanceFromReply(reply);
    $("tip-text").value = "";
    toast(`You tipped ${room} ${tokens(reply.price)} for “${reply.item.label}”.`, "success");
  } catch (err) {
    toast(explain(err, `the tip for “${item.label}”`), "error");
    // The menu changed under the page: show it as it is now.
    if (err.code === "PRICE_CHANGED" || err.code === "NOT_FOUND") loadMenu(room);
  }
}

// A model's menu editor: one row per item (label, price, remove); saving
// replaces the menu, and rows keep their item's id so fans' pages still work.
async function loadMenuEditor() {
  try {
    const { items } = await api("GET", `/v1/users/${encodeURIComponent(state.me.id)}/menu`, undefined, {
      auth: false,
    });
    showMenuEditor(items);
  } catch (err) {
    toast(explain(err, "loading your tip menu"), "error");
  }
}

function showMenuEditor(items) {
  $("menu-rows").replaceChildren();
  for (const item of items) addMenuRow(item);
  $("menu-editor-note").textContent = items.length
    ? `${plural(items.length, "item")} on your menu; fans see them as buttons in your room.`
    : "No items yet: add one, then save. Fans see them as buttons in your room.";
}

function addMenuRow(item = { id: null, label: "", price: 10 }) {
  const rows = $("menu-rows");
  if (rows.children.length >= MENU_ITEMS_MAX) {
    toast(`A menu has at most ${MENU_ITEMS_MAX} items.`, "error");
    return;
  }
  const n = rows.children.length + 1;
  const label = el("input", {
    class: "menu-row-label",
    maxlength: String(MENU_LABEL_LEN_MAX),
    required: "",
    placeholder: "e.g. Dance",
    "aria-label": `Item ${n} label`,
    autocomplete: "off",
  });
  label.value = item.label;
  const price = el("input", {
    class: "menu-row-price",
    type: "number",
    min: "1",
    max: "1000000",
    step: "1",
    required: "",
    inputmode: "numeric",
    "aria-label": `Item ${n} price in tokens`,
  });
  price.value = String(item.price);
  const remove = el("button", { type: "button", class: "ghost small", "aria-label": `Remove item ${n}` }, "✕");
  const row = el("li", { class: "menu-row" }, label, price, remove);
  if (item.id) row.dataset.id = item.id;
  remove.addEventListener("click", () => row.remove());
  rows.append(row);
  if (!item.id) label.focus();
}

async function saveMenu(event) {
  event.preventDefault();
  const items = [];
  for (const row of $("menu-rows").children) {
    const label = row.querySelector(".menu-row-label").value;
    const price = Number(row.querySelector(".menu-row-price").value);
    if (!label.trim() || label.length > MENU_LABEL_LEN_MAX) {
      toast(`Each item needs a label of 1 to ${MENU_LABEL_LEN_MAX} characters.`, "error");
      return;
    }
    if (!Number.isInteger(price) || price < 1 || price > 1000000) {
      toast("Each price is a whole number of tokens between 1 and 1,000,000.", "error");
      return;
    }
    items.push(row.dataset.id ? { id: row.dataset.id, label, price } : { label, price });
  }
  try {
    const saved = await api("PUT", "/v1/me/menu", { items });
    showMenuEditor(saved.items);
    toast(`Tip menu saved: ${plural(saved.items.length, "item")}.`, "success");
  } catch (err) {
    toast(explain(err, "saving your tip menu"), "error");
  }
}

// --- private messages ------------------------------------------------------------------------
async function openDm(to) {
  state.dm = { to, price: null, key: null, signature: null };
  $("dm-to").textContent = to;
  $("dm-form").hidden = false;
  $("dm-price").textContent = "Checking the price…";
  $("dm-text").focus();
  $("inbox").scrollIntoView({ block: "nearest", behavior: "smooth" });
  loadDmHistory(to);
  await loadDmPrice();
}

async function loadDmPrice() {
  const dm = state.dm;
  if (!dm) return;
  $("dm-send").disabled = true;
  try {
    const { dm: price } = await api("GET", `/v1/users/${encodeURIComponent(dm.to)}/prices`, undefined, {
      auth: false,
    });
    if (state.dm !== dm) return;
    dm.price = price;
    $("dm-price").textContent =
      price > 0
        ? `A private message to ${dm.to} costs ${tokens(price)}. You have ${tokens(state.balance ?? 0)}.`
        : `Private messages to ${dm.to} are free.`;
    $("dm-price").dataset.price = String(price);
    $("dm-send").textContent = price > 0 ? `Send for ${tokens(price)}` : "Send";
  } catch (err) {
    $("dm-price").textContent = explain(err, "loading the price");
  } finally {
    $("dm-send").disabled = false;
  }
}

function closeDm() {
  state.dm = null;
  $("dm-form").hidden = true;
  $("dm-text").value = "";
}

async function sendDm(event) {
  event.preventDefault();
  const dm = state.dm;
  const text = $("dm-text").value.trim();
  if (!dm || !text) return;
  if (dm.price === null) {
    toast("The price is not known yet; wait a moment.", "error");
    return;
  }
  if (dm.price > 0) {
    const after = (state.balance ?? 0) - dm.price;
    const ok = await confirmDialog(
      `Send for ${tokens(dm.price)}?`,
      `Your private message to ${dm.to} costs ${tokens(dm.price)}. ` +
        (after >= 0 ? `Your balance will be ${tokens(after)}.` : `You have only ${tokens(state.balance ?? 0)}.`),
      `Pay ${dm.price} and send`,
    );
    if (!ok || state.dm !== dm) return;
  }
  // The same key while the same message is retried; a new one for a new message.
  const signature = JSON.stringify([dm.to, text, dm.price]);
  if (dm.signature !== signature) {
    dm.key = newKey();
    dm.signature = signature;
  }
  const fields = { to: dm.to, text, key: dm.key, max_price: dm.price };
  if (!state.conn.online) toast(`Offline: your message to ${dm.to} goes out once the connection is back.`);
  $("dm-send").disabled = true;
  try {
    const reply = await state.conn.request("dm", fields);
    balanceFromReply(reply);
    addDm({ from: state.me.id, to: dm.to, text, price: reply.price, ts: Date.now(), incoming: false });
    toast(
      reply.price > 0 ? `Sent to ${dm.to} for ${tokens(reply.price)}.` : `Sent to ${dm.to}.`,
      "success",
    );
    if (state.dm === dm) {
      $("dm-text").value = "";
      dm.signature = null;
    }
  } catch (err) {
    toast(explain(err, "your private message"), "error");
    if (err.code === "PRICE_CHANGED" && state.dm === dm) loadDmPrice();
  } finally {
    $("dm-send").disabled = false;
  }
}

function addDm(dm) {
  $("dms-empty").hidden = true;
  const other = dm.incoming ? dm.from : dm.to;
  const head = el(
    "p",
    { class: "dm-head" },
    el("strong", { text: dm.incoming ? `From ${other}` : `To ${other}` }),
    el("span", { class: "dm-price", text: dm.price > 0 ? ` · ${tokens(dm.price)}` : " · free" }),
    el("time", { text: clock(dm.ts) }),
  );
  const item = el("li", { class: `dm ${dm.incoming ? "in" : "out"}` }, head, el("p", { class: "dm-text", text: dm.text }));
  if (dm.media) item.append(mediaCard(dm.media, dm.from));
  if (dm.incoming) {
    const reply = el("button", { type: "button", class: "link" }, `Reply to ${other}`);
    reply.addEventListener("click", () => openDm(other));
    item.append(reply);
  }
  const list = $("dms");
  list.append(item);
  while (list.children.length > 100) list.firstElementChild.remove();
  list.scrollTop = list.scrollHeight;
}

// --- ticket shows --------------------------------------------------------------------------------
const SHOW_STATES = { scheduled: "scheduled", running: "on air", ended: "ended", cancelled: "cancelled" };

function setShow(roomId, show, ticket) {
  const known = state.shows.get(roomId);
  if (!show) state.shows.delete(roomId);
  else state.shows.set(roomId, { show, ticket: Boolean(ticket) || (known?.show.show === show.show && known.ticket) });
  if (roomId === state.room) renderShow(roomId);
  if (roomId === state.me?.id) renderShowControls();
}

function onShowEvent(event) {
  const known = state.shows.get(event.room);
  const ticket = known?.show.show === event.show && known.ticket;
  const closed = event.state === "ended" || event.state === "cancelled";
  setShow(event.room, event, ticket);
  if (closed) {
    const paid = event.state === "ended" ? "ended" : "was cancelled";
    addLine(event.room, { type: "note", text: `The ticket show “${event.title}” ${paid}.` });
  } else if (event.state === "running") {
    addLine(event.room, { type: "note", text: `The ticket show “${event.title}” is on air.` });
  }
}

/** The banner, and for a fan without a ticket to a running show, the wall instead of the chat. */
function renderShow(roomId) {
  const entry = state.shows.get(roomId);
  const own = roomId === state.me?.id;
  const show = entry?.show;
  const open = show && (show.state === "scheduled" || show.state === "running");
  $("show-banner").hidden = !open;
  const walled = Boolean(open && show.state === "running" && !own && !entry.ticket);
  $("ticket-wall").hidden = !walled;
  $("stage").hidden = walled;
  $("say-form").hidden = walled;
  $("tip-form").hidden = walled || own || roomId.startsWith("p:"); // no tips in a private show
  if (!open) return;
  $("show-title").textContent = show.title;
  $("show-state").textContent = SHOW_STATES[show.state] ?? show.state;
  $("show-price").textContent = `· ticket ${tokens(show.price)}`;
  // Walled, the wall has the button.
  $("show-buy").hidden = walled || own || entry.ticket || state.me?.role !== "fan";
  $("show-buy").textContent = `Buy a ticket for ${tokens(show.price)}`;
  $("show-ticket").hidden = own || !entry.ticket;
  $("wall-text").textContent = `“${show.title}”: only ticket holders see the chat. A ticket costs ${tokens(show.price)}; it is refunded if the show is cancelled or ends early.`;
  $("wall-buy").textContent = `Buy a ticket for ${tokens(show.price)}`;
}

async function buyTicket() {
  const roomId = state.room;
  const entry = state.shows.get(roomId);
  if (!entry) return;
  const { show } = entry;
  try {
    const reply = await state.conn.request("buy_ticket", { room: roomId, show: show.show, key: newKey() });
    balanceFromReply(reply);
    entry.ticket = true;
    toast(reply.already ? "You have a ticket already." : `Ticket bought: ${tokens(show.price)}.`, "success");
  } catch (err) {
    toast(explain(err, "buying the ticket"), "error");
    return;
  }
  renderShow(roomId);
}

function renderShowControls() {
  const entry = state.shows.get(state.me?.id);
  const show = entry?.show;
  const open = show && (show.state === "scheduled" || show.state === "running");
  $("show-controls").hidden = !open;
  if (!open) return;
  $("show-controls-text").textContent = `“${show.title}”, ${SHOW_STATES[show.state]}, ticket ${tokens(show.price)}`;
  $("show-start").hidden = show.state !== "scheduled";
  $("show-end").hidden = show.state !== "running";
}

async function scheduleShow(event) {
  event.preventDefault();
  const body = {
    title: $("show-form-title-input").value.trim(),
    price: Number($("show-form-price").value),
    min_s: Number($("show-form-min").value),
    starts_at: Date.now() + Number($("show-form-in").value) * 60000,
  };
  try {
    const show = await api("POST", "/v1/me/shows", body);
    setShow(state.me.id, show, false);
    toast(`Show “${show.title}” scheduled.`, "success");
  } catch (err) {
    toast(explain(err, "scheduling the show"), "error");
  }
}

async function moveShow(type) {
  const entry = state.shows.get(state.me?.id);
  if (!entry) return;
  try {
    const reply = await state.conn.request(type, { show: entry.show.show });
    if (reply.outcome === "refund") toast("Every ticket was refunded.", "info");
    if (reply.outcome === "release") toast("The tickets are yours.", "success");
  } catch (err) {
    toast(explain(err, "changing the show"), "error");
  }
}

// --- tip goals -----------------------------------------------------------------------------------
const GOAL_STATES = { active: "", reached: "Reached!", failed: "Missed: tips refunded", deleted: "Removed" };

function setGoal(roomId, goal) {
  if (!goal || goal.state === "deleted") state.goals.delete(roomId);
  else state.goals.set(roomId, goal);
  if (roomId === state.room) renderGoal(roomId);
  if (roomId === state.me?.id) $("goal-delete").hidden = !state.goals.has(roomId);
}

function onGoalEvent(event) {
  const before = state.goals.get(event.room);
  setGoal(event.room, event.goal);
  const { goal } = event;
  if (before?.state === goal.state && before?.id === goal.id) return; // progress only
  if (goal.state === "reached") {
    addLine(event.room, { type: "note", text: `Goal “${goal.title}” reached: ${tokens(goal.target)}!` });
  } else if (goal.state === "failed") {
    const back = goal.all_or_nothing ? " Every held tip was refunded." : "";
    addLine(event.room, { type: "note", text: `Goal “${goal.title}” was not reached in time.${back}` });
  } else if (goal.state === "active" && goal.progress === 0) {
    addLine(event.room, { type: "note", text: `New goal: “${goal.title}”, ${tokens(goal.target)}.` });
  }
}

/** The goal bar of the room on screen: title, progress of target, its kind and state. */
function renderGoal(roomId) {
  const goal = state.goals.get(roomId);
  $("goal-bar").hidden = !goal;
  if (!goal) return;
  const kind = [];
  if (goal.all_or_nothing) kind.push("all or nothing");
  if (goal.deadline && goal.state === "active") kind.push(`until ${clock(goal.deadline)}`);
  $("goal-title").textContent = goal.title;
  $("goal-kind").textContent = kind.length ? `(${kind.join(", ")})` : "";
  $("goal-progress").textContent = `${goal.progress} / ${goal.target}`;
  $("goal-state").textContent = GOAL_STATES[goal.state] ?? goal.state;
  const percent = Math.min(100, Math.round((100 * goal.progress) / goal.target));
  $("goal-fill").style.width = `${percent}%`;
  $("goal-track").setAttribute("aria-valuemax", String(goal.target));
  $("goal-track").setAttribute("aria-valuenow", String(Math.min(goal.progress, goal.target)));
  $("goal-bar").classList.toggle("reached", goal.state === "reached");
}

async function saveGoal(event) {
  event.preventDefault();
  const minutes = Number($("goal-form-in").value);
  const body = {
    title: $("goal-form-title-input").value.trim(),
    target: Number($("goal-form-target").value),
    all_or_nothing: $("goal-form-aon").checked,
  };
  if (minutes > 0) body.deadline = Date.now() + minutes * 60000;
  try {
    const { goal } = await api("PUT", "/v1/me/goal", body);
    setGoal(state.me.id, goal);
    toast(`Goal “${goal.title}” set.`, "success");
  } catch (err) {
    const busy = err.code === "CONFLICT" ? "Remove the current goal first." : explain(err, "setting the goal");
    toast(busy, "error");
  }
}

async function removeGoal() {
  try {
    const reply = await api("DELETE", "/v1/me/goal");
    setGoal(state.me.id, null);
    const back = reply.goal.all_or_nothing && reply.goal.progress < reply.goal.target ? " Held tips go back to the fans." : "";
    toast(`Goal removed.${back}`, "info");
  } catch (err) {
    toast(explain(err, "removing the goal"), "error");
  }
}

// --- custom requests ---------------------------------------------------------------------------
const REQUEST_STATES = {
  offered: "Offered",
  accepted: "Accepted",
  delivered: "Delivered",
  declined: "Declined",
  cancelled: "Cancelled",
  expired: "Expired",
};

async function loadRequests() {
  try {
    const { requests } = await state.conn.request("request_list");
    for (const request of requests.slice().reverse()) showRequest(request);
  } catch (err) {
    toast(explain(err, "loading your requests"), "error");
  }
}

/** Add or update one request in the list (newest first). */
function showRequest(request) {
  state.requests.set(request.request, request);
  const list = $("requests");
  const old = list.querySelector(`[data-request="${CSS.escape(request.request)}"]`);
  const item = renderRequest(request);
  if (old) old.replaceWith(item);
  else list.prepend(item);
  while (list.children.length > 100) list.lastElementChild.remove();
  $("requests-empty").hidden = true;
}

function renderRequest(request) {
  const asModel = request.to === state.me?.id;
  const other = asModel ? `From ${request.from}` : `To ${request.to}`;
  const item = el(
    "li",
    { class: `request ${request.state}`, "data-request": request.request, "data-state": request.state },
    el(
      "p",
      { class: "request-head" },
      el("strong", { text: other }),
      el("span", { class: "request-amount", text: ` · ${tokens(request.amount)}` }),
      el("span", { class: "request-state", text: REQUEST_STATES[request.state] ?? request.state }),
    ),
    el("p", { class: "request-text", text: request.text }),
  );
  if (request.delivery) {
    const said = request.delivery.text ? `“${request.delivery.text}”` : "";
    const media = request.delivery.media ? ` ${request.delivery.media}` : "";
    item.append(el("p", { class: "request-delivery", text: `Delivered: ${said}${media}`.trim() }));
  } else if (request.expires_ms) {
    const what = request.state === "offered" ? "Expires" : "Due";
    const when = new Date(request.expires_ms).toLocaleString([], { dateStyle: "medium", timeStyle: "short" });
    item.append(el("p", { class: "hint", text: `${what} ${when}` }));
  }
  const actions = el("div", { class: "actions" });
  const action = (label, run, kind = "ghost") => {
    const button = el("button", { type: "button", class: `${kind} small` }, label);
    button.addEventListener("click", () => run(button));
    actions.append(button);
  };
  if (asModel && request.state === "offered") {
    action("Accept", () => answerRequest("request_accept", request), "primary");
    action("Decline", () => answerRequest("request_decline", request));
  } else if (asModel && request.state === "accepted") {
    const note = el("input", {
      class: "delivery-text",
      maxlength: "1000",
      placeholder: "Note or link with the delivery",
      "aria-label": `Delivery note for ${request.from}`,
    });
    actions.append(note);
    action("Deliver", () => answerRequest("request_deliver", request, { text: note.value.trim() }), "primary");
    action("Decline", () => answerRequest("request_decline", request));
  } else if (!asModel && request.state === "offered") {
    action("Cancel", () => answerRequest("request_cancel", request));
  }
  if (actions.children.length) item.append(actions);
  return item;
}

async function answerRequest(type, request, extra = {}) {
  const what = {
    request_accept: "accepting",
    request_deliver: "delivering",
    request_decline: "declining",
    request_cancel: "cancelling",
  }[type];
  try {
    const reply = await state.conn.request(type, { request: request.request, ...extra });
    // The `request` event brings the whole request; the reply may come first.
    const known = state.requests.get(request.request) ?? request;
    if (known.state !== reply.state) showRequest({ ...known, state: reply.state, expires_ms: null });
  } catch (err) {
    toast(explain(err, `${what} this request`), "error");
  }
}

async function offerRequest(event) {
  event.preventDefault();
  const model = state.room;
  const text = $("request-text").value.trim();
  const amount = Number($("request-amount").value);
  if (!model || !text) return;
  if (!Number.isInteger(amount) || amount < 1 || amount > 1000000) {
    toast("Enter a whole number of tokens between 1 and 1,000,000.", "error");
    return;
  }
  const ok = await confirmDialog(
    `Offer ${tokens(amount)}?`,
    `${tokens(amount)} are held until ${model} delivers your request; you get them back if she declines, or lets it expire.`,
    `Hold ${amount} and offer`,
  );
  if (!ok) return;
  $("request-send").disabled = true;
  try {
    const reply = await state.conn.request("request_offer", { model, text, amount, key: newKey() });
    balanceFromReply(reply);
    $("request-text").value = "";
    $("request-amount").value = "";
    toast(`Request offered to ${model}: ${tokens(amount)} held.`, "success");
  } catch (err) {
    toast(explain(err, "this request"), "error");
  } finally {
    $("request-send").disabled = false;
  }
}

// --- private shows -----------------------------------------------------------------------------
const PRIVATE_STATES = {
  requested: "Requested",
  accepted: "Starting",
  running: "Running",
  ended: "Ended",
  declined: "Declined",
  expired: "Expired",
};
const PRIVATE_REASONS = {
  fan: "the fan ended it",
  model: "the model ended it",
  balance: "the fan's balance ran out",
  fan_left: "the fan left",
  model_left: "the model left",
  no_funds: "the fan could not pay the minimum",
  cancelled: "the fan withdrew the request",
};

async function loadPrivates() {
  try {
    const { privates } = await api("GET", "/v1/me/privates");
    const open = privates.find((show) => ["requested", "accepted", "running"].includes(show.state));
    if (open || privates.length) onPrivate(open ?? privates[0], { quiet: true });
  } catch (err) {
    toast(explain(err, "loading your private shows"), "error");
  }
}

function onPrivate(show, { quiet = false } = {}) {
  const current = state.show;
  // An event of an older show than the one on the card only matters if it is open.
  if (current && current.show !== show.show && current.state === "running" && show.state !== "running") return;
  const wasRunning = current?.show === show.show && current.state === "running";
  state.show = show;
  renderPrivate(show);
  const asModel = show.model === state.me?.id;
  if (show.state === "running" && show.room && state.room !== show.room && !wasRunning) {
    openRoom(show.room);
    if (!quiet) toast(`Private show with ${asModel ? show.fan : show.model} started.`, "success");
  }
  if (show.warning === "low_balance" && !quiet) {
    toast(`Low balance: about ${show.seconds_left} s of private show left.`, "error");
  }
  if (show.state === "ended" && wasRunning) {
    toast(`Private show ended (${PRIVATE_REASONS[show.reason] ?? show.reason}).`);
    const room = `p:${show.show}`;
    if (state.conn?.rooms.has(room)) state.conn.leave(room); // closed: no rejoin on reconnect
    if (state.room === room) showRoom(asModel ? state.me.id : null);
  }
}

function renderPrivate(show) {
  const asModel = show.model === state.me?.id;
  $("private-empty").hidden = true;
  const card = $("private-show");
  card.hidden = false;
  card.dataset.state = show.state;
  card.dataset.show = show.show;
  $("private-who").textContent = asModel ? `From ${show.fan}` : `With ${show.model}`;
  $("private-rate").textContent = `${tokens(show.rate)}/min`;
  $("private-state").textContent = PRIVATE_STATES[show.state] ?? show.state;
  $("private-seconds").textContent = String(show.seconds ?? 0);
  $("private-charged").textContent = String(show.charged ?? 0);
  const minimum = show.min_s ? `Minimum ${show.min_s} s, held at the start. ` : "";
  $("private-note").textContent =
    show.state === "ended"
      ? `Ended: ${PRIVATE_REASONS[show.reason] ?? show.reason}.`
      : show.state === "requested"
        ? `${minimum}Nothing is charged until ${asModel ? "you accept" : `${show.model} accepts`}.`
        : `${minimum}Billed to the second; billing pauses while either side is disconnected.`;
  const actions = $("private-actions");
  actions.replaceChildren();
  const action = (label, run, kind = "ghost") => {
    const button = el("button", { type: "button", class: `${kind} small` }, label);
    button.addEventListener("click", run);
    actions.append(button);
  };
  if (asModel && show.state === "requested") {
    action("Accept", () => answerPrivate("private_accept", show), "primary");
    action("Decline", () => answerPrivate("private_decline", show));
  } else if (!asModel && show.state === "requested") {
    action("Withdraw", () => answerPrivate("private_end", show));
  } else if (show.state === "running") {
    if (state.room !== show.room) action("Open the private room", () => openRoom(show.room), "primary");
    action("End the show", () => answerPrivate("private_end", show));
  }
}

async function answerPrivate(type, show) {
  const what = { private_accept: "accepting", private_decline: "declining", private_end: "ending" }[type];
  try {
    const reply = await state.conn.request(type, { show: show.show });
    const known = state.show?.show === show.show ? state.show : show;
    if (reply.state !== known.state) {
      onPrivate({ ...known, state: reply.state, room: reply.room, reason: reply.reason,
        seconds: reply.seconds ?? known.seconds, charged: reply.charged ?? known.charged });
    }
  } catch (err) {
    toast(explain(err, `${what} this private show`), "error");
  }
}

async function loadPrivatePrice(model) {
  $("private-model").textContent = model;
  $("private-price").textContent = "";
  $("private-send").disabled = true;
  try {
    const prices = await api("GET", `/v1/users/${encodeURIComponent(model)}/prices`, undefined, { auth: false });
    if (state.room !== model) return;
    state.privatePrice = { model, rate: prices.private_rate, min_s: prices.private_min_s };
    if (!prices.private_rate) {
      $("private-price").textContent = `${model} does not take private shows now.`;
      return;
    }
    const minimum = prices.private_min_s
      ? `, minimum ${prices.private_min_s} s (${tokens(Math.floor((prices.private_rate * prices.private_min_s) / 60))} held at the start)`
      : "";
    $("private-price").textContent = `${tokens(prices.private_rate)} a minute${minimum}.`;
    $("private-send").disabled = false;
  } catch (err) {
    $("private-price").textContent = explain(err, "loading the rate");
  }
}

async function requestPrivate(event) {
  event.preventDefault();
  const price = state.privatePrice;
  if (!price || price.model !== state.room || !price.rate) return;
  const ok = await confirmDialog(
    `Private show at ${tokens(price.rate)} a minute?`,
    `Nothing is charged until ${price.model} accepts. Then ${price.min_s ? `the minimum (${price.min_s} s) is held and ` : ""}each second is billed until one of you ends the show.`,
    `Request at ${price.rate}/min`,
  );
  if (!ok) return;
  $("private-send").disabled = true;
  try {
    const reply = await state.conn.request("private_request", {
      model: price.model,
      rate: price.rate,
      key: newKey(),
    });
    toast(`Private show requested from ${price.model}.`, "success");
    if (state.show?.show !== reply.show) {
      onPrivate({ show: reply.show, fan: state.me.id, model: price.model, rate: reply.rate,
        min_s: price.min_s, state: reply.state, seconds: 0, charged: 0 });
    }
  } catch (err) {
    toast(explain(err, "this private show request"), "error");
    if (err.code === "PRICE_CHANGED") loadPrivatePrice(price.model);
  } finally {
    $("private-send").disabled = false;
  }
}

// --- a model's prices ------------------------------------------------------------------------
async function loadPrices() {
  try {
    const prices = await api("GET", `/v1/users/${encodeURIComponent(state.me.id)}/prices`, undefined, {
      auth: false,
    });
    $("price-dm").value = prices.dm;
    $("price-private-rate").value = prices.private_rate;
    $("price-private-min").value = prices.private_min_s;
  } catch (err) {
    toast(explain(err, "loading your prices"), "error");
  }
  const room = state.rooms.get(state.me.id);
  if (room) $("price-tip-min").value = room.tip_min;
}

async function savePrices(event) {
  event.preventDefault();
  const dm = Number($("price-dm").value);
  const tipMin = Number($("price-tip-min").value);
  try {
    const prices = await api("PUT", "/v1/me/prices", {
      dm,
      tip_min: tipMin,
      private_rate: Number($("price-private-rate").value),
      private_min_s: Number($("price-private-min").value),
    });
    $("price-dm").value = prices.dm;
    $("price-private-rate").value = prices.private_rate;
    $("price-private-min").value = prices.private_min_s;
    $("price-tip-min").value = prices.tip_min;
    const room = state.rooms.get(state.me.id);
    if (room) room.tip_min = prices.tip_min;
    if (state.room === state.me.id && room) updateRoomInfo(room);
    toast(`Prices saved: private message ${tokens(prices.dm)}, minimum tip ${tokens(prices.tip_min)}.`, "success");
  } catch (err) {
    toast(explain(err, "saving your prices"), "error");
  }
}

// --- buying tokens (dev mode: the fake payment provider) ----------------------------------------
async function buy() {
  let bundles;
  try {
    ({ bundles } = await api("GET", "/v1/bundles", undefined, { auth: false }));
  } catch (err) {
    toast(explain(err, "loading the bundles"), "error");
    return;
  }
  const smallest = bundles[0];
  const ok = await confirmDialog(
    "Buy tokens (test payment)?",
    `Demo mode uses a fake payment provider: ${tokens(smallest.tokens)} for $${(smallest.price_cents / 100).toFixed(2)}, nothing is really charged.`,
    `Buy ${smallest.tokens}`,
  );
  if (!ok) return;
  try {
    const reply = await api("POST", "/v1/purchases", { bundle: smallest.id, payment_ref: `demo-${newKey()}` });
    setBalance(reply.balance);
    toast(`Added ${tokens(reply.tokens)}.`, "success");
  } catch (err) {
    toast(explain(err, "the purchase"), "error");
  }
}

// --- spending limits, self-exclusion and reality checks ------------------------------------------
const WINDOWS = ["daily", "weekly", "monthly"];

/** A time the server gave (ms), in the browser's time zone. */
function when(ms) {
  if (!Number.isFinite(ms)) return "later";
  return new Date(ms).toLocaleString([], { dateStyle: "medium", timeStyle: "short" });
}

/** SPEND_LIMIT's fields as a sentence, shown in a toast and in the limits card. */
function spendLimitText(reply) {
  return `Your ${reply.window} spending limit leaves ${tokens(reply.remaining ?? 0)} until ${when(
    reply.resets_at,
  )}. Nothing was charged.`;
}

/** A limit's refusal (also a toast) stays visible in the limits card; returns `text`. */
function showLimitRefusal(text) {
  const box = $("limit-refusal");
  box.textContent = text;
  box.hidden = false;
  loadLimits();
  return text;
}

function renderLimits(view) {
  const list = $("limit-windows");
  list.replaceChildren();
  for (const name of WINDOWS) {
    const w = view.windows[name];
    const pending = view.pending[name];
    const limit = w.limit === null ? "no limit" : `${tokens(w.remaining)} left of ${tokens(w.limit)}`;
    const item = el(
      "li",
      { "data-window": name },
      el("strong", { text: `${name[0].toUpperCase()}${name.slice(1)}: ` }),
      `spent ${tokens(w.spent)}, ${limit}`,
    );
    if (pending) {
      const to = pending.to === null ? "no limit" : tokens(pending.to);
      item.append(el("span", { class: "pending", text: ` → ${to} from ${when(pending.at)}` }));
    }
    list.append(item);
    $(`limit-${name}`).value = (pending ? pending.to : w.limit) ?? "";
  }
  $("limit-reality").value = view.reality_check_min ?? "";
  const excluded = view.excluded_until;
  $("exclusion-state").textContent = excluded
    ? `You excluded yourself until ${when(excluded)}: no spending and no buying until then.`
    : "No spending and no buying for the days you choose. It cannot be undone early.";
  document.body.classList.toggle("self-excluded", Boolean(excluded));
}

async function loadLimits() {
  try {
    renderLimits(await api("GET", "/v1/me/limits"));
  } catch (err) {
    toast(explain(err, "loading your limits"), "error");
  }
}

function limitField(id, low, high) {
  const raw = $(id).value.trim();
  if (raw === "") return null;
  const n = Number(raw);
  return Number.isInteger(n) && n >= low && n <= high ? n : undefined;
}

async function saveLimits(event) {
  event.preventDefault();
  const body = {};
  for (const name of WINDOWS) {
    const value = limitField(`limit-${name}`, 0, 1e12);
    if (value === undefined) {
      toast(`The ${name} limit must be a whole number of tokens, or blank for none.`, "error");
      return;
    }
    body[name] = value;
  }
  const reality = limitField("limit-reality", 1, 1440);
  if (reality === undefined) {
    toast("A reality check comes every 1 to 1,440 minutes, or never (blank).", "error");
    return;
  }
  body.reality_check_min = reality;
  try {
    const view = await api("PUT", "/v1/me/limits", body);
    renderLimits(view);
    const later = Object.keys(view.pending).length;
    toast(later ? "Limits saved. Raised limits apply after 24 hours." : "Limits saved.", "success");
  } catch (err) {
    toast(explain(err, "saving your limits"), "error");
  }
}

async function excludeMe(event) {
  event.preventDefault();
  const days = Number($("exclusion-days").value);
  if (!Number.isInteger(days) || days < 1 || days > 3650) {
    toast("Choose between 1 and 3,650 days.", "error");
    return;
  }
  const ok = await confirmDialog(
    `Exclude yourself for ${plural(days, "day")}?`,
    "You will not be able to tip, message for a price, unlock, buy tickets or tokens until it ends. It cannot be undone early.",
    "Exclude me",
  );
  if (!ok) return;
  try {
    const reply = await api("POST", "/v1/me/self-exclusion", { days });
    toast(`You are excluded until ${when(reply.excluded_until)}.`, "success");
    loadLimits();
  } catch (err) {
    toast(explain(err, "the self-exclusion"), "error");
  }
}

function onRealityCheck(event) {
  const minutes = Math.floor(event.online_s / 60);
  const text = `Reality check: online for ${plural(minutes, "minute")}, ${tokens(event.spent)} spent this session.`;
  const line = $("reality-line");
  line.textContent = text;
  line.hidden = false;
  toast(text);
}

// --- wiring ---------------------------------------------------------------------------------------
function wire() {
  $("dev-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const role = new FormData(event.target).get("role");
    devSignIn($("dev-user").value.trim(), role);
  });
  // The suggested name follows the role until it is edited.
  for (const radio of document.querySelectorAll('#dev-form input[name="role"]')) {
    radio.addEventListener("change", () => {
      const input = $("dev-user");
      const match = /^(fan|model)_([a-z0-9]{5})$/.exec(input.value);
      if (match) input.value = `${radio.value}_${match[2]}`;
    });
  }
  for (const button of document.querySelectorAll("[data-demo]")) {
    button.addEventListener("click", () => {
      const [user, role] = button.dataset.demo.split(":");
      devSignIn(user, role);
    });
  }
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("token-input").value.trim();
    if (token) signIn(token);
  });
  $("sign-out").addEventListener("click", () => signOut());
  $("buy").addEventListener("click", buy);
  $("rooms-refresh").addEventListener("click", refreshRooms);
  $("rooms-sort").addEventListener("change", () => newRoomsQuery(false));
  $("rooms-tag").addEventListener("input", () => newRoomsQuery(true));
  $("rooms-q").addEventListener("input", () => newRoomsQuery(true));
  $("rooms-filter").addEventListener("submit", (event) => {
    event.preventDefault();
    newRoomsQuery(false);
  });
  $("room-follow").addEventListener("click", () => toggleFollow($("room-follow").dataset.model));
  $("rooms-more").addEventListener("click", moreRooms);
  $("profile-form").addEventListener("submit", saveProfile);
  $("profile-form").addEventListener("input", () => {
    $("profile-form").dataset.dirty = "1";
  });
  $("room-back").addEventListener("click", () => {
    showRoom(null);
    $("lobby").focus?.();
  });
  $("room-leave").addEventListener("click", () => {
    const room = state.room;
    if (room) state.conn.leave(room);
    showRoom(null);
  });
  $("say-form").addEventListener("submit", say);
  for (const button of document.querySelectorAll(".tip-quick")) {
    button.addEventListener("click", () => tip(Number(button.dataset.amount)));
  }
  $("tip-form").addEventListener("submit", (event) => {
    event.preventDefault();
    tip(Number($("tip-amount").value));
  });
  $("dm-room-owner").addEventListener("click", () => state.room && openDm(state.room));
  $("dm-form").addEventListener("submit", sendDm);
  $("dm-cancel").addEventListener("click", closeDm);
  $("prices-form").addEventListener("submit", savePrices);
  $("menu-add").addEventListener("click", () => addMenuRow());
  $("menu-form").addEventListener("submit", saveMenu);
  $("request-form").addEventListener("submit", offerRequest);
  $("media-form").addEventListener("submit", uploadMedia);
  $("private-form").addEventListener("submit", requestPrivate);
  $("show-form").addEventListener("submit", scheduleShow);
  $("show-buy").addEventListener("click", buyTicket);
  $("wall-buy").addEventListener("click", buyTicket);
  $("show-start").addEventListener("click", () => moveShow("show_start"));
  $("show-end").addEventListener("click", () => moveShow("show_end"));
  $("show-cancel").addEventListener("click", () => moveShow("show_cancel"));
  $("leaderboard-window").addEventListener("change", () => state.room && loadLeaderboard(state.room));
  loadTiers();
  $("goal-form").addEventListener("submit", saveGoal);
  $("goal-delete").addEventListener("click", removeGoal);
}

// --- standing: leaderboards, the king of the room, tiers ---------------------------------------
// A tip is on the leaderboard once the ledger has it (well under a second);
// the board is read again this long after a tip seen in the room.
const LEADERBOARD_REFRESH_MS = 1500;
let leaderboardTimer = null;

async function loadTiers() {
  try {
    state.tiers = (await api("GET", "/v1/tiers", undefined, { auth: false })).tiers;
  } catch {
    state.tiers = []; // names stay uncoloured; nothing else depends on them
  }
}

/** Colour a name by its sender's tier (a class per tier, its name as a tooltip). */
function tierName(span, tier) {
  const n = Number.isInteger(tier) ? tier : 0;
  span.classList.add(`tier-${Math.min(n, 4)}`);
  span.dataset.tier = String(n);
  const named = state.tiers[n];
  if (named) span.title = `${named.name} tier`;
  return span;
}

function onKing(event) {
  state.kings.set(event.room, event.king);
  if (event.room !== state.room) return;
  renderKing(event.room);
  if (event.king) addLine(event.room, { type: "note", text: `♛ ${event.king.user} is the king of the room now.` });
  loadLeaderboard(event.room);
}

function renderKing(roomId) {
  const king = state.kings.get(roomId);
  const badge = $("room-king");
  badge.hidden = !king;
  badge.textContent = king ? `♛ ${king.user === state.me?.id ? "You" : king.user}` : "";
  badge.title = king ? `King of the room: ${tokens(king.tokens)} tipped in 12 hours` : "";
}

async function loadLeaderboard(roomId) {
  const section = $("leaderboard");
  section.hidden = roomId.startsWith("p:"); // no tips in a private show
  if (section.hidden) return;
  const window_ = $("leaderboard-window").value;
  let board;
  try {
    board = await api(
      "GET",
      `/v1/rooms/${encodeURIComponent(roomId)}/leaderboard?window=${encodeURIComponent(window_)}`,
      undefined,
      { auth: false },
    );
  } catch (err) {
    toast(explain(err, `loading the leaderboard of ${roomId}`), "error");
    return;
  }
  if (roomId !== state.room || window_ !== $("leaderboard-window").value) return;
  $("leaderboard-empty").hidden = board.entries.length > 0;
  $("leaderboard-entries").replaceChildren(
    ...board.entries.map((entry) =>
      el(
        "li",
        { class: "leaderboard-entry", "data-user": entry.user },
        el("span", { class: "rank", text: `${entry.rank}.` }),
        tierName(el("span", { class: "from", text: entry.user === state.me?.id ? "You" : entry.user }), entry.tier),
        el("span", { class: "tokens", text: tokens(entry.tokens) }),
      ),
    ),
  );
}

function refreshLeaderboardSoon(roomId) {
  clearTimeout(leaderboardTimer);
  leaderboardTimer = setTimeout(() => roomId === state.room && loadLeaderboard(roomId), LEADERBOARD_REFRESH_MS);
}

// --- transactions, receipts, DM history, blocks and reports -------------------------------------
const HISTORY_PAGE = 20;
const TX_KINDS = {
  tip: "Tip",
  dm: "Private message",
  unlock: "Unlock",
  purchase: "Purchase",
  credit: "Grant",
  refund: "Refund",
  hold: "Held in escrow",
  release: "Escrow released",
  escrow_refund: "Escrow returned",
  meter: "Private show",
  ticket: "Show ticket",
  chargeback: "Payment reversed",
  forfeit: "Forfeited (account deleted)",
};
const txPage = { next: null, kind: "" };

function dollars(cents) {
  return `$${(cents / 100).toFixed(2)}`;
}

async function loadTransactions({ more = false } = {}) {
  if (!more) txPage.kind = $("tx-kind").value;
  const params = new URLSearchParams({ limit: String(HISTORY_PAGE) });
  if (txPage.kind) params.set("kind", txPage.kind);
  if (more && txPage.next) params.set("before", txPage.next);
  let page;
  try {
    page = await api("GET", `/v1/me/transactions?${params}`);
  } catch (err) {
    toast(explain(err, "loading your transactions"), "error");
    return;
  }
  const list = $("tx-list");
  if (!more) list.replaceChildren();
  for (const item of page.transactions) list.append(transactionRow(item));
  txPage.next = page.next;
  $("tx-more").hidden = !page.next;
  $("tx-empty").hidden = list.children.length > 0;
}

function transactionRow(item) {
  const what = TX_KINDS[item.kind] || item.kind;
  const about = item.room ? ` in ${item.room}` : item.counterparty ? ` · ${item.counterparty}` : "";
  const sign = item.amount < 0 ? "minus" : "plus";
  const button = el(
    "button",
    { type: "button", class: "ghost small", "data-tx": item.tx },
    el("span", { text: `${what}${about}` }),
    el("span", { class: sign, text: `${item.amount > 0 ? "+" : ""}${item.amount.toLocaleString()}` }),
    el("time", { text: clock(item.ts) }),
  );
  button.addEventListener("click", () => showReceipt(item.tx));
  return el("li", { class: "tx" }, button);
}

async function showReceipt(tx) {
  let receipt;
  try {
    receipt = await api("GET", `/v1/me/transactions/${encodeURIComponent(tx)}`);
  } catch (err) {
    toast(explain(err, "loading the receipt"), "error");
    return;
  }
  const rows = [
    ["What", TX_KINDS[receipt.kind] || receipt.kind],
    ["Tokens", tokens(receipt.tokens)],
    ["From", receipt.from || "—"],
    ["To", receipt.to || "—"],
  ];
  if (receipt.room) rows.push(["Room", receipt.room]);
  if (receipt.item) rows.push(["Item", receipt.item.label || receipt.item.id || String(receipt.item)]);
  if (receipt.media) rows.push(["Media", receipt.media]);
  if (receipt.show) rows.push(["Show", receipt.show]);
  if (receipt.value) {
    rows.push([
      "Money value",
      receipt.value.cents === null
        ? "— (no tokens bought before it)"
        : `${dollars(receipt.value.cents)} at your average purchase price (${receipt.value.cents_per_token}¢ a token)`,
    ]);
  }
  if (receipt.earnings) {
    rows.push(["You earn", `${dollars(receipt.earnings.cents)} at ${receipt.earnings.cents_per_token}¢ a token`]);
  }
  rows.push(["When", new Date(receipt.ts).toLocaleString()], ["Transaction", receipt.tx]);
  const body = $("receipt-body");
  body.replaceChildren();
  for (const [term, detail] of rows) body.append(el("dt", { text: term }), el("dd", { text: detail }));
  $("receipt").hidden = false;
  $("receipt").dataset.tx = receipt.tx;
  $("receipt").focus();
}

async function loadDmHistory(other) {
  const list = $("dm-history");
  list.replaceChildren();
  $("dm-history-note").textContent = "Loading the conversation…";
  let page;
  let blocked;
  try {
    [page, blocked] = await Promise.all([
      api("GET", `/v1/me/dms?with=${encodeURIComponent(other)}&limit=${HISTORY_PAGE}`),
      api("GET", "/v1/me/blocks"),
    ]);
  } catch (err) {
    $("dm-history-note").textContent = explain(err, "loading the conversation");
    return;
  }
  if (state.dm?.to !== other) return;
  for (const message of [...page.messages].reverse()) {
    const mine = message.from === state.me.id;
    const head = el(
      "p",
      { class: "dm-head" },
      el("strong", { text: mine ? "You" : message.from }),
      el("span", { class: "dm-price", text: message.price > 0 ? ` · ${tokens(message.price)}` : " · free" }),
      el("time", { text: clock(message.ts) }),
    );
    list.append(el("li", { class: `dm ${mine ? "out" : "in"}` }, head, el("p", { class: "dm-text", text: message.text })));
  }
  list.scrollTop = list.scrollHeight;
  $("dm-history-note").textContent = page.messages.length ? "" : `No earlier messages with ${other}.`;
  setBlocked(other, blocked.blocks.some((b) => b.user === other));
}

function setBlocked(other, blocked) {
  const button = $("dm-block");
  button.dataset.blocked = blocked ? "1" : "";
  button.textContent = blocked ? `Unblock ${other}` : `Block ${other}`;
}

async function toggleBlock() {
  const other = state.dm?.to;
  if (!other) return;
  const blocked = $("dm-block").dataset.blocked === "1";
  try {
    const reply = await api(blocked ? "DELETE" : "PUT", `/v1/me/blocks/${encodeURIComponent(other)}`);
    setBlocked(other, reply.blocked);
    toast(reply.blocked ? `${other} can no longer message you.` : `${other} can message you again.`, "success");
  } catch (err) {
    toast(explain(err, blocked ? "unblocking" : "blocking"), "error");
  }
}

async function reportUser() {
  const other = state.dm?.to;
  if (!other) return;
  const reason = window.prompt(`Why are you reporting ${other}?`);
  if (!reason || !reason.trim()) return;
  try {
    await api("POST", "/v1/reports", { user: other, reason: reason.trim().slice(0, 1000) });
    toast(`Reported ${other}. An admin will look at it.`, "success");
  } catch (err) {
    toast(explain(err, "your report"), "error");
  }
}

function wireHistory() {
  $("tx-refresh").addEventListener("click", () => loadTransactions());
  $("tx-kind").addEventListener("change", () => loadTransactions());
  $("tx-more").addEventListener("click", () => loadTransactions({ more: true }));
  $("receipt-close").addEventListener("click", () => {
    $("receipt").hidden = true;
  });
  $("dm-block").addEventListener("click", toggleBlock);
  $("dm-report").addEventListener("click", reportUser);
  $("limits-form").addEventListener("submit", saveLimits);
  $("exclusion-form").addEventListener("submit", excludeMe);
}

wire();
wireModeration();
wireHistory();
wirePayouts();
wireAccount();
init();

// --- moderation (docs/protocol.md, "Moderation") --------------------------------------------
/** " (until 14:03:05)", or " (permanent)" for a ban with no end. */
function untilText(until) {
  if (typeof until !== "number") return "";
  return ` (until ${new Date(until).toLocaleTimeString()})`;
}

/** Whether I may moderate `user` in `roomId`: its model, or a moderator of it
 * acting on someone who is neither the model nor a moderator. */
function canModerate(roomId, user) {
  if (!roomId || !state.me || user === roomId || roomId.startsWith("p:")) return false;
  if (roomId === state.me.id) return true;
  const moderators = state.rooms.get(roomId)?.moderation?.moderators || [];
  return moderators.includes(state.me.id) && !moderators.includes(user);
}

/** The moderation menu for `user`, beside their name in the chat. */
function openModMenu(anchor, user) {
  closeModMenu();
  const room = state.room;
  const menu = el("div", { class: "mod-menu", id: "mod-menu", role: "menu", "data-user": user });
  const act = (label, type, fields) => {
    const button = el("button", { type: "button", role: "menuitem", text: label, "data-action": type });
    button.addEventListener("click", () => moderate(type, { room, user, ...fields }, label));
    menu.append(button);
  };
  menu.append(el("strong", { text: user }));
  act("Mute 5 min", "mute", { seconds: 300 });
  act("Unmute", "unmute", {});
  act("Kick", "kick", {});
  act("Ban 1 h", "ban", { seconds: 3600 });
  act("Ban", "ban", {});
  act("Unban", "unban", {});
  act("Clear messages", "clear", {});
  anchor.after(menu);
  menu.querySelector("button")?.focus();
}

function closeModMenu() {
  $("mod-menu")?.remove();
}

async function moderate(type, fields, label) {
  closeModMenu();
  try {
    const reply = await state.conn.request(type, fields);
    toast(`${label}: ${fields.user}${untilText(reply.until)}.`, "success");
  } catch (err) {
    toast(explain(err, `${label.toLowerCase()} ${fields.user}`), "error");
  }
}

/** `clear`: a moderator removed `user`'s lines; hide them everywhere. With
 * `all`, `user` deleted their account: every line of theirs goes (tips and
 * media too), as the room's history no longer holds them. */
function onClear(event) {
  const log = state.logs.get(event.room);
  if (!log) return;
  const gone = event.all === true ? (entry) => entry.from === event.user : (entry) => entry.type === "message" && entry.from === event.user;
  const kept = log.filter((entry) => !gone(entry));
  const removed = log.length - kept.length;
  const note = event.all === true ? `${event.user} deleted their account.` : `${event.user === state.me?.id ? "Your" : `${event.user}'s`} messages were removed by a moderator.`;
  kept.push({ type: "note", text: note });
  state.logs.set(event.room, kept);
  if (event.room === state.room) showRoom(event.room);
  return removed;
}

/** `removed`: I was kicked or banned from a room. */
function onRemoved(event) {
  const what = event.reason === "banned" ? "banned from" : "removed from";
  const ends = event.reason === "banned" ? untilText(event.until) || " (until the model lifts it)" : "";
  const text = `You were ${what} ${event.room}${ends}.`;
  const log = state.logs.get(event.room) || [];
  log.push({ type: "note", text });
  state.logs.set(event.room, log);
  $("mod-notice").textContent = text;
  $("mod-notice").hidden = false;
  toast(text, "error");
  if (event.room === state.room) showRoom(null);
}

/** The model's room settings: slow mode and who may chat (PUT /v1/me/room). */
async function saveRoomSettings(event) {
  event.preventDefault();
  const body = {
    slow_s: Number($("room-slow").value || 0),
    chat_requires: $("room-chat-requires").value,
    chat_min_balance: Number($("room-chat-min").value || 0),
  };
  try {
    await api("PUT", "/v1/me/room", body);
    toast("Room settings saved.", "success");
  } catch (err) {
    toast(explain(err, "saving room settings"), "error");
  }
}

async function saveModerators(event) {
  event.preventDefault();
  const users = $("room-moderators").value.split(/[\s,]+/).filter(Boolean);
  try {
    const reply = await api("PUT", "/v1/me/moderators", { users });
    toast(reply.moderators.length ? `Moderators: ${reply.moderators.join(", ")}.` : "No moderators.", "success");
  } catch (err) {
    toast(explain(err, "saving moderators"), "error");
  }
}

function wireModeration() {
  const chat = $("chat");
  const open = (event) => {
    const name = event.target.closest(".from.moderatable");
    if (!name) return;
    if (event.type === "keydown" && event.key !== "Enter" && event.key !== " ") return;
    event.preventDefault();
    openModMenu(name, name.dataset.user);
  };
  chat.addEventListener("click", open);
  chat.addEventListener("keydown", open);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") closeModMenu();
  });
  $("room-settings-form")?.addEventListener("submit", saveRoomSettings);
  $("moderators-form")?.addEventListener("submit", saveModerators);
  $("mod-notice")?.addEventListener("click", () => {
    $("mod-notice").hidden = true;
  });
}

// --- payouts (docs/protocol.md, "Payouts") --------------------------------------------------
// While a payout waits for an admin, its list is read again this often, so
// the model sees it paid (or rejected) without reloading.
const PAYOUTS_REFRESH_MS = 3000;
const EARNING_LABELS = {
  tip: "Tips",
  dm: "Private messages",
  unlock: "Media",
  ticket: "Ticket shows",
  private: "Private shows",
  request: "Custom requests",
  goal: "Goals",
  refunded: "Refunded",
};

function money(cents) {
  return `$${(cents / 100).toFixed(2)}`;
}

function isoDay(date) {
  return date.toISOString().slice(0, 10);
}

function openPayouts() {
  $("payouts-card").hidden = false;
  const today = new Date();
  if (!$("earnings-to").value) $("earnings-to").value = isoDay(new Date(today.getTime() + 86_400_000));
  if (!$("earnings-from").value) $("earnings-from").value = isoDay(new Date(today.getTime() - 30 * 86_400_000));
  loadPayoutStatus();
  loadPayouts();
  loadEarnings();
}

async function loadPayoutStatus() {
  try {
    const status = await api("GET", "/v1/me/payout-method");
    const rule = status.rule;
    const method = status.method
      ? status.method.type === "bank"
        ? `bank account ${status.method.iban} (${status.method.holder})`
        : `PayPal ${status.method.email}`
      : "no payout method";
    $("payout-status").textContent =
      `${status.verified ? "Verified" : "Not verified yet (an admin verifies you)"} · ${method} · ` +
      `${rule.cents_per_token} cents a token, at least ${tokens(rule.min_payout_tokens)} a payout.`;
    $("payout-tokens").min = String(rule.min_payout_tokens);
    // The server would refuse (FORBIDDEN): say why instead of asking.
    $("payout-request").disabled = !(status.verified && status.method);
  } catch (err) {
    toast(explain(err, "loading your payout settings"), "error");
  }
}

async function loadPayouts() {
  clearTimeout(state.payoutsTimer);
  let listed;
  try {
    listed = (await api("GET", "/v1/me/payouts")).payouts;
  } catch (err) {
    toast(explain(err, "loading your payouts"), "error");
    return;
  }
  const list = $("payout-list");
  list.replaceChildren(
    ...listed.map((p) =>
      el(
        "li",
        { "data-payout": p.payout, "data-state": p.state },
        el("span", { text: `${tokens(p.tokens)} · ${money(p.cents)}` }),
        el("span", { class: "state", text: p.state }),
      ),
    ),
  );
  $("payouts-empty").hidden = listed.length > 0;
  if (listed.some((p) => p.state === "requested" || p.state === "requesting")) {
    state.payoutsTimer = setTimeout(() => {
      if (state.me?.role === "model") loadPayouts();
    }, PAYOUTS_REFRESH_MS);
  }
}

async function loadEarnings(event) {
  event?.preventDefault();
  const from = $("earnings-from").value;
  const to = $("earnings-to").value;
  try {
    const statement = await api(
      "GET",
      `/v1/me/earnings?from=${encodeURIComponent(from)}&to=${encodeURIComponent(to)}`,
    );
    $("statement-rows").replaceChildren(
      ...Object.entries(statement.kinds).map(([kind, figures]) =>
        el(
          "tr",
          { "data-kind": kind },
          el("th", { scope: "row", text: EARNING_LABELS[kind] || kind }),
          el("td", { text: figures.tokens.toLocaleString() }),
          el("td", { text: money(figures.cents) }),
        ),
      ),
    );
    $("statement-tokens").textContent = statement.total.tokens.toLocaleString();
    $("statement-money").textContent = money(statement.total.cents);
  } catch (err) {
    toast(explain(err, "loading your earnings"), "error");
  }
}

async function savePayoutMethod(event) {
  event.preventDefault();
  const type = $("payout-method-type").value;
  const body =
    type === "bank"
      ? { type, holder: $("payout-holder").value, iban: $("payout-iban").value }
      : { type, email: $("payout-email").value };
  try {
    await api("PUT", "/v1/me/payout-method", body);
    toast("Payout method saved.", "success");
    loadPayoutStatus();
  } catch (err) {
    toast(explain(err, "saving your payout method"), "error");
  }
}

async function requestPayout(event) {
  event.preventDefault();
  const amount = Number($("payout-tokens").value);
  try {
    const payout = await api("POST", "/v1/me/payouts", { tokens: amount, key: newKey() });
    if (typeof payout.balance === "number") setBalance(payout.balance);
    toast(`Payout of ${tokens(payout.tokens)} (${money(payout.cents)}) requested.`, "success");
    loadPayouts();
  } catch (err) {
    toast(explain(err, "the payout"), "error");
  }
}

function wirePayouts() {
  $("payouts-refresh").addEventListener("click", () => {
    loadPayoutStatus();
    loadPayouts();
    loadEarnings();
  });
  $("earnings-form").addEventListener("submit", loadEarnings);
  $("payout-method-form").addEventListener("submit", savePayoutMethod);
  $("payout-form").addEventListener("submit", requestPayout);
  $("payout-method-type").addEventListener("change", () => {
    const bank = $("payout-method-type").value === "bank";
    $("payout-bank-fields").hidden = !bank;
    $("payout-paypal-fields").hidden = bank;
  });
}

// --- your data and your account (docs/protocol.md, "Payments and accounts") ------------------
// The export's sections shown in the summary, in this order.
const EXPORT_SECTIONS = ["purchases", "transactions", "dms", "blocks", "reports", "reversals", "follows"];

async function exportData() {
  let data;
  try {
    data = await api("GET", "/v1/me/export");
  } catch (err) {
    toast(explain(err, "your export"), "error");
    return;
  }
  const counts = EXPORT_SECTIONS.filter((name) => Array.isArray(data[name])).map(
    (name) => `${data[name].length} ${name}`,
  );
  const cut = data.truncated.length ? ` (cut at ${data.rows_max} rows: ${data.truncated.join(", ")})` : "";
  $("export-summary").textContent = `Exported: ${counts.join(", ")}${cut}.`;
  // Offered as a file: the JSON as the server sent it.
  const blob = new Blob([JSON.stringify(data, null, 2)], { type: "application/json" });
  const link = el("a", { href: URL.createObjectURL(blob), download: `tokenchat-${data.user.id}.json` });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
}

async function deleteAccount() {
  if (!state.me) return;
  const left = state.balance ? ` Your ${tokens(state.balance)} will be forfeited.` : "";
  const ok = await confirmDialog(
    "Delete your account?",
    `You will be signed out everywhere and cannot sign in as ${state.me.id} again. ` +
      `Your messages and reports are removed; the ledger keeps your transactions under a pseudonym.${left}`,
    "Delete my account",
  );
  if (!ok) return;
  try {
    await api("DELETE", "/v1/me", { confirm: state.me.id });
  } catch (err) {
    const open = err.code === "CONFLICT" ? err.reply?.open : null;
    toast(Array.isArray(open) ? openEscrowsText(open) : explain(err, "deleting your account"), "error");
    return;
  }
  signOut();
  toast("Your account was deleted.", "success");
}

// What a refused deletion waits for (DELETE /v1/me's CONFLICT `open`): each
// escrow closes by itself, and nothing was deleted meanwhile.
const OPEN_ESCROW_TEXT = {
  request: "a request the model accepted (delivered, or refunded when it expires)",
  show: "a show you hold a ticket to, running now",
  goal: "tips held by an all-or-nothing goal",
};

function openEscrowsText(open) {
  const items = open.map((o) => {
    const what = OPEN_ESCROW_TEXT[o.kind] ?? o.kind;
    return o.until ? `${what}, closing by ${new Date(o.until).toLocaleString()}` : what;
  });
  return `Your account was not deleted: your tokens are in ${items.join("; ")}. Delete it once these have closed.`;
}

function wireAccount() {
  $("export-data").addEventListener("click", exportData);
  $("delete-account").addEventListener("click", deleteAccount);
}
