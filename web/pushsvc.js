// pushsvc.js: watch pushsvc jobs from a browser. A plain ES module, no dependencies.
//
// Server-Sent Events first (EventSource, with its native Last-Event-ID resume); when
// streaming does not work (a stream that cannot open, a 503, repeated errors, no
// EventSource, or no event in time because a proxy buffers) it polls GET /v1/jobs/{id}
// with If-None-Match and backoff, and calls the same handlers, then tries streaming
// again, soon at first, then less often. When neither reaches the server its mode
// says so ("unreachable") until one does.
//
//   const handle = watchJob(job.id, {progress(job) {...}, output(job, ev) {...},
//                                    done(job) {...}}, {apiKey, eventsUrl: job.links.events});
//   handle.close();
//
// Every handler is called as handler(job, event): `job` is the job as known after the
// event (a snapshot plus the events since), `event` the event's data with its `kind`.

const TERMINAL = new Set(["completed", "failed", "cancelled"]);
const KINDS = ["snapshot", "status", "progress", "output", "completed", "failed", "cancelled"];
const HANDLER = {
  snapshot: "snapshot",
  status: "status",
  progress: "progress",
  output: "output",
  completed: "done",
  failed: "failed",
  cancelled: "cancelled",
};

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
});

export function isTerminal(status) {
  return TERMINAL.has(status);
}

/** No answer at all: the network or the server is down (fetch rejected). */
export class UnreachableError extends Error {
  constructor(cause) {
    super("cannot reach the server", { cause });
    this.name = "UnreachableError";
    this.code = "unreachable";
    this.status = 0;
  }
}

/** An error answer of the API: {error: {code, message, details}} with its HTTP status. */
export class ApiError extends Error {
  constructor(status, code, message, details = null, retryAfterS = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.details = details;
    this.retryAfterS = retryAfterS;
  }
}

function retryAfter(resp) {
  const value = Number.parseFloat(resp.headers.get("Retry-After") || "");
  return Number.isFinite(value) && value >= 0 ? value : null;
}

const GATEWAY = new Set([502, 504]); // a proxy answering for a server that is down

/** Does `err` mean the server is out of reach (no answer, or a proxy saying so)? */
export function isUnreachable(err) {
  return err instanceof UnreachableError || (err instanceof ApiError && GATEWAY.has(err.status));
}

/** fetch, with a network failure turned into UnreachableError (an abort stays one). */
async function reach(url, init) {
  try {
    return await fetch(url, init);
  } catch (err) {
    if (err && err.name === "AbortError") throw err;
    throw new UnreachableError(err);
  }
}

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

/** A small JSON client for the v1 API (fetch; `Authorization: Bearer` with an API key). */
export function createClient({ baseUrl = "", apiKey = null } = {}) {
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
  const job = (id) => `/v1/jobs/${encodeURIComponent(id)}`;
  return {
    baseUrl,
    apiKey,
    call,
    jobTypes: async () => (await call("/v1/job-types")).types,
    submit: (type, payload, { priority, idempotencyKey } = {}) =>
      call("/v1/jobs", {
        method: "POST",
        body: priority ? { type, payload, priority } : { type, payload },
        headers: idempotencyKey ? { "Idempotency-Key": idempotencyKey } : {},
      }),
    get: (id) => call(job(id)),
    list: (params = {}) => call(`/v1/jobs?${new URLSearchParams(params)}`),
    cancel: (id) => call(job(id), { method: "DELETE" }),
    retry: (id) => call(`${job(id)}/retry`, { method: "POST" }),
    streamToken: () => call("/v1/stream-tokens", { method: "POST" }),
  };
}

// ---- remembered jobs (so a reloaded page resumes them) ----

function readIds(key) {
  try {
    const ids = JSON.parse(localStorage.getItem(key) || "[]");
    return Array.isArray(ids) ? ids.filter((id) => typeof id === "string") : [];
  } catch {
    return []; // storage disabled or garbled: nothing to resume
  }
}

