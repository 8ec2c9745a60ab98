import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { scanBundle } from '../../scripts/bundle-scan.mjs';
import { runDemoUntilOnline } from '../e2e/demo-run.ts';

// Builds dist/fleetlet once and checks what docs/build.md promises about it. The binary
// is what ships, so these tests run it the way a device would: a bare environment, no
// node_modules next to it, and (in the last test) no node anywhere on PATH.

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
// the tests read a copy of dist/ made under the build lock (build.mjs --copy-to): another
// test file may rebuild dist/ meanwhile (test/e2e/ota-selfupdate.test.ts)
const BUILT = mkdtempSync(join(tmpdir(), 'fleetlet-build-copy-'));
const BIN = join(BUILT, 'fleetlet');
const BUNDLE = join(BUILT, 'fleetlet.cjs');
/** the agent's part and the start script that picks a part (cli/sea-main.ts, docs/build.md) */
const AGENT_PART = join(BUILT, 'fleetlet-agent.cjs');
const SEA_MAIN = join(BUILT, 'sea-main.cjs');
const VERSION = (JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { version: string }).version;
const MAX_BYTES = 100 * 1024 * 1024;
const CHECK_NAMES = ['coap', 'ed25519', 'execa', 'level', 'mqtt', 'node-cron', 'systeminformation'];
const ADDON_FILE = /^classic-level-[0-9a-f]{16}\.node$/;

let work = '';

interface Run {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Run with a deadline; a process that does not exit by itself (handles left open) fails by the deadline. */
function run(cmd: string, args: string[], opts: { cwd?: string; timeoutMs?: number } = {}): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { cwd: opts.cwd ?? ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`${cmd} ${args.join(' ')} did not exit within ${opts.timeoutMs ?? 60_000} ms\nstdout: ${stdout}\nstderr: ${stderr}`));
    }, opts.timeoutMs ?? 60_000);
    child.on('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
  });
}

/** `env -i PATH=... [VAR=...] bin args`: nothing from the test runner's environment leaks in. */
function bare(bin: string, args: string[], vars: Record<string, string> = {}, opts: { cwd?: string; timeoutMs?: number } = {}): Promise<Run> {
  const assignments = Object.entries({ PATH: '/usr/bin:/bin', ...vars }).map(([k, v]) => `${k}=${v}`);
  return run('/usr/bin/env', ['-i', ...assignments, bin, ...args], opts);
}

function parseSelftest(stdout: string): { status: string; name: string; ms: number; detail: string }[] {
  return stdout
    .trimEnd()
    .split('\n')
    .map((line) => {
      const m = /^(ok|FAIL)\s+(\S+)\s+(\d+)ms\s+(.*)$/.exec(line);
      assert.ok(m, `selftest line does not match "<ok|FAIL> <name> <ms>ms <detail>": ${JSON.stringify(line)}`);
      return { status: m[1]!, name: m[2]!, ms: Number(m[3]), detail: m[4]! };
    });
}

function assertSelftestPassed(r: Run): void {
  assert.equal(r.stderr, '', `selftest wrote to stderr:\n${r.stderr}`);
  assert.equal(r.code, 0, `selftest exit ${r.code} (signal ${r.signal})\n${r.stdout}`);
  const lines = parseSelftest(r.stdout);
  for (const l of lines) assert.equal(l.status, 'ok', `check ${l.name} failed: ${l.detail}`);
  assert.deepEqual(lines.map((l) => l.name).sort(), CHECK_NAMES);
}

/** The extracted addon: exactly one content-addressed file under <state-dir>/native. */
function extractedAddon(stateDir: string): string {
  const files = readdirSync(join(stateDir, 'native'));
  assert.equal(files.length, 1, `expected one file in ${stateDir}/native, found ${files.join(', ')}`);
  assert.match(files[0]!, ADDON_FILE);
  return join(stateDir, 'native', files[0]!);
}

before(
  async () => {
    work = mkdtempSync(join(tmpdir(), 'fleetlet-build-test-'));
    const r = await run(process.execPath, [join(ROOT, 'scripts', 'build.mjs'), '--copy-to', BUILT], { timeoutMs: 600_000 });
    assert.equal(r.code, 0, `build failed (exit ${r.code}):\n${r.stdout}\n${r.stderr}`);
  },
  { timeout: 620_000 },
);

