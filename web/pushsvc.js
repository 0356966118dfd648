// pushsvc.js: watch pushsvc jobs from a browser. Plain ES modules (this and tabs.js), no
// dependencies.
//
// Server-Sent Events first (EventSource, with its native Last-Event-ID resume); when
// streaming does not work (a stream that cannot open, a 503, repeated errors, no
// EventSource, or no event in time because a proxy buffers) it polls GET /v1/jobs/{id}
// with If-None-Match and backoff, and calls the same handlers, then tries streaming
// again, soon at first, then less often. When neither reaches the server its mode
// says so ("unreachable") until one does.
//
//   const handle = watchJob(job.id, {progress(job) {...}, output(job, ev) {...},
//                                    done(job, ev) {...}}, {apiKey, eventsUrl: job.links.events});
//   handle.close();
//
// Every job handler is called as handler(job, event): `job` is the job as known after
// the event (a snapshot plus the events since), `event` the event's data with its
// `kind`. `done` follows every final event (completed, failed or cancelled).
//
// One `Feed` keeps the connection (stream, polls, retries) in one state field; what it
// streams and polls is its source: the jobs of a watcher here (`JobSet`), the stats
// document on the dashboard.
//
// tabs.js (beside this file, imported by it) shares one stream among the tabs of an
// origin and key (`TabLink`, see watchJobs).

import { ATTACH_MS, TabLink } from "./tabs.js";

export { TabLink };

/**
 * @typedef {"queued" | "running" | "completed" | "failed" | "cancelled"} Status
 *
 * @typedef {object} JobError the last attempt's error
 * @property {string} code
 * @property {string} message
 * @property {boolean} retryable
 *
 * @typedef {object} Job a job as GET /v1/jobs/{id} returns it, or as known after events
 * @property {string} id
 * @property {string} type
 * @property {Status} status
 * @property {number} progress 0 to 100
 * @property {string | null} stage
 * @property {string | null} message
 * @property {string} output the text streamed so far
 * @property {*} result
 * @property {JobError | null} error
 * @property {number} attempt
 * @property {number} max_attempts
 * @property {"high" | "normal" | "low"} priority
 * @property {number} created_at epoch seconds, like every time here
 * @property {number | null} started_at the current attempt's start
 * @property {number | null} finished_at
 * @property {number | null} eta_s
 * @property {number | null} [queue_position] a queued attempt's place in line (1: next)
 * @property {number | null} [starts_in_s] seconds until it starts, at the measured rate
 * @property {{reason: string, until: number | null} | null} [waiting] why it is not moving
 * @property {object | null} [llm] the model call: model, ttft_s, tokens_per_s, tokens, cost
 * @property {number} seq the seq of its last event
 * @property {string} [epoch] the history seq counts in (snapshots that GET returns)
 * @property {boolean} [cancel_requested] a cancel was asked of the running job
 * @property {number} [retry_in_s] queued for its next attempt in this many seconds
 * @property {{self: string, events: string, events_expires_at: number}} [links]
 *
 * @typedef {"snapshot" | "status" | "progress" | "queue" | "output" | "completed" |
 *   "failed" | "cancelled"} EventKind
 *
 * @typedef {object} Event an event's data (the `data:` of an SSE frame) and its kind
 * @property {EventKind} kind
 * @property {string} job_id
 * @property {number} seq the job's position
 * @property {number} ts when it was published
 * @property {boolean} [reset] a snapshot that stands for events the stream could not send
 * @property {boolean} [polled] made from polled snapshots, not streamed
 *
 * @typedef {"stream" | "polling" | "unreachable"} Mode how news reaches the page
 *
 * @callback JobHandler
 * @param {Job} job the job after the event
 * @param {Event} event the event
 * @returns {void}
 *
 * @typedef {object} Handlers every one optional; one that throws is logged, never fatal
 * @property {JobHandler} [snapshot] the whole job (first, and whenever it is replaced)
 * @property {JobHandler} [status]
 * @property {JobHandler} [progress]
 * @property {JobHandler} [queue] a queued job's place in line changed (no `id:`)
 * @property {JobHandler} [output] text appended: `event.delta`
 * @property {JobHandler} [completed]
 * @property {JobHandler} [failed]
 * @property {JobHandler} [cancelled]
 * @property {JobHandler} [done] after every final event, whichever its kind (`event.kind`)
 * @property {(mode: Mode, reason: string | null) => void} [mode] how news reaches the page
 *   now; reason: why it polls
 * @property {(err: ApiError | UnreachableError, jobId: string | null) => void} [error]
 *   a 401 (the watch then stops), or a job that is gone (404)
 *
 * @typedef {object} Options see DEFAULTS
 * @property {string} baseUrl
 * @property {string | null} apiKey
 * @property {string | null} eventsUrl
 * @property {number} firstEventTimeoutMs
 * @property {number} maxStreamErrors
 * @property {number} pollMinMs
 * @property {number} pollMaxMs
 * @property {number} unreachablePollMaxMs
 * @property {number} streamRetryMinMs
 * @property {number} streamRetryMs
 * @property {string | false} storageKey
 * @property {boolean} shareTabs
 * @property {number} tabPingMs
 */

const TERMINAL = new Set(["completed", "failed", "cancelled"]);
const KINDS = [
  "snapshot", "status", "progress", "queue", "output", "completed", "failed", "cancelled",
];
const TRANSPORT = ["job_id", "ts", "reset", "polled"]; // an event's, never the job's
const PROGRESS_FIELDS = ["progress", "stage", "message", "eta_s", "waiting", "llm"];
const QUEUE_FIELDS = ["queue_position", "starts_in_s"]; // a queued attempt's place in line
const FRESH_ATTEMPT = {
  progress: 0, stage: null, message: null, output: "", eta_s: null, waiting: null, llm: null,
};
const OUT_OF_LINE = { queue_position: null, starts_in_s: null };
const MAX_NAMED_JOBS = 100; // job= on one /v1/events stream

/** @type {Readonly<Options>} */
export const DEFAULTS = Object.freeze({
  baseUrl: "",
  apiKey: null,
  eventsUrl: null, // watchJob: the job's links.events (carries a job-scoped ?token=)
  firstEventTimeoutMs: 10000, // a stream that sends nothing this long is buffered: poll
  maxStreamErrors: 3, // consecutive stream errors before polling
  pollMinMs: 1000,
  pollMaxMs: 15000,
  unreachablePollMaxMs: 4000, // while nothing reaches the server, poll at least this often
  streamRetryMinMs: 2000, // while polling, try streaming again after this, doubling ...
  streamRetryMs: 30000, // ... up to this (at once this, when the server refused a stream)
  storageKey: "pushsvc.jobs", // localStorage key of active job ids; false: none
  shareTabs: true, // watchJobs: one stream for all tabs of an origin and key (see TabLink)
  tabPingMs: 10000, // the leading tab pings the others this often; 2-3 missed: forgotten
});

/**
 * Whether a status (or an event kind) is final.
 * @param {string} status
 * @returns {boolean}
 */
export function isTerminal(status) {
  return TERMINAL.has(status);
}

/** No answer at all: the network or the server is down (fetch rejected). */
export class UnreachableError extends Error {
  /** @param {unknown} cause what fetch threw */
  constructor(cause) {
    super("cannot reach the server", { cause });
    this.name = "UnreachableError";
    this.code = "unreachable";
    this.status = 0;
  }
}