function writeIds(key, ids) {
  try {
    localStorage.setItem(key, JSON.stringify(ids));
  } catch {
    // storage full or disabled: resuming after a reload is best effort
  }
}

/** The job ids a page was watching and that had not ended (newest last). */
export function rememberedJobs(key = DEFAULTS.storageKey) {
  return key ? readIds(key) : [];
}

export function rememberJob(id, key = DEFAULTS.storageKey) {
  if (key && !readIds(key).includes(id)) writeIds(key, [...readIds(key), id]);
}

export function forgetJob(id, key = DEFAULTS.storageKey) {
  if (key) writeIds(key, readIds(key).filter((known) => known !== id));
}

// ---- what a job looks like after each event ----

/** Apply one event to a job (a copy); the server's snapshot hash changes the same way. */
export function applyEvent(job, kind, data) {
  const { job_id: id, ts: _ts, reset: _reset, polled: _polled, ...fields } = data;
  if (kind === "snapshot") return { ...fields, id };
  const next = { ...job, id, seq: data.seq };
  if (kind === "status") {
    const { seq: _s, ...change } = fields;
    // A new attempt starts afresh (the worker resets these fields with it).
    if (change.status === "running" && job.status !== "running" && !change.cancel_requested) {
      Object.assign(next, { progress: 0, stage: null, message: null, output: "", eta_s: null });
      next.started_at = data.ts;
    }
    Object.assign(next, change);
  } else if (kind === "progress") {
    for (const key of ["progress", "stage", "message", "eta_s"]) next[key] = data[key];
  } else if (kind === "output") {
    next.output = (job.output || "") + data.delta;
  }
  if (TERMINAL.has(kind)) next.finished_at = data.ts ?? next.finished_at;
  if (kind === "completed") {
    Object.assign(next, { status: kind, result: data.result, progress: 100, eta_s: 0 });
  } else if (kind === "failed") {
    Object.assign(next, { status: kind, error: data.error, eta_s: null });
    if ("result" in data) next.result = data.result;
  } else if (kind === "cancelled") {
    Object.assign(next, { status: kind, eta_s: null });
  }
  return next;
}

/** The events that turn snapshot `prev` into snapshot `job` (for pollers). */
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
    events.push(["status", { ...base, status: job.status, attempt: job.attempt }]);
  }
  if ((job.output || "").length > (prev.output || "").length) {
    events.push(["output", { ...base, delta: job.output.slice((prev.output || "").length) }]);
  }
  const moved = ["progress", "stage", "message", "eta_s"].some((k) => job[k] !== prev[k]);
  if (moved) {
    const { progress, stage, message, eta_s } = job;
    events.push(["progress", { ...base, progress, stage, message, eta_s }]);
  }
  if (isTerminal(job.status)) events.push(terminalOf(job, base));
  return events;
}

function terminalOf(job, polledBase) {
  const base = { ...polledBase, ts: job.finished_at ?? polledBase.ts };
  if (job.status === "completed") return ["completed", { ...base, result: job.result }];
  if (job.status === "failed") {
    return ["failed", { ...base, error: job.error, result: job.result }];
  }
  return ["cancelled", { ...base }];
}

// ---- the watcher: one stream (or poll loop) for one job or many ----

