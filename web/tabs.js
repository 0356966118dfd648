// tabs.js: one stream for all tabs of an origin and API key (pushsvc.js's watchJobs).
//
// Browsers open at most six HTTP/1.1 connections per origin: eight tabs of the console,
// each with its stream, left two of them waiting. Tabs of one origin and API key share
// one stream instead. Whoever holds a Web Lock named after the two (hashed: no key in
// clear) leads: it opens /v1/events for the jobs of every tab and relays each frame on a
// BroadcastChannel of that name; the others follow: they say which jobs they watch, and
// apply the relayed frames as if they came from their own stream (deduped by seq). When
// the leader goes (its tab closed), the next tab in the lock's queue leads and resumes
// after the last id it heard relayed: nothing is lost. While the leader polls, every tab
// polls for its own jobs. Without Web Locks or BroadcastChannel (or crypto.subtle: all
// three want a secure context) each tab streams on its own.
//
// A follower that starts listening asks to be synced: its own state and a relay already
// under way may not meet. If the leader's open stream carries its jobs already, the
// leader says "covered" and keeps it: the follower GETs its jobs, holding back the
// frames relayed meanwhile, then applies them (deduped by seq; whatever the GETs missed
// happened after them, so it is relayed after "covered"). Otherwise the leader opens a
// fresh stream (snapshots first; followers that ask within ATTACH_MS share it), and the
// follower takes frames only from a fresh stream opened after it asked.
//
// A tab may go without a word (a crash, a discarded tab): the leader pings every
// tabPingMs, listening followers answer, and a member that answered neither of the last
// two pings is forgotten (its jobs no longer streamed for it). The leader pings rather
// than each follower on its own timer: background tabs' timers may run once a minute,
// their message handlers do not wait. A follower forgotten while alive (frozen a while)
// finds itself missing from a ping's members and listens anew. A job's final frame ends
// it for every tab: the leader drops it from the others' jobs as it relays it.
//
// Messages on the channel:
//   {t: "event", kind, data, id, stamp, fresh}  leader: one frame; stamp: when its stream
//                                                opened; fresh: it began with snapshots
//   {t: "mode", mode, reason}                   leader: how news reaches it
//   {t: "hello", mode, reason}                  a new leader: say what you watch again
//   {t: "ping", members}                        leader: who it streams for; answer
//   {t: "covered", member, ask}                 leader: the open stream has your jobs
//   {t: "interest", member, all, ids, fresh, ask}  a member's jobs (fresh: sync me)
//   {t: "bye", member}                          a member leaves

export const ATTACH_MS = 200; // followers asking for a fresh stream this close share one
const HELLO_MS = 2000; // members that did not answer a new leader's hello by then are gone

/**
 * What a TabLink calls on its feed.
 * @typedef {object} LinkHooks
 * @property {() => void} lead this tab holds the stream for all
 * @property {() => void} follow another tab holds it
 * @property {(kind: string, data: string, id: string) => void} relayed a frame the leader
 *   relayed (data: its JSON, as sent)
 * @property {(mode: Mode, reason: string | null) => void} leaderMode
 * @property {(grew: boolean) => void} interest the tabs' jobs changed (grew: a stream
 *   must open anew, with snapshots)
 * @property {() => Mode | null} mode this feed's mode
 * @property {() => boolean} live the leader's stream is open and streaming
 * @property {() => void} covered the leader's stream has this follower's jobs: sync by GET
 * @property {() => void} forgotten the leader forgot this follower: listen anew
 *
 * @typedef {import("./pushsvc.js").Mode} Mode
 * @typedef {{all: boolean, ids: string[]}} Interest the jobs a tab watches
 * @typedef {{baseUrl: string, apiKey: string | null, tabPingMs: number}} LinkOptions
 */

/**
 * @returns {boolean} can tabs share a stream here?
 */
function canShareTabs() {
  return (
    typeof BroadcastChannel === "function" &&
    typeof navigator !== "undefined" &&
    Boolean(navigator.locks) &&
    typeof crypto !== "undefined" &&
    Boolean(crypto.subtle) &&
    typeof location !== "undefined"
  );
}

