// The job console: a form per job type (from its JSON Schema), one card per job, toasts.
// All live updates come through pushsvc.js (one multiplexed stream, or polling).

import {
  $,
  askForKey,
  bindKeyPanel,
  clock,
  lineWords,
  llmWords,
  load,
  save,
  seconds,
  setText,
  showMode,
  storedKey,
  waitWords,
} from "./page.js";
import {
  createClient,
  forgetJob,
  isTerminal,
  isUnreachable,
  rememberedJobs,
  watchJobs,
} from "./pushsvc.js";

const CARDS_STORE = "pushsvc.console.cards"; // ids of the cards shown, newest first
const TYPE_STORE = "pushsvc.console.type"; // the job type last submitted
const MAX_CARDS = 50;
const MAX_TOASTS = 3;
const RECOVER_MS = [1000, 2000, 4000]; // while unreachable, ask again after these (then 4 s)

/**
 * A job's card and what the page knows of it.
 * @typedef {object} Card
 * @property {string} id
 * @property {HTMLElement} node
 * @property {HTMLElement} bar
 * @property {HTMLElement} progress
 * @property {HTMLElement} output
 * @property {number} outLen the length of the text shown
 * @property {boolean} sawActive the page saw it active: its end gets a toast
 * @property {boolean} polled the last update came from a poll
 * @property {number} lineAt when its place in line last changed (epoch s): starts_in_s
 *   counts down from there
 * @property {import("./pushsvc.js").Job | null} job
 */

/** @type {Map<string, Card>} job id -> card */
const cards = new Map();
let client = createClient({ apiKey: storedKey() });
let watcher = null;
let types = [];
let link = "connecting"; // the pill's mode; cards say "unreachable" while it is

// ---- small helpers ----

/**
 * @param {string} tag
 * @param {object} [props] properties, or attributes where no property is
 * @param {...(Node | string)} children
 * @returns {HTMLElement}
 */
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === null || value === undefined || value === false) continue;
    if (key in node && key !== "list") node[key] = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  node.append(...children);
  return node;
}

/**
 * A field's label from its name: "interval_ms" is "Interval (ms)".
 * @param {string} name
 * @returns {string}
 */
function humanize(name) {
  const unit = name.match(/_(ms|s)$/);
  const words = name.replace(/_(ms|s)$/, "").replace(/_/g, " ");
  const label = words.charAt(0).toUpperCase() + words.slice(1);
  return unit ? `${label} (${unit[1]})` : label;
}

/**
 * @param {string} id
 * @returns {string}
 */
function shortId(id) {
  return id.slice(0, 8);
}

/**
 * @param {number | null | undefined} seconds
 * @returns {string}
 */
function formatEta(seconds) {
  if (seconds === null || seconds === undefined) return "";
  if (seconds < 1) return "almost done";
  if (seconds < 60) return `about ${Math.ceil(seconds)} s left`;
  const minutes = Math.round(seconds / 60);
  return `about ${minutes} min left`;
}

// ---- connection state and API key ----

/**
 * The pill says how the page reaches the server; each card, how its news arrives.
 * @param {string} mode
 */
function showLink(mode) {
  link = mode;
  showMode(mode);
  for (const card of cards.values()) showVia(card);
}

/**
 * What went wrong, in words a person can act on (the server's own words where useful).
 * @param {Error} err
 * @returns {string}
 */
function humanError(err) {
  if (isUnreachable(err)) {
    return "Cannot reach the server: it may be restarting, or the network is down. " +
      "Try again in a moment.";
  }
  const detail = err.message ? ` (${err.message})` : "";
  if (err.status === 429) {
    const wait = err.retryAfterS ? ` in ${Math.ceil(err.retryAfterS)} s` : " shortly";
    return `Too many requests: try again${wait}.`;
  }
  if (err.status === 413) return `The payload is too large for this server${detail}.`;
  if (err.status === 503) return `The server cannot take requests right now${detail}.`;
  if (err.status >= 500) return `The server failed${detail}.`;
  return err.message || String(err);
}

let recovering = null; // the timer of recover()'s next question, while it asks

