// The job console: a form per job type (from its JSON Schema), one card per job, toasts.
// All live updates come through pushsvc.js (one multiplexed stream, or polling).

import {
  createClient,
  forgetJob,
  isTerminal,
  rememberedJobs,
  watchJobs,
} from "./pushsvc.js";
import { askForKey, bindKeyPanel, storedKey } from "./keypanel.js";

const CARDS_STORE = "pushsvc.console.cards"; // ids of the cards shown, newest first
const TYPE_STORE = "pushsvc.console.type"; // the job type last submitted
const MAX_CARDS = 50;

const $ = (id) => document.getElementById(id);
const cards = new Map(); // job id -> card state
let client = createClient({ apiKey: storedKey() });
let watcher = null;
let types = [];

// ---- small helpers ----

function load(key, fallback) {
  try {
    return JSON.parse(localStorage.getItem(key)) ?? fallback;
  } catch {
    return fallback;
  }
}

function save(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
  } catch {
    // storage disabled: the page still works, it just forgets on reload
  }
}

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

function humanize(name) {
  const unit = name.match(/_(ms|s)$/);
  const words = name.replace(/_(ms|s)$/, "").replace(/_/g, " ");
  const label = words.charAt(0).toUpperCase() + words.slice(1);
  return unit ? `${label} (${unit[1]})` : label;
}

function shortId(id) {
  return id.slice(0, 8);
}

function formatEta(seconds) {
  if (seconds === null || seconds === undefined) return "";
  if (seconds < 1) return "almost done";
  if (seconds < 60) return `about ${Math.ceil(seconds)} s left`;
  const minutes = Math.round(seconds / 60);
  return `about ${minutes} min left`;
}

function formatTime(epoch) {
  return epoch ? new Date(epoch * 1000).toLocaleTimeString([], { hour12: false }) : "";
}

function formatDuration(seconds) {
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
}

// ---- connection state and API key ----

const MODE_LABELS = {
  connecting: "Connecting…",
  ready: "Ready",
  stream: "Live: streaming",
  polling: "Polling (streaming unavailable)",
  offline: "Not connected",
};

function showMode(mode) {
  document.body.dataset.mode = mode;
  $("conn").dataset.mode = mode;
  $("conn-label").textContent = MODE_LABELS[mode] || mode;
}

function needKey(message) {
  showMode("offline");
  askForKey(message);
}

bindKeyPanel((key) => {
  client = createClient({ apiKey: key });
  start();
});

// ---- the form, built from the job types' JSON Schemas ----

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

function showFieldErrors(details) {
  for (const { error } of readers) error.hidden = true;
  let shown = false;
  for (const detail of Array.isArray(details) ? details : []) {
    const name = detail.loc?.[0] === "payload" ? detail.loc[1] : null;
    const reader = readers.find((r) => r.name === name);
    if (!reader) continue;
    reader.error.textContent = detail.msg;
    reader.error.hidden = false;
    reader.input.setAttribute("aria-invalid", "true");
    if (reader.more) reader.more.open = true;
    if (!shown) reader.input.focus();
    shown = true;
  }
  return shown;
}

function formError(message) {
  $("form-error").textContent = message || "";
  $("form-error").hidden = !message;
}

async function loadTypes() {
  const select = $("job-type");
  try {
    types = await client.jobTypes();
  } catch (err) {
    if (err.status === 401) needKey("This server needs an API key.");
    else formError(`Could not load the job types: ${err.message}`);
    return false;
  }
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

$("job-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  formError("");
  for (const r of readers) {
    r.error.hidden = true;
    r.input.removeAttribute("aria-invalid");
  }
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
  try {
    const job = await client.submit($("job-type").value, payload, {
      priority: $("priority").value,
    });
    addCard(job.id, { fresh: true });
    watcher.add(job.id, job);
    save(TYPE_STORE, job.type);
  } catch (err) {
    if (err.status === 401) needKey("This server needs an API key.");
    else if (!showFieldErrors(err.details)) formError(err.message);
  } finally {
    button.disabled = false;
    button.textContent = "Submit job";
  }
});