after(() => {
  rmSync(BUILT, { recursive: true, force: true });
  if (work) rmSync(work, { recursive: true, force: true });
});

test('dist/fleetlet is one executable file of at most 100 MB', () => {
  const st = statSync(BIN);
  assert.ok(st.isFile());
  assert.ok((st.mode & 0o111) !== 0, 'not executable');
  assert.ok(st.size <= MAX_BYTES, `dist/fleetlet is ${st.size} bytes, limit ${MAX_BYTES}`);
  // the build also leaves the bundle and blob in dist/; only the binary is meant to ship,
  // which the isolated-copy test below proves
});

test('--version in a bare environment prints the version and nothing on stderr', async () => {
  const r = await bare(BIN, ['--version']);
  assert.equal(r.stderr, '', `stderr not empty (a leftover require prints a warning here):\n${r.stderr}`);
  assert.equal(r.code, 0);
  assert.equal(r.stdout, `fleetlet ${VERSION}\n`);
});

test('selftest in a bare environment passes every check and extracts the addon under the state dir, removing an addon an older binary left there', async () => {
  const home = join(work, 'home');
  const stateDir = join(work, 'selftest-state');
  mkdirSync(home);
  // what a binary with another addon left (a content-addressed name of its own)
  mkdirSync(join(stateDir, 'native'), { recursive: true });
  const older = join(stateDir, 'native', 'classic-level-0123456789abcdef.node');
  writeFileSync(older, 'an older addon');
  // written an hour ago: no other binary is about to load it
  utimesSync(older, new Date(Date.now() - 3_600_000), new Date(Date.now() - 3_600_000));
  const r = await bare(BIN, ['selftest', '--state-dir', stateDir], { HOME: home });
  assertSelftestPassed(r);
  // exactly one file: the one this binary extracted and loaded
  extractedAddon(stateDir);
  // the test store is removed; only the addon cache stays
  assert.deepEqual(readdirSync(stateDir), ['native']);
});

test('selftest --json reports every check', async () => {
  const stateDir = join(work, 'json-state');
  const r = await bare(BIN, ['selftest', '--json', '--state-dir', stateDir], { HOME: join(work, 'home') });
  assert.equal(r.code, 0, r.stdout + r.stderr);
  const out = JSON.parse(r.stdout) as { ok: boolean; sea: boolean; checks: { name: string; ok: boolean }[] };
  assert.equal(out.ok, true);
  assert.equal(out.sea, true);
  assert.deepEqual(out.checks.map((c) => c.name).sort(), CHECK_NAMES);
  assert.ok(out.checks.every((c) => c.ok));
});

test('no part of the binary, nor its start script, requires a non-builtin module', () => {
  for (const file of [BUNDLE, AGENT_PART, SEA_MAIN]) {
    const { nonBuiltin } = scanBundle(readFileSync(file, 'utf8'));
    assert.deepEqual(nonBuiltin.map((f) => f.spec), [], file);
  }
});

test("the agent's part holds the agent, not the hub, gateway, simulator or inventory library", () => {
  const inputs = (file: string) => Object.keys((JSON.parse(readFileSync(join(BUILT, file), 'utf8')) as { inputs: Record<string, unknown> }).inputs);
  const agent = inputs('meta-agent.json');
  const all = inputs('meta.json');
  const left = /^(hub|gateway|esp32-sim)\/|node_modules\/(aedes|coap|cbor-x|execa|systeminformation)\//;
  assert.ok(agent.some((i) => i.startsWith('agent/supervisor.ts')), 'the supervisor is in the agent part');
  assert.ok(agent.some((i) => i.includes('node_modules/mqtt/')), 'the MQTT client is in the agent part');
  assert.deepEqual(agent.filter((i) => left.test(i) && !i.startsWith('fleetlet-stub:')), []);
  assert.ok(all.filter((i) => left.test(i)).length > 50, 'the full part has them (so the check above can fail)');
  assert.ok(statSync(AGENT_PART).size < 0.7 * statSync(BUNDLE).size, `agent part ${statSync(AGENT_PART).size} B vs all ${statSync(BUNDLE).size} B`);
});