/** An error answer of the API: {error: {code, message, details}} with its HTTP status. */
export class ApiError extends Error {
  /**
   * @param {number} status HTTP status
   * @param {string} code the API's stable error code
   * @param {string} message
   * @param {*} [details]
   * @param {number | null} [retryAfterS] the Retry-After header
   */
  constructor(status, code, message, details = null, retryAfterS = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.details = details;
    this.retryAfterS = retryAfterS;
  }
}

/**
 * @param {Response} resp
 * @returns {number | null} its Retry-After in seconds
 */
function retryAfter(resp) {
  const value = Number.parseFloat(resp.headers.get("Retry-After") || "");
  return Number.isFinite(value) && value >= 0 ? value : null;
}

const GATEWAY = new Set([502, 504]); // a proxy answering for a server that is down

/**
 * Does `err` mean the server is out of reach (no answer, or a proxy saying so)?
 * @param {unknown} err
 * @returns {boolean}
 */
export function isUnreachable(err) {
  return err instanceof UnreachableError || (err instanceof ApiError && GATEWAY.has(err.status));
}

/**
 * fetch, with a network failure turned into UnreachableError (an abort stays one).
 * @param {string} url
 * @param {RequestInit} init
 * @returns {Promise<Response>}
 */
async function reach(url, init) {
  try {
    return await fetch(url, init);
  } catch (err) {
    if (err && err.name === "AbortError") throw err;
    throw new UnreachableError(err);
  }
}

/**
 * @param {Response} resp an error answer
 * @returns {Promise<ApiError>}
 */
async function errorOf(resp) {
  let body = null;
  try {
    body = await resp.json();
  } catch {
    // not JSON (a proxy's page): the status says enough
  }
  const err = (body && body.error) || {};
  return new ApiError(
    resp.status,
    err.code || `http_${resp.status}`,
    err.message || `HTTP ${resp.status}`,
    err.details ?? null,
    retryAfter(resp),
  );
}

/**
 * A small JSON client for the v1 API (fetch; `Authorization: Bearer` with an API key).
 * @param {{baseUrl?: string, apiKey?: string | null}} [options]
 */
export function createClient({ baseUrl = "", apiKey = null } = {}) {
  /**
   * @param {string} path
   * @param {{method?: string, body?: *, headers?: object, signal?: AbortSignal}} [init]
   * @returns {Promise<*>} the JSON answer (null for 204); an error answer throws ApiError
   */
  async function call(path, { method = "GET", body, headers = {}, signal } = {}) {
    const h = { Accept: "application/json", ...headers };
    if (apiKey) h.Authorization = `Bearer ${apiKey}`;
    if (body !== undefined) h["Content-Type"] = "application/json";
    const resp = await reach(baseUrl + path, {
      method,
      headers: h,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
      signal,
    });
    if (!resp.ok) throw await errorOf(resp);
    return resp.status === 204 ? null : resp.json();
  }
  /** @param {string} id */
  const job = (id) => `/v1/jobs/${encodeURIComponent(id)}`;
  return {
    baseUrl,
    apiKey,
    call,
    jobTypes: async () => (await call("/v1/job-types")).types,
    /**
     * @param {string} type
     * @param {object} payload
     * @param {{priority?: string, idempotencyKey?: string}} [options]
     */
    submit: (type, payload, { priority, idempotencyKey } = {}) =>
      call("/v1/jobs", {
        method: "POST",
        body: priority ? { type, payload, priority } : { type, payload },
        headers: idempotencyKey ? { "Idempotency-Key": idempotencyKey } : {},
      }),
    /** @param {string} id */
    get: (id) => call(job(id)),
    /** @param {Record<string, string>} [params] */
    list: (params = {}) => call(`/v1/jobs?${new URLSearchParams(params)}`),
    /** @param {string} id */
    cancel: (id) => call(job(id), { method: "DELETE" }),
    /** @param {string} id */
    retry: (id) => call(`${job(id)}/retry`, { method: "POST" }),
    streamToken: () => call("/v1/stream-tokens", { method: "POST" }),
  };
}

// ---- remembered jobs (so a reloaded page resumes them) ----

/**
 * @param {string} key
 * @returns {string[]}
 */
function readIds(key) {
  try {
    const ids = JSON.parse(localStorage.getItem(key) || "[]");
    return Array.isArray(ids) ? ids.filter((id) => typeof id === "string") : [];
  } catch {
    return []; // storage disabled or garbled: nothing to resume
  }
}

/**
 * @param {string} key
 * @param {string[]} ids
 */
function writeIds(key, ids) {
  try {
    localStorage.setItem(key, JSON.stringify(ids));
  } catch {
    // storage full or disabled: resuming after a reload is best effort
  }
}

/**
 * The job ids a page was watching and that had not ended (newest last).
 * @param {string | false} [key]
 * @returns {string[]}
 */
export function rememberedJobs(key = DEFAULTS.storageKey) {
  return key ? readIds(key) : [];
}

/**
 * @param {string} id
 * @param {string | false} [key]
 */
export function rememberJob(id, key = DEFAULTS.storageKey) {
  if (key && !readIds(key).includes(id)) writeIds(key, [...readIds(key), id]);
}

/**
 * @param {string} id
 * @param {string | false} [key]
 */
export function forgetJob(id, key = DEFAULTS.storageKey) {
  if (key) writeIds(key, readIds(key).filter((known) => known !== id));
}

// ---- what a job looks like after each event ----

/**
 * Apply one event to a job (a copy); the server's snapshot changes the same way.
 *
 * The contract's rules; tests/golden/events.json holds their cases, and the Python
 * client's apply_event passes the same ones. No event carries started_at or
 * finished_at: the server stamps them as it publishes a new attempt's `running` and a
 * final event, so they come from that event's `ts`.
 * @param {Partial<Job>} job the job before (`{}` or `{id}` when nothing is known yet)
 * @param {EventKind} kind
 * @param {object} data the event's data
 * @returns {Job}
 */
export function applyEvent(job, kind, data) {
  const fields = { ...data };
  for (const key of TRANSPORT) delete fields[key];
  if (kind === "snapshot") return { ...fields, id: data.job_id };
  const next = { ...job, id: data.job_id, seq: data.seq };
  if (kind === "status") {
    if (startsAttempt(job, fields)) {
      Object.assign(next, FRESH_ATTEMPT);
      next.started_at = data.ts ?? null;
      delete next.retry_in_s; // the wait it announced is over
    }
    Object.assign(next, OUT_OF_LINE, fields); // back in line with the next `queue` event
  } else if (kind === "progress") {
    for (const key of PROGRESS_FIELDS) next[key] = data[key] ?? null;
  } else if (kind === "queue") {
    for (const key of QUEUE_FIELDS) next[key] = data[key] ?? null;
  } else if (kind === "output") {
    next.output = (job.output || "") + data.delta;
  } else if (TERMINAL.has(kind)) {
    Object.assign(next, finalFields(kind, data), OUT_OF_LINE, { waiting: null });
    next.finished_at = data.ts ?? job.finished_at ?? null;
  }
  return next;
}

/**
 * A `running` status for a job that was not running: a new attempt, not a cancel request.
 * @param {Partial<Job>} job
 * @param {object} change the status event's fields
 * @returns {boolean}
 */
function startsAttempt(job, change) {
  return change.status === "running" && job.status !== "running" && !change.cancel_requested;
}

/**
 * What a final event sets: `completed` drops an earlier attempt's error; `failed` keeps
 * the job's result unless it carries one (an end rebuilt from a snapshot does not).
 * @param {EventKind} kind
 * @param {object} data
 * @returns {Partial<Job>}
 */