// ---- cards ----

function saveCards() {
  save(CARDS_STORE, [...cards.keys()].reverse().slice(0, MAX_CARDS));
}

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
    const wait = job.retry_in_s ? ` in ${Math.ceil(job.retry_in_s)} s` : "";
    return `Attempt ${job.attempt - 1} failed (${job.error.message}); retrying${wait}.`;
  }
  return "";
}

function render(card, job, event) {
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
  const stage = [job.stage, job.message].filter(Boolean).join(" · ");
  node.querySelector(".stage").textContent = stage || (job.status === "queued" ? "waiting…" : "");
  node.querySelector(".eta").textContent = job.status === "running" ? formatEta(job.eta_s) : "";
  const meta = [`attempt ${job.attempt ?? 1} of ${job.max_attempts ?? 1}`];
  if (job.created_at) meta.push(`submitted ${formatTime(job.created_at)}`);
  if (job.finished_at && job.started_at) {
    meta.push(`ran ${formatDuration(job.finished_at - job.started_at)}`);
  }
  node.querySelector(".meta").textContent = meta.join(" · ");
  renderOutput(card, job, event);
  const outcome = node.querySelector(".outcome");
  outcome.textContent = outcomeText(job);
  outcome.hidden = !outcome.textContent;
  const ended = isTerminal(job.status);
  node.querySelector(".cancel").hidden = ended;
  node.querySelector(".cancel").disabled = Boolean(job.cancel_requested);
  node.querySelector(".retry").hidden = !(job.status === "failed" || job.status === "cancelled");
  node.querySelector(".dismiss").hidden = !ended;
  const via = node.querySelector(".via");
  via.dataset.via = event.polled ? "polling" : "stream";
  node.dataset.via = via.dataset.via;
  via.textContent = event.polled ? "updated by polling" : "live";
  if (!ended) card.sawActive = true;
  updateEmpty();
}

function onEvent(job, event) {
  const card = cards.get(job.id) || addCard(job.id);
  render(card, job, event);
  if (isTerminal(event.kind) && card.sawActive) {
    card.sawActive = false;
    toast(job);
  }
}

async function cancel(card) {
  const button = card.node.querySelector(".cancel");
  button.disabled = true;
  button.textContent = "Cancelling…";
  try {
    await client.cancel(card.id);
  } catch (err) {
    if (err.status !== 409) toastText(`Could not cancel: ${err.message}`, "failed");
  } finally {
    button.textContent = "Cancel";
  }
}

async function retry(card) {
  const button = card.node.querySelector(".retry");
  button.disabled = true;
  try {
    const job = await client.retry(card.id);
    card.sawActive = true;
    watcher.add(card.id, job);
  } catch (err) {
    toastText(`Could not retry: ${err.message}`, "failed");
  } finally {
    button.disabled = false;
  }
}

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

function toast(job) {
  const words = { completed: "completed", failed: "failed", cancelled: "was cancelled" };
  const detail = job.status === "failed" && job.error ? `: ${job.error.message}` : "";
  toastText(`${job.type} ${shortId(job.id)} ${words[job.status]}${detail}`, job.status);
}

function toastText(text, status) {
  const close = el("button", { type: "button", className: "toast-close", ariaLabel: "Dismiss" },
    "×");
  const node = el("div", { className: "toast" },
    el("span", { className: "toast-dot", ariaHidden: "true" }), el("span", {}, text), close);
  node.dataset.status = status;
  close.addEventListener("click", () => node.remove());
  $("toasts").append(node);
  setTimeout(() => node.remove(), 8000);
}

// ---- start ----

function handlers() {
  return {
    snapshot: onEvent,
    status: onEvent,
    progress: onEvent,
    output: onEvent,
    done: onEvent,
    failed: onEvent,
    cancelled: onEvent,
    mode: (mode) => showMode(mode),
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

async function start() {
  watcher?.close();
  showMode("connecting");
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
  if (active.length === 0) showMode("ready");
}

start();
