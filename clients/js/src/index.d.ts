// Types for switchboard-client (src/index.js). The protocol: docs/PROTOCOL.md of switchboard.

/** An offset: two unsigned 64-bit decimal numbers joined by `-` (PROTOCOL.md §4). Opaque. */
export type Offset = string;

export interface ConnectOptions {
  /** The token (dev mode: the user id; else a JWT). One of `token` and `getToken` is required. */
  token?: string;
  /** Called before every connection attempt and for each refresh, with why: `'connect'` (the
   * current token will do), `'refresh'` (a `refresh` is due before `exp`) or `'expired'` (the
   * server closed with 4010: the session expired; a fresh token is needed). */
  getToken?: (reason: 'connect' | 'refresh' | 'expired') => string | Promise<string>;
  /** A WebSocket class to use instead of `globalThis.WebSocket` (Node 20: the `ws` package). */
  WebSocket?: new (url: string) => WebSocketLike;
  /** Resume from this offset on the first connection (e.g. the newest one of a history load). */
  since?: Offset;
  /** First retry delay; doubles per failed attempt, half of it random (jitter). Default 500. */
  backoffMinMs?: number;
  /** Longest retry delay. Default 15000. */
  backoffMaxMs?: number;
  /** A connection open this long resets the backoff. Default 5000. */
  stableMs?: number;
  /** `request` (and `presence`, `history`) rejects with `timeout` after this. Default 10000. */
  requestTimeoutMs?: number;
  /** A send, join or leave without an answer after this is sent again (same clientId). Default 5000. */
  resendAfterMs?: number;
  /** Silence after which the server is asked for a sign of life; 0 never. Default 30000. */
  probeAfterMs?: number;
  /** No answer to that within this: the connection is dead and replaced. Default 10000. */
  probeTimeoutMs?: number;
  /** How often the silence is checked. Default 5000. */
  probeTickMs?: number;
  /** Message ids remembered to drop repeats. Default 10000. */
  dedupeIds?: number;
  /** The server's `--max-message-bytes`: bigger sends reject with `too_big`. Default 65536. */
  maxMessageBytes?: number;
  /**
   * Token refresh, off by default (0). With `getToken` and a JWT, at three quarters of the
   * token's remaining life and at the latest this long before its `exp`, the client calls
   * `getToken('refresh')` and sends `refresh` with `{token}`; a server without the event
   * (`unknown_event`) is not asked again on that connection's client.
   */
  refreshBeforeExpiryMs?: number;
  /** After two failed connects in a row, ask `GET /api/history` whether the token is refused
   * (an `error` with code `unauthorized`; with a fixed `token` the client then closes). Default true. */
  authCheck?: boolean;
}

/** What the client needs of a WebSocket (the browser's, or `ws`): it sets the four handlers;
 * `onmessage` gets `{data}` (a string for text frames), `onclose` gets `{code, reason}`. */
export interface WebSocketLike {
  send(data: string): void;
  close(code?: number): void;
  onopen: ((ev: any) => void) | null;
  onmessage: ((ev: any) => void) | null;
  onclose: ((ev: any) => void) | null;
  onerror: ((ev: any) => void) | null;
}

export type ConnectionState = 'connecting' | 'connected' | 'waiting' | 'offline' | 'closed';

export interface StateChange {
  state: ConnectionState;
  previous: ConnectionState;
  /** `connecting`: failed attempts before this one; `waiting`: attempts so far. */
  attempt?: number;
  /** `connecting`: a connection was open before (this is a reconnect). */
  reconnect?: boolean;
  /** `waiting`: the delay before the next attempt. */
  delayMs?: number;
  /** The close code and reason of the connection that went, when there was one. */
  code?: number;
  reason?: string;
  /** `connected`: the offset this connection resumes from, or null. */
  since?: Offset | null;
}

/** A direct message (`newMessage`) or, with `room` and no `to`, a room message (`roomMessage`). */
export interface Message {
  id: string;
  from: string;
  to?: string;
  room?: string;
  text: string;
  /** Milliseconds since the Unix epoch, from the server. */
  ts: number;
  /** Null when the server runs without history. A room message's offset is in the room's own
   * stream (see `roomOffset`), a direct message's in the user's. */
  offset: Offset | null;
}

