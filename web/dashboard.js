// The live dashboard: the stats document pushed over SSE (GET /v1/stats/events), polling
// GET /v1/stats only while that stream fails (pushsvc.js's Feed, as for jobs); the
// tenant's recent jobs through pushsvc.js's watchJobs.

import {
  $,
  askForKey,
  bindKeyPanel,
  clock,
  seconds,
  setText,
  showMode,
  storedKey,
} from "./page.js";
import { Feed, createClient, watchJobs } from "./pushsvc.js";

const RECENT = 20; // rows in "Your recent jobs"
const HISTORY = 40; // samples kept for the sparklines
/** The stats feed's pace: a new document comes every few seconds anyway. */
const STATS_FEED = Object.freeze({
  pollMinMs: 4000, // GET /v1/stats this often while the stream is down
  pollMaxMs: 30000,
  unreachablePollMaxMs: 4000, // while nothing answers, notice its return quickly
  streamRetryMinMs: 30000, // while polling, try the stream again this often
  streamRetryMs: 30000,
  firstEventTimeoutMs: 10000, // a stream that sends nothing this long is buffered
  maxStreamErrors: 3, // consecutive reconnects before polling
});

// ---- formatting ----

/**
 * @param {number | null | undefined} n
 * @returns {string}
 */
function count(n) {
  return n === null || n === undefined ? "–" : Number(n).toLocaleString("en");
}

/**
 * @param {number | null | undefined} x a fraction
 * @param {number} [digits]
 * @returns {string}
 */
function percent(x, digits = 1) {
  if (x === null || x === undefined) return "–";
  const pct = x * 100;
  return `${pct === 100 || pct === 0 ? pct.toFixed(0) : pct.toFixed(digits)}%`;
}

/**
 * How long something has waited: whole seconds, so it does not flicker.
 * @param {number | null | undefined} s
 * @returns {string}
 */
function age(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1) return "< 1 s";
  return s < 60 ? `${Math.floor(s)} s` : seconds(Math.floor(s));
}

/**
 * A threshold or window: "30 s", "5 min".
 * @param {number} s
 * @returns {string}
 */
function span(s) {
  return s % 60 === 0 && s >= 60 ? `${s / 60} min` : `${s} s`;
}

/**
 * @param {number | null | undefined} perS
 * @returns {string}
 */
function rate(perS) {
  if (perS === null || perS === undefined) return "–";
  if (perS === 0) return "0";
  if (perS >= 100) return perS.toFixed(0);
  return String(Number(perS.toPrecision(2)));
}

/**
 * US dollars: cents and up to the cent, less to two significant digits ("$0.00042").
 * @param {number | null | undefined} usd
 * @returns {string}
 */
function dollars(usd) {
  if (usd === null || usd === undefined) return "–";
  if (usd === 0) return "$0";
  return usd >= 0.01 ? `$${usd.toFixed(2)}` : `$${Number(usd.toPrecision(2))}`;
}

/**
 * @param {number} n
 * @param {string} word
 * @returns {string}
 */
