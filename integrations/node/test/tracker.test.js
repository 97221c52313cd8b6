'use strict';
// Runs against a real `tracer serve` (root, eBPF). TRACER_BIN and WORKLOAD_BIN name the binaries;
// by default the workspace's debug builds.
const { test, before, after } = require('node:test');
const assert = require('node:assert');
const { spawn } = require('node:child_process');
const { MemoryTracker, TracerError } = require('..');
const { workloadBin, startServer, tolerance } = require('../test-support/helpers');

let server;
let socketPath;

before(async () => {
  server = await startServer();
  socketPath = server.socketPath;
});

after(() => server.stop());

/** Starts the workload holding `mib` MiB; resolves its pid, and (later) its exit and oracle. */
function startWorkload(mib, holdMs) {
  const child = spawn(workloadBin, ['hold', '--mib', String(mib), '--hold-ms', String(holdMs)], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  let stdout = '';
  child.stdout.on('data', (chunk) => (stdout += chunk));
  const done = new Promise((resolve) => child.on('exit', () => resolve(JSON.parse(stdout.trim()).oracle_bytes)));
  return { pid: child.pid, done };
}

function assertNear(peak, oracle) {
  assert.ok(Math.abs(peak - oracle) <= tolerance(oracle), `peak ${peak} vs oracle ${oracle}`);
}

test('startTracking / stopTracking gives the peak of the tree', async () => {
  const tracker = new MemoryTracker(socketPath);
  const workload = startWorkload(64, 400);
  await tracker.startTracking(workload.pid);
  const oracle = await workload.done;
  const peak = await tracker.stopTracking(workload.pid);
  assertNear(peak, oracle);
  tracker.close();
});

test('peek shows current and peak RSS while it runs', async () => {
  const tracker = new MemoryTracker(socketPath);
  const workload = startWorkload(48, 800);
  await tracker.startTracking(workload.pid);
  await new Promise((resolve) => setTimeout(resolve, 400));
  const now = await tracker.peek(workload.pid);
  assert.ok(now.rssBytes > 48 * 1024 * 1024, JSON.stringify(now));
  assert.ok(now.peakRssBytes >= now.rssBytes);
  await workload.done;
  const report = await tracker.stopTrackingReport(workload.pid);
  assert.strictEqual(report.backend, 'ebpf');
  assert.strictEqual(report.exact, true, JSON.stringify(report.inexact_reasons));
  tracker.close();
});

test('several trackers and pids at once', async () => {
  const workloads = [20, 40, 60].map((mib) => startWorkload(mib, 300));
  const trackers = workloads.map(() => new MemoryTracker(socketPath));
  await Promise.all(workloads.map((workload, i) => trackers[i].startTracking(workload.pid)));
  const oracles = await Promise.all(workloads.map((workload) => workload.done));
  const peaks = await Promise.all(workloads.map((workload, i) => trackers[i].stopTracking(workload.pid)));
  peaks.forEach((peak, i) => assertNear(peak, oracles[i]));
  trackers.forEach((tracker) => tracker.close());
});

test('errors reject with the server message and keep the connection usable', async () => {
  const tracker = new MemoryTracker(socketPath);
  await assert.rejects(tracker.stopTracking(process.pid), TracerError);
  await assert.rejects(tracker.startTracking(2147483646), /no process/);
  const workload = startWorkload(8, 100);
  await tracker.startTracking(workload.pid);
  await workload.done;
  assert.ok((await tracker.stopTracking(workload.pid)) > 8 * 1024 * 1024);
  tracker.close();
});
