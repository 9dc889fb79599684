// switchboard-client: a client of the switchboard native protocol (docs/PROTOCOL.md) that keeps
// the rules of §3 and §4 which decide whether anything is lost: it reconnects with backoff and
// jitter and passes the newest offset it saw as `since` every time (and each joined room's own
// newest offset as `since` of its rejoin), drops what it already
// delivered (by message id and by offset), and keeps every `send` until the server acknowledged
// it, sending it again with the same `clientId`, so a send whose ack was lost is stored once.
//
// One file, no imports, no runtime dependencies: the chat page served by the binary
// (src/web/index.html) includes this file as it is, with the `export` keywords taken out.

const DEFAULTS = {
  backoffMinMs: 500, // first retry delay
  backoffMaxMs: 15000, // longest retry delay
  stableMs: 5000, // a connection open this long resets the backoff
  requestTimeoutMs: 10000, // `request` without an answer by then rejects with `timeout`
  resendAfterMs: 5000, // a `send` without an ack by then is sent again (same clientId)
  probeAfterMs: 30000, // silence before asking the server for a sign of life; 0: never
  probeTimeoutMs: 10000, // no answer by then: the connection is dead, reconnect
  probeTickMs: 5000, // how often the silence is checked
  dedupeIds: 10000, // message ids remembered to drop repeats
  maxMessageBytes: 65536, // the server's --max-message-bytes: bigger sends are refused here
  refreshBeforeExpiryMs: 0, // token refresh (`refresh` event): 0 off; else this long before `exp`
  authCheck: true, // after failed connects, ask GET /api/history whether the token is refused
};

// Server error codes after which a send is sent again rather than refused (PROTOCOL.md §2, §3).
const RETRY_CODES = new Set(['unavailable', 'rate_limited']);
// Close codes after which reconnecting in a loop is wrong (PROTOCOL.md §6).
// 4010 (the session expired) is final only without `getToken`: with it, the client reconnects
// with a fresh token, asked for with the reason 'expired'.
const FINAL_CLOSE_CODES = new Map([
  [4009, 'device_limit'],
  [4011, 'server_disconnect'],
]);
const CLOSE_SESSION_EXPIRED = 4010;

/** Opens a client of the switchboard server at `url` (`ws://host:port`, `/ws` added when the
 * URL has no path). See index.d.ts for the options and events. */
export function connect(url, options = {}) {
  return new SwitchboardClient(url, options);
}

/** An error with the server's (or this client's) `code`. */
export class SwitchboardError extends Error {
  constructor(code, message) {
    super(message || code);
    this.name = 'SwitchboardError';
    this.code = code;
  }
}

// ---- offsets: "A-B", compared as the pair (A, B) (PROTOCOL.md §4) ------------------------------
export function parseOffset(s) {
  const m = /^(\d+)-(\d+)$/.exec(typeof s === 'string' ? s : '');
  return m ? [BigInt(m[1]), BigInt(m[2])] : null;
}

export function compareOffsets(a, b) {
  const x = parseOffset(a);
  const y = parseOffset(b);
  if (x[0] !== y[0]) return x[0] < y[0] ? -1 : 1;
  return x[1] === y[1] ? 0 : x[1] < y[1] ? -1 : 1;
}

// ---- per-room resume ---------------------------------------------------------------------------
// A room message is stored once, in the room's own history, and its frame carries the room's
// offset beside `room` (PROTOCOL.md §4, §9): each joined room is a stream of its own. The tracker
// keeps the newest offset delivered per room; a reconnect joins each room again with
// `joinRoom {room, since}`, which answers the ack, replays what the room got meanwhile and ends
// with that room's `recovered`. (The server also takes `?rooms=R@O,...` on connect; joining with
// `since` is used instead because a restarted embedded server has forgotten the membership, and
// the join must come first anyway.) A room whose first message never reached this client has no
// offset yet and is joined again without `since`: nothing to resume from.
class RoomTracker {
  constructor() {
    this.rooms = new Set(); // rooms this client asked to be in
    this.offsets = new Map(); // room -> newest offset delivered from that room's stream
    this.replays = new Map(); // room -> {since, delivered} while its resume runs
  }

  joinArgs(room) {
    const since = this.offsets.get(room);
    return since === undefined ? { room } : { room, since };
  }