class Watcher {
  constructor(ids, single, handlers, options) {
    this.o = { ...DEFAULTS, ...options };
    this.h = handlers || {};
    this.single = single; // one job: GET /v1/jobs/{id}/events (id: = the job's seq)
    this.all = ids === null; // every job of the tenant: GET /v1/events (id: = tenant seq)
    this.ids = new Set(ids || []);
    this.jobs = new Map(); // id -> {job, seq, ended}
    this.etags = new Map();
    this.eventsUrl = this.o.eventsUrl;
    this.token = null; // {token, expires_at} for the multiplexed stream
    this.es = null;
    this.opened = false; // the current EventSource has opened (at least once)
    this.generation = 0; // bumped whenever a stream is dropped: stale opens give up
    this.cursor = null; // the last event id the stream sent
    // What reaches the server: null (not yet known), "stream", "polling" (the stream does
    // not work, polls do) or "unreachable" (neither: the polls go on, the stream retries).
    this.mode = null;
    this.reason = null; // why we poll (the mode handler's second argument)
    this.refused = false; // the server said it will not stream (retry it seldom)
    this.errors = 0;
    this.refreshed = false;
    this.listed = false;
    this.timers = new Set();
    this.fetches = new Set();
    this.pollTimer = null;
    this.retryTimer = null;
    this.reopenTimer = null;
    this.pollDelay = this.o.pollMinMs;
    this.streamDelay = null; // the next stream retry's delay (doubles while it fails)
    this.probing = false; // a reachability check is on its way
    this.closed = false;
    for (const id of this.ids) rememberJob(id, this.o.storageKey);
  }

  // -- lifecycle --

  start() {
    if (typeof EventSource === "undefined") this.fallBack("no_eventsource");
    else this.openStream(null);
    return this;
  }

  close() {
    if (this.closed) return;
    this.closed = true;
    this.dropStream();
    for (const id of this.timers) clearTimeout(id);
    this.timers.clear();
    for (const ctl of this.fetches) ctl.abort();
    this.fetches.clear();
  }

  add(id, job = null) {
    if (this.closed) return;
    if (!this.all) this.ids.add(id);
    const st = this.state(id);
    if (job) this.applySnapshot(job, false);
    if (st.ended || this.all) return;
    rememberJob(id, this.o.storageKey);
    this.reconnectSoon();
  }

  remove(id) {
    this.ids.delete(id);
    this.jobs.delete(id);
    forgetJob(id, this.o.storageKey);
    if (!this.all) this.reconnectSoon();
  }

  reconnectSoon() {
    // Several add() calls in a row make one new connection.
    if (this.closed || this.reopenTimer !== null) return;
    this.reopenTimer = this.later(() => {
      this.reopenTimer = null;
      if (this.polling()) {
        this.pollSoon();
        if (this.retryTimer === null) this.scheduleStreamRetry();
      } else {
        this.dropStream();
        this.openStream(null);
      }
    }, 0);
  }

  later(fn, ms) {
    const id = setTimeout(() => {
      this.timers.delete(id);
      if (!this.closed) fn();
    }, ms);
    this.timers.add(id);
    return id;
  }

  cancelTimer(id) {
    if (id === null) return null;
    clearTimeout(id);
    this.timers.delete(id);
    return null;
  }

  setMode(mode, reason = null) {
    if (this.mode === mode) return;
    this.mode = mode;
    this.call("mode", mode, reason);
  }

  /** Polling (the stream does not work), whether the polls reach the server or not. */
  polling() {
    return this.mode === "polling" || this.mode === "unreachable";
  }

  call(name, ...args) {
    const fn = this.h[name];
    if (typeof fn !== "function") return;
    try {
      fn(...args);
    } catch (err) {
      console.error(`pushsvc: the ${name} handler threw`, err); // never break the watcher
    }
  }

  fail(err, id = null) {
    this.call("error", err, id);
  }

  async fetch(path, init = {}) {
    const ctl = new AbortController();
    this.fetches.add(ctl);
    const headers = { ...(init.headers || {}) };
    if (this.o.apiKey) headers.Authorization = `Bearer ${this.o.apiKey}`;
    try {
      const options = { ...init, headers, cache: "no-store", signal: ctl.signal };
      return await reach(this.url(path), options);
    } finally {
      this.fetches.delete(ctl);
    }
  }

  url(path) {
    return /^https?:/.test(path) ? path : this.o.baseUrl + path;
  }

  // -- job state --

  state(id) {
    let st = this.jobs.get(id);
    if (!st) {
      st = { job: null, seq: 0, epoch: "", ended: false }; // seq counts within epoch
      this.jobs.set(id, st);
    }
    return st;
  }

  active() {
    return [...this.ids].filter((id) => !this.state(id).ended);
  }