function finalFields(kind, data) {
  if (kind === "completed") {
    return { status: kind, result: data.result ?? null, error: null, progress: 100, eta_s: 0 };
  }
  if (kind === "failed") {
    const failed = { status: kind, error: data.error ?? null, eta_s: null };
    return "result" in data ? { ...failed, result: data.result } : failed;
  }
  return { status: kind, eta_s: null };
}

/**
 * The events that turn snapshot `prev` into snapshot `job` (for pollers).
 * @param {Job | null} prev
 * @param {Job} job
 * @param {boolean} [polled] mark them `polled`
 * @returns {Array<[EventKind, object]>}
 */
export function diffSnapshots(prev, job, polled = true) {
  const base = { job_id: job.id, seq: job.seq, ts: Date.now() / 1000 };
  if (polled) base.polled = true;
  const rewound =
    !prev ||
    job.attempt !== prev.attempt ||
    Boolean(job.epoch && prev.epoch && job.epoch !== prev.epoch) ||
    (job.progress ?? 0) < (prev.progress ?? 0) ||
    !(job.output || "").startsWith(prev.output || "") ||
    (isTerminal(prev.status) && !isTerminal(job.status));
  if (rewound) {
    const { id: _id, links: _links, ...fields } = job;
    const events = [["snapshot", { ...base, ...fields }]];
    if (isTerminal(job.status)) events.push(terminalOf(job, base));
    return events;
  }
  const events = [];
  if (job.status !== prev.status && !isTerminal(job.status)) {
    // A start was published as the attempt started: its ts is the job's started_at.
    const ts = job.status === "running" ? (job.started_at ?? base.ts) : base.ts;
    events.push(["status", { ...base, ts, status: job.status, attempt: job.attempt }]);
  }
  if ((job.output || "").length > (prev.output || "").length) {
    events.push(["output", { ...base, delta: job.output.slice((prev.output || "").length) }]);
  }
  if (PROGRESS_FIELDS.some((k) => !sameValue(job[k], prev[k]))) {
    const fields = Object.fromEntries(PROGRESS_FIELDS.map((k) => [k, job[k] ?? null]));
    events.push(["progress", { ...base, ...fields }]);
  }
  const moved = job.status !== prev.status || QUEUE_FIELDS.some((k) => job[k] !== prev[k]);
  if (job.status === "queued" && moved) {
    const fields = Object.fromEntries(QUEUE_FIELDS.map((k) => [k, job[k] ?? null]));
    events.push(["queue", { ...base, ...fields }]);
  }
  if (isTerminal(job.status)) events.push(terminalOf(job, base));
  return events;
}

/**
 * Equal as JSON (the fields that hold objects: `waiting`, `llm`).
 * @param {unknown} a
 * @param {unknown} b
 * @returns {boolean}
 */
function sameValue(a, b) {
  return a === b || JSON.stringify(a ?? null) === JSON.stringify(b ?? null);
}

/**
 * The final event of a polled snapshot that ended.
 * @param {Job} job
 * @param {object} polledBase job_id, seq, ts (and polled)
 * @returns {[EventKind, object]}
 */
function terminalOf(job, polledBase) {
  const base = { ...polledBase, ts: job.finished_at ?? polledBase.ts };
  if (job.status === "completed") return ["completed", { ...base, result: job.result }];
  if (job.status === "failed") {
    return ["failed", { ...base, error: job.error, result: job.result }];
  }
  return ["cancelled", { ...base }];
}

// ---- requests and handlers ----

/**
 * Call a handler, if there is one; one that throws is logged, never breaks the feed.
 * @param {object} handlers
 * @param {string} name
 * @param {...*} args
 */
function callHandler(handlers, name, ...args) {
  const fn = handlers[name];
  if (typeof fn !== "function") return;
  try {
    fn(...args);
  } catch (err) {
    console.error(`pushsvc: the ${name} handler threw`, err);
  }
}

/** The requests of one feed: its API key on each, all aborted by abort() (then refused). */
export class Requests {
  /** @type {string} prefixed to paths (not to absolute URLs) */
  #baseUrl;
  /** @type {string | null} sent as `Authorization: Bearer` */
  #apiKey;
  /** @type {Set<AbortController>} the requests on their way */
  #controllers = new Set();
  /** @type {boolean} abort() was called: no more requests */
  #aborted = false;

  /** @param {{baseUrl?: string, apiKey?: string | null}} options */
  constructor({ baseUrl = "", apiKey = null }) {
    this.#baseUrl = baseUrl;
    this.#apiKey = apiKey;
  }

  /** @returns {string | null} */
  get apiKey() {
    return this.#apiKey;
  }

  /**
   * @param {string} path a path of the API, or an absolute URL
   * @returns {string}
   */
  url(path) {
    return /^https?:/.test(path) ? path : this.#baseUrl + path;
  }