/** While nothing answers (and no watcher is polling): ask now and then, say when it is back. */
function recover() {
  if (recovering !== null) return;
  showLink("unreachable");
  let attempt = 0;
  const tick = async () => {
    try {
      await client.jobTypes();
    } catch (err) {
      if (isUnreachable(err)) {
        recovering = setTimeout(tick, RECOVER_MS[Math.min(attempt++, RECOVER_MS.length - 1)]);
        return;
      }
    }
    recovering = null;
    if (types.length === 0) start(); // the form was never built: build it now
    else recovered();
  };
  recovering = setTimeout(tick, RECOVER_MS[attempt++]);
}

/** Something answered: the pill says what the watcher knows again (typed input stays). */
function recovered() {
  clearTimeout(recovering);
  recovering = null;
  if (link === "unreachable") showLink(watcher?.mode || "ready");
}

/** @param {string} message why a key is needed */
function needKey(message) {
  showLink("offline");
  askForKey(message);
}

bindKeyPanel((key) => {
  client = createClient({ apiKey: key });
  start();
});

// ---- the form, built from the job types' JSON Schemas ----

/**
 * @param {object} schema a property's schema
 * @param {object} root the payload's schema ($defs)
 * @returns {{prop: object, nullable: boolean}}
 */
function resolve(schema, root) {
  // Pydantic writes optional fields as anyOf [X, null] and enums as $ref into $defs.
  let prop = schema;
  let nullable = false;
  if (prop.$ref) prop = { ...root.$defs?.[prop.$ref.split("/").pop()], ...prop };
  if (Array.isArray(prop.anyOf)) {
    const options = prop.anyOf.filter((s) => s.type !== "null");
    nullable = options.length < prop.anyOf.length;
    if (options.length === 1) prop = { ...prop, ...resolve(options[0], root).prop };
  }
  return { prop, nullable };
}

/**
 * @param {object} prop
 * @returns {string[]} its limits, in words
 */
function constraintsOf(prop) {
  const parts = [];
  const min = prop.minimum ?? prop.exclusiveMinimum;
  const max = prop.maximum ?? prop.exclusiveMaximum;
  if (min !== undefined && max !== undefined) parts.push(`${min}–${max}`);
  else if (min !== undefined) parts.push(`at least ${min}`);
  else if (max !== undefined) parts.push(`at most ${max}`);
  if (prop.maxLength) parts.push(`up to ${prop.maxLength} characters`);
  return parts;
}

/**
 * @param {string} name
 * @param {object} prop its schema
 * @param {boolean} required
 * @returns {{input: HTMLElement, read: () => *, inline?: boolean}}
 */
function inputFor(name, prop, required) {
  const id = `f-${name}`;
  const common = { id, name, required };
  if (prop.enum) {
    const select = el("select", common);
    if (!required) select.append(el("option", { value: "" }, "(default)"));
    for (const value of prop.enum) select.append(el("option", { value }, String(value)));
    if (prop.default !== undefined && prop.default !== null) select.value = prop.default;
    return { input: select, read: () => select.value || undefined };
  }
  if (prop.type === "boolean") {
    const box = el("input", { ...common, type: "checkbox", checked: prop.default === true });
    return { input: box, read: () => box.checked, inline: true };
  }
  if (prop.type === "integer" || prop.type === "number") {
    const input = el("input", {
      ...common,
      type: "number",
      inputMode: prop.type === "integer" ? "numeric" : "decimal",
      step: prop.type === "integer" ? "1" : "any",
      min: prop.minimum ?? prop.exclusiveMinimum,
      max: prop.maximum ?? prop.exclusiveMaximum,
      value: prop.default ?? "",
    });
    return { input, read: () => (input.value === "" ? undefined : Number(input.value)) };
  }
  if (prop.type === "array") {
    const area = el("textarea", { ...common, rows: 3, placeholder: "one per line" });
    const numeric = ["integer", "number"].includes(prop.items?.type);
    const read = () => {
      const lines = area.value.split("\n").map((l) => l.trim()).filter(Boolean);
      return lines.length || required ? lines.map((l) => (numeric ? Number(l) : l)) : undefined;
    };
    return { input: area, read };
  }
  if (prop.type === "string") {
    const long = !prop.maxLength || prop.maxLength > 300;
    const input = long
      ? el("textarea", { ...common, rows: 3, maxLength: prop.maxLength })
      : el("input", { ...common, type: "text", maxLength: prop.maxLength });
    input.value = prop.default ?? "";
    return { input, read: () => (input.value === "" ? undefined : input.value) };
  }
  // Anything else (objects, unions): JSON, checked on submit.
  const area = el("textarea", { ...common, rows: 3, placeholder: "JSON" });
  if (prop.default !== undefined && prop.default !== null) {
    area.value = JSON.stringify(prop.default);
  }
  return { input: area, read: () => (area.value.trim() ? JSON.parse(area.value) : undefined) };
}