  finished() {
    return !this.all && this.active().length === 0;
  }

  /** One event, from a stream or synthesized: dedupe by the job's seq, apply, call. */
  apply(kind, data, fresh = false) {
    const st = this.state(data.job_id);
    // A finished job's stream repeats its terminal event with the snapshot's seq.
    const echo = TERMINAL.has(kind) && !st.ended && data.seq === st.seq;
    // History was lost (a Redis restart or failover): the server's state wins, whatever
    // its seq; later events count from it. The end of a job the store lost altogether
    // (`failed`, `state_lost`) opens a new history too: a stream that resumed on another
    // API process numbers it from what it knows, which may be less than we saw.
    const restart =
      (kind === "snapshot" && data.reset === true) ||
      (kind === "failed" && data.error?.code === "state_lost" && !st.ended);
    if (st.job && data.seq <= st.seq && !echo && !fresh && !restart) return;
    st.job = applyEvent(st.job || { id: data.job_id }, kind, data);
    st.seq = data.seq;
    if (kind === "snapshot") st.ended = false;
    if (TERMINAL.has(kind)) {
      st.ended = true;
      forgetJob(data.job_id, this.o.storageKey);
    }
    this.call(HANDLER[kind], st.job, { kind, ...data });
  }

  applySnapshot(job, polled = true) {
    const st = this.state(job.id);
    // Another epoch: the seq counts in another history, so a lower one is news too.
    const otherHistory = Boolean(job.epoch && st.epoch && job.epoch !== st.epoch);
    if (st.job && job.seq <= st.seq && !otherHistory) return false;
    // The events made from one snapshot share its seq: checked once, here.
    for (const [kind, data] of diffSnapshots(st.job, job, polled)) this.apply(kind, data, true);
    st.epoch = job.epoch || st.epoch;
    return true;
  }

  settle() {
    // Called after every batch of events: a finished watch lets go of its connection.
    if (!this.finished()) return;
    if (this.single) this.close();
    else {
      this.dropStream();
      this.retryTimer = this.cancelTimer(this.retryTimer);
      this.pollTimer = this.cancelTimer(this.pollTimer);
    }
  }

  // -- streaming --

  async streamUrl(lastId) {
    let url;
    if (this.single) {
      url = this.eventsUrl;
      const expiry = url && /[?&]token=/.test(url) ? this.eventsExpires || Infinity : Infinity;
      if (!url || expiry * 1000 < Date.now() + 5000) url = await this.freshJobLink();
      if (!url) return null;
    } else {
      const params = new URLSearchParams();
      if (!this.all) for (const id of this.active()) params.append("job", id);
      if (this.o.apiKey) params.set("token", await this.streamToken());
      url = `/v1/events?${params}`;
    }
    if (lastId !== null) url += `${url.includes("?") ? "&" : "?"}last_event_id=${lastId}`;
    return this.url(url);
  }

  async freshJobLink() {
    // GET the job: a new job-scoped token, and its state on the way.
    const [id] = this.ids;
    const resp = await this.fetch(`/v1/jobs/${encodeURIComponent(id)}`);
    if (!resp.ok) throw await errorOf(resp);
    const job = await resp.json();
    this.eventsUrl = job.links.events;
    this.eventsExpires = job.links.events_expires_at;
    this.etags.set(id, resp.headers.get("ETag"));
    this.applySnapshot(job, false);
    this.settle();
    return this.closed ? null : this.eventsUrl;
  }

  async streamToken() {
    if (!this.token || this.token.expires_at * 1000 < Date.now() + 30000) {
      const resp = await this.fetch("/v1/stream-tokens", { method: "POST" });
      if (!resp.ok) throw await errorOf(resp);
      this.token = await resp.json();
    }
    return this.token.token;
  }