test('agent commands run from the agent part; `agent inventory` (systeminformation) from the full one', async () => {
  const a = await bare(BIN, ['agent', '--help']);
  assert.equal(a.code, 0, a.stderr);
  assert.match(a.stdout, /fleetlet agent/);
  // the agent part leaves systeminformation out: the inventory only works because the
  // start script runs this subcommand from the full part, as the agent's child does
  const inv = await bare(BIN, ['agent', 'inventory'], {}, { timeoutMs: 60_000 });
  assert.equal(inv.code, 0, inv.stderr);
  const parsed = JSON.parse(inv.stdout) as Record<string, unknown>;
  assert.ok(parsed.os && parsed.cpu, `inventory: ${inv.stdout.slice(0, 200)}`);
  assert.equal(a.stderr + inv.stderr, '');
});

test('the bundle scan flags a non-builtin require (so the test above can fail)', () => {
  const text = 'var a=require("left-pad"),b=require("node:fs"),c=require(\'fs/promises\'),d=require("left-pad");x.require("not-a-call");y_require("nor-this")';
  const { nonBuiltin } = scanBundle(text);
  assert.deepEqual(
    nonBuiltin.map((f) => [f.spec, f.count]),
    [['left-pad', 2]],
  );
  assert.deepEqual(scanBundle('require(`@scope/pkg`)').nonBuiltin.map((f) => f.spec), ['@scope/pkg']);
  assert.equal(scanBundle('require("worker_threads");require("node:sea")').nonBuiltin.length, 0);
});

test('an unknown command exits 2', async () => {
  const r = await bare(BIN, ['nosuchcommand']);
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, /FLEET_USAGE/);
});

/**
 * A PATH with every tool from /usr/bin and /bin except node and its launchers (node is in
 * /usr/bin on these machines, so PATH=/usr/bin:/bin alone proves nothing). Made once.
 */
function pathWithoutNode(): string {
  const pathDir = join(work, 'path-without-node');
  if (!existsSync(pathDir)) {
    mkdirSync(pathDir);
    for (const dir of ['/usr/bin', '/bin']) {
      for (const name of readdirSync(dir)) {
        if (/^(node|nodejs|npm|npx|corepack)$/.test(name) || existsSync(join(pathDir, name))) continue;
        symlinkSync(join(dir, name), join(pathDir, name));
      }
    }
  }
  assert.notEqual(spawnSync('/bin/sh', ['-c', 'command -v node'], { env: { PATH: pathDir } }).status, 0, 'node still on PATH');
  return pathDir;
}

test('a copy alone in an empty directory runs with no node on PATH, and reuses its extracted addon', async () => {
  const pathDir = pathWithoutNode();

  const alone = join(work, 'alone');
  mkdirSync(alone);
  const copy = join(alone, 'fleetlet');
  copyFileSync(BIN, copy);
  const vars = { PATH: pathDir, HOME: join(work, 'home-alone') };
  const stateDir = join(work, 'alone-state');

  const v = await bare(copy, ['--version'], vars, { cwd: alone });
  assert.equal(v.code, 0, v.stderr);
  assert.equal(v.stdout, `fleetlet ${VERSION}\n`);

  assertSelftestPassed(await bare(copy, ['selftest', '--state-dir', stateDir], vars, { cwd: alone }));
  const addon = extractedAddon(stateDir);
  const first = statSync(addon);
  assertSelftestPassed(await bare(copy, ['selftest', '--state-dir', stateDir], vars, { cwd: alone }));
  const second = statSync(extractedAddon(stateDir));
  assert.equal(second.ino, first.ino, 'the addon was extracted again instead of reused');
  assert.equal(second.mtimeMs, first.mtimeMs);
});

test('the binary runs the whole demo with no node on PATH and Ctrl-C leaves no process behind', { timeout: 150_000 }, async () => {
  const stateDir = join(work, 'demo-state');
  const out = await runDemoUntilOnline(BIN, [], stateDir, { PATH: pathWithoutNode(), HOME: join(work, 'home-demo') });
  assert.equal(out.summary.online, 22, out.output);
  assert.equal(out.exitCode, 130);
  assert.deepEqual(out.leftovers, []);
  assert.doesNotMatch(out.output, /Warning|ExperimentalWarning/, 'no start-up warnings from any part');
});