export interface Recovered {
  /** Set when one room's stream was resumed (the rejoin with `joinRoom {room, since}` after a
   * reconnect, or the server's own resync); absent for the user's own stream. */
  room?: string;
  /** False: events after `since` may be missing (a `gap` event follows). */
  complete: boolean;
  /** The newest offset the server sent, or null. */
  offset: Offset | null;
  /** The offset this connection resumed from; null for a resume the server started itself. */
  since: Offset | null;
  /** Events with an offset delivered during the replay (repeats not counted). */
  delivered: number;
}

export interface PresenceChange {
  room: string;
  user: string;
  online: boolean;
}

/** An event as the server dispatched it (also the entries of a history page). */
export interface ServerEvent {
  event: string;
  args: unknown;
  offset: Offset | null;
  /** A room's event: the room whose stream `offset` belongs to. */
  room?: string;
}

export interface Events {
  state: (change: StateChange) => void;
  newMessage: (message: Message) => void;
  roomMessage: (message: Message) => void;
  presenceChanged: (change: PresenceChange) => void;
  recovered: (info: Recovered) => void;
  /** The resume was incomplete: reload the application's state (e.g. `history()`, or with
   * `info.room`, `history({room})`). */
  gap: (info: Recovered) => void;
  /** Server `error` events with no request of this client behind them, and client trouble
   * (`unauthorized`, `device_limit`, `token`, a failed rejoin with its `room`); the client
   * closes itself after `device_limit` (4009), `server_disconnect` (4011: the application ended
   * the session) and `session_expired` (4010 without `getToken`). */
  error: (error: SwitchboardError) => void;
  /** Every dispatched event, once, including `newMessage`. */
  event: (event: ServerEvent) => void;
}

export class SwitchboardError extends Error {
  constructor(code: string, message?: string);
  /** The server's error code (`bad_args`, `not_member`, ...) or this client's: `timeout`,
   * `disconnected`, `closed`, `too_big`, `unauthorized`, `device_limit`, `server_disconnect`,
   * `session_expired`, `token`, `connect`. */
  code: string;
  /** Set on an `error` event for a room that could not be joined again. */
  room?: string;
}

export interface Ack {
  id: string;
  ts: number;
}

export interface RequestOptions {
  timeoutMs?: number;
}

export interface HistoryPage {
  /** Newest first. */
  events: ServerEvent[];
  /** Pass as `before` for the next page; null when nothing more is retained. */
  before: Offset | null;
}

export class SwitchboardClient {
  constructor(url: string, options: ConnectOptions);
  readonly state: ConnectionState;
  /** The newest offset delivered: persist it and pass it as `since` to resume after a reload. */
  readonly offset: Offset | null;
  /** The rooms joined through this client, joined again on every reconnect. */
  readonly rooms: string[];
  /** The newest offset delivered from `room`'s own stream, or null; a reconnect rejoins the room
   * with it as `since`, so what the room got meanwhile is replayed (once). */
  roomOffset(room: string): Offset | null;

  on<E extends keyof Events>(event: E, fn: Events[E]): () => void;
  /** Any other event the server dispatches, under its own name. */
  on(event: string, fn: (args: unknown, offset: Offset | null) => void): () => void;
  off(event: string, fn: (...args: any[]) => void): void;

  /** Resolves once the server stored it; kept and sent again (same clientId) until then. */
  send(to: string, text: string, options?: { clientId?: string }): Promise<Ack>;
  sendRoom(room: string, text: string, options?: { clientId?: string }): Promise<Ack>;
  joinRoom(room: string): Promise<{ room: string }>;
  /** Resolves with `{room}`, or null when the user was not (or no longer) a member. */
  leaveRoom(room: string): Promise<{ room: string } | null>;
  presence(room: string, options?: RequestOptions): Promise<string[]>;
  /** With `room`: that room's history (members only). */
  history(page?: { limit?: number; before?: Offset | null; room?: string }, options?: RequestOptions): Promise<HistoryPage>;
  request<T = unknown>(event: string, args?: unknown, options?: RequestOptions): Promise<T>;
  /** Drop the connection, if any, and connect again now (or when the network is back). */
  reconnect(): void;
  close(): void;
}

export function connect(url: string, options: ConnectOptions): SwitchboardClient;
export function parseOffset(offset: string): [bigint, bigint] | null;
/** -1, 0 or 1; both must be valid offsets. */
export function compareOffsets(a: Offset, b: Offset): number;