  async openStream(lastId) {
    if (this.closed || this.finished() || this.es) return;
    const generation = ++this.generation;
    let url;
    try {
      url = await this.streamUrl(lastId);
    } catch (err) {
      if (!this.closed && generation === this.generation) this.onFailure(err);
      return;
    }
    // Another open (say, for a job added meanwhile) may have superseded this one.
    if (generation !== this.generation || !url || this.closed || this.finished()) return;
    const es = new EventSource(url);
    this.es = es;
    this.gotEvent = false;
    this.opened = false;
    for (const kind of KINDS) es.addEventListener(kind, (m) => this.onMessage(es, kind, m));
    es.onopen = () => {
      if (es !== this.es) return;
      this.opened = true;
      this.errors = 0;
      // Back after an outage: a resumed stream may have nothing to send for a while.
      if (this.mode === "unreachable") this.streaming();
    };
    es.onerror = () => this.onStreamError(es);
    // A fresh stream starts with snapshots at once; silence means a buffering proxy.
    const expectsEvent = lastId === null && (this.single || this.active().length > 0);
    if (expectsEvent) {
      this.firstTimer = this.later(() => {
        if (es === this.es && !this.gotEvent) this.fallBack("no_events", true);
      }, this.o.firstEventTimeoutMs);
    }
  }

  dropStream() {
    this.generation += 1;
    this.firstTimer = this.cancelTimer(this.firstTimer ?? null);
    if (this.es) {
      this.es.close();
      this.es = null;
    }
  }

  onMessage(es, kind, message) {
    if (es !== this.es || this.closed) return;
    let data;
    try {
      data = JSON.parse(message.data);
    } catch {
      return; // not ours
    }
    this.gotEvent = true;
    this.errors = 0;
    this.refreshed = false;
    this.cursor = message.lastEventId || this.cursor;
    this.firstTimer = this.cancelTimer(this.firstTimer ?? null);
    if (this.mode !== "stream") this.streaming();
    this.apply(kind, data);
    // A job stream's id is the job's position "<seq>.<epoch>" (a multiplexed one's is
    // the tenant's): keep the epoch, so a polled snapshot of another history is news.
    const epoch = this.single ? (message.lastEventId || "").split(".")[1] : "";
    if (epoch) this.state(data.job_id).epoch = epoch;
    this.settle();
  }

  streaming() {
    this.pollTimer = this.cancelTimer(this.pollTimer);
    this.retryTimer = this.cancelTimer(this.retryTimer);
    this.pollDelay = this.o.pollMinMs;
    this.streamDelay = null;
    this.setMode("stream");
  }

  onStreamError(es) {
    if (es !== this.es || this.closed) return;
    if (es.readyState === EventSource.CONNECTING && !this.opened) {
      // It never opened (blocked, refused by a proxy, no server): the browser's own
      // retries would take seconds each. Poll now; the stream is tried again soon.
      this.fallBack("stream_unavailable");
      return;
    }
    if (es.readyState === EventSource.CONNECTING) {
      // The browser reconnects by itself, sending Last-Event-ID: count, and give up at last.
      // Meanwhile, say at once whether the server is there at all.
      this.errors += 1;
      if (this.errors >= this.o.maxStreamErrors) this.fallBack("stream_errors");
      else this.probe();
      return;
    }
    // Closed for good: the server refused (401, 404, 503, 204...). Ask it why.
    this.dropStream();
    this.diagnose(this.cursor);
  }

  async diagnose(lastId) {
    const generation = this.generation;
    let resp;
    try {
      const url = await this.streamUrl(lastId);
      if (!url) return;
      resp = await this.fetch(url, { headers: { Accept: "text/event-stream" } });
    } catch (err) {
      if (!this.closed && generation === this.generation) this.onFailure(err);
      return;
    }
    if (resp.ok && resp.body) resp.body.cancel().catch(() => {}); // a working stream: let go
    if (this.closed || generation !== this.generation) return;
    if (resp.status === 200) {
      this.errors += 1;
      if (this.errors >= this.o.maxStreamErrors) this.fallBack("stream_errors");
      else this.openStream(lastId);
    } else if (resp.status === 204) {
      this.fallBack("stream_ended"); // nothing more to stream: one poll settles the end
    } else {
      this.onFailure(await errorOf(resp));
    }
  }

