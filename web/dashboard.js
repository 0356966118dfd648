// The live dashboard: the stats document pushed over SSE (GET /v1/stats/events), polling
// GET /v1/stats only while that stream fails; the tenant's recent jobs through pushsvc.js.

import { askForKey, bindKeyPanel, storedKey } from "./keypanel.js";
import { ApiError, createClient, isUnreachable, watchJobs } from "./pushsvc.js";

const RECENT = 20; // rows in "Your recent jobs"
const POLL_MS = 4000; // GET /v1/stats this often while the stream is down
const POLL_MAX_MS = 30000;
const UNREACHABLE_POLL_MAX_MS = 4000; // while nothing answers, notice its return quickly
const STREAM_RETRY_MS = 30000; // while polling, try the stream again this often
const FIRST_EVENT_MS = 10000; // a stream that sends nothing this long is buffered
const MAX_STREAM_ERRORS = 3; // consecutive reconnects before polling
const HISTORY = 40; // samples kept for the sparklines

const $ = (id) => document.getElementById(id);

// ---- formatting ----

function count(n) {
  return n === null || n === undefined ? "–" : Number(n).toLocaleString("en");
}

function percent(x, digits = 1) {
  if (x === null || x === undefined) return "–";
  const pct = x * 100;
  return `${pct === 100 || pct === 0 ? pct.toFixed(0) : pct.toFixed(digits)}%`;
}

function seconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 10) return `${s.toFixed(2)} s`;
  if (s < 60) return `${s.toFixed(1)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

function age(s) {
  // How long something has waited: whole seconds, so it does not flicker.
  if (s === null || s === undefined) return "–";
  if (s < 1) return "< 1 s";
  return s < 60 ? `${Math.floor(s)} s` : seconds(Math.floor(s));
}

function span(s) {
  // A threshold or window: "30 s", "5 min".
  return s % 60 === 0 && s >= 60 ? `${s / 60} min` : `${s} s`;
}

function rate(perS) {
  if (perS === null || perS === undefined) return "–";
  if (perS === 0) return "0";
  if (perS >= 100) return perS.toFixed(0);
  return String(Number(perS.toPrecision(2)));
}

function clock(epoch) {
  return epoch ? new Date(epoch * 1000).toLocaleTimeString([], { hour12: false }) : "";
}

function plural(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

function setText(node, text) {
  if (node.textContent !== text) node.textContent = text; // no churn for screen readers
}

// ---- connection state and API key (as in the console) ----

const MODE_LABELS = {
  connecting: "Connecting…",
  stream: "Live: streaming",
  polling: "Polling (streaming unavailable)",
  unreachable: "Server unreachable, retrying…",
  offline: "Not connected",
};

function showMode(mode) {
  document.body.dataset.mode = mode;
  $("conn").dataset.mode = mode;
  setText($("conn-label"), MODE_LABELS[mode] || mode);
}

function needKey(message) {
  stop();
  showMode("offline");
  setText($("alerts-summary"), "Not connected: this server needs an API key.");
  askForKey(message);
}

bindKeyPanel((key) => start(key));

// ---- the stats feed: one EventSource, GET /v1/stats only while it fails ----

class StatsFeed {
  constructor(client, { stats, mode, error }) {
    this.client = client;
    this.h = { stats, mode, error };
    this.es = null;
    this.mode = null;
    this.errors = 0;
    this.got = false; // the current stream has sent a frame
    this.opened = false; // the current stream has opened
    this.refreshed = false; // a fresh token was tried after the stream closed
    this.generation = 0;
    this.timers = { first: null, poll: null, retry: null };
    this.pollMs = POLL_MS;
    this.closed = false;
  }

  start() {
    if (typeof EventSource === "undefined") this.fallBack();
    else this.open();
    return this;
  }

  close() {
    this.closed = true;
    this.drop();
    for (const name of Object.keys(this.timers)) this.clear(name);
  }

  setMode(mode) {
    if (this.mode === mode) return;
    this.mode = mode;
    this.h.mode(mode);
  }

  clear(name) {
    clearTimeout(this.timers[name]);
    this.timers[name] = null;
  }

  later(name, fn, ms) {
    this.clear(name);
    this.timers[name] = setTimeout(() => {
      this.timers[name] = null;
      if (!this.closed) fn();
    }, ms);
  }

  async open() {
    const generation = ++this.generation;
    let url = "/v1/stats/events";
    if (this.client.apiKey) {
      // EventSource sends no headers: a tenant-scoped stream token instead.
      try {
        const { token } = await this.client.streamToken();
        url += `?token=${encodeURIComponent(token)}`;
      } catch (err) {
        if (!this.closed && generation === this.generation) this.onFailure(err);
        return;
      }
    }
    if (this.closed || generation !== this.generation) return;
    const es = new EventSource(url);
    this.es = es;
    this.got = false;
    this.opened = false;
    es.onopen = () => {
      if (es === this.es) this.opened = true;
    };
    es.addEventListener("stats", (message) => this.onMessage(es, message));
    es.onerror = () => this.onError(es);
    this.later("first", () => {
      if (es === this.es && !this.got) this.fallBack();
    }, FIRST_EVENT_MS);
  }

  drop() {
    this.generation += 1;
    this.clear("first");
    if (this.es) {
      this.es.close();
      this.es = null;
    }
  }

  onMessage(es, message) {
    if (es !== this.es || this.closed) return;
    let doc;
    try {
      doc = JSON.parse(message.data);
    } catch {
      return;
    }
    this.got = true;
    this.errors = 0;
    this.refreshed = false;
    this.clear("first");
    if (this.mode !== "stream") {
      this.clear("poll");
      this.clear("retry");
      this.pollMs = POLL_MS;
      this.setMode("stream");
    }
    this.h.stats(doc);
  }

  onError(es) {
    if (es !== this.es || this.closed) return;
    if (es.readyState === EventSource.CONNECTING) {
      // The browser reconnects by itself; a few failures in a row and we poll. A stream
      // that never opened polls at once (the browser's retries take seconds each).
      this.errors += this.opened ? 1 : MAX_STREAM_ERRORS;
      if (this.errors >= MAX_STREAM_ERRORS) this.fallBack();
      return;
    }
    // Closed for good: refused (an expired token, 503...). A stream that worked gets
    // one fresh token; anything else polls, and the poll's answer says what is wrong.
    const worked = this.got;
    this.drop();
    if (worked && !this.refreshed) {
      this.refreshed = true;
      this.open();
    } else {
      this.fallBack();
    }
  }

  onFailure(err) {
    if (err instanceof ApiError && err.status === 401) this.h.error(err);
    else this.fallBack();
  }

  fallBack() {
    if (this.closed) return;
    this.drop();
    if (!["polling", "offline", "unreachable"].includes(this.mode)) {
      this.setMode("polling");
      this.poll();
    }
    if (this.timers.retry === null) this.later("retry", () => this.retry(), STREAM_RETRY_MS);
  }

  retry() {
    if (this.mode === "stream") return;
    if (!this.es) {
      this.errors = 0;
      this.refreshed = false;
      this.open();
    }
    this.later("retry", () => this.retry(), STREAM_RETRY_MS);
  }

  async poll() {
    if (this.closed || this.mode === "stream") return;
    try {
      const doc = await this.client.call("/v1/stats");
      if (this.closed || this.mode === "stream") return;
      const back = this.mode === "unreachable";
      this.pollMs = POLL_MS;
      this.setMode("polling");
      this.h.stats(doc);
      if (back) this.retry(); // the server is back: its stream may be too
    } catch (err) {
      if (this.closed) return;
      if (err instanceof ApiError && err.status === 401) {
        this.h.error(err);
        return;
      }
      const away = isUnreachable(err);
      this.pollMs = Math.min(this.pollMs * 2, away ? UNREACHABLE_POLL_MAX_MS : POLL_MAX_MS);
      this.setMode(away ? "unreachable" : "offline");
    }
    this.later("poll", () => this.poll(), this.pollMs);
  }
}

// ---- tiles ----

const history = { queue_depth: [], running: [], throughput: [] };

function tile(metric) {
  const node = document.querySelector(`.tile[data-metric="${metric}"]`);
  return { node, value: node.querySelector(".value"), sub: node.querySelector(".sub") };
}

function setTile(metric, value, unit, sub, state = "") {
  const t = tile(metric);
  const text = unit ? `${value} ${unit}` : value;
  if (t.value.dataset.text !== text) {
    t.value.dataset.text = text;
    t.value.replaceChildren(value);
    if (unit) {
      const u = document.createElement("span");
      u.className = "unit";
      u.textContent = unit;
      t.value.append(u);
    }
  }
  setText(t.sub, sub);
  if (state) t.node.dataset.state = state;
  else delete t.node.dataset.state;
}

function sparkline(metric, value) {
  const samples = history[metric];
  samples.push(value ?? 0);
  if (samples.length > HISTORY) samples.shift();
  const { node } = tile(metric);
  let svg = node.querySelector(".spark");
  if (!svg) {
    svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("class", "spark");
    svg.setAttribute("viewBox", `0 0 ${HISTORY - 1} 20`);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("aria-hidden", "true");
    for (const cls of ["spark-area", "spark-line"]) {
      const path = document.createElementNS(svg.namespaceURI, "path");
      path.setAttribute("class", cls);
      svg.append(path);
    }
    node.querySelector("dt").append(svg); // inside the label: a dl's divs hold only dt/dd
  }
  // A trend needs a few points; a line of zeros says nothing the number does not.
  svg.toggleAttribute("hidden", samples.length < 3 || samples.every((v) => v === 0));
  const top = Math.max(...samples, 1e-9);
  const step = (HISTORY - 1) / (samples.length - 1 || 1);
  const points = samples.map((v, i) => `${(i * step).toFixed(2)},${(19 - (v / top) * 17).toFixed(2)}`);
  const line = `M${points.join("L")}`;
  svg.querySelector(".spark-line").setAttribute("d", line);
  svg.querySelector(".spark-area").setAttribute("d", `${line}L${HISTORY - 1},20L0,20Z`);
}

function renderTiles(doc, alerts) {
  const o = doc.overall;
  const windowText = span(doc.window_s);
  const delayed = o.queue_depth - o.queued_ready;
  setTile("queue_depth", count(o.queue_depth), "",
    `${count(o.queued_ready)} ready · ${count(delayed)} waiting to retry`,
    alerts.has("queue_depth") ? "warn" : "");
  setTile("running", count(o.running), "", "attempts in progress",
    alerts.has("stuck_jobs") ? "bad" : "");
  setTile("workers", count(doc.workers), "",
    doc.workers ? "with a recent heartbeat" : "no heartbeat: nothing will start",
    doc.workers ? "ok" : "bad");
  setTile("oldest_queued", age(o.oldest_queued_age_s), "",
    o.queue_wait_p50_s === null
      ? "queue wait: –"
      : `queue wait p50 ${seconds(o.queue_wait_p50_s)} · p95 ${seconds(o.queue_wait_p95_s)}`);
  const finished = o.completed + o.failed + o.cancelled;
  const perMin = o.throughput_per_s * 60;
  setTile("throughput", rate(o.throughput_per_s), "jobs/s",
    `${plural(finished, "job")} finished in ${windowText}` +
      (perMin > 0 && perMin < 60 ? ` · ${rate(perMin)}/min` : ""));
  setTile("success_rate", percent(o.success_rate), "",
    o.success_rate === null ? "nothing decided yet" : `${count(o.failed)} failed of ${count(o.completed + o.failed)}`,
    alerts.has("failure_rate") ? "bad" : o.success_rate === null ? "" : "ok");
  setTile("completed", count(o.completed), "",
    `${count(o.failed)} failed · ${count(o.cancelled)} cancelled · ${count(o.retried)} retried`);
  const durations = o.duration_p50_s === null
    ? "–"
    : `${seconds(o.duration_p50_s)} · ${seconds(o.duration_p95_s)}`;
  setTile("duration", durations, "",
    o.duration_p50_s === null ? "no job completed yet" : "of completed jobs, start to finish");
  sparkline("queue_depth", o.queue_depth);
  sparkline("running", o.running);
  sparkline("throughput", o.throughput_per_s);
}

// ---- alerts ----

const ALERTS = {
  workers_absent: {
    title: "No workers",
    severity: "critical",
    what: (a) => `No worker has sent a heartbeat in the last ${span(a.threshold)}.`,
    means:
      "Queued jobs will not start until a worker is back. Check that the worker processes " +
      "are running and can reach Redis.",
  },
  failure_rate: {
    title: "High failure rate",
    severity: "critical",
    what: (a) =>
      `${percent(a.value)} of the jobs decided in the window failed ` +
      `(the alert fires above ${percent(a.threshold, 0)}).`,
    means:
      "Something jobs depend on may be broken: an upstream API, a key, a recent deploy. " +
      "The table by job type shows which types fail.",
  },
  stuck_jobs: {
    title: "Stuck jobs",
    severity: "critical",
    what: (a) =>
      `${plural(a.value, "running job")} sent no event for over ${span(a.threshold)}.`,
    means:
      "Their worker may be hung or an upstream call stalled; they hold worker slots. " +
      "Look at the workers' logs, or cancel the jobs.",
  },
  queue_depth: {
    title: "Queue backing up",
    severity: "warning",
    what: (a) => `${plural(a.value, "job")} waiting (the alert fires above ${count(a.threshold)}).`,
    means:
      "Jobs arrive faster than the workers finish them, so waits grow. Add workers or " +
      "raise their concurrency.",
  },
};

const ORDER = ["workers_absent", "stuck_jobs", "failure_rate", "queue_depth"];
const shownAlerts = new Map(); // name -> li

function describe(alert) {
  const known = ALERTS[alert.name];
  if (known) return known;
  return {
    title: alert.name.replace(/_/g, " "),
    severity: "warning",
    what: (a) => `Value ${a.value}, threshold ${a.threshold}.`,
    means: "",
  };
}

function renderAlerts(doc) {
  const alerts = [...doc.alerts].sort((a, b) => {
    const rank = (n) => (ORDER.includes(n) ? ORDER.indexOf(n) : ORDER.length);
    return rank(a.name) - rank(b.name);
  });
  const list = $("alert-list");
  const names = alerts.map((a) => a.name);
  for (const [name, node] of shownAlerts) {
    if (!names.includes(name)) {
      node.remove();
      shownAlerts.delete(name);
    }
  }
  for (const alert of alerts) {
    const info = describe(alert);
    let node = shownAlerts.get(alert.name);
    if (!node) {
      node = $("alert-template").content.firstElementChild.cloneNode(true);
      node.dataset.name = alert.name;
      node.dataset.severity = info.severity;
      node.querySelector(".alert-title").textContent = info.title;
      node.querySelector(".alert-means").textContent = info.means;
      shownAlerts.set(alert.name, node);
    }
    let what = info.what(alert);
    const ids = alert.job_ids || [];
    if (ids.length) what += ` Yours: ${ids.slice(0, 5).map((id) => id.slice(0, 8)).join(", ")}.`;
    setText(node.querySelector(".alert-what"), what);
    list.append(node); // keeps the order
  }
  list.dataset.count = String(alerts.length);
  // Announced only when the set of alerts changes, not on every push.
  const summary = alerts.length
    ? `${plural(alerts.length, "alert")}: ${alerts.map((a) => describe(a).title).join(", ")}.`
    : "All clear: queue, failures, stuck jobs and workers are within limits.";
  setText($("alerts-summary"), summary);
  $("alerts-summary").dataset.state = alerts.length ? "alerting" : "clear";
  return new Set(names);
}

// ---- the table by job type ----

function renderTypes(doc) {
  const body = $("types-body");
  const rows = Object.entries(doc.types || {});
  const cells = ([name, t]) => [
    name,
    count(t.completed),
    count(t.failed),
    count(t.cancelled),
    count(t.retried),
    percent(t.success_rate),
    seconds(t.duration_p50_s),
    seconds(t.duration_p95_s),
  ];
  const existing = new Map([...body.rows].map((tr) => [tr.dataset.type, tr]));
  for (const [name, tr] of existing) {
    if (!(doc.types || {})[name]) tr.remove();
  }
  for (const entry of rows) {
    let tr = existing.get(entry[0]);
    if (!tr) {
      tr = document.createElement("tr");
      tr.dataset.type = entry[0];
      const head = document.createElement("th");
      head.scope = "row";
      tr.append(head);
      for (let i = 1; i < 8; i += 1) {
        const td = document.createElement("td");
        td.className = "num";
        tr.append(td);
      }
    }
    cells(entry).forEach((text, i) => setText(tr.cells[i], text));
    tr.dataset.failing = String(entry[1].failed > 0);
    body.append(tr); // sorted by the server
  }
  $("types-empty").hidden = rows.length > 0;
  $("types").hidden = rows.length === 0;
}

function renderStats(doc) {
  const alerts = renderAlerts(doc);
  renderTiles(doc, alerts);
  renderTypes(doc);
  setText($("window-note"), `All tenants · last ${span(doc.window_s)} · updated ${clock(doc.at)}`);
  setText($("types-note"), `all tenants · last ${span(doc.window_s)}`);
}

// ---- recent jobs of this tenant (pushsvc.js: one multiplexed stream, or polling) ----

const rows = new Map(); // job id -> {node, job}

function addRow(job) {
  const node = $("recent-template").content.firstElementChild.cloneNode(true);
  node.dataset.jobId = job.id;
  node.querySelector(".job-id").textContent = job.id.slice(0, 8);
  node.querySelector(".job-id").title = job.id;
  const row = { node, job };
  rows.set(job.id, row);
  // Newest first; beyond RECENT rows the oldest go.
  const body = $("recent-body");
  const after = [...rows.values()]
    .filter((r) => r !== row && (r.job.created_at ?? 0) < (job.created_at ?? 0))
    .sort((a, b) => (b.job.created_at ?? 0) - (a.job.created_at ?? 0))[0];
  body.insertBefore(node, after ? after.node : null);
  while (rows.size > RECENT) {
    const oldest = [...rows.values()].sort((a, b) => a.job.created_at - b.job.created_at)[0];
    oldest.node.remove();
    rows.delete(oldest.job.id);
  }
  $("recent-empty").hidden = true;
  $("recent").hidden = false;
  return row;
}

function renderJob(job) {
  let row = rows.get(job.id);
  if (!row) {
    if (!job.type || !job.created_at) return; // not a whole job (its snapshot comes first)
    const oldest = Math.min(...[...rows.values()].map((r) => r.job.created_at));
    if (rows.size >= RECENT && job.created_at < oldest) return; // older than those shown
    row = addRow(job);
  }
  row.job = job;
  const { node } = row;
  const status = job.cancel_requested && job.status === "running" ? "cancelling" : job.status;
  node.dataset.status = job.status;
  setText(node.querySelector(".job-type"), job.type);
  const badge = node.querySelector(".badge");
  setText(badge, status);
  badge.dataset.status = status;
  const pct = Math.round(Math.max(0, Math.min(100, job.progress || 0)));
  const bar = node.querySelector(".progress");
  node.querySelector(".bar").style.width = `${pct}%`;
  bar.setAttribute("aria-valuenow", String(pct));
  bar.setAttribute("aria-label", `${job.type} ${job.id.slice(0, 8)} progress`);
  setText(node.querySelector(".pct"), `${pct}%`);
  let stage = [job.stage, job.message].filter(Boolean).join(" · ");
  if (job.status === "failed" && job.error) stage = job.error.message;
  if (job.status === "queued" && !stage) stage = job.attempt > 1 ? "waiting to retry" : "waiting…";
  if (job.status === "completed" && job.started_at && job.finished_at) {
    stage = `ran ${seconds(job.finished_at - job.started_at)}`;
  }
  setText(node.querySelector(".stage"), stage);
  node.querySelector(".stage").title = stage;
  setText(node.querySelector(".when"), clock(job.created_at));
}

function onJob(job) {
  renderJob(job);
}

function jobHandlers() {
  return {
    snapshot: onJob,
    status: onJob,
    progress: onJob,
    done: onJob,
    failed: onJob,
    cancelled: onJob,
    mode: (mode) => {
      const words = { stream: "live", unreachable: "server unreachable, retrying" };
      setText($("recent-note"), words[mode] || "polling");
      $("recent-note").dataset.mode = mode;
    },
    error: (err) => {
      if (err.status === 401) needKey("The API key was refused.");
    },
  };
}

// ---- tables wider than the screen scroll sideways, and say so ----

function cueOverflow(wrap, cue) {
  const update = () => {
    const more = wrap.scrollWidth - wrap.clientWidth - wrap.scrollLeft > 1;
    cue.hidden = !more;
  };
  new ResizeObserver(update).observe(wrap);
  new ResizeObserver(update).observe(wrap.firstElementChild);
  wrap.addEventListener("scroll", update, { passive: true });
}

cueOverflow($("types").parentElement, $("types-cue"));
cueOverflow($("recent").parentElement, $("recent-cue"));

// ---- start ----

let feed = null;
let watcher = null;

function stop() {
  feed?.close();
  watcher?.close();
  feed = watcher = null;
}

async function start(apiKey) {
  stop();
  showMode("connecting");
  const client = createClient({ apiKey });
  const current = (feed = new StatsFeed(client, {
    stats: renderStats,
    mode: showMode,
    error: () => needKey(apiKey ? "The API key was refused." : "This server needs an API key."),
  }).start());
  let seed;
  try {
    seed = await client.list({ limit: RECENT });
  } catch (err) {
    if (feed !== current) return;
    if (err.status === 401) {
      needKey(apiKey ? "The API key was refused." : "This server needs an API key.");
      return;
    }
    seed = { jobs: [] };
  }
  if (feed !== current) return; // restarted meanwhile (a new key)
  for (const row of rows.values()) row.node.remove();
  rows.clear();
  $("recent-empty").hidden = seed.jobs.length > 0;
  $("recent").hidden = seed.jobs.length === 0;
  watcher = watchJobs("all", jobHandlers(), { apiKey, storageKey: false });
  // The stream's snapshots and these dedupe by seq in the watcher: the newest wins.
  for (const job of seed.jobs.reverse()) watcher.add(job.id, job);
}

start(storedKey());
