'use strict';
// A task runner written in Node.js, using the client: it runs each package's build of the Nx test
// workspace (as Nx would: `npm run build` with the task marked in its environment), tracks each with
// startTracking/stopTracking, and gets the same numbers as the task's own oracle (the summed VmRSS of
// npm, the shell and the workload while the workload holds its memory) — the numbers
// `tracer run --tasks` reports for these tasks under Nx. Needs TRACER_NX_WORKSPACE (`cargo xtask test`).
const { test, before, after } = require('node:test');
const assert = require('node:assert');
const { spawn } = require('node:child_process');
const path = require('node:path');
const { MemoryTracker } = require('..');
const { workloadBin, startServer, tolerance } = require('../test-support/helpers');

const workspace = process.env.TRACER_NX_WORKSPACE;
let server;

before(async () => {
  server = await startServer();
});

after(() => server.stop());

function runBuild(tracker, project) {
  const child = spawn('npm', ['run', '--silent', 'build'], {
    cwd: path.join(workspace, 'packages', project),
    env: { ...process.env, WORKLOAD: workloadBin, NX_TASK_TARGET_PROJECT: project, NX_TASK_TARGET_TARGET: 'build' },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  let stdout = '';
  child.stdout.on('data', (chunk) => (stdout += chunk));
  const exited = new Promise((resolve) => child.on('exit', resolve));
  return tracker.startTracking(child.pid).then(async () => {
    assert.strictEqual(await exited, 0);
    const peak = await tracker.stopTracking(child.pid);
    const line = stdout.split('\n').find((text) => text.includes('"scenario"'));
    const oracle = JSON.parse(line.slice(line.indexOf('{')));
    assert.strictEqual(oracle.pids[0], child.pid, 'npm is the task root');
    return { project, peak, oracle: oracle.oracle_bytes };
  });
}

test('a Node.js runner gets each task peak from the client', { skip: !workspace && 'TRACER_NX_WORKSPACE not set' }, async () => {
  const tracker = new MemoryTracker(server.socketPath);
  const results = await Promise.all(['alpha', 'beta', 'gamma'].map((project) => runBuild(tracker, project)));
  for (const { project, peak, oracle } of results) {
    assert.ok(Math.abs(peak - oracle) <= tolerance(oracle), `${project}: client peak ${peak} vs oracle ${oracle}`);
  }
  tracker.close();
});