let readers = [];

/**
 * The payload's fields for a job type (from GET /v1/job-types).
 * @param {object | undefined} type
 */
function buildFields(type) {
  const box = $("fields");
  box.querySelectorAll(".field, .more").forEach((node) => node.remove());
  readers = [];
  $("job-type-desc").textContent = type?.description || "";
  if (!type) return;
  const schema = type.payload_schema || {};
  const required = new Set(schema.required || []);
  // Optional fields without a default value wait behind "More options".
  const more = el("details", { className: "more" }, el("summary", {}, "More options"));
  const moreBody = el("div", { className: "more-body" });
  more.append(moreBody);
  for (const [name, raw] of Object.entries(schema.properties || {})) {
    const { prop, nullable } = resolve(raw, schema);
    const isRequired = required.has(name) && !nullable;
    const { input, read, inline } = inputFor(name, prop, isRequired);
    const hintId = `f-${name}-hint`;
    const errorId = `f-${name}-error`;
    const hintText = [prop.description, ...constraintsOf(prop)].filter(Boolean).join("; ");
    input.setAttribute("aria-describedby", `${hintText ? hintId : ""} ${errorId}`.trim());
    const label = el("label", { htmlFor: input.id }, humanize(name));
    if (isRequired) label.append(el("span", { className: "req", ariaHidden: "true" }, " *"));
    const hint = hintText ? el("p", { id: hintId, className: "hint" }, hintText) : "";
    const error = el("p", { id: errorId, className: "field-error", hidden: true });
    const field = inline
      ? el("div", { className: "field inline" }, el("div", { className: "check" }, input, label),
        hint, error)
      : el("div", { className: "field" }, label, input, hint, error);
    const optional = nullable && (prop.default === null || prop.default === undefined);
    (optional ? moreBody : box).append(field);
    readers.push({ name, read, input, error, more: optional ? more : null });
  }
  if (moreBody.childElementCount) box.append(more);
}

