// The original Node.js design, small and faithful: Node `cluster` with one worker per core,
// each worker an Express app + http server + socket.io v4 Server on the shared port, a
// per-worker socketsState (user id -> sockets), every client event arriving as 'message'
// {event, args} and dispatched to a handler, and responses fanned out to every worker through
// Redis pub/sub (node-redis-pubsub, scope 'message'). Default namespace '/': the article
// names no namespace. Only here for side-by-side load tests; see README.md.
'use strict';

const cluster = require('node:cluster');
const os = require('node:os');
const http = require('node:http');
const crypto = require('node:crypto');
const express = require('express');
const { Server } = require('socket.io');
const NRP = require('node-redis-pubsub');

const PORT = Number(process.env.PORT || 3000);
const REDIS_PORT = Number(process.env.REDIS_PORT || 6379);
const REDIS_HOST = process.env.REDIS_HOST || '127.0.0.1';
const WORKERS = Number(process.env.WORKERS || os.cpus().length);

if (cluster.isPrimary) {
  console.log(`primary ${process.pid}: forking ${WORKERS} workers on port ${PORT}`);
  for (let i = 0; i < WORKERS; i++) cluster.fork();
  cluster.on('exit', (worker, code, signal) => {
    console.log(`worker ${worker.process.pid} exited (${signal || code})`);
  });
  const stop = () => {
    for (const id in cluster.workers) cluster.workers[id].process.kill('SIGTERM');
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
} else {
  // ---- Redis pub/sub between the workers ----
  const nrp = new NRP({ port: REDIS_PORT, host: REDIS_HOST, scope: 'message' });
  nrp.on('error', (err) => console.error(`worker ${process.pid}: redis: ${err}`));

  // ---- this worker's sockets: user id -> array of sockets ----
  const socketsState = {};
  const state = {
    add(id, socket) {
      if (socketsState[id]) socketsState[id].push(socket);
      else socketsState[id] = [socket];
    },
    remove(id, socket) {
      if (!socketsState[id]) return;
      socketsState[id] = socketsState[id].filter((s) => s !== socket);
      if (socketsState[id].length === 0) socketsState[id] = undefined;
    },
    emit({ event, id, args }) {
      socketsState[id]?.forEach((s) => s.emit('message', { event, args }));
    },
  };

  // ---- dispatch: publish once per target user; every worker emits to its own sockets ----
  const dispatch = (event, args, ids) => {
    for (const id of new Set(ids)) nrp.emit('outgoing_socket_message', { event, id, args });
  };
  nrp.on('outgoing_socket_message', (data) => state.emit(data));

  // ---- handlers: event name -> function(socket, args) ----
  const handlers = {
    sendMessage(socket, args) {
      const from = socket.user.id;
      const to = args && typeof args.to === 'string' ? args.to : null;
      if (!to) return;
      const msg = { id: crypto.randomUUID(), from, to, text: String(args.text ?? ''), ts: Date.now() };
      dispatch('newMessage', msg, [to, from]);
    },
  };

  // ---- Express + http + socket.io ----
  const app = express();
  app.get('/healthz', (_req, res) => res.json({ ok: true, pid: process.pid }));
  const server = http.createServer(app);
  const io = new Server(server);

  // Mock auth, as in the article: the token is the user id (like switchboard's dev mode).
  const onAuth = (socket, next) => {
    const token = socket.handshake.auth?.token || socket.handshake.query?.token;
    if (!token) return next(new Error('unauthorized'));
    socket.user = { id: String(token) };
    next();
  };

  const onConnection = (socket) => {
    const { id } = socket.user;
    state.add(id, socket);
    socket.on('message', ({ event, args } = {}) => handlers[event]?.(socket, args));
    socket.on('disconnect', () => state.remove(id, socket));
  };

  io.use(onAuth);
  io.on('connection', onConnection);
  server.listen(PORT, () => console.log(`worker ${process.pid} listening on ${PORT}`));
}
