// The admin page (/admin): every figure comes from an admin HTTP route
// (docs/protocol.md, "Admin"), called with the token the operator pasted.
// Untrusted text (user ids, reasons, report text) is only ever set as
// textContent, never parsed as HTML.

const TOKEN_KEY = "tokenchat.admin.token";
// How often the live counters are read: "every few seconds", and tips/s is
// averaged over several polls by the server (TOKENCHAT_ADMIN_RATE_WINDOW_S).
const STATS_EVERY_MS = 2000;
const TOAST_MS = 6000;

const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem(TOKEN_KEY);
let statsTimer = null;
let shownUser = null;

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, body) {
  const init = { method, headers: { Authorization: `Bearer ${token}` } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = data.error || {};
    throw new ApiError(response.status, error.code || "UNAVAILABLE",
      error.message || `HTTP ${response.status}`);
  }
  return data;
}

function toast(text, kind) {
  const node = document.createElement("div");
  node.className = `toast ${kind}`;
  node.setAttribute("role", kind === "error" ? "alert" : "status");
  node.textContent = text;
  $("toasts").append(node);
  setTimeout(() => node.remove(), TOAST_MS);
}

function failed(what) {
  return (error) => toast(`${what}: ${error.message}`, "error");
}

function when(ms) {
  return ms == null ? "" : new Date(ms).toISOString().replace("T", " ").slice(0, 19);
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text == null ? "" : String(text);
  if (className) td.className = className;
  // Ids are long: a cut cell still shows its whole text on hover.
  if (className === "id") td.title = td.textContent;
  return td;
}

function row(...cells) {
  const tr = document.createElement("tr");
  tr.append(...cells);
  return tr;
}

function button(label, onClick, className = "ghost") {
  const b = document.createElement("button");
  b.type = "button";
  b.className = className;
  b.textContent = label;
  b.addEventListener("click", onClick);
  return b;
}

// An idempotency key per refund click. getRandomValues, not randomUUID: the
// latter exists only in secure contexts, and the page may be served over
// plain http on a private network.
function key() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// --- sign in ---------------------------------------------------------------------
function signOut(message) {
  token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  clearInterval(statsTimer);
  statsTimer = null;
  $("panels").hidden = true;
  $("account").hidden = true;
  $("signin").hidden = false;
  $("signin-status").textContent = message || "";
}

async function signIn(candidate) {
  token = candidate;
  try {
    await loadStats();  // refused (401/403) unless the token is an admin's
  } catch (error) {
    // A fan's or a model's token (403), or an expired one (401), is refused.
    const refused = error instanceof ApiError && (error.status === 401 || error.status === 403);
    signOut(refused ? `Refused: ${error.message}` : error.message);
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  $("signin").hidden = true;
  $("panels").hidden = false;
  $("account").hidden = false;
  $("me-name").textContent = subjectOf(token);
  statsTimer = setInterval(() => loadStats().catch(failed("stats")), STATS_EVERY_MS);
  loadParked().catch(failed("parked entries"));
  loadRefunds().catch(failed("refunds"));
  loadReports().catch(failed("reports"));
  loadFlags().catch(failed("flags"));
  loadAudit().catch(failed("audit log"));
}

function subjectOf(jwt) {
  try {
    const part = jwt.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part)).sub || "";
  } catch {
    return "";
  }
}

// --- live counters ---------------------------------------------------------------
async function loadStats() {
  const stats = await api("GET", "/v1/admin/stats");
  for (const dd of document.querySelectorAll("[data-stat]")) {
    const value = stats[dd.dataset.stat];
    dd.textContent = value == null ? "–" : String(value);
  }
}

// --- ledger ----------------------------------------------------------------------
async function reconcile() {
  $("reconcile-status").textContent = "Running…";
  try {
    const result = await api("GET", "/v1/admin/reconcile");
    const status = $("reconcile-status");
    status.className = result.ok ? "ok" : "bad";
    status.textContent = result.ok
      ? `Reconcile ok: ${result.accounts} accounts, ${result.issued} tokens issued.`
      : `Reconcile found ${result.mismatches.length} mismatches, ${result.pending} pending,`
        + ` ${result.rejected} parked.`;
  } catch (error) {
    $("reconcile-status").textContent = "";
    failed("reconcile")(error);
  }
  await loadParked().catch(failed("parked entries"));
}