  // A rejoin with `since` starts that room's replay.
  beginReplay(args) {
    if (typeof args.since === 'string') this.replays.set(args.room, { since: args.since, delivered: 0 });
  }

  forget(room) {
    this.rooms.delete(room);
    this.offsets.delete(room);
    this.replays.delete(room);
  }

  // Whether a frame of `room` at `offset` was delivered already (at or before the room's newest).
  seen(room, offset) {
    const last = this.offsets.get(room);
    return last !== undefined && compareOffsets(offset, last) <= 0;
  }

  // Records `offset` as delivered in `room` (only forward).
  note(room, offset, replayed) {
    if (!this.seen(room, offset)) this.offsets.set(room, offset);
    const replay = this.replays.get(room);
    if (replay && replayed) replay.delivered += 1;
  }

  // The end of `room`'s replay: its info for `recovered`.
  finish(room, newest) {
    if (newest !== null) this.note(room, newest, false);
    const replay = this.replays.get(room);
    this.replays.delete(room);
    return { since: replay ? replay.since : null, delivered: replay ? replay.delivered : 0 };
  }
}

// ---- the client --------------------------------------------------------------------------------
export class SwitchboardClient {
  #url;
  #options;
  #WebSocket;
  #token;
  #ws = null;
  #opened = false;
  #openedAt = 0;
  #everOpened = false;
  #attempt = 0;
  #generation = 0;
  #state = 'connecting';
  #closed = false;
  #retryTimer = null;
  #probeTimer = null;
  #refreshTimer = null;
  #expired = false; // the last close was 4010: the next getToken is asked for a fresh token
  #lastHeard = 0;
  #offset = null;
  #replay = null; // {since, delivered} while a resume runs on this connection
  #seenIds = new Set();
  #nextAck = 1;
  #inFlight = new Map(); // ack -> entry
  #outbox = []; // reliable entries (sends, joins, leaves) until answered
  #waiting = new Set(); // plain requests made while disconnected
  #rooms = new RoomTracker();
  #listeners = new Map();
  #onlineListener = null;
  #refreshing = true;

