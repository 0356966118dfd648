// What the console and the dashboard share: the top bar (the connection pill, the API-key
// panel), what they keep in localStorage, and how they write times. Imports change nothing
// on the page: each page calls what it needs.

const KEY_STORE = "pushsvc.apiKey"; // one key, shared by every page of this origin

/**
 * @param {string} id
 * @returns {HTMLElement}
 */
export const $ = (id) => document.getElementById(id);

/**
 * Set a node's text only when it changes: no churn for screen readers.
 * @param {Node} node
 * @param {string} text
 */
export function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

// ---- storage (a page works without it: it just forgets on reload) ----

/**
 * @param {string} key
 * @param {*} fallback
 * @returns {*} the JSON stored under `key`, or `fallback`
 */
export function load(key, fallback) {
  try {
    return JSON.parse(localStorage.getItem(key)) ?? fallback;
  } catch {
    return fallback;
  }
}

/**
 * @param {string} key
 * @param {*} value stored as JSON
 */
export function save(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
  } catch {
    // storage disabled or full
  }
}

// ---- the top bar: connection pill and API key ----

/** The pill's words for each mode (pushsvc.js's modes and the pages' own). */
export const MODE_LABELS = Object.freeze({
  connecting: "Connecting…",
  ready: "Ready",
  stream: "Live: streaming",
  polling: "Polling (streaming unavailable)",
  unreachable: "Server unreachable, retrying…",
  offline: "Not connected",
});

/**
 * Show how the page reaches the server (the pill, and body[data-mode] for the styles).
 * @param {string} mode a key of MODE_LABELS
 */
export function showMode(mode) {
  document.body.dataset.mode = mode;
  $("conn").dataset.mode = mode;
  setText($("conn-label"), MODE_LABELS[mode] || mode);
}

/** @returns {string | null} the API key kept in this browser */
export function storedKey() {
  try {
    return localStorage.getItem(KEY_STORE) || null;
  } catch {
    return null;
  }
}

/**
 * Fill the key field with the stored key; on submit, store the new one and call onSave.
 * @param {(key: string | null) => void} onSave
 */
export function bindKeyPanel(onSave) {
  $("api-key").value = storedKey() || "";
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    try {
      if (key) localStorage.setItem(KEY_STORE, key);
      else localStorage.removeItem(KEY_STORE);
    } catch {
      // kept for this page only
    }
    $("key-note").textContent = key ? "Saved." : "Cleared.";
    onSave(key || null);
  });
}

/**
 * Open the key panel and say why a key is needed.
 * @param {string} message
 */
export function askForKey(message) {
  $("key-panel").open = true;
  $("key-note").textContent = message;
  $("api-key").focus();
}

// ---- times ----

/**
 * @param {number | null | undefined} epoch epoch seconds
 * @returns {string} the local time of day, 24-hour ("" for none)
 */
export function clock(epoch) {
  return epoch ? new Date(epoch * 1000).toLocaleTimeString([], { hour12: false }) : "";
}

/**
 * A duration: "350 ms", "2.35 s", "12.5 s", "3 min 5 s", "1 h 20 min".
 * @param {number | null | undefined} s seconds
 * @returns {string} ("–" for none)
 */
export function seconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 10) return `${s.toFixed(2)} s`;
  if (s < 60) return `${s.toFixed(1)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

// ---- a job's wait, place in line and model call, in words ----
// (pushsvc submit --follow says the same: pushsvc/tools/submit.py)

/**
 * @param {number} n
 * @returns {string} "1st", "2nd", "3rd", "11th", "22nd"...
 */
export function ordinal(n) {
  const tens = n % 100;
  const suffix = tens >= 11 && tens <= 13 ? "th" : { 1: "st", 2: "nd", 3: "rd" }[n % 10] || "th";
  return `${n}${suffix}`;
}

/**
 * A wait in whole seconds (rounded up), minutes past a minute: "12 s", "3 min", "2 h".
 * @param {number} s
 * @returns {string}
 */
export function waitFor(s) {
  const whole = Math.max(1, Math.ceil(s));
  if (whole < 60) return `${whole} s`;
  if (whole < 3600) return `${Math.round(whole / 60)} min`;
  return `${Math.round(whole / 3600)} h`;
}

/**
 * Why a job is not moving: "provider rate limit, retrying in 12 s", counting down to
 * `waiting.until` (epoch seconds; null: no known end).
 * @param {{reason: string, until: number | null} | null | undefined} waiting
 * @param {number} now epoch seconds
 * @returns {string} "" when it is not waiting
 */
export function waitWords(waiting, now) {
  if (!waiting) return "";
  const left = waiting.until === null || waiting.until === undefined ? null : waiting.until - now;
  /** @param {string} verb */
  const when = (verb) => {
    if (left === null) return "";
    return left >= 0.5 ? `${verb} in ${waitFor(left)}` : `${verb} now`;
  };
  const joined = (what, verb) => [what, when(verb)].filter(Boolean).join(", ");
  switch (waiting.reason) {
    case "rate_limited":
      return joined("provider rate limit", "retrying");
    case "model_limit":
      return joined("model limit", "starts");
    case "tenant_limit":
      return joined("your running-job limit is reached", "starts");
    case "backoff":
      return when("retrying") || "retrying soon";
    default:
      return joined(`waiting (${waiting.reason})`, "starts");
  }
}

/**
 * A queued job's place in line: "3rd in line, starts in ~12 s".
 * @param {number | null | undefined} position 1: next
 * @param {number | null | undefined} startsInS
 * @returns {string} "" when not known
 */
export function lineWords(position, startsInS) {
  if (position === null || position === undefined) return "";
  const place = position === 1 ? "next in line" : `${ordinal(position)} in line`;
  if (startsInS === null || startsInS === undefined) return place;
  return startsInS < 0.5 ? `${place}, starts any moment` : `${place}, starts in ~${waitFor(startsInS)}`;
}

/**
 * @param {number} usd
 * @returns {string} "$0.0012", "$1.25"
 */
export function dollars(usd) {
  return `$${usd < 0.01 ? usd.toPrecision(2) : usd.toFixed(2)}`;
}

/**
 * The model call: "fake-1 · first token 420 ms · 85 tok/s · 12 + 120 tokens · $0.0012"
 * (tokens "~" when estimated, cost only when the price is known).
 * @param {{model: string, ttft_s: number | null, tokens_per_s: number | null,
 *   prompt_tokens: number | null, completion_tokens: number | null, estimated: boolean,
 *   cost_usd: number | null} | null | undefined} llm
 * @returns {string}
 */
export function llmWords(llm) {
  if (!llm) return "";
  const parts = [llm.model || "model"];
  if (typeof llm.ttft_s === "number") parts.push(`first token ${seconds(llm.ttft_s)}`);
  if (typeof llm.tokens_per_s === "number") parts.push(`${Math.round(llm.tokens_per_s)} tok/s`);
  const about = llm.estimated ? "~" : "";
  const tokens = [llm.prompt_tokens, llm.completion_tokens];
  if (tokens.every((n) => typeof n === "number")) {
    parts.push(`${about}${tokens[0]} in + ${about}${tokens[1]} out tokens`);
  } else if (typeof llm.completion_tokens === "number") {
    parts.push(`${about}${llm.completion_tokens} tokens`);
  }
  if (typeof llm.cost_usd === "number") parts.push(dollars(llm.cost_usd));
  return parts.join(" · ");
}