async function loadParked() {
  const parked = await api("GET", "/v1/admin/ledger/rejected?limit=50");
  $("parked").replaceChildren(...parked.items.map((item) =>
    row(cell(item.outbox_id, "id"), cell(item.tx, "id"), cell(item.reason, "detail"),
      cell(item.recorded_at))));
}

// --- users -----------------------------------------------------------------------
async function findUsers(prefix) {
  const found = await api("GET", `/v1/admin/users?prefix=${encodeURIComponent(prefix)}`);
  $("user-results").replaceChildren(...found.users.map((user) => {
    const li = document.createElement("li");
    li.append(button(user.id, () => showUser(user.id).catch(failed("user"))));
    li.append(` ${user.role} · seen ${when(user.seen_at)}`);
    return li;
  }));
  if (found.users.length === 0) toast(`No user starts with '${prefix}'.`, "error");
  else if (found.users[0].id === prefix) await showUser(prefix);
}

async function showUser(userId) {
  const path = `/v1/admin/users/${encodeURIComponent(userId)}`;
  const [detail, history] = await Promise.all([
    api("GET", path), api("GET", `${path}/transactions?limit=50`)]);
  shownUser = userId;
  $("user-detail").hidden = false;
  $("user-name").textContent = detail.user.id;
  $("user-role").textContent = detail.user.role;
  $("user-balance").textContent = String(detail.balance);
  $("user-ledger-balance").textContent = String(detail.ledger_balance);
  $("user-reports").textContent = String(detail.open_reports);
  const ban = detail.platform_ban;
  $("user-ban").textContent = ban
    ? `Banned from the platform${ban.until ? ` until ${when(ban.until)}` : ""} by ${ban.by}`
      + (ban.reason ? `: ${ban.reason}` : "")
    : "Not banned.";
  // Refunds on this page name what they reversed: no second Refund button.
  const reversed = new Set(history.transactions.map((tx) => tx.reverses).filter(Boolean));
  $("user-transactions").replaceChildren(...history.transactions.map((tx) => {
    // A spend of this user's (they paid) can be refunded from here.
    const refundable = tx.amount < 0 && tx.kind !== "refund" && !reversed.has(tx.tx);
    const actions = document.createElement("td");
    if (refundable) actions.append(button("Refund", () => refund(tx.tx)));
    const tr = row(cell(when(tx.ts)), cell(tx.kind), cell(tx.amount), cell(tx.counterparty),
      cell(tx.tx, "id"), actions);
    tr.dataset.tx = tx.tx;
    return tr;
  }));
}

async function ban(event) {
  event.preventDefault();
  if (!shownUser) return;
  try {
    await api("POST", `/v1/admin/bans/${encodeURIComponent(shownUser)}`,
      { reason: $("ban-reason").value });
    toast(`Banned ${shownUser} from the platform.`, "success");
    await showUser(shownUser);
    await loadAudit();
  } catch (error) {
    failed("ban")(error);
  }
}

async function unban() {
  if (!shownUser) return;
  try {
    await api("DELETE", `/v1/admin/bans/${encodeURIComponent(shownUser)}`);
    toast(`Lifted the ban of ${shownUser}.`, "success");
    await showUser(shownUser);
    await loadAudit();
  } catch (error) {
    failed("unban")(error);
  }
}

// --- refunds ---------------------------------------------------------------------
async function refund(tx) {
  try {
    const reply = await api("POST", "/v1/admin/refunds", { tx, key: key() });
    toast(`Refunded ${tx}: ${reply.tx}`, "success");
  } catch (error) {
    failed("refund")(error);
    return;
  }
  await loadRefunds().catch(failed("refunds"));
  await loadAudit().catch(failed("audit log"));
  if (shownUser) await showUser(shownUser).catch(failed("user"));
}

async function loadRefunds() {
  const listed = await api("GET", "/v1/admin/refunds?limit=50");
  $("refunds").replaceChildren(...listed.refunds.map((r) =>
    row(cell(when(r.ts)), cell(r.tx, "id"), cell(r.reverses, "id"), cell(r.original_kind),
      cell(r.tokens),
      cell(r.by))));
}

