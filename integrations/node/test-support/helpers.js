'use strict';
// Shared by the tests: the binaries, and a real `tracer serve` on a socket of its own.
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

const root = path.resolve(__dirname, '../../..');
const tracerBin = process.env.TRACER_BIN || path.join(root, 'target/debug/tracer');
const workloadBin = process.env.WORKLOAD_BIN || path.join(root, 'target/debug/workload');

/** Starts `tracer serve`; resolves `{ socketPath, stop() }` once its socket exists. */
async function startServer() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tracer-node-'));
  const socketPath = path.join(dir, 'tracer.sock');
  const server = spawn(tracerBin, ['serve', '--socket', socketPath], { stdio: ['ignore', 'inherit', 'inherit'] });
  for (let waited = 0; !fs.existsSync(socketPath); waited += 50) {
    if (waited > 10000) throw new Error('tracer serve did not create its socket');
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  return {
    socketPath,
    stop() {
      server.kill('SIGTERM');
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** max(1%, 1 MiB), as in the Rust tests: the workload's VmRSS at its barrier is the truth. */
function tolerance(oracle) {
  return Math.max(oracle / 100, 1 << 20);
}

module.exports = { tracerBin, workloadBin, startServer, tolerance };
