'use strict';
// Client for `tracer serve` (one JSON object per line over a Unix socket). No dependencies.
//
//   const { MemoryTracker } = require('tracer-memory');
//   const tracker = new MemoryTracker('/run/tracer.sock');
//   await tracker.startTracking(child.pid);
//   ...
//   const peakBytes = await tracker.stopTracking(child.pid);
//   tracker.close();

const net = require('node:net');

class TracerError extends Error {}

class MemoryTracker {
  /** @param {string} socketPath where `tracer serve --socket PATH` listens */
  constructor(socketPath) {
    this.socketPath = socketPath;
    this.socket = null;
    this.connecting = null;
    this.pending = [];
    this.buffer = '';
  }

  /** Starts tracking `pid` and every process it starts. */
  async startTracking(pid) {
    await this.request({ op: 'start', pid });
  }

  /** The tree's current and peak RSS so far: `{ rssBytes, peakRssBytes }`. */
  async peek(pid) {
    const answer = await this.request({ op: 'peek', pid });
    return { rssBytes: answer.rss_bytes, peakRssBytes: answer.peak_rss_bytes };
  }

  /** Stops tracking `pid`; resolves to the tree's peak RSS in bytes. */
  async stopTracking(pid) {
    return (await this.stopTrackingReport(pid)).peak_rss_bytes;
  }

  /** Stops tracking `pid`; resolves to tracer's whole report (the JSON of `tracer run --json`). */
  async stopTrackingReport(pid) {
    return this.request({ op: 'stop', pid });
  }

  /** Closes the connection (the server stops whatever this client still tracks). */
  close() {
    if (this.socket) this.socket.end();
    this.socket = null;
    this.connecting = null;
  }

  connect() {
    if (this.socket) return Promise.resolve(this.socket);
    if (!this.connecting) {
      this.connecting = new Promise((resolve, reject) => {
        const socket = net.createConnection(this.socketPath);
        socket.setEncoding('utf8');
        socket.once('connect', () => {
          this.socket = socket;
          resolve(socket);
        });
        socket.once('error', (err) => {
          this.failAll(err);
          this.socket = null;
          this.connecting = null;
          reject(err);
        });
        socket.on('data', (chunk) => this.receive(chunk));
        socket.on('close', () => {
          this.failAll(new TracerError('connection to tracer closed'));
          this.socket = null;
          this.connecting = null;
        });
      });
    }
    return this.connecting;
  }

  async request(message) {
    const socket = await this.connect();
    return new Promise((resolve, reject) => {
      // Answers come back in request order, one line each.
      this.pending.push({ resolve, reject });
      socket.write(JSON.stringify(message) + '\n');
    });
  }

  receive(chunk) {
    this.buffer += chunk;
    let newline;
    while ((newline = this.buffer.indexOf('\n')) >= 0) {
      const line = this.buffer.slice(0, newline);
      this.buffer = this.buffer.slice(newline + 1);
      const waiter = this.pending.shift();
      if (!waiter) continue;
      let answer;
      try {
        answer = JSON.parse(line);
      } catch (err) {
        waiter.reject(new TracerError(`bad answer from tracer: ${line}`));
        continue;
      }
      if (answer.error) waiter.reject(new TracerError(answer.error));
      else waiter.resolve(answer);
    }
  }

  failAll(err) {
    for (const waiter of this.pending.splice(0)) waiter.reject(err);
  }
}

module.exports = { MemoryTracker, TracerError };