  constructor(url, options = {}) {
    this.#options = { ...DEFAULTS, ...options };
    this.#url = socketUrl(url);
    this.#WebSocket = options.WebSocket || globalThis.WebSocket;
    if (typeof this.#WebSocket !== 'function') {
      throw new TypeError('no WebSocket: pass one as options.WebSocket (e.g. the `ws` package)');
    }
    if (options.token === undefined && typeof options.getToken !== 'function') {
      throw new TypeError('options.token or options.getToken is required');
    }
    this.#token = options.token;
    if (typeof options.since === 'string' && parseOffset(options.since)) this.#offset = options.since;
    // Browsers say when the network comes back: a client waiting for it connects at once.
    if (typeof globalThis.addEventListener === 'function' && hasNetworkState()) {
      this.#onlineListener = () => {
        if (this.#ws === null && !this.#closed) this.#connectNow();
      };
      globalThis.addEventListener('online', this.#onlineListener);
    }
    // After the caller's `on(...)` calls, so that they see the first state change too.
    queueMicrotask(() => this.#open());
  }

  /** `connecting`, `connected`, `waiting` (to retry), `offline` (no network) or `closed`. */
  get state() {
    return this.#state;
  }

  /** The newest offset delivered (or passed as `since`): persist it to resume after a reload. */
  get offset() {
    return this.#offset;
  }

  /** The rooms this client joined and rejoins on every reconnect. */
  get rooms() {
    return [...this.#rooms.rooms];
  }

  /** The newest offset delivered from `room`'s stream (null before its first message). */
  roomOffset(room) {
    return this.#rooms.offsets.get(room) ?? null;
  }

  on(event, fn) {
    if (!this.#listeners.has(event)) this.#listeners.set(event, new Set());
    this.#listeners.get(event).add(fn);
    return () => this.off(event, fn);
  }

  off(event, fn) {
    this.#listeners.get(event)?.delete(fn);
  }

  /** A direct message; resolves with `{id, ts}` once the server stored it. */
  send(to, text, { clientId } = {}) {
    return this.#reliable('sendMessage', { to, text, clientId: clientId || newClientId() });
  }

  /** A room message; resolves with `{id, ts}` once the server stored it. */
  sendRoom(room, text, { clientId } = {}) {
    return this.#reliable('sendRoomMessage', { room, text, clientId: clientId || newClientId() });
  }

  /** Joins `room` (again after every reconnect, until `leaveRoom`). */
  joinRoom(room) {
    this.#rooms.rooms.add(room);
    return this.#reliable('joinRoom', this.#rooms.joinArgs(room), {
      onRefused: () => this.#rooms.forget(room),
    });
  }

  leaveRoom(room) {
    this.#rooms.forget(room);
    // A resend after a lost ack finds the user out already: that is the answer wanted.
    return this.#reliable('leaveRoom', { room }, { doneCodes: ['not_member'] });
  }

  /** The members of `room` online anywhere, sorted. */
  async presence(room, options) {
    const result = await this.request('presence', { room }, options);
    return Array.isArray(result && result.online) ? result.online : [];
  }

  /** One page of the user's history (with `room`, of that room's, for a member), newest first;
   * `before` of the answer asks for the next page (null when nothing more is retained). */
  async history({ limit, before, room } = {}, options) {
    const args = {};
    if (typeof room === 'string') args.room = room;
    if (limit !== undefined) args.limit = limit;
    if (before !== undefined && before !== null) args.before = before;
    const result = await this.request('history', args, options);
    const events = Array.isArray(result && result.events) ? result.events : [];
    const last = events[events.length - 1];
    return { events, before: last && typeof last.offset === 'string' ? last.offset : null };
  }

  /** Any other event, answered through its ack; waits for a connection within the timeout.
   * Rejects with the server's error code, `timeout`, `disconnected` (the connection went while
   * the request was out: it may or may not have taken effect) or `closed`. */
  request(event, args = null, { timeoutMs } = {}) {
    return new Promise((resolve, reject) => {
      if (this.#closed) return reject(new SwitchboardError('closed', 'the client is closed'));
      const entry = { event, args, resolve, reject, ack: null, timer: null };
      entry.timer = setTimeout(() => {
        this.#waiting.delete(entry);
        if (entry.ack !== null) this.#inFlight.delete(entry.ack);
        reject(new SwitchboardError('timeout', `no answer to ${event}`));
      }, timeoutMs || this.#options.requestTimeoutMs);
      if (this.#opened) this.#transmit(entry);
      else this.#waiting.add(entry);
    });
  }

  /** Drops the connection, if any, and connects again at once (or when the network is back).
   * For a browser's `offline` event, or any sign that the connection is dead. */
  reconnect() {
    if (this.#closed) return;
    if (this.#ws !== null) this.#dropped({ reason: 'reconnect', immediate: true });
    else this.#connectNow();
  }

  /** Closes for good: unanswered sends and requests reject with `closed`. */
  close() {
    if (this.#closed) return;
    this.#closed = true;
    clearTimeout(this.#retryTimer);
    if (this.#onlineListener) globalThis.removeEventListener('online', this.#onlineListener);
    if (this.#ws !== null) this.#dropped({ code: 1000, reason: 'closed by the client' });
    const closed = () => new SwitchboardError('closed', 'the client is closed');
    for (const entry of [...this.#outbox, ...this.#waiting]) {
      clearTimeout(entry.timer);
      entry.reject(closed());
    }
    this.#outbox = [];
    this.#waiting.clear();
    this.#setState('closed', {});
  }

  // ---- connecting ------------------------------------------------------------------------------

  async #open() {
    clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    if (this.#closed || this.#ws !== null) return;
    if (!isOnline()) return this.#setState('offline', {});
    const generation = ++this.#generation;
    this.#setState('connecting', { attempt: this.#attempt, reconnect: this.#everOpened });
    let token;
    try {
      const reason = this.#expired ? 'expired' : 'connect';
      token = typeof this.#options.getToken === 'function' ? await this.#options.getToken(reason) : this.#token;
    } catch (e) {
      if (generation !== this.#generation || this.#closed) return;
      this.#emit('error', new SwitchboardError('token', `getToken failed: ${e && e.message}`));
      return this.#retry({ reason: 'getToken failed' }, false);
    }
    if (generation !== this.#generation || this.#closed || this.#ws !== null) return;
    this.#token = token;
    this.#expired = false;
    const url = new URL(this.#url);
    url.searchParams.set('token', String(token));
    const since = this.#offset;
    if (since !== null) url.searchParams.set('since', since);
    let ws;
    try {
      ws = new this.#WebSocket(url.toString());
    } catch (e) {
      this.#emit('error', new SwitchboardError('connect', String(e && e.message)));
      return this.#retry({ reason: 'could not connect' }, false);
    }
    this.#ws = ws;
    this.#opened = false;
    ws.onopen = () => {
      if (this.#ws === ws) this.#onOpen(since);
    };
    ws.onmessage = (e) => {
      if (this.#ws !== ws) return;
      this.#lastHeard = Date.now();
      this.#onFrame(typeof e.data === 'string' ? e.data : String(e.data));
    };
    ws.onclose = (e) => {
      if (this.#ws === ws) this.#dropped({ code: e.code, reason: e.reason || 'closed' });
    };
    ws.onerror = () => {}; // a close follows
  }

  #onOpen(since) {
    this.#opened = true;
    this.#everOpened = true;
    this.#openedAt = Date.now();
    this.#lastHeard = this.#openedAt;
    this.#replay = since === null ? null : { since, delivered: 0 };
    // On the wire in this order: joins (room sends need membership), then everything unanswered
    // in the order it was made, then requests that waited for the connection.
    const pendingJoins = new Set(
      this.#outbox.filter((e) => e.event === 'joinRoom').map((e) => e.args.room),
    );
    for (const room of this.#rooms.rooms) {
      if (!pendingJoins.has(room)) this.#rejoin(room);
    }
    for (const entry of this.#outbox) this.#transmit(entry);
    for (const entry of this.#waiting) this.#transmit(entry);
    this.#waiting.clear();
    this.#scheduleProbe();
    this.#scheduleRefresh();
    // Last, so that what a listener sends now goes after the joins.
    this.#setState('connected', { since });
  }

  #rejoin(room) {
    const args = this.#rooms.joinArgs(room);
    this.#rooms.beginReplay(args);
    const entry = {
      event: 'joinRoom',
      args,
      resolve: () => {},
      reject: (err) => {
        if (err.code === 'disconnected') return; // the next connection joins again
        this.#rooms.forget(room);
        this.#emit('error', Object.assign(err, { room }));
      },
      ack: null,
      timer: null,
    };
    this.#transmit(entry);
  }

  #connectNow() {
    this.#attempt = 0;
    this.#open();
  }

  // The socket is gone (closed, silent, or dropped on purpose): forget it and retry.
  #dropped({ code, reason, immediate }) {
    const sock = this.#ws;
    this.#ws = null;
    clearTimeout(this.#probeTimer);
    clearTimeout(this.#refreshTimer);
    if (sock) {
      sock.onopen = sock.onmessage = sock.onclose = null;
      try {
        sock.close(code === 1000 ? 1000 : undefined);
      } catch (_) {
        /* already closed */
      }
    }
    // What was out on this connection: sends go again on the next; requests cannot know.
    for (const [ack, entry] of this.#inFlight) {
      this.#inFlight.delete(ack);
      if (entry.reliable) {
        clearTimeout(entry.resendTimer);
      } else {
        clearTimeout(entry.timer);
        entry.reject(
          this.#closed
            ? new SwitchboardError('closed', 'the client is closed')
            : new SwitchboardError('disconnected', `the connection closed before ${entry.event} was answered`),
        );
      }
    }
    const wasOpen = this.#opened;
    if (wasOpen && Date.now() - this.#openedAt >= this.#options.stableMs) this.#attempt = 0;
    this.#opened = false;
    this.#replay = null;
    this.#rooms.replays.clear();
    if (this.#closed) return;
    if (code === CLOSE_SESSION_EXPIRED) {
      if (typeof this.#options.getToken !== 'function') {
        this.#emit('error', new SwitchboardError('session_expired', reason));
        return this.close();
      }
      this.#expired = true;
    }
    const final = FINAL_CLOSE_CODES.get(code);
    if (final) {
      this.#emit('error', new SwitchboardError(final, reason));
      return this.close();
    }
    this.#retry({ code, reason }, wasOpen, immediate);
  }

  #retry(info, wasOpen, immediate = false) {
    if (!isOnline()) return this.#setState('offline', info);
    if (immediate) return this.#connectNow();
    // Exponential backoff with jitter: half the delay fixed, half random.
    const { backoffMinMs, backoffMaxMs } = this.#options;
    const base = Math.min(backoffMaxMs, backoffMinMs * 2 ** Math.min(this.#attempt, 30));
    const delayMs = Math.round(base / 2 + (Math.random() * base) / 2);
    this.#attempt += 1;
    this.#setState('waiting', { ...info, delayMs, attempt: this.#attempt });
    this.#retryTimer = setTimeout(() => this.#open(), delayMs);
    if (!wasOpen && this.#attempt >= 2 && this.#options.authCheck) this.#checkToken();
  }

  // A WebSocket refused at the handshake shows only as a close (browsers hide the status): ask
  // HTTP whether the token is the reason (PROTOCOL.md §1: 401 means get a new token).
  async #checkToken() {
    if (typeof globalThis.fetch !== 'function') return;
    const url = new URL(this.#url);
    url.protocol = url.protocol === 'wss:' ? 'https:' : 'http:';
    url.pathname = url.pathname.replace(/\/ws$/, '') + '/api/history';
    url.search = '';
    url.searchParams.set('limit', '1');
    url.searchParams.set('token', String(this.#token));
    try {
      const r = await globalThis.fetch(url.toString(), { cache: 'no-store' });
      if (r.status !== 401 || this.#closed) return;
      const body = await r.json().catch(() => ({}));
      this.#emit('error', new SwitchboardError('unauthorized', body.error || 'token refused'));
      // A fixed token will not get better; a getToken may return a new one next time.
      if (typeof this.#options.getToken !== 'function') this.close();
    } catch (_) {
      /* network down: keep retrying */
    }
  }

  // ---- frames ------------------------------------------------------------------------------------

  #transmit(entry) {
    const ack = this.#nextAck++;
    entry.ack = ack;
    this.#inFlight.set(ack, entry);
    this.#ws.send(JSON.stringify({ event: entry.event, args: entry.args, ack }));
    if (entry.reliable) {
      clearTimeout(entry.resendTimer);
      entry.resendTimer = setTimeout(() => this.#resend(entry), this.#options.resendAfterMs);
    }
  }

  // No ack within resendAfterMs: send again on this connection (same clientId: stored once).
  #resend(entry) {
    if (!this.#opened || !this.#outbox.includes(entry)) return;
    this.#inFlight.delete(entry.ack);
    this.#transmit(entry);
  }

  #reliable(event, args, { doneCodes = [], onRefused } = {}) {
    return new Promise((resolve, reject) => {
      if (this.#closed) return reject(new SwitchboardError('closed', 'the client is closed'));
      const bytes = byteLength(JSON.stringify({ event, args, ack: Number.MAX_SAFE_INTEGER }));
      if (bytes > this.#options.maxMessageBytes) {
        return reject(new SwitchboardError('too_big', `${bytes} bytes, over ${this.#options.maxMessageBytes}`));
      }
      const entry = { event, args, reliable: true, doneCodes, ack: null, resendTimer: null };
      const settle = () => {
        clearTimeout(entry.resendTimer);
        this.#outbox = this.#outbox.filter((e) => e !== entry);
      };
      entry.resolve = (result) => {
        settle();
        resolve(result);
      };
      entry.reject = (err) => {
        settle();
        if (onRefused && err.code !== 'closed') onRefused();
        reject(err);
      };
      this.#outbox.push(entry);
      if (this.#opened) this.#transmit(entry);
    });
  }

  #onFrame(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch (_) {
      return;
    }
    if (typeof frame !== 'object' || frame === null || typeof frame.event !== 'string') return;
    const answered = (frame.event === 'ack' || frame.event === 'error') && this.#inFlight.get(frame.ack);
    if (answered) return this.#onAnswer(answered, frame);
    switch (frame.event) {
      case 'ack':
        return; // an answer to an attempt already settled
      case 'error':
        return this.#emit('error', serverError(frame.args));
      case 'recovered':
        return this.#onRecovered(frame.args || {});
      default:
        return this.#onEvent(frame);
    }
  }

  #onAnswer(entry, frame) {
    this.#inFlight.delete(frame.ack);
    clearTimeout(entry.timer);
    if (frame.event === 'ack') return entry.resolve(frame.args);
    const err = serverError(frame.args);
    if (entry.reliable && entry.doneCodes.includes(err.code)) return entry.resolve(null);
    if (entry.reliable && RETRY_CODES.has(err.code)) return; // its resend timer sends it again
    entry.reject(err);
  }

  // A dispatched event: dropped when already delivered (PROTOCOL.md §4: a replay may repeat what
  // came live; with Redis a retried publication may repeat with another offset, same id).
  // A frame with a top-level `room` is of that room's stream: its offset is the room's.
  #onEvent(frame) {
    const args = frame.args;
    const offset = typeof frame.offset === 'string' && parseOffset(frame.offset) ? frame.offset : null;
    const room = typeof frame.room === 'string' ? frame.room : null;
    if (room !== null && offset !== null) return this.#onRoomEvent(frame, room, offset);
    if (offset !== null && this.#offset !== null && compareOffsets(offset, this.#offset) <= 0) return;
    if (!this.#rememberId(args)) {
      if (offset !== null) this.#offset = offset;
      return;
    }
    if (offset !== null) {
      this.#offset = offset;
      if (this.#replay) this.#replay.delivered += 1;
    }
    this.#deliver(frame, offset);
  }

  // A room frame: dropped when at or before the room's newest offset delivered, or when its
  // message id was delivered already.
  #onRoomEvent(frame, room, offset) {
    if (this.#rooms.seen(room, offset)) return;
    const fresh = this.#rememberId(frame.args);
    this.#rooms.note(room, offset, fresh);
    if (fresh) this.#deliver(frame, offset);
  }

  // Whether a message's id is new (a frame without one counts as new); remembers it.
  #rememberId(args) {
    const id = args && typeof args.id === 'string' ? args.id : null;
    if (id === null) return true;
    if (this.#seenIds.has(id)) return false;
    this.#seenIds.add(id);
    if (this.#seenIds.size > this.#options.dedupeIds) {
      this.#seenIds.delete(this.#seenIds.values().next().value);
    }
    return true;
  }

  #deliver(frame, offset) {
    const args = frame.args;
    this.#emit('event', { event: frame.event, args, offset, room: frame.room });
    if (frame.event === 'newMessage' && args && typeof args === 'object') {
      const message = { ...args, offset };
      this.#emit(typeof args.room === 'string' ? 'roomMessage' : 'newMessage', message);
    } else if (!RESERVED_EVENTS.has(frame.event)) {
      this.#emit(frame.event, args, offset);
    }
  }

  // The end of a replay, asked for (`since`) or not (the server's own, after a Redis outage).
  #onRecovered(args) {
    const newest = typeof args.offset === 'string' && parseOffset(args.offset) ? args.offset : null;
    if (typeof args.room === 'string') {
      // One room's stream: `joinRoom {since}` asked for it, or the server's own resync.
      const info = { room: args.room, complete: args.complete === true, offset: newest };
      Object.assign(info, this.#rooms.finish(args.room, newest));
      this.#emit('recovered', info);
      if (!info.complete) this.#emit('gap', info);
      return;
    }
    if (newest !== null && (this.#offset === null || compareOffsets(newest, this.#offset) > 0)) {
      this.#offset = newest;
    }
    const replay = this.#replay;
    this.#replay = null;
    const info = {
      complete: args.complete === true,
      offset: newest,
      since: replay ? replay.since : null,
      delivered: replay ? replay.delivered : 0,
    };
    this.#emit('recovered', info);
    // Events after `since` may be missing: the application refetches its state.
    if (!info.complete) this.#emit('gap', info);
  }

  // ---- liveness: server pings are invisible to scripts, so after a silence ask for an answer ----
  // Every request with an `ack` is answered; `ping` has no handler, so the answer is an
  // immediate `unknown_event` error from the core loop (no Redis involved): alive either way.
  #scheduleProbe() {
    clearTimeout(this.#probeTimer);
    const { probeAfterMs, probeTimeoutMs, probeTickMs } = this.#options;
    if (!(probeAfterMs > 0)) return;
    const sock = this.#ws;
    this.#probeTimer = setTimeout(() => {
      if (this.#ws !== sock || !this.#opened) return;
      if (Date.now() - this.#lastHeard < probeAfterMs) return this.#scheduleProbe();
      const alive = () => {
        if (this.#ws === sock) this.#scheduleProbe();
      };
      const entry = { event: 'ping', args: null, resolve: alive, reject: alive, ack: null, timer: null };
      entry.timer = setTimeout(() => {
        this.#inFlight.delete(entry.ack);
        if (this.#ws === sock) this.#dropped({ reason: 'no answer from the server' });
      }, probeTimeoutMs);
      this.#transmit(entry);
    }, probeTickMs);
  }

  // ---- token refresh (`refresh` with `{token}`, on servers that have it) ----------------------
  #scheduleRefresh() {
    clearTimeout(this.#refreshTimer);
    const before = this.#options.refreshBeforeExpiryMs;
    if (!(before > 0) || !this.#refreshing || typeof this.#options.getToken !== 'function') return;
    const exp = jwtExpiry(this.#token);
    if (exp === null) return;
    const sock = this.#ws;
    // At three quarters of the remaining life, and at the latest `before` ahead of `exp` (a
    // fixed margin alone would come too late for long tokens, or at once for short ones); at
    // least a second apart, so a getToken that returns the same token cannot spin.
    const left = exp * 1000 - Date.now();
    const delay = Math.max(1000, Math.min(left * 0.75, left - before));
    this.#refreshTimer = setTimeout(async () => {
      try {
        const token = await this.#options.getToken('refresh');
        if (this.#ws !== sock || !this.#opened) return;
        await this.request('refresh', { token });
        this.#token = token;
      } catch (err) {
        if (err.code === 'unknown_event') this.#refreshing = false; // the server has no refresh
        else if (err.code !== 'disconnected' && err.code !== 'closed') this.#emit('error', err);
      }
      if (this.#ws === sock && this.#opened) this.#scheduleRefresh();
    }, delay);
  }

  // ---- events ------------------------------------------------------------------------------------

  #setState(state, info) {
    const previous = this.#state;
    this.#state = state;
    this.#emit('state', { ...info, state, previous });
  }

  #emit(event, ...args) {
    const fns = this.#listeners.get(event);
    if (!fns) return;
    for (const fn of [...fns]) {
      try {
        fn(...args);
      } catch (e) {
        // A listener's bug must not break the connection: report it outside this call.
        queueMicrotask(() => {
          throw e;
        });
      }
    }
  }
}

// Names this client emits itself; server events of these names arrive only through `event`.
const RESERVED_EVENTS = new Set([
  'state', 'newMessage', 'roomMessage', 'recovered', 'gap', 'error', 'event',
]);

function serverError(args) {
  const code = args && typeof args.code === 'string' ? args.code : 'error';
  return new SwitchboardError(code, args && typeof args.message === 'string' ? args.message : code);
}

// `ws://host:port` → `ws://host:port/ws`; `http(s)` becomes `ws(s)`.
function socketUrl(url) {
  const u = new URL(String(url), globalThis.location ? globalThis.location.href : undefined);
  if (u.protocol === 'http:') u.protocol = 'ws:';
  if (u.protocol === 'https:') u.protocol = 'wss:';
  if (u.pathname === '' || u.pathname === '/') u.pathname = '/ws';
  return u.toString();
}

function hasNetworkState() {
  return typeof globalThis.navigator === 'object' && typeof globalThis.navigator.onLine === 'boolean';
}

function isOnline() {
  return !hasNetworkState() || globalThis.navigator.onLine !== false;
}

function newClientId() {
  const bytes = new Uint8Array(12);
  globalThis.crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

function byteLength(s) {
  return new TextEncoder().encode(s).length;
}

// The `exp` of a JWT (seconds), read without checking it: only to know when to refresh.
function jwtExpiry(token) {
  const parts = typeof token === 'string' ? token.split('.') : [];
  if (parts.length !== 3) return null;
  try {
    const bytes = atob(parts[1].replace(/-/g, '+').replace(/_/g, '/'));
    const json = new TextDecoder().decode(Uint8Array.from(bytes, (c) => c.charCodeAt(0)));
    const exp = JSON.parse(json).exp;
    return typeof exp === 'number' ? exp : null;
  } catch (_) {
    return null;
  }
}