/**
 * The lock's and the channel's name: the origin and the API key, hashed.
 * @param {string} baseUrl
 * @param {string | null} apiKey
 * @returns {Promise<string>}
 */
async function tabsName(baseUrl, apiKey) {
  const origin = new URL(baseUrl || "/", location.href).origin;
  const bytes = new TextEncoder().encode(`${origin}\n${apiKey || ""}`);
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  const hex = Array.from(digest.slice(0, 16), (b) => b.toString(16).padStart(2, "0"));
  return `pushsvc.tabs.${hex.join("")}`;
}

/**
 * One tab's (one watcher's) place among the tabs sharing a stream: leader or follower.
 *
 *   joining -> leading (the lock was free) | following (another tab holds it) | closed
 *   following -> leading (the lock came: the leader left) | closed
 *   leading -> closed (the lock goes to the next tab)
 * ("alone": sharing failed to set up; it streams as if leading, relaying to no one.)
 */
export class TabLink {
  /** @type {"joining" | "leading" | "following" | "alone" | "closed"} */
  #role = "joining";
  /** @type {string} this member's id on the channel */
  #member = Math.random().toString(36).slice(2);
  /** @type {LinkOptions} */
  #options;
  /** @type {LinkHooks | null} */
  #hooks = null;
  /** @type {BroadcastChannel | null} */
  #channel = null;
  /** @type {AbortController} cancels a lock request still queued */
  #abort = new AbortController();
  /** @type {(() => void) | null} releases the lock (leading) */
  #release = null;
  /** @type {Map<string, Interest & {seen: number}>} the other members' jobs */
  #others = new Map();
  /** @type {Interest | null} this follower's jobs while it listens (null: it does not) */
  #mine = null;
  /** @type {number | null} a follower takes frames of a fresh stream opened at or after this */
  #waitFresh = null;
  /** @type {string | null} the follower's pending ask to be synced (see "covered") */
  #ask = null;
  /** @type {{stamp: number, fresh: boolean, all: boolean, ids: Set<string>}} the leader's
   *  current stream: when it opened, whether with snapshots, and which jobs it carries */
  #stream = { stamp: 0, fresh: false, all: false, ids: new Set() };
  /** @type {number | null} the leader's ping interval */
  #pinger = null;
  /** @type {[number, number]} when the leader pinged: the one before last, the last */
  #pinged = [0, 0];
  /** @type {() => void} says bye when the page goes */
  #onHide = () => this.#post({ t: "bye", member: this.#member });

  /** @param {LinkOptions} options */
  constructor(options) {
    this.#options = options;
  }

  /** @returns {boolean} Web Locks and BroadcastChannel are there */
  static available() {
    return canShareTabs();
  }

  /** @returns {string} joining, leading, following, alone or closed */
  get role() {
    return this.#role;
  }

  /** @returns {boolean} this tab opens the stream (for all, or alone) */
  get leading() {
    return this.#role === "leading" || this.#role === "alone";
  }

  /** @returns {boolean} */
  get following() {
    return this.#role === "following";
  }

  /** @returns {boolean} a follower listening, from a stream it takes frames of */
  get synced() {
    return this.#mine !== null && this.#waitFresh === null;
  }