function plural(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

// ---- API key ----

/** @param {string} message why a key is needed */
function needKey(message) {
  stop();
  showMode("offline");
  setText($("alerts-summary"), "Not connected: this server needs an API key.");
  askForKey(message);
}

bindKeyPanel((key) => start(key));

// ---- the stats feed: one EventSource, GET /v1/stats only while it fails ----

/**
 * The stats document as a source of pushsvc.js's Feed.
 * @param {(doc: object) => void} onStats
 * @returns {import("./pushsvc.js").Source}
 */
function statsSource(onStats) {
  return {
    kinds: ["stats"],
    resumes: false,
    diagnoses: false, // the stream is asked once; the next poll says what is wrong
    closesWhenFinished: false,
    finished: () => false,
    expectsEvent: () => true, // a document comes at once
    probePath: () => null,
    renew: () => {}, // every stream URL brings a fresh token
    /**
     * @param {string | null} _lastId stats frames are not resumed
     * @param {import("./pushsvc.js").Requests} requests
     */
    async streamUrl(_lastId, requests) {
      if (!requests.apiKey) return requests.url("/v1/stats/events");
      // EventSource sends no headers: a tenant-scoped stream token instead.
      const { token } = await requests.json("/v1/stream-tokens", { method: "POST" });
      return requests.url(`/v1/stats/events?token=${encodeURIComponent(token)}`);
    },
    take: (_kind, doc) => onStats(doc),
    /** @param {import("./pushsvc.js").Requests} requests */
    async poll(requests) {
      onStats(await requests.json("/v1/stats"));
      return { changed: true, hintS: null };
    },
  };
}

// ---- tiles ----

const history = { queue_depth: [], running: [], throughput: [] };

/** @param {string} metric a tile's data-metric */
function tile(metric) {
  const node = document.querySelector(`.tile[data-metric="${metric}"]`);
  return { node, value: node.querySelector(".value"), sub: node.querySelector(".sub") };
}

/**
 * @param {string} metric
 * @param {string} value
 * @param {string} unit shown small after the value ("": none)
 * @param {string} sub the line under it
 * @param {"" | "ok" | "warn" | "bad"} [state]
 */
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

/**
 * Add a sample to the tile's sparkline.
 * @param {string} metric
 * @param {number | null} value
 */
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

/**
 * @param {object} doc the stats document
 * @param {Set<string>} alerts the names of the alerts firing
 */
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

/**
 * @param {{name: string}} alert
 * @returns {{title: string, severity: string, what: (a: object) => string, means: string}}
 */
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

/**
 * @param {object} doc the stats document
 * @returns {Set<string>} the names of the alerts firing
 */
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

/** @param {object} doc the stats document */
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

// ---- the model calls by job type and model (each type's ``llm``) ----

/**
 * One row of the model table.
 * @param {string} type
 * @param {string} model
 * @param {object} m the type's figures of that model (stats.py, telemetry.summarize_calls)
 * @returns {string[]}
 */
function modelCells(type, model, m) {
  // Counted from characters where the server sent no usage: "≈".
  const approx = m.estimated_calls > 0 ? "≈ " : "";
  return [
    type,
    model,
    count(m.calls),
    seconds(m.ttft_p50_s),
    seconds(m.ttft_p95_s),
    rate(m.tokens_per_s_p50),
    approx + count(m.prompt_tokens),
    approx + count(m.completion_tokens),
    dollars(m.cost_usd),
  ];
}

/** @param {object} doc the stats document */
function renderModels(doc) {
  const body = $("models-body");
  const rows = Object.entries(doc.types || {}).flatMap(([type, t]) =>
    Object.entries(t.llm || {}).map(([model, m]) => ({ key: `${type} ${model}`, type, model, m })),
  );
  const keep = new Set(rows.map((r) => r.key));
  const existing = new Map([...body.rows].map((tr) => [tr.dataset.key, tr]));
  for (const [key, tr] of existing) {
    if (!keep.has(key)) tr.remove();
  }
  for (const { key, type, model, m } of rows) {
    let tr = existing.get(key);
    if (!tr) {
      tr = document.createElement("tr");
      tr.dataset.key = key;
      tr.dataset.type = type;
      tr.dataset.model = model;
      const head = document.createElement("th");
      head.scope = "row";
      tr.append(head);
      for (let i = 1; i < 9; i += 1) {
        const td = document.createElement("td");
        td.className = i === 1 ? "model-cell" : "num";
        tr.append(td);
      }
      tr.cells[8].title = "from PUSHSVC_LLM_PRICES; – : no price for this model";
    }
    modelCells(type, model, m).forEach((text, i) => setText(tr.cells[i], text));
    body.append(tr); // sorted by the server: type, then model
  }
  $("models-empty").hidden = rows.length > 0;
  $("models").hidden = rows.length === 0;
}

/** @param {object} doc the stats document (GET /v1/stats) */
function renderStats(doc) {
  const alerts = renderAlerts(doc);
  renderTiles(doc, alerts);
  renderTypes(doc);
  renderModels(doc);
  setText($("models-note"), `all tenants · last ${span(doc.window_s)}`);
  setText($("window-note"), `All tenants · last ${span(doc.window_s)} · updated ${clock(doc.at)}`);
  setText($("types-note"), `all tenants · last ${span(doc.window_s)}`);
}

// ---- recent jobs of this tenant (pushsvc.js: one multiplexed stream, or polling) ----

const rows = new Map(); // job id -> {node, job}

/**
 * @param {import("./pushsvc.js").Job} job
 * @returns {{node: HTMLElement, job: import("./pushsvc.js").Job}}
 */
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

/** @param {import("./pushsvc.js").Job} job */
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

/** @param {import("./pushsvc.js").Job} job */
function onJob(job) {
  renderJob(job);
}

/**
 * @param {ReturnType<typeof createClient>} client
 * @returns {import("./pushsvc.js").Handlers}
 */
function jobHandlers(client) {
  let relisted = false;
  return {
    snapshot: onJob,
    status: onJob,
    progress: onJob,
    done: onJob, // every final event: completed, failed or cancelled
    mode: (mode) => {
      const words = { stream: "live", unreachable: "server unreachable, retrying" };
      setText($("recent-note"), words[mode] || "polling");
      $("recent-note").dataset.mode = mode;
      if (mode === "stream" && !relisted) {
        // A job made after the first list and finished before the stream began is in
        // neither (the stream starts with the active jobs): list once more, now.
        relisted = true;
        const mine = watcher;
        client
          .list({ limit: RECENT })
          .then((seed) => {
            if (mine && watcher === mine) seed.jobs.reverse().forEach((job) => mine.add(job.id, job));
          })
          .catch(() => {
            relisted = false; // the first list and the stream stand; again when live again
          });
      }
    },
    error: (err) => {
      if (err.status === 401) needKey("The API key was refused.");
    },
  };
}

// ---- tables wider than the screen scroll sideways, and say so ----

/**
 * @param {HTMLElement} wrap the scrolling box
 * @param {HTMLElement} cue shown while there is more to its right
 */
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
cueOverflow($("models").parentElement, $("models-cue"));
cueOverflow($("recent").parentElement, $("recent-cue"));

// ---- start ----

let feed = null;
let watcher = null;

/** Stop both feeds (a new key, or none that works). */
function stop() {
  feed?.close();
  watcher?.close();
  feed = watcher = null;
}

/** @param {string | null} apiKey */
async function start(apiKey) {
  stop();
  showMode("connecting");
  const client = createClient({ apiKey });
  const handlers = {
    mode: showMode,
    error: () => needKey(apiKey ? "The API key was refused." : "This server needs an API key."),
  };
  const current = (feed = new Feed(statsSource(renderStats), handlers, { ...STATS_FEED, apiKey }));
  feed.start();
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
  watcher = watchJobs("all", jobHandlers(client), { apiKey, storageKey: false });
  // The stream's snapshots and these dedupe by seq in the watcher: the newest wins.
  for (const job of seed.jobs.reverse()) watcher.add(job.id, job);
}

start(storedKey());