// jsonschema's "required" error sits on the object that lacks the property, and names
// it only in its message: "'prompt' is a required property".
const REQUIRED = /^(['"])(.+)\1 is a required property$/;

/**
 * The form field a 422 detail ({loc, msg, type}) is about, if it is one of ours.
 * @param {{loc?: Array<string | number>, msg?: string, type?: string}} detail
 */
function fieldOf(detail) {
  const loc = Array.isArray(detail.loc) ? detail.loc : [];
  if (loc[0] !== "payload") return null;
  let name = loc[1];
  if (name === undefined && detail.type === "required") name = REQUIRED.exec(detail.msg)?.[2];
  return readers.find((r) => r.name === name) || null;
}

/**
 * Mark the fields the server named; returns the details no field took.
 * @param {unknown} details a 422's details
 * @returns {{marked: boolean, left: string[]}}
 */
function showFieldErrors(details) {
  const left = [];
  let first = null;
  for (const detail of Array.isArray(details) ? details : []) {
    const reader = fieldOf(detail);
    if (!reader) {
      if (detail?.msg) left.push(detail.msg);
      continue;
    }
    const shown = reader.error.hidden ? [] : [reader.error.textContent];
    reader.error.textContent = [...shown, detail.msg].join("; ");
    reader.error.hidden = false;
    reader.input.setAttribute("aria-invalid", "true");
    if (reader.more) reader.more.open = true;
    first ??= reader;
  }
  first?.input.focus();
  return { marked: first !== null, left };
}

function clearFieldErrors() {
  for (const r of readers) {
    r.error.hidden = true;
    r.error.textContent = "";
    r.input.removeAttribute("aria-invalid");
  }
}

/** @param {Error} err what submitting threw */
function showSubmitError(err) {
  if (err.status === 401) {
    needKey("This server needs an API key.");
    return;
  }
  if (err.status === 422) {
    const { marked, left } = showFieldErrors(err.details);
    // The server's own words: what the fields do not say, or the summary.
    const what = left.join("; ");
    if (marked) formError(`Check the marked fields.${what ? ` Also: ${what}` : ""}`);
    else formError(what ? `${err.message}: ${what}` : err.message);
    return;
  }
  formError(humanError(err));
  if (isUnreachable(err)) recover();
}

/** @param {string} message ("": none) */
function formError(message) {
  $("form-error").textContent = message || "";
  $("form-error").hidden = !message;
}

/**
 * Fill the job type select; false when the types could not be loaded.
 * @returns {Promise<boolean>}
 */
async function loadTypes() {
  const select = $("job-type");
  try {
    types = await client.jobTypes();
  } catch (err) {
    if (err.status === 401) needKey("This server needs an API key.");
    else formError(`Could not load the job types. ${humanError(err)}`);
    if (isUnreachable(err)) recover();
    return false;
  }
  formError("");
  const previous = (select.disabled ? "" : select.value) || load(TYPE_STORE, "");
  select.replaceChildren(...types.map((t) => el("option", { value: t.name }, t.name)));
  select.value = types.some((t) => t.name === previous) ? previous : types[0]?.name ?? "";
  select.disabled = $("submit").disabled = types.length === 0;
  buildFields(types.find((t) => t.name === select.value));
  return true;
}

$("job-type").addEventListener("change", (event) => {
  buildFields(types.find((t) => t.name === event.target.value));
  formError("");
});

// The Idempotency-Key of the last submission that got no answer: sending the same
// request again cannot make a second job if the first one did arrive.
let unanswered = null; // {body, key}

/**
 * The last unanswered submission's key when the same body is sent again, else a new one.
 * @param {string} body
 * @returns {string}
 */
function idempotencyKey(body) {
  if (unanswered?.body === body) return unanswered.key;
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

$("job-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  formError("");
  clearFieldErrors();
  const payload = {};
  for (const { name, read, input, error } of readers) {
    try {
      const value = read();
      if (value !== undefined) payload[name] = value;
    } catch {
      error.textContent = "Not valid JSON.";
      error.hidden = false;
      input.focus();
      return;
    }
  }
  const button = $("submit");
  button.disabled = true;
  button.textContent = "Submitting…";
  const type = $("job-type").value;
  const priority = $("priority").value;
  const body = JSON.stringify([type, payload, priority]);
  const key = idempotencyKey(body);
  try {
    const job = await client.submit(type, payload, { priority, idempotencyKey: key });
    unanswered = null;
    const card = addCard(job.id, { fresh: true });
    watcher.add(job.id, job);
    save(TYPE_STORE, job.type);
    recovered();
    reveal(card.node);
  } catch (err) {
    unanswered = isUnreachable(err) ? { body, key } : null;
    showSubmitError(err);
  } finally {
    button.disabled = false;
    button.textContent = "Submit job";
  }
});

// ---- cards ----

function saveCards() {
  save(CARDS_STORE, [...cards.keys()].reverse().slice(0, MAX_CARDS));
}

/**
 * @param {string} id
 * @param {{fresh?: boolean}} [options] fresh: the job is known to be active
 * @returns {Card}
 */
function addCard(id, { fresh = false } = {}) {
  if (cards.has(id)) return cards.get(id);
  const node = $("card-template").content.firstElementChild.cloneNode(true);
  node.dataset.jobId = id;
  node.querySelector(".job-id").textContent = shortId(id);
  node.querySelector(".job-id").title = id;
  const card = {
    id,
    node,
    bar: node.querySelector(".bar"),
    progress: node.querySelector(".progress"),
    output: node.querySelector(".output"),
    outLen: 0,
    sawActive: fresh,
    polled: false, // the last update came from a poll
    lineAt: 0,
    job: null,
  };
  node.querySelector(".cancel").addEventListener("click", () => cancel(card));
  node.querySelector(".retry").addEventListener("click", () => retry(card));
  node.querySelector(".dismiss").addEventListener("click", () => dismiss(card));
  cards.set(id, card);
  $("job-list").prepend(node);
  saveCards();
  updateEmpty();
  return card;
}

function updateEmpty() {
  $("empty").hidden = cards.size > 0;
  const finished = [...cards.values()].some((c) => c.job && isTerminal(c.job.status));
  $("clear-finished").hidden = !finished;
}

/**
 * @param {Card} card
 * @param {import("./pushsvc.js").Job} job
 * @param {import("./pushsvc.js").Event} event
 */
function renderOutput(card, job, event) {
  const text = job.output || "";
  const pre = card.output;
  const follow = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 24;
  if (event.kind === "output" && card.outLen + event.delta.length === text.length) {
    pre.append(event.delta); // the common case: only the new text touches the DOM
  } else if (card.outLen !== text.length || ["snapshot", "status"].includes(event.kind)) {
    pre.textContent = text; // a snapshot (or a new attempt) replaces the text
  }
  card.outLen = text.length;
  pre.hidden = text.length === 0;
  if (follow) pre.scrollTop = pre.scrollHeight;
}

/**
 * @param {import("./pushsvc.js").Job} job
 * @returns {string}
 */
function outcomeText(job) {
  if (job.status === "completed") {
    const result = job.result === null || job.result === undefined ? "" : JSON.stringify(job.result);
    return result && result.length <= 160 ? `Result: ${result}` : "Completed.";
  }
  if (job.status === "failed") {
    return `${job.error?.message || "Failed."}${job.error?.code ? ` (${job.error.code})` : ""}`;
  }
  if (job.status === "cancelled") return `Cancelled at ${Math.round(job.progress || 0)}%.`;
  if (job.status === "queued" && job.attempt > 1 && job.error) {
    const failed = `Attempt ${job.attempt - 1} failed (${job.error.message})`;
    if (job.waiting) return `${failed}.`; // the wait line counts down to the retry
    const wait = job.retry_in_s ? ` in ${Math.ceil(job.retry_in_s)} s` : "";
    return `${failed}; retrying${wait}.`;
  }
  return "";
}

/**
 * @param {Card} card
 * @param {import("./pushsvc.js").Job} job
 * @param {import("./pushsvc.js").Event} event
 */
function render(card, job, event) {
  const moved = ["queue_position", "starts_in_s"].some((k) => job[k] !== card.job?.[k]);
  if (moved) card.lineAt = Date.now() / 1000;
  card.job = job;
  const { node } = card;
  const status = job.cancel_requested && job.status === "running" ? "cancelling" : job.status;
  node.dataset.status = job.status;
  node.querySelector(".job-type").textContent = job.type || "job";
  const name = `${job.type || "job"} ${shortId(job.id)}`;
  for (const action of ["cancel", "retry", "dismiss"]) {
    const button = node.querySelector(`.${action}`);
    button.setAttribute("aria-label", `${button.textContent.trim()} ${name}`);
  }
  const badge = node.querySelector(".badge");
  badge.textContent = status;
  badge.dataset.status = status;
  const pct = Math.round(Math.max(0, Math.min(100, job.progress || 0)));
  card.bar.style.width = `${pct}%`;
  card.progress.setAttribute("aria-valuenow", String(pct));
  card.progress.setAttribute("aria-label", `${job.type || "job"} ${shortId(job.id)} progress`);
  card.progress.setAttribute("aria-valuetext", `${pct}% ${status}`);
  node.querySelector(".pct").textContent = `${pct}%`;
  const ended = isTerminal(job.status);
  // The last stage ("finalizing") is history once the job ended: the outcome says the rest.
  const stage = ended ? "" : [job.stage, job.message].filter(Boolean).join(" · ");
  const line = renderLine(card);
  const idle = job.status === "queued" && !line ? "waiting…" : "";
  node.querySelector(".stage").textContent = stage || idle;
  const llm = node.querySelector(".llm");
  setText(llm, llmWords(job.llm));
  llm.hidden = !llm.textContent;
  node.querySelector(".eta").textContent = job.status === "running" ? formatEta(job.eta_s) : "";
  const meta = [`attempt ${job.attempt ?? 1} of ${job.max_attempts ?? 1}`];
  if (job.created_at) meta.push(`submitted ${clock(job.created_at)}`);
  if (job.finished_at && job.started_at) {
    meta.push(`ran ${seconds(job.finished_at - job.started_at)}`);
  }
  node.querySelector(".meta").textContent = meta.join(" · ");
  renderOutput(card, job, event);
  const outcome = node.querySelector(".outcome");
  outcome.textContent = outcomeText(job);
  outcome.hidden = !outcome.textContent;
  node.querySelector(".cancel").hidden = ended;
  node.querySelector(".cancel").disabled = Boolean(job.cancel_requested);
  node.querySelector(".retry").hidden = !(job.status === "failed" || job.status === "cancelled");
  node.querySelector(".dismiss").hidden = !ended;
  card.polled = Boolean(event.polled);
  showVia(card);
  if (!ended) card.sawActive = true;
  updateEmpty();
}

/**
 * A card's wait or place in line (counting down), in words; "" when neither.
 * @param {Card} card
 * @returns {string}
 */
function renderLine(card) {
  const { job, node } = card;
  const now = Date.now() / 1000;
  let text = "";
  let reason = "";
  if (job && !isTerminal(job.status) && job.waiting) {
    text = waitWords(job.waiting, now);
    reason = job.waiting.reason;
  } else if (job?.status === "queued") {
    const startsIn = job.starts_in_s ?? null;
    text = lineWords(job.queue_position, startsIn === null ? null : startsIn - (now - card.lineAt));
    reason = text ? "line" : "";
  }
  const box = node.querySelector(".line");
  setText(box, text);
  box.dataset.reason = reason;
  box.hidden = !text;
  return text;
}

// Waits and start estimates count down each second, between events too.
setInterval(() => {
  for (const card of cards.values()) {
    if (card.job && !isTerminal(card.job.status)) renderLine(card);
  }
}, 1000);

const VIA_TEXT = {
  connecting: "connecting…",
  stream: "live",
  polling: "updated by polling",
  unreachable: "server unreachable, retrying",
};

/**
 * How the card's news arrives: live, by polling, or not at all while the server is away.
 * @param {Card} card
 */
function showVia(card) {
  if (!card.job) return;
  const ended = isTerminal(card.job.status);
  // What the watcher says, once it has said anything (a new card waits for its stream).
  let via = ["stream", "polling", "unreachable"].includes(link) ? link : "connecting";
  if (ended) via = card.polled ? "polling" : "stream";
  card.node.dataset.via = via;
  card.node.querySelector(".eta").hidden = via === "unreachable"; // it counts from old news
  const node = card.node.querySelector(".via");
  node.dataset.via = via;
  node.textContent = VIA_TEXT[via];
}

/**
 * Bring a new card into view when it is not (on a phone the list is below the form).
 * @param {HTMLElement} node
 */
function reveal(node) {
  const box = node.getBoundingClientRect();
  if (box.top >= 0 && box.bottom <= window.innerHeight) return;
  const still = window.matchMedia("(prefers-reduced-motion: reduce)").matches;
  node.scrollIntoView({ block: "nearest", behavior: still ? "auto" : "smooth" });
}

/**
 * Say on the card itself that an action failed (a toast is gone in seconds).
 * @param {Card} card
 * @param {string} text ("": none)
 */
function cardError(card, text) {
  const note = card.node.querySelector(".card-error");
  note.textContent = text || "";
  note.hidden = !text;
}

/**
 * Every job event of the watcher: render its card, toast its end.
 * @param {import("./pushsvc.js").Job} job
 * @param {import("./pushsvc.js").Event} event
 */
function onEvent(job, event) {
  const card = cards.get(job.id) || addCard(job.id);
  // A refused retry or cancel stays said until the job ends again (or the next click).
  if (isTerminal(event.kind) && card.sawActive) cardError(card, "");
  render(card, job, event);
  if (isTerminal(event.kind) && card.sawActive) {
    card.sawActive = false;
    toast(job);
  }
}

/** @param {Card} card */
async function cancel(card) {
  const button = card.node.querySelector(".cancel");
  button.disabled = true;
  button.textContent = "Cancelling…";
  cardError(card, "");
  try {
    await client.cancel(card.id);
  } catch (err) {
    // 409: it ended meanwhile, and its end is on the way.
    if (err.status !== 409) {
      button.disabled = false;
      cardError(card, `Could not cancel: ${humanError(err)}`);
    }
  } finally {
    button.textContent = "Cancel";
  }
}

/** @param {Card} card */
async function retry(card) {
  const button = card.node.querySelector(".retry");
  button.disabled = true;
  button.textContent = "Retrying…";
  cardError(card, "");
  try {
    const job = await client.retry(card.id);
    card.sawActive = true;
    watcher.add(card.id, job);
  } catch (err) {
    if (err.status === 409) {
      cardError(card, `Retry refused by the server: ${err.message}.`);
      // It moved on elsewhere (another tab retried it): show, and follow, where it is.
      client.get(card.id).then((job) => watcher.add(card.id, job), () => {});
    } else {
      cardError(card, `Retry failed: ${humanError(err)}`);
    }
  } finally {
    button.disabled = false;
    button.textContent = "Retry";
  }
}

/** @param {Card} card */
function dismiss(card) {
  const list = [...cards.keys()];
  const next = list[list.indexOf(card.id) - 1] || list[list.indexOf(card.id) + 1];
  card.node.remove();
  cards.delete(card.id);
  watcher.remove(card.id);
  saveCards();
  updateEmpty();
  // Keep keyboard users in the list rather than dropping focus to the page.
  const target = next && cards.get(next)?.node.querySelector("button:not([hidden])");
  (target || $("job-type")).focus();
}

$("clear-finished").addEventListener("click", () => {
  for (const card of [...cards.values()]) {
    if (card.job && isTerminal(card.job.status)) {
      card.node.remove();
      cards.delete(card.id);
      watcher.remove(card.id);
    }
  }
  saveCards();
  updateEmpty();
  $("job-type").focus();
});

// ---- toasts ----

/** @param {import("./pushsvc.js").Job} job a job that just ended */
function toast(job) {
  const words = { completed: "completed", failed: "failed", cancelled: "was cancelled" };
  const detail = job.status === "failed" && job.error ? `: ${job.error.message}` : "";
  toastText(`${job.type} ${shortId(job.id)} ${words[job.status]}${detail}`, job.status);
}

/**
 * @param {string} text
 * @param {string} status its tone
 */
function toastText(text, status) {
  const close = el("button", { type: "button", className: "toast-close", ariaLabel: "Dismiss" },
    "×");
  const node = el("div", { className: "toast" },
    el("span", { className: "toast-dot", ariaHidden: "true" }), el("span", {}, text), close);
  node.dataset.status = status;
  close.addEventListener("click", () => node.remove());
  const box = $("toasts");
  box.append(node);
  while (box.childElementCount > MAX_TOASTS) box.firstElementChild.remove();
  setTimeout(() => node.remove(), 8000);
}

// On one column the toasts float at the bottom: keep that much room below the last card.
new ResizeObserver(() => {
  const box = $("toasts");
  const floating = getComputedStyle(box).position === "fixed";
  const room = floating && box.childElementCount ? box.offsetHeight + 12 : 0;
  document.body.style.setProperty("--toast-room", `${room}px`);
}).observe($("toasts"));

// ---- start ----

/** @returns {import("./pushsvc.js").Handlers} */
function handlers() {
  return {
    snapshot: onEvent,
    status: onEvent,
    progress: onEvent,
    queue: onEvent,
    output: onEvent,
    done: onEvent, // every final event: completed, failed or cancelled
    mode: (mode) => showLink(mode),
    error: (err, id) => {
      if (err.status === 401) needKey("The API key was refused.");
      else if (err.status === 404 && id && cards.has(id)) {
        const card = cards.get(id);
        card.node.dataset.status = "gone";
        card.node.querySelector(".badge").textContent = "expired";
        card.node.querySelector(".outcome").textContent = "This job is no longer kept.";
        card.node.querySelector(".outcome").hidden = false;
        card.node.querySelector(".cancel").hidden = true;
        card.node.querySelector(".dismiss").hidden = false;
      }
    },
  };
}

/** Load the types, show the remembered cards, and watch the jobs still active. */
async function start() {
  watcher?.close();
  showLink("connecting");
  if (!(await loadTypes())) return;
  const active = rememberedJobs();
  const shown = load(CARDS_STORE, []).filter((id) => typeof id === "string");
  for (const id of [...shown].reverse()) addCard(id);
  for (const id of active) addCard(id, { fresh: true });
  watcher = watchJobs(active, handlers(), { apiKey: client.apiKey });
  // Finished jobs are not streamed; one GET each shows how they ended.
  for (const id of shown.filter((id) => !active.includes(id))) {
    client.get(id).then(
      (job) => watcher.add(id, job),
      (err) => {
        if (err.status === 404) {
          cards.get(id)?.node.remove();
          cards.delete(id);
          forgetJob(id);
          saveCards();
          updateEmpty();
        }
      },
    );
  }
  if (active.length === 0) showLink("ready");
}

start();
