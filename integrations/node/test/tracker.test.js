'use strict';
// Runs against a real `tracer serve` (root, eBPF). TRACER_BIN and WORKLOAD_BIN name the binaries;
// by default the workspace's debug builds.
const { test, before, after } = require('node:test');
const assert = require('node:assert');
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { MemoryTracker, TracerError } = require('..');

const root = path.resolve(__dirname, '../../..');
const tracerBin = process.env.TRACER_BIN || path.join(root, 'target/debug/tracer');
const workloadBin = process.env.WORKLOAD_BIN || path.join(root, 'target/debug/workload');
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tracer-node-'));
const socketPath = path.join(dir, 'tracer.sock');
let server;

before(async () => {
  server = spawn(tracerBin, ['serve', '--socket', socketPath], { stdio: ['ignore', 'inherit', 'inherit'] });
  for (let waited = 0; !fs.existsSync(socketPath); waited += 50) {
    if (waited > 10000) throw new Error('tracer serve did not create its socket');
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
});

after(() => {
  server.kill('SIGTERM');
  fs.rmSync(dir, { recursive: true, force: true });
});

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

/** max(1%, 1 MiB), as in the Rust tests: the workload's VmRSS at its barrier is the truth. */
function assertNear(peak, oracle) {
  const tolerance = Math.max(oracle / 100, 1 << 20);
  assert.ok(Math.abs(peak - oracle) <= tolerance, `peak ${peak} vs oracle ${oracle} (tolerance ${tolerance})`);
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