  onFailure(err) {
    if (!(err instanceof ApiError)) {
      if (err && err.name === "AbortError") return;
      this.fallBack("network");
      return;
    }
    if (err.status === 401 && !this.refreshed) {
      // An expired stream token: get a fresh one and resume where the stream stopped.
      this.refreshed = true;
      this.eventsUrl = null;
      this.token = null;
      this.openStream(this.cursor);
      return;
    }
    if (err.status === 401 || err.status === 404) {
      this.fallBack(err.code, true); // polling says which job, or that the key is wrong
      return;
    }
    // 503 streams_disabled / redis_unavailable, 5xx, ...; a gateway's 502 or 504 is the
    // server missing rather than refusing.
    this.fallBack(err.code, !GATEWAY.has(err.status));
  }

  /** While the stream reconnects by itself: does anything answer? No: "unreachable". */
  async probe() {
    if (this.probing || this.mode === "unreachable") return;
    this.probing = true;
    try {
      const resp = await this.fetch(this.probePath());
      resp.body?.cancel().catch(() => {});
      if (GATEWAY.has(resp.status)) this.unreachable();
    } catch (err) {
      if (isUnreachable(err)) this.unreachable();
    } finally {
      this.probing = false;
    }
  }

  probePath() {
    const [id] = this.active();
    return id && !this.all ? `/v1/jobs/${encodeURIComponent(id)}` : "/v1/jobs?limit=1";
  }

  unreachable() {
    if (this.closed || (this.es && this.es.readyState === EventSource.OPEN)) return; // back
    this.setMode("unreachable", "network");
  }

  /** Poll instead of streaming; `refused`: the server answered that it will not stream. */
  fallBack(reason, refused = false) {
    if (this.closed) return;
    this.dropStream();
    if (this.finished()) return this.settle();
    this.reason = reason;
    this.refused = refused;
    // Unreachable stays so until a poll gets an answer.
    if (this.mode !== "unreachable") this.setMode("polling", reason);
    this.pollSoon();
    if (reason !== "no_eventsource" && this.retryTimer === null) this.scheduleStreamRetry();
  }

  scheduleStreamRetry() {
    // Soon after a stream that could not open, doubling while it still cannot; a server
    // that answered "no" (503 streams off, a proxy that buffers) only every streamRetryMs.
    const max = this.o.streamRetryMs;
    const first = Math.min(this.o.streamRetryMinMs, max);
    const delay = this.refused ? max : (this.streamDelay ?? first);
    this.streamDelay = Math.min(delay * 2, max);
    this.retryTimer = this.later(() => this.retryStream(), delay);
  }

  retryStream() {
    this.retryTimer = null;
    if (!this.polling() || this.finished()) return;
    if (!this.es) {
      this.errors = 0;
      this.refreshed = false;
      // The all-jobs stream resumes (jobs that ended meanwhile are in the tenant log);
      // named jobs start afresh with a snapshot each.
      this.openStream(this.all ? this.cursor : null);
    }
    this.scheduleStreamRetry();
  }

  // -- polling --

  pollSoon(ms = 0) {
    this.pollTimer = this.cancelTimer(this.pollTimer);
    this.pollTimer = this.later(() => {
      this.pollTimer = null;
      this.poll();
    }, ms);
  }

  async poll() {
    if (this.closed || !this.polling()) return;
    let outcome;
    let reached = true;
    try {
      outcome = this.all ? await this.pollList() : await this.pollJobs();
    } catch (err) {
      if (this.closed || (err && err.name === "AbortError")) return;
      outcome = { changed: false, hintS: err instanceof ApiError ? err.retryAfterS : null };
      if (err instanceof ApiError && err.status === 401) {
        this.fail(err);
        this.close(); // a wrong or missing API key: nothing will work until it changes
        return;
      }
      reached = !isUnreachable(err);
    }
    if (this.closed || !this.polling()) return;
    this.reached(reached);
    this.settle();
    if (this.finished()) return;
    // Quick after a change, doubling while nothing changes; never sooner than the hint.
    // An unreachable server is asked often enough to notice its return within seconds.
    const cap = this.mode === "unreachable" ? this.o.unreachablePollMaxMs : this.o.pollMaxMs;
    this.pollDelay = outcome.changed ? this.o.pollMinMs : Math.min(this.pollDelay * 2, cap);
    const jittered = this.pollDelay * (0.75 + Math.random() * 0.5);
    this.pollSoon(Math.max(jittered, (outcome.hintS ?? 0) * 1000));
  }