  /**
   * Take the lock if it is free (lead), else follow and queue for it.
   * @param {LinkHooks} hooks
   */
  async join(hooks) {
    this.#hooks = hooks;
    let name;
    try {
      name = await tabsName(this.#options.baseUrl, this.#options.apiKey);
    } catch {
      name = null; // no digest here after all: a stream of its own
    }
    if (this.#role === "closed") return;
    if (name === null) {
      this.#role = "alone";
      hooks.lead();
      return;
    }
    this.#channel = new BroadcastChannel(name);
    this.#channel.onmessage = (event) => this.#onMessage(event.data);
    globalThis.addEventListener("pagehide", this.#onHide);
    const free = await new Promise((resolve) => {
      navigator.locks
        .request(name, { ifAvailable: true }, (lock) => {
          resolve(Boolean(lock));
          return lock ? this.#hold() : null;
        })
        .catch(() => resolve(false));
    });
    if (free || this.#role === "closed") return;
    this.#role = "following";
    hooks.follow();
    navigator.locks.request(name, { signal: this.#abort.signal }, () => this.#hold()).catch(() => {});
  }

  /** Leave: a leader's lock goes to the next tab. */
  close() {
    if (this.#role === "closed") return;
    this.#post({ t: "bye", member: this.#member });
    this.#role = "closed";
    if (this.#pinger !== null) clearInterval(this.#pinger);
    this.#abort.abort();
    this.#release?.();
    this.#channel?.close();
    this.#channel = null;
    globalThis.removeEventListener("pagehide", this.#onHide);
  }

  /**
   * The lock is ours: lead until close().
   * @returns {Promise<void>}
   */
  #hold() {
    if (this.#role === "closed") return Promise.resolve();
    this.#role = "leading";
    this.#mine = null;
    this.#waitFresh = null;
    this.#ask = null;
    const hello = Date.now();
    this.#post({ t: "hello", mode: this.#hooks.mode(), reason: null });
    setTimeout(() => this.#forget(hello), HELLO_MS);
    this.#pinged = [hello, hello];
    this.#pinger = setInterval(() => this.#ping(), this.#options.tabPingMs);
    this.#hooks.lead();
    return new Promise((resolve) => {
      this.#release = resolve;
    });
  }

  /**
   * The other tabs' jobs (a leader streams them too); none unless leading.
   * @returns {{all: boolean, ids: Set<string>}}
   */
  elsewhere() {
    const union = { all: false, ids: new Set() };
    if (!this.leading) return union;
    for (const interest of this.#others.values()) {
      union.all ||= interest.all;
      for (const id of interest.ids) union.ids.add(id);
    }
    return union;
  }

  // -- the leader's side --

  /**
   * The leader opened a stream.
   * @param {boolean} fresh with snapshots (not resumed)?
   * @param {string} url its URL: the jobs it names (none: all of the tenant's)
   */
  opened(fresh, url) {
    const named = new URL(url, location.href).searchParams.getAll("job");
    this.#stream = { stamp: Date.now(), fresh, all: named.length === 0, ids: new Set(named) };
  }

  /**
   * @param {string} kind
   * @param {string} data the frame's JSON
   * @param {string} id
   * @param {string | null} [ended] the job this final frame ends: no tab watches it now
   */
  relay(kind, data, id, ended = null) {
    const { stamp, fresh } = this.#stream;
    this.#post({ t: "event", kind, data, id, stamp, fresh });
    if (ended === null) return;
    for (const interest of this.#others.values()) {
      interest.ids = interest.ids.filter((other) => other !== ended);
    }
  }

  /**
   * @param {Interest} interest
   * @returns {boolean} the leader's open stream carries these jobs
   */
  #covers(interest) {
    const stream = this.#stream;
    if (!this.#hooks.live()) return false;
    return stream.all || (!interest.all && interest.ids.every((id) => stream.ids.has(id)));
  }

  /** Forget the members that missed the last two pings, then ping. */
  #ping() {
    this.#forget(this.#pinged[0]);
    this.#pinged = [this.#pinged[1], Date.now()];
    this.#post({ t: "ping", members: [...this.#others.keys()] });
  }

  /**
   * Forget the members not heard from since then: their jobs need no stream now.
   * @param {number} since
   */
  #forget(since) {
    let gone = false;
    for (const [member, interest] of this.#others) {
      if (interest.seen >= since) continue;
      this.#others.delete(member);
      gone = true;
    }
    if (gone && this.leading) this.#hooks.interest(false);
  }

  /**
   * @param {Mode} mode
   * @param {string | null} reason
   */
  mode(mode, reason) {
    this.#post({ t: "mode", mode, reason });
  }

  // -- a follower's side --

  /**
   * Listen, from a fresh stream: say which jobs.
   * @param {Interest} interest
   */
  attach(interest) {
    this.#mine = interest;
    this.#waitFresh = Date.now();
    this.#ask = Math.random().toString(36).slice(2);
    this.#post({ t: "interest", member: this.#member, ...interest, fresh: true, ask: this.#ask });
  }

  /** Stop listening (the feed polls, or has nothing left to watch). */
  detach() {
    if (this.#mine === null) return;
    this.#mine = null;
    this.#waitFresh = null;
    this.#ask = null;
    this.#post({ t: "interest", member: this.#member, all: false, ids: [], fresh: false });
  }

  /**
   * The jobs this follower watches now (fewer as they end): said when they change.
   * @param {Interest | null} interest
   */
  update(interest) {
    if (this.#mine === null || interest === null) return;
    const same = interest.all === this.#mine.all && interest.ids.join() === this.#mine.ids.join();
    if (same) return;
    this.#mine = interest;
    this.#post({ t: "interest", member: this.#member, ...interest, fresh: false });
  }

  // -- the channel --

  /** @param {object} message */
  #post(message) {
    try {
      this.#channel?.postMessage(message);
    } catch {
      // closed meanwhile
    }
  }

  /** @param {any} msg */
  #onMessage(msg) {
    if (this.#role === "closed" || !msg || typeof msg !== "object") return;
    if (msg.t === "interest") this.#onInterest(msg);
    else if (msg.t === "bye") this.#others.delete(msg.member);
    else if (!this.following) return;
    else if (msg.t === "event") this.#onRelayed(msg);
    else if (msg.t === "mode") this.#hooks.leaderMode(msg.mode, msg.reason);
    else if (msg.t === "hello") this.#onHello(msg);
    else if (msg.t === "ping") this.#onPing(msg);
    else if (msg.t === "covered") this.#onCovered(msg);
  }

  /** @param {any} msg */
  #onInterest(msg) {
    const before = this.elsewhere();
    const interest = { all: Boolean(msg.all), ids: [...(msg.ids || [])], seen: Date.now() };
    this.#others.set(msg.member, interest);
    if (!this.leading) return;
    const grew = (interest.all && !before.all) || interest.ids.some((id) => !before.ids.has(id));
    const covered = this.#covers(interest);
    if (msg.fresh && covered) this.#post({ t: "covered", member: msg.member, ask: msg.ask });
    this.#hooks.interest(!covered && (Boolean(msg.fresh) || (grew && !before.all)));
    const mode = this.#hooks.mode(); // so that a new follower polls if the leader does
    if (msg.fresh && mode) this.#post({ t: "mode", mode, reason: null });
  }

  /** @param {any} msg */
  #onRelayed(msg) {
    if (this.#mine === null) return; // not listening: polling, or nothing to watch
    if (this.#waitFresh !== null) {
      if (!msg.fresh || msg.stamp < this.#waitFresh) return;
      this.#waitFresh = null;
      this.#ask = null;
    }
    this.#hooks.relayed(msg.kind, msg.data, msg.id);
  }

  /** @param {any} msg */
  #onHello(msg) {
    if (this.#mine !== null) {
      const fresh = this.#waitFresh !== null;
      this.#post({ t: "interest", member: this.#member, ...this.#mine, fresh, ask: this.#ask });
    }
    if (msg.mode) this.#hooks.leaderMode(msg.mode, msg.reason);
  }

  /**
   * The leader pings: a listening follower answers with its jobs; one the leader forgot
   * (frozen a while: frames went by) listens anew. One still waiting to be synced is not
   * in the list yet, perhaps: its answer says what it watches.
   * @param {any} msg
   */
  #onPing(msg) {
    if (this.#mine === null) return;
    const known = Array.isArray(msg.members) && msg.members.includes(this.#member);
    if (!known && this.#waitFresh === null) this.#hooks.forgotten();
    else this.#post({ t: "interest", member: this.#member, ...this.#mine, fresh: false });
  }

  /**
   * The leader's open stream carries this follower's jobs: it takes every frame from now
   * on, once GETs of its jobs bring it up to date (LinkHooks.covered).
   * @param {any} msg
   */
  #onCovered(msg) {
    if (msg.member !== this.#member || msg.ask !== this.#ask || this.#waitFresh === null) return;
    this.#waitFresh = null;
    this.#ask = null;
    this.#hooks.covered();
  }
}