// --- reports ---------------------------------------------------------------------
// The one-line form closing a report or a flag: a note, then `button`; the
// caller attaches what submitting does.
function resolutionForm(label, button) {
  const form = document.createElement("form");
  form.className = "row";
  const input = document.createElement("input");
  input.maxLength = 1000;
  input.placeholder = "Resolution";
  input.setAttribute("aria-label", label);
  const submit = document.createElement("button");
  submit.type = "submit";
  submit.textContent = button;
  form.append(input, submit);
  return { form, input, submit };
}

async function loadReports() {
  const queue = await api("GET", "/v1/admin/reports?state=open");
  const items = queue.reports.map((report) => {
    const li = document.createElement("li");
    li.dataset.report = String(report.id);
    const what = document.createElement("p");
    what.textContent = `#${report.id} ${report.reporter} reported ${report.user}`
      + (report.message ? ` (message ${report.message})` : "") + `: ${report.reason || ""}`;
    const { form, input } = resolutionForm(`Resolution of report ${report.id}`, "Resolve");
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      resolve(report.id, input.value).catch(failed("resolve"));
    });
    li.append(what, form);
    return li;
  });
  if (items.length === 0) {
    const li = document.createElement("li");
    li.textContent = "No open reports.";
    items.push(li);
  }
  $("reports").replaceChildren(...items);
}

async function resolve(id, resolution) {
  await api("POST", `/v1/admin/reports/${id}/resolve`,
    resolution ? { resolution } : {});
  toast(`Report #${id} resolved.`, "success");
  await loadReports();
}

// --- account flags -----------------------------------------------------------------
// The open flags (chargebacks), each with the shortfall the platform lost; an
// admin looks at the account (the Users panel) and closes the flag with a note.
async function loadFlags() {
  const page = await api("GET", "/v1/admin/flags?state=open");
  const items = page.flags.map((flag) => {
    const li = document.createElement("li");
    li.dataset.flag = String(flag.id);
    const what = document.createElement("p");
    what.textContent = `#${flag.id} ${flag.user}: ${flag.reason} of ${flag.payment_ref}, `
      + `shortfall ${flag.shortfall} tokens (${when(flag.ts)})`;
    const { form, input, submit } = resolutionForm(`Resolution of flag ${flag.id}`, "Resolve flag");
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      submit.disabled = true; // one click, one request (the server is idempotent anyway)
      resolveFlag(flag.id, input.value)
        .catch(failed("resolve flag"))
        .finally(() => { submit.disabled = false; });
    });
    li.append(what, form);
    return li;
  });
  if (items.length === 0) {
    const li = document.createElement("li");
    li.textContent = "No open flags.";
    items.push(li);
  }
  if (page.next) {
    const li = document.createElement("li");
    li.className = "hint";
    li.textContent = `Newest ${page.flags.length} shown; resolve them to see older ones.`;
    items.push(li);
  }
  $("flags").replaceChildren(...items);
}

async function resolveFlag(id, resolution) {
  const flag = await api("POST", `/v1/admin/flags/${id}/resolve`,
    resolution ? { resolution } : {});
  toast(flag.already
    ? `Flag #${id} was already resolved by ${flag.resolved_by}.`
    : `Flag #${id} resolved.`, "success");
  await Promise.all([loadFlags(), loadAudit()]);
}

// --- audit log -------------------------------------------------------------------
async function loadAudit() {
  const log = await api("GET", "/v1/admin/audit?limit=50");
  $("audit").replaceChildren(...log.entries.map((entry) =>
    row(cell(when(entry.ts)), cell(entry.actor), cell(entry.action), cell(entry.room),
      cell(entry.target), cell(JSON.stringify(entry.detail), "detail"))));
}

// --- wiring ----------------------------------------------------------------------
$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  signIn($("token-input").value.trim());
});
$("sign-out").addEventListener("click", () => signOut());
$("reconcile").addEventListener("click", () => reconcile());
$("user-form").addEventListener("submit", (event) => {
  event.preventDefault();
  findUsers($("user-prefix").value.trim()).catch(failed("find"));
});
$("ban-form").addEventListener("submit", ban);
$("unban").addEventListener("click", () => unban());
$("refund-form").addEventListener("submit", (event) => {
  event.preventDefault();
  refund($("refund-tx").value.trim());
});
if (token) signIn(token);