  reached(reached) {
    if (!reached) {
      this.setMode("unreachable", "network");
    } else if (this.mode === "unreachable") {
      // The server is back: polling it works; try the stream at once (if there is one).
      this.setMode("polling", this.reason);
      if (this.reason === "no_eventsource") return;
      this.streamDelay = null;
      this.retryTimer = this.cancelTimer(this.retryTimer);
      this.retryStream();
    }
  }

  async pollJobs() {
    let changed = false;
    let hintS = null;
    for (const id of this.active()) {
      const etag = this.etags.get(id);
      const resp = await this.fetch(`/v1/jobs/${encodeURIComponent(id)}`, {
        headers: etag ? { "If-None-Match": etag } : {},
      });
      if (this.closed) break;
      const hint = retryAfter(resp);
      if (hint !== null) hintS = Math.max(hintS ?? 0, hint);
      if (resp.status === 304) continue;
      if (resp.status === 404) {
        this.fail(await errorOf(resp), id);
        this.state(id).ended = true; // gone (expired, or never ours): stop asking
        forgetJob(id, this.o.storageKey);
        continue;
      }
      if (!resp.ok) throw await errorOf(resp);
      const job = await resp.json();
      this.etags.set(id, resp.headers.get("ETag"));
      if (job.links && this.single) {
        this.eventsUrl = job.links.events;
        this.eventsExpires = job.links.events_expires_at;
      }
      changed = this.applySnapshot(job) || changed;
    }
    return { changed, hintS };
  }

  async pollList() {
    const resp = await this.fetch("/v1/jobs?limit=50");
    if (!resp.ok) throw await errorOf(resp);
    const { jobs } = await resp.json();
    let changed = false;
    for (const job of jobs.reverse()) {
      const st = this.state(job.id);
      if (!this.listed && !st.job && isTerminal(job.status)) {
        // Like the all-jobs stream: jobs that ended before we looked are not news.
        Object.assign(st, { job, seq: job.seq, ended: true });
        continue;
      }
      changed = this.applySnapshot(job) || changed;
    }
    this.listed = true;
    return { changed, hintS: retryAfter(resp) };
  }
}

function handleOf(watcher) {
  return {
    close: () => watcher.close(),
    get mode() {
      return watcher.mode;
    },
    job: (id) => watcher.jobs.get(id)?.job ?? null,
  };
}

/**
 * Watch one job until it ends; returns {close(), mode, job(id)}.
 *
 * handlers: snapshot, status, progress, output, done, failed, cancelled, each (job, event);
 * mode(mode, reason) with "stream" | "polling" | "unreachable" (neither the stream nor a
 * poll reaches the server; it keeps trying); error(err, jobId).
 * options: see DEFAULTS (apiKey, eventsUrl: the job's links.events, baseUrl, ...).
 */
export function watchJob(jobId, handlers = {}, options = {}) {
  return handleOf(new Watcher([jobId], true, handlers, options).start());
}

/**
 * Watch many jobs over one connection (GET /v1/events), or every job of the tenant
 * with "all". The handle also has add(id, job?) and remove(id) for named jobs.
 */
export function watchJobs(jobIds, handlers = {}, options = {}) {
  const watcher = new Watcher(jobIds === "all" ? null : [...jobIds], false, handlers, options);
  watcher.start();
  return {
    ...handleOf(watcher),
    add: (id, job = null) => watcher.add(id, job),
    remove: (id) => watcher.remove(id),
  };
}
