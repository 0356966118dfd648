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