  /**
   * fetch, uncached, with the API key; no answer at all throws UnreachableError.
   * @param {string} path
   * @param {RequestInit} [init]
   * @returns {Promise<Response>}
   */
  async fetch(path, init = {}) {
    if (this.#aborted) throw new DOMException("the feed is closed", "AbortError");
    const ctl = new AbortController();
    this.#controllers.add(ctl);
    const headers = { ...(init.headers || {}) };
    if (this.#apiKey) headers.Authorization = `Bearer ${this.#apiKey}`;
    try {
      return await reach(this.url(path), { ...init, headers, cache: "no-store", signal: ctl.signal });
    } finally {
      this.#controllers.delete(ctl);
    }
  }

  /**
   * The JSON answer; an error answer throws ApiError.
   * @param {string} path
   * @param {RequestInit} [init]
   * @returns {Promise<*>}
   */
  async json(path, init = {}) {
    const headers = { Accept: "application/json", ...(init.headers || {}) };
    const resp = await this.fetch(path, { ...init, headers });
    if (!resp.ok) throw await errorOf(resp);
    return resp.status === 204 ? null : resp.json();
  }

  /** Abort every request on its way, and refuse any later one. */
  abort() {
    this.#aborted = true;
    for (const ctl of this.#controllers) ctl.abort();
    this.#controllers.clear();
  }
}

// ---- the feed: one stream, or polls while it does not work ----

/**
 * What a Feed streams and polls: the jobs of a watcher (JobSet), the dashboard's stats.
 * @typedef {object} Source
 * @property {string[]} kinds the SSE event names it takes
 * @property {boolean} resumes a stream retried after polling resumes from the last id
 *   (else it starts afresh)
 * @property {boolean} diagnoses a stream closed for good is asked why with one request to
 *   its URL (else the next poll's answer says)
 * @property {boolean} closesWhenFinished once finished() the feed closes (else it idles,
 *   for more to watch)
 * @property {(lastId: string | null, requests: Requests) => Promise<string | null>} streamUrl
 *   the stream to open (null: nothing to stream); may throw ApiError
 * @property {(lastId: string | null) => boolean} expectsEvent should such a stream send
 *   at once? (then silence means a buffering proxy)
 * @property {(kind: string, data: object, lastEventId: string) => void} take one event
 * @property {(requests: Requests) => Promise<{changed: boolean, hintS: number | null}>} poll
 *   one round of polls: did anything change, and the server's Retry-After
 * @property {() => boolean} finished nothing is left to watch
 * @property {() => string | null} probePath a GET that says whether the server answers
 *   (null: no probe)
 * @property {() => void} renew forget the stream's credentials: the next URL brings fresh ones
 * @property {() => Interest} [interest] what it watches, for a stream shared by tabs
 */

/**
 * The feed's state: what reaches the server.
 *
 *   connecting  -> streaming (an event; a quiet stream opens) | polling (it fails) | closed
 *   streaming   -> polling (#fallBack) | unreachable (#probe: nothing answers) | closed
 *   polling     -> streaming (a retried stream sends; a quiet one opens) | unreachable (a
 *                  poll gets no answer)
 *   unreachable -> polling (a poll is answered) | streaming (a stream opens) | closed
 *
 * A stream may be opening while polling (a retry): the state changes when it sends.
 * @typedef {"connecting" | "streaming" | "polling" | "unreachable" | "closed"} FeedState
 */

/** @type {Record<FeedState, Mode | null>} what the mode handler hears of each state */
const MODE_OF = {
  connecting: null,
  streaming: "stream",
  polling: "polling",
  unreachable: "unreachable",
  closed: null,
};

/**
 * One stream (EventSource) of a source's events; polls while streaming does not work,
 * tries the stream again meanwhile, and says which (the `mode` handler).
 */
export class Feed {
  /** @type {FeedState} the one state field: see FeedState */
  #state = "connecting";
  /** @type {Source} what to stream and poll */
  #source;
  /** @type {Handlers} mode and error are the feed's; the source calls the rest */
  #handlers;
  /** @type {Options} */
  #options;
  /** @type {Requests} every fetch of the feed, aborted by close() */
  #requests;
  /** @type {EventSource | null} the current stream, open or opening */
  #es = null;
  /** @type {number} bumped whenever a stream is dropped: an open begun earlier gives up */
  #generation = 0;
  /** @type {boolean} the current stream has opened */
  #opened = false;
  /** @type {boolean} the current stream has sent an event */
  #heard = false;
  /** @type {string | null} the last event id a stream sent (EventSource's Last-Event-ID) */
  #cursor = null;
  /** @type {number} stream errors in a row */
  #errors = 0;
  /** @type {boolean} fresh credentials were tried since the stream last sent */
  #renewed = false;
  /** @type {string | null} why it polls (the mode handler's second argument) */
  #reason = null;
  /** @type {boolean} the server answered that it will not stream: retry it seldom */
  #refused = false;
  /** @type {number} the next poll's delay: doubles while nothing changes */
  #pollDelay;
  /** @type {number | null} the next stream retry's delay: doubles while it fails */
  #streamDelay = null;
  /** @type {boolean} a reachability probe is on its way */
  #probing = false;
  /** @type {Set<number>} every pending timeout, cleared by close() */
  #timers = new Set();
  /** @type {number | null} gives up on a stream that sends nothing (a buffering proxy) */
  #firstTimer = null;
  /** @type {number | null} the next poll */
  #pollTimer = null;
  /** @type {number | null} the next stream retry, while polling */
  #retryTimer = null;
  /** @type {number | null} one reconnection for several changes of what to watch */
  #reopenTimer = null;
  /** @type {TabLink | null} the tabs sharing one stream: this feed streams for all of them
   *  (leading) or hears what the leader relays (following); null: a stream of its own */
  #link;

  /**
   * @param {Source} source
   * @param {Handlers} handlers
   * @param {Partial<Options>} [options]
   * @param {TabLink | null} [link] share one stream with the other tabs
   */
  constructor(source, handlers = {}, options = {}, link = null) {
    this.#source = source;
    this.#handlers = handlers;
    this.#options = { ...DEFAULTS, ...options };
    this.#requests = new Requests(this.#options);
    this.#pollDelay = this.#options.pollMinMs;
    this.#link = link;
  }

  /** @returns {Mode | null} how news reaches the page (null: not yet known, or closed) */
  get mode() {
    return MODE_OF[this.#state];
  }

  /** @returns {boolean} */
  get closed() {
    return this.#state === "closed";
  }

  /** @returns {Feed} this, streaming (or polling, without EventSource) */
  start() {
    if (typeof EventSource === "undefined") this.#fallBack("no_eventsource");
    else if (this.#link) this.#link.join(this.#linkHooks()); // connects once it knows its role
    else this.#connect(null);
    return this;
  }

  /** Stop for good: no stream, no timer, no request (a leader hands its stream over). */
  close() {
    if (this.closed) return;
    this.#state = "closed";
    this.#disconnect();
    for (const id of this.#timers) clearTimeout(id);
    this.#timers.clear();
    this.#requests.abort();
    this.#link?.close();
  }

  /**
   * What to watch changed: stream it anew (polling: poll now). Several calls, one reconnect.
   * @param {number} [ms] wait this long first (other changes join the same reconnect)
   */
  reconnect(ms = 0) {
    if (this.closed || this.#reopenTimer !== null) return;
    this.#reopenTimer = this.#later(() => {
      this.#reopenTimer = null;
      if (this.#polling()) {
        this.#pollSoon();
        if (this.#retryTimer === null) this.#scheduleReconnect();
      } else {
        this.#disconnect();
        this.#connect(null);
      }
    }, ms);
  }

  // -- transitions --

  /**
   * @param {FeedState} state
   * @param {string | null} [reason]
   */
  #enter(state, reason = null) {
    if (this.#state === state || this.closed) return;
    this.#state = state;
    if (!MODE_OF[state]) return;
    callHandler(this.#handlers, "mode", MODE_OF[state], reason);
    if (this.#link?.leading) this.#link.mode(MODE_OF[state], reason);
  }

  /** A stream sends: polls and stream retries stop. */
  #streaming() {
    this.#pollTimer = this.#cancel(this.#pollTimer);
    this.#retryTimer = this.#cancel(this.#retryTimer);
    this.#pollDelay = this.#options.pollMinMs;
    this.#streamDelay = null;
    this.#enter("streaming");
  }

  /**
   * Poll instead of streaming, and try the stream again later.
   * @param {string} reason
   * @param {boolean} [refused] the server answered that it will not stream
   */
  #fallBack(reason, refused = false) {
    if (this.closed) return;
    this.#disconnect();
    if (this.#source.finished()) {
      this.#settle();
      return;
    }
    this.#reason = reason;
    this.#refused = refused;
    // Unreachable stays so until a poll gets an answer.
    if (this.#state !== "unreachable") this.#enter("polling", reason);
    this.#pollSoon();
    if (reason !== "no_eventsource" && this.#retryTimer === null) this.#scheduleReconnect();
  }

  /** A probe got no answer while the stream reconnects by itself. */
  #unreachable() {
    if (this.#es && this.#es.readyState === EventSource.OPEN) return; // back already
    this.#enter("unreachable", "network");
  }

  /**
   * After a poll: did it reach the server?
   * @param {boolean} reached
   */
  #reached(reached) {
    if (!reached) {
      this.#enter("unreachable", "network");
    } else if (this.#state === "unreachable") {
      // The server is back: polling it works; try the stream at once (if there is one).
      this.#enter("polling", this.#reason);
      if (this.#reason === "no_eventsource") return;
      this.#streamDelay = null;
      this.#retryTimer = this.#cancel(this.#retryTimer);
      this.#reconnectStream();
    }
  }

  /** After every batch of events: a finished source lets go of its connection. */
  #settle() {
    if (!this.#source.finished()) return;
    if (this.#source.closesWhenFinished) {
      this.close();
      return;
    }
    this.#disconnect();
    this.#retryTimer = this.#cancel(this.#retryTimer);
    this.#pollTimer = this.#cancel(this.#pollTimer);
  }

  // -- the stream --

  /**
   * Open a stream (unless one is open or opening).
   * @param {string | null} lastId resume after this event id
   */
  async #connect(lastId) {
    if (this.closed || this.#source.finished() || this.#es) return;
    if (this.#link && !this.#link.leading) {
      if (this.#link.following) this.#attach();
      return; // joining: the role, once known, connects
    }
    const generation = ++this.#generation;
    let url;
    try {
      url = await this.#source.streamUrl(lastId, this.#requests);
    } catch (err) {
      if (this.#current(generation)) this.#onFailure(err);
      return;
    }
    // Another open (say, for a job added meanwhile) may have superseded this one.
    if (!this.#current(generation)) return;
    if (!url || this.#source.finished()) {
      this.#settle();
      return;
    }
    const es = new EventSource(url);
    this.#link?.opened(lastId === null, url);
    this.#es = es;
    this.#heard = false;
    this.#opened = false;
    for (const kind of this.#source.kinds) {
      es.addEventListener(kind, (message) => this.#onMessage(es, kind, message));
    }
    // A stream that may have nothing to send (all of a tenant's jobs, maybe none active;
    // a resume) counts as streaming once open: the server answers once it has started.
    const quiet = !this.#source.expectsEvent(lastId);
    es.onopen = () => this.#onOpen(es, quiet);
    es.onerror = () => this.#onStreamError(es);
    // A fresh stream starts with snapshots at once; silence means a buffering proxy.
    if (!quiet) {
      this.#firstTimer = this.#later(() => {
        if (es === this.#es && !this.#heard) this.#fallBack("no_events", true);
      }, this.#options.firstEventTimeoutMs);
    }
  }

  /**
   * @param {number} generation the #generation an async step began in
   * @returns {boolean} it is still the current one, and the feed open
   */
  #current(generation) {
    return !this.closed && generation === this.#generation;
  }

  /** Drop the current stream (an open of an earlier generation gives up too). */
  #disconnect() {
    this.#generation += 1;
    this.#firstTimer = this.#cancel(this.#firstTimer);
    if (this.#es) {
      this.#es.close();
      this.#es = null;
    }
  }

  /**
   * @param {EventSource} es
   * @param {boolean} quiet it may have nothing to send for a while
   */
  #onOpen(es, quiet) {
    if (es !== this.#es) return;
    this.#opened = true;
    this.#errors = 0;
    // Back after an outage: a resumed stream may have nothing to send for a while. A
    // quiet stream is open: the server answers once it has started (subscribed, its
    // position read), so what a list taken now misses, it sends.
    if (this.#state === "unreachable" || (quiet && this.#state !== "streaming")) {
      this.#streaming();
    }
  }

  /**
   * @param {EventSource} es
   * @param {string} kind
   * @param {MessageEvent} message
   */
  #onMessage(es, kind, message) {
    if (es !== this.#es || this.closed) return;
    let data;
    try {
      data = JSON.parse(message.data);
    } catch {
      return; // not ours
    }
    this.#heard = true;
    this.#errors = 0;
    this.#renewed = false;
    this.#cursor = message.lastEventId || this.#cursor;
    this.#firstTimer = this.#cancel(this.#firstTimer);
    if (this.#state !== "streaming") this.#streaming();
    if (this.#link?.leading) {
      const ended = TERMINAL.has(kind) ? data.job_id : null; // done for every tab
      this.#link.relay(kind, message.data, message.lastEventId, ended);
    }
    this.#source.take(kind, data, message.lastEventId);
    this.#settle();
    if (this.#link?.following) this.#link.update(this.#source.interest?.() ?? null);
  }

  /** @param {EventSource} es */
  #onStreamError(es) {
    if (es !== this.#es || this.closed) return;
    if (es.readyState === EventSource.CONNECTING) {
      if (!this.#opened) {
        // It never opened (blocked, refused by a proxy, no server): the browser's own
        // retries would take seconds each. Poll now; the stream is tried again soon.
        this.#fallBack("stream_unavailable");
        return;
      }
      // The browser reconnects by itself, sending Last-Event-ID: count, and give up at
      // last. Meanwhile, say at once whether the server is there at all.
      this.#errors += 1;
      if (this.#errors >= this.#options.maxStreamErrors) this.#fallBack("stream_errors");
      else this.#probe();
      return;
    }
    // Closed for good: the server refused (401, 404, 503, 204...).
    const worked = this.#heard;
    this.#disconnect();
    if (this.#source.diagnoses) this.#diagnose(this.#cursor);
    else if (worked && !this.#renewed) this.#renew(); // an expired token, most likely
    else this.#fallBack("stream_closed"); // the poll's answer says what is wrong
  }

  /** Fresh credentials (a new token or job link), and resume where the stream stopped. */
  #renew() {
    this.#renewed = true;
    this.#source.renew();
    this.#connect(this.#cursor);
  }

  /**
   * Ask the server why the stream closed: one request to its URL.
   * @param {string | null} lastId
   */
  async #diagnose(lastId) {
    const generation = this.#generation;
    let resp;
    try {
      const url = await this.#source.streamUrl(lastId, this.#requests);
      if (!url) {
        if (this.#current(generation)) this.#settle();
        return;
      }
      resp = await this.#requests.fetch(url, { headers: { Accept: "text/event-stream" } });
    } catch (err) {
      if (this.#current(generation)) this.#onFailure(err);
      return;
    }
    if (resp.ok && resp.body) resp.body.cancel().catch(() => {}); // a working stream: let go
    if (!this.#current(generation)) return;
    if (resp.status === 200) {
      this.#errors += 1;
      if (this.#errors >= this.#options.maxStreamErrors) this.#fallBack("stream_errors");
      else this.#connect(lastId);
    } else if (resp.status === 204) {
      this.#fallBack("stream_ended"); // nothing more to stream: one poll settles the end
    } else {
      this.#onFailure(await errorOf(resp));
    }
  }

  /**
   * A stream could not be opened, or was refused.
   * @param {unknown} err
   */
  #onFailure(err) {
    if (!(err instanceof ApiError)) {
      if (err && err.name === "AbortError") return;
      this.#fallBack("network");
      return;
    }
    if (err.status === 401 && !this.#renewed) {
      this.#renew(); // an expired stream token: a fresh one, resuming where it stopped
      return;
    }
    if (err.status === 401 || err.status === 404) {
      this.#fallBack(err.code, true); // polling says which job, or that the key is wrong
      return;
    }
    // 503 streams_disabled / redis_unavailable, 5xx, ...; a gateway's 502 or 504 is the
    // server missing rather than refusing.
    this.#fallBack(err.code, !GATEWAY.has(err.status));
  }

  /** While the stream reconnects by itself: does anything answer? No: unreachable. */
  async #probe() {
    const path = this.#source.probePath();
    if (this.#probing || this.#state === "unreachable" || !path) return;
    this.#probing = true;
    try {
      const resp = await this.#requests.fetch(path);
      resp.body?.cancel().catch(() => {});
      if (GATEWAY.has(resp.status) && !this.closed) this.#unreachable();
    } catch (err) {
      if (isUnreachable(err) && !this.closed) this.#unreachable();
    } finally {
      this.#probing = false;
    }
  }

  /** The next stream retry while polling. */
  #scheduleReconnect() {
    // Soon after a stream that could not open, doubling while it still cannot; a server
    // that answered "no" (503 streams off, a proxy that buffers) only every streamRetryMs.
    const max = this.#options.streamRetryMs;
    const first = Math.min(this.#options.streamRetryMinMs, max);
    const delay = this.#refused ? max : (this.#streamDelay ?? first);
    this.#streamDelay = Math.min(delay * 2, max);
    this.#retryTimer = this.#later(() => this.#reconnectStream(), delay);
  }

  /** While polling: try the stream again (unless one is opening), and plan the next try. */
  #reconnectStream() {
    this.#retryTimer = null;
    if (!this.#polling() || this.#source.finished()) return;
    if (!this.#es) {
      this.#errors = 0;
      this.#renewed = false;
      this.#connect(this.#source.resumes ? this.#cursor : null);
    }
    this.#scheduleReconnect();
  }

  // -- one stream for all tabs (see TabLink) --

  /** @returns {LinkHooks} what the tab link calls on this feed */
  #linkHooks() {
    return {
      // The lock came: stream for every tab, resuming after the last event relayed.
      lead: () => {
        if (this.closed) return;
        this.#disconnect();
        this.#connect(this.#polling() ? null : this.#cursor);
      },
      follow: () => this.#connect(null),
      relayed: (kind, data, id) => {
        const relay = this.#es;
        if (!(relay instanceof Relay)) return;
        if (relay.held) relay.held.push([kind, data, id]);
        else this.#onMessage(relay, kind, { data, lastEventId: id });
      },
      leaderMode: (mode, reason) => this.#onLeaderMode(mode, reason),
      // Tabs that come within ATTACH_MS of each other share one new stream.
      interest: (grew) => (grew ? this.reconnect(ATTACH_MS) : this.#settle()),
      mode: () => this.mode,
      live: () => this.#live(),
      covered: () => this.#sync(),
      forgotten: () => {
        if (!(this.#es instanceof Relay)) return;
        this.#disconnect();
        this.#connect(null); // listen anew: frames went by while it was forgotten
      },
    };
  }

  /** @returns {boolean} a leader's stream is open and streaming (what it names, it carries) */
  #live() {
    const es = this.#es;
    const own = es !== null && !(es instanceof Relay) && es.readyState === EventSource.OPEN;
    return own && this.#opened && !this.#polling();
  }

  /**
   * The leader's stream carries this follower's jobs already (it kept it rather than open
   * a fresh one): their state by GET, while what the relay brings meanwhile waits, and is
   * applied after it (deduped by seq). Whatever the GET missed came after it: relayed.
   */
  async #sync() {
    const relay = this.#es;
    if (!(relay instanceof Relay) || this.closed) return;
    relay.held = [];
    const generation = this.#generation;
    try {
      await this.#source.poll(this.#requests);
    } catch (err) {
      if (this.#current(generation)) this.#onFailure(err);
      return;
    }
    if (!this.#current(generation) || relay !== this.#es) return;
    const held = relay.held;
    relay.held = null;
    this.#heard = true;
    this.#firstTimer = this.#cancel(this.#firstTimer);
    if (this.#state !== "streaming") this.#streaming();
    for (const [kind, data, id] of held) this.#onMessage(relay, kind, { data, lastEventId: id });
    this.#settle();
    if (this.#link?.following) this.#link.update(this.#source.interest?.() ?? null);
  }

  /** A follower listens to what the leader relays, once synced (see tabs.js). */
  #attach() {
    const relay = new Relay(() => this.#link?.detach());
    this.#es = relay;
    this.#heard = false;
    this.#opened = true;
    this.#link.attach(this.#source.interest());
    if (this.#source.expectsEvent(null)) {
      this.#firstTimer = this.#later(() => {
        if (relay === this.#es && !this.#heard) this.#fallBack("no_events", true);
      }, this.#options.firstEventTimeoutMs);
    }
  }

  /**
   * The leader's mode: a follower polls when the leader polls, and listens again (asking
   * for a fresh stream: its polled state and the relay may not meet) when it streams. While
   * the leader's stream reconnects by itself (unreachable) the relay resumes with it, as a
   * stream of its own would: it says so, and stays.
   * @param {Mode} mode
   * @param {string | null} reason
   */
  #onLeaderMode(mode, reason) {
    if (this.closed || !this.#link?.following) return;
    const listening = this.#es instanceof Relay && this.#link.synced;
    if (mode === "stream") {
      if (listening && this.#state === "unreachable") this.#streaming();
      else if (this.#polling()) {
        this.#disconnect();
        this.#connect(null);
      }
    } else if (mode === "unreachable" && listening) {
      this.#enter("unreachable", reason || "network");
    } else if (!this.#polling() && this.#es) {
      this.#fallBack(reason || "leader_polling");
    }
  }

  // -- polling --

  /** @returns {boolean} polling (the stream does not work), whether polls reach or not */
  #polling() {
    return this.#state === "polling" || this.#state === "unreachable";
  }

  /** @param {number} [ms] */
  #pollSoon(ms = 0) {
    this.#pollTimer = this.#cancel(this.#pollTimer);
    this.#pollTimer = this.#later(() => {
      this.#pollTimer = null;
      this.#poll();
    }, ms);
  }

  /** One round of polls; the next one follows at the pace of the answers. */
  async #poll() {
    if (!this.#polling()) return;
    let outcome;
    let reached = true;
    try {
      outcome = await this.#source.poll(this.#requests);
    } catch (err) {
      if (this.closed || (err && err.name === "AbortError")) return;
      outcome = { changed: false, hintS: err instanceof ApiError ? err.retryAfterS : null };
      if (err instanceof ApiError && err.status === 401) {
        callHandler(this.#handlers, "error", err, null);
        this.close(); // a wrong or missing API key: nothing will work until it changes
        return;
      }
      reached = !isUnreachable(err);
    }
    if (!this.#polling()) return;
    this.#reached(reached);
    this.#settle();
    if (this.closed || this.#source.finished()) return;
    // Quick after a change, doubling while nothing changes; never sooner than the hint.
    // An unreachable server is asked often enough to notice its return within seconds.
    const o = this.#options;
    const cap = this.#state === "unreachable" ? o.unreachablePollMaxMs : o.pollMaxMs;
    this.#pollDelay = outcome.changed ? o.pollMinMs : Math.min(this.#pollDelay * 2, cap);
    const jittered = this.#pollDelay * (0.75 + Math.random() * 0.5);
    this.#pollSoon(Math.max(jittered, (outcome.hintS ?? 0) * 1000));
  }

  // -- timers --

  /**
   * setTimeout that close() clears.
   * @param {() => void} fn
   * @param {number} ms
   * @returns {number}
   */
  #later(fn, ms) {
    const id = setTimeout(() => {
      this.#timers.delete(id);
      if (!this.closed) fn();
    }, ms);
    this.#timers.add(id);
    return id;
  }

  /**
   * @param {number | null} id
   * @returns {null}
   */
  #cancel(id) {
    if (id === null) return null;
    clearTimeout(id);
    this.#timers.delete(id);
    return null;
  }
}

// ---- a follower's stream ----

/**
 * @typedef {import("./tabs.js").LinkHooks} LinkHooks
 * @typedef {import("./tabs.js").Interest} Interest
 */

/** What a follower's feed holds instead of an EventSource: the leader's relay (tabs.js). */
class Relay {
  readyState = 1; // EventSource.OPEN: the leader's stream is its business
  /** @type {Array<[string, string, string]> | null} frames held while the GETs of a
   *  follower's jobs are on their way (see Feed.#sync) */
  held = null;
  /** @type {() => void} */
  #onClose;

  /** @param {() => void} onClose */
  constructor(onClose) {
    this.#onClose = onClose;
  }

  close() {
    this.#onClose();
  }
}

// ---- the jobs a watcher follows ----

/**
 * One job as the watcher knows it.
 * @typedef {object} JobState
 * @property {Job | null} job
 * @property {number} seq the last seq applied (counts within `epoch`)
 * @property {string} epoch the history of a per-job stream's positions
 * @property {boolean} ended a final event was applied
 */

/** The jobs of one watcher as a Feed's source: one job, several, or all of the tenant's. */
class JobSet {
  kinds = KINDS;
  diagnoses = true;
  /** @type {Handlers} */
  #handlers;
  /** @type {string | false} where remembered jobs are kept */
  #storageKey;
  /** @type {boolean} one job: GET /v1/jobs/{id}/events (ids: the job's positions) */
  #single;
  /** @type {boolean} every job of the tenant: GET /v1/events (ids: the tenant's positions) */
  #all;
  /** @type {Set<string>} the jobs named (none with #all) */
  #ids;
  /** @type {Map<string, JobState>} */
  #jobs = new Map();
  /** @type {Map<string, string | null>} each job's last polled ETag */
  #etags = new Map();
  /** @type {string | null} the single job's stream link (links.events, with its token) */
  #eventsUrl;
  /** @type {number | null} when that link's token expires */
  #eventsExpires = null;
  /** @type {{token: string, expires_at: number} | null} the tenant token of /v1/events */
  #token = null;
  /** @type {boolean} the all-jobs poll has listed once (jobs ended before are no news) */
  #listed = false;
  /** @type {() => {all: boolean, ids: Set<string>}} the jobs of the tabs this one streams
   *  for too (TabLink.elsewhere) */
  #elsewhere = () => ({ all: false, ids: new Set() });

  /**
   * @param {string[] | null} ids null: every job of the tenant
   * @param {boolean} single
   * @param {Handlers} handlers
   * @param {Options} options
   */
  constructor(ids, single, handlers, options) {
    this.#single = single;
    this.#all = ids === null;
    this.#ids = new Set(ids || []);
    this.#handlers = handlers;
    this.#storageKey = options.storageKey;
    this.#eventsUrl = options.eventsUrl;
    for (const id of this.#ids) rememberJob(id, this.#storageKey);
  }

  get resumes() {
    return this.#all; // jobs that ended meanwhile are in the tenant log; named ones restart
  }

  get closesWhenFinished() {
    return this.#single;
  }

  /**
   * @param {string} id
   * @returns {Job | null}
   */
  job(id) {
    return this.#jobs.get(id)?.job ?? null;
  }

  /**
   * Watch one more job (its snapshot, if known, applied now).
   * @param {string} id
   * @param {Job | null} job
   * @returns {boolean} the connection must change for it
   */
  add(id, job) {
    if (!this.#all) this.#ids.add(id);
    const st = this.#state(id);
    if (job) this.#applySnapshot(job, false);
    if (st.ended || this.#all) return false;
    rememberJob(id, this.#storageKey);
    return true;
  }

  /**
   * @param {string} id
   * @returns {boolean} the connection must change for it
   */
  remove(id) {
    this.#ids.delete(id);
    this.#jobs.delete(id);
    forgetJob(id, this.#storageKey);
    return !this.#all;
  }

  /**
   * Stream for other tabs' jobs too (a leader's).
   * @param {() => {all: boolean, ids: Set<string>}} elsewhere
   */
  share(elsewhere) {
    this.#elsewhere = elsewhere;
  }

  /** @returns {Interest} the jobs it watches, for the tab that streams them */
  interest() {
    return { all: this.#all, ids: this.#active() };
  }

  /** @returns {boolean} */
  finished() {
    const other = this.#elsewhere();
    return !this.#all && !other.all && this.#active().length === 0 && other.ids.size === 0;
  }

  /**
   * @param {string | null} lastId
   * @returns {boolean}
   */
  expectsEvent(lastId) {
    // A fresh stream of named jobs starts with their snapshots (of all jobs: maybe none).
    const named = this.#active().length > 0 || this.#elsewhere().ids.size > 0;
    return lastId === null && (this.#single || named);
  }

  /** @returns {string} */
  probePath() {
    const [id] = this.#active();
    return id && !this.#all ? `/v1/jobs/${encodeURIComponent(id)}` : "/v1/jobs?limit=1";
  }

  /** Forget the stream's credentials: the next URL brings a fresh link or token. */
  renew() {
    this.#eventsUrl = null;
    this.#token = null;
  }

  /**
   * @param {string} kind
   * @param {object} data
   * @param {string} lastEventId
   */
  take(kind, data, lastEventId) {
    // A stream shared by tabs carries their jobs too: each takes its own.
    if (!this.#all && !this.#ids.has(data.job_id)) return;
    this.#apply(kind, data);
    // A job stream's id is the job's position "<seq>.<epoch>" (a multiplexed one's is
    // the tenant's): keep the epoch, so a polled snapshot of another history is news.
    const epoch = this.#single ? (lastEventId || "").split(".")[1] : "";
    if (epoch) this.#state(data.job_id).epoch = epoch;
  }

  /**
   * @param {string | null} lastId
   * @param {Requests} requests
   * @returns {Promise<string | null>}
   */
  async streamUrl(lastId, requests) {
    let url;
    if (this.#single) {
      url = this.#eventsUrl;
      const expiry = url && /[?&]token=/.test(url) ? this.#eventsExpires || Infinity : Infinity;
      if (!url || expiry * 1000 < Date.now() + 5000) url = await this.#freshJobLink(requests);
      if (!url) return null;
    } else {
      const params = new URLSearchParams();
      const other = this.#elsewhere();
      const ids = new Set([...this.#active(), ...other.ids]);
      // Tabs may name more jobs together than a stream takes: then all of the tenant's.
      const shared = other.ids.size > 0;
      const named = !this.#all && !other.all && (!shared || ids.size <= MAX_NAMED_JOBS);
      if (named) for (const id of ids) params.append("job", id);
      if (requests.apiKey) params.set("token", await this.#streamToken(requests));
      url = `/v1/events?${params}`;
    }
    if (lastId !== null) url += `${url.includes("?") ? "&" : "?"}last_event_id=${lastId}`;
    return requests.url(url);
  }

  /**
   * GET the job: a new job-scoped token, and its state on the way.
   * @param {Requests} requests
   * @returns {Promise<string | null>} its stream link (null: it ended)
   */
  async #freshJobLink(requests) {
    const [id] = this.#ids;
    const resp = await requests.fetch(`/v1/jobs/${encodeURIComponent(id)}`);
    if (!resp.ok) throw await errorOf(resp);
    const job = await resp.json();
    this.#eventsUrl = job.links.events;
    this.#eventsExpires = job.links.events_expires_at;
    this.#etags.set(id, resp.headers.get("ETag"));
    this.#applySnapshot(job, false);
    return this.finished() ? null : this.#eventsUrl;
  }

  /**
   * @param {Requests} requests
   * @returns {Promise<string>} a tenant stream token, fresh for at least 30 s
   */
  async #streamToken(requests) {
    if (!this.#token || this.#token.expires_at * 1000 < Date.now() + 30000) {
      this.#token = await requests.json("/v1/stream-tokens", { method: "POST" });
    }
    return this.#token.token;
  }

  /**
   * @param {Requests} requests
   * @returns {Promise<{changed: boolean, hintS: number | null}>}
   */
  poll(requests) {
    return this.#all ? this.#pollList(requests) : this.#pollJobs(requests);
  }

  /** @param {Requests} requests */
  async #pollJobs(requests) {
    let changed = false;
    let hintS = null;
    for (const id of this.#active()) {
      const etag = this.#etags.get(id);
      const resp = await requests.fetch(`/v1/jobs/${encodeURIComponent(id)}`, {
        headers: etag ? { "If-None-Match": etag } : {},
      });
      const hint = retryAfter(resp);
      if (hint !== null) hintS = Math.max(hintS ?? 0, hint);
      if (resp.status === 304) continue;
      if (resp.status === 404) {
        callHandler(this.#handlers, "error", await errorOf(resp), id);
        this.#state(id).ended = true; // gone (expired, or never ours): stop asking
        forgetJob(id, this.#storageKey);
        continue;
      }
      if (!resp.ok) throw await errorOf(resp);
      const job = await resp.json();
      this.#etags.set(id, resp.headers.get("ETag"));
      if (job.links && this.#single) {
        this.#eventsUrl = job.links.events;
        this.#eventsExpires = job.links.events_expires_at;
      }
      changed = this.#applySnapshot(job) || changed;
    }
    return { changed, hintS };
  }

  /** @param {Requests} requests */
  async #pollList(requests) {
    const resp = await requests.fetch("/v1/jobs?limit=50");
    if (!resp.ok) throw await errorOf(resp);
    const { jobs } = await resp.json();
    let changed = false;
    for (const job of jobs.reverse()) {
      const st = this.#state(job.id);
      if (!this.#listed && !st.job && isTerminal(job.status)) {
        // Like the all-jobs stream: jobs that ended before we looked are not news.
        Object.assign(st, { job, seq: job.seq, ended: true });
        continue;
      }
      changed = this.#applySnapshot(job) || changed;
    }
    this.#listed = true;
    return { changed, hintS: retryAfter(resp) };
  }

  /**
   * @param {string} id
   * @returns {JobState}
   */
  #state(id) {
    let st = this.#jobs.get(id);
    if (!st) {
      st = { job: null, seq: 0, epoch: "", ended: false };
      this.#jobs.set(id, st);
    }
    return st;
  }

  /** @returns {string[]} the named jobs that have not ended */
  #active() {
    return [...this.#ids].filter((id) => !this.#state(id).ended);
  }

  /**
   * One event, streamed or made from a snapshot: dedupe by the job's seq, apply, call.
   * @param {EventKind} kind
   * @param {object} data
   * @param {boolean} [fresh] made from a snapshot already checked to be news
   */
  #apply(kind, data, fresh = false) {
    const st = this.#state(data.job_id);
    // A finished job's stream repeats its terminal event with the snapshot's seq.
    const echo = TERMINAL.has(kind) && !st.ended && data.seq === st.seq;
    // History was lost (a Redis restart or failover): the server's state wins, whatever
    // its seq; later events count from it. The end of a job the store lost altogether
    // (`failed`, `state_lost`) opens a new history too: a stream that resumed on another
    // API process numbers it from what it knows, which may be less than we saw.
    const restart =
      (kind === "snapshot" && data.reset === true) ||
      (kind === "failed" && data.error?.code === "state_lost" && !st.ended);
    // A `queue` event tells the place in line at the job's current seq (it has no id).
    const inLine = kind === "queue" && data.seq === st.seq && !st.ended;
    if (st.job && data.seq <= st.seq && !echo && !fresh && !restart && !inLine) return;
    st.job = applyEvent(st.job || { id: data.job_id }, kind, data);
    st.seq = data.seq;
    if (kind === "snapshot") st.ended = false;
    const event = { kind, ...data };
    if (TERMINAL.has(kind)) {
      st.ended = true;
      forgetJob(data.job_id, this.#storageKey);
    }
    callHandler(this.#handlers, kind, st.job, event);
    if (TERMINAL.has(kind)) callHandler(this.#handlers, "done", st.job, event);
  }

  /**
   * A snapshot (polled, or given to add()): the events it brings, if it is news.
   * @param {Job} job
   * @param {boolean} [polled]
   * @returns {boolean} it was news
   */
  #applySnapshot(job, polled = true) {
    const st = this.#state(job.id);
    // Another epoch: the seq counts in another history, so a lower one is news too.
    const otherHistory = Boolean(job.epoch && st.epoch && job.epoch !== st.epoch);
    // A place in line is read, not published: at the seq we have, a new one is news. An
    // older snapshot (a list taken before the job started) is not, whatever it says.
    const moved =
      job.status === "queued" &&
      st.job?.status === "queued" &&
      job.seq === st.seq &&
      QUEUE_FIELDS.some((k) => job[k] !== st.job[k]);
    if (st.job && job.seq <= st.seq && !otherHistory && !moved) return false;
    // The events made from one snapshot share its seq: checked once, here.
    for (const [kind, data] of diffSnapshots(st.job, job, polled)) this.#apply(kind, data, true);
    st.epoch = job.epoch || st.epoch;
    return true;
  }
}

/**
 * The handle of a watch.
 * @param {Feed} feed
 * @param {JobSet} jobs
 * @param {TabLink | null} [link]
 */
function handleOf(feed, jobs, link = null) {
  return {
    close: () => feed.close(),
    /** @returns {Mode | null} */
    get mode() {
      return feed.mode;
    },
    /** @returns {string} the stream's: "own", or shared by tabs ("leading", "following", ...) */
    get sharing() {
      return link ? link.role : "own";
    },
    /** @param {string} id */
    job: (id) => jobs.job(id),
  };
}

/**
 * Watch one job until it ends; returns {close(), mode, job(id)}.
 *
 * handlers: see Handlers (snapshot, status, progress, output, completed, failed,
 * cancelled, done, each (job, event); mode(mode, reason); error(err, jobId)).
 * options: see DEFAULTS (apiKey, eventsUrl: the job's links.events, baseUrl, ...).
 * @param {string} jobId
 * @param {Handlers} [handlers]
 * @param {Partial<Options>} [options]
 */
export function watchJob(jobId, handlers = {}, options = {}) {
  const o = { ...DEFAULTS, ...options };
  const jobs = new JobSet([jobId], true, handlers, o);
  return handleOf(new Feed(jobs, handlers, o).start(), jobs);
}

/**
 * Watch many jobs over one connection (GET /v1/events), or every job of the tenant
 * with "all". The handle also has add(id, job?) and remove(id) for named jobs. Tabs of
 * one origin and key share that connection (options.shareTabs; see TabLink).
 * @param {Iterable<string> | "all"} jobIds
 * @param {Handlers} [handlers]
 * @param {Partial<Options>} [options]
 */
export function watchJobs(jobIds, handlers = {}, options = {}) {
  const o = { ...DEFAULTS, ...options };
  const jobs = new JobSet(jobIds === "all" ? null : [...jobIds], false, handlers, o);
  const link = o.shareTabs && TabLink.available() ? new TabLink(o) : null;
  if (link) jobs.share(() => link.elsewhere());
  const feed = new Feed(jobs, handlers, o, link).start();
  // Added to the handle, not spread into a new object: that would freeze its `mode`.
  return Object.assign(handleOf(feed, jobs, link), {
    /**
     * @param {string} id
     * @param {Job | null} [job] its snapshot, when the page has it
     */
    add: (id, job = null) => {
      if (!feed.closed && jobs.add(id, job)) feed.reconnect();
    },
    /** @param {string} id */
    remove: (id) => {
      if (jobs.remove(id)) feed.reconnect();
    },
  });
}
