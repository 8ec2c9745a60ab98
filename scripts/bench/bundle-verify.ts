// Bundle verification throughput beside `openssl dgst -sha256` on the same file, same run.
//   node --import tsx scripts/bench/bundle-verify.ts [--mb 512] [--runs 3]
// Builds a bundle of about 512 MB (random bytes: one large file plus 16 × 4 MiB files) in a
// temp dir on a real disk, then times, interleaved, verifyBundle (in this process, as the agent
// calls it: signatures, manifest, the signed payload sha256 and the whole-file sha256) and
// `openssl dgst -sha256 FILE` (a child process), best of N each, both from the page cache (the
// file was just written and is read once untimed first). MB = 10^6 bytes.
// Writes the figures and the machine's details to scripts/bench/results/bundle-verify-<date>.json.
import { spawnSync } from 'node:child_process';
import { closeSync, mkdirSync, mkdtempSync, openSync, rmSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { generateKeyPairSync, randomFillSync } from 'node:crypto';
import { cpus, loadavg, release, totalmem, tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { buildBundle, createRootBytes, parseTrustRoot, verifyBundle } from '../../bundles/index.ts';

const argv = process.argv.slice(2);
const arg = (name: string, def: number) => {
  const i = argv.indexOf(`--${name}`);
  return i >= 0 ? Number(argv[i + 1]) : def;
};
const TOTAL_MB = arg('mb', 512);
const RUNS = arg('runs', 3);
const MiB = 1024 * 1024;

function fsType(dir: string): string {
  const r = spawnSync('stat', ['-f', '-c', '%T', dir], { encoding: 'utf8' });
  return r.stdout.trim();
}

function pickDir(): string {
  const repoTmp = join(process.cwd(), '.tmp');
  mkdirSync(repoTmp, { recursive: true });
  for (const d of [repoTmp, tmpdir()]) if (fsType(d) !== 'tmpfs') return d;
  return repoTmp;
}

function writeRandom(file: string, bytes: number): void {
  const fd = openSync(file, 'w');
  const buf = Buffer.allocUnsafe(4 * MiB);
  try {
    for (let done = 0; done < bytes; ) {
      const n = Math.min(buf.length, bytes - done);
      randomFillSync(buf, 0, n);
      writeSync(fd, buf, 0, n);
      done += n;
    }
  } finally {
    closeSync(fd);
  }
}

const TIME = '/usr/bin/time';
const haveTime = spawnSync(TIME, ['-f', '%U', 'true'], { encoding: 'utf8' }).status === 0;

/** openssl dgst as a child; CPU seconds (user + sys) from /usr/bin/time when it exists. */
function opensslOnce(file: string): { ms: number; cpuMs: number | undefined; sha256: string } {
  const t0 = performance.now();
  const r = haveTime
    ? spawnSync(TIME, ['-f', 'CPU %U %S', 'openssl', 'dgst', '-sha256', '-r', file], { encoding: 'utf8' })
    : spawnSync('openssl', ['dgst', '-sha256', '-r', file], { encoding: 'utf8' });
  const ms = performance.now() - t0;
  if (r.status !== 0) throw new Error(`openssl failed: ${r.stderr}`);
  const m = /CPU ([\d.]+) ([\d.]+)/.exec(r.stderr);
  return { ms, cpuMs: m ? (Number(m[1]) + Number(m[2])) * 1000 : undefined, sha256: r.stdout.split(' ')[0]!.trim() };
}

async function main(): Promise<void> {
  const base = pickDir();
  const dir = mkdtempSync(join(base, 'bundle-verify-bench-'));
  const cleanup = () => rmSync(dir, { recursive: true, force: true });
  process.on('SIGINT', () => {
    cleanup();
    process.exit(130);
  });
  try {
    const src = join(dir, 'src');
    mkdirSync(src);
    const small = 16;
    const bigBytes = TOTAL_MB * 1e6 - small * 4 * MiB;
    process.stderr.write(`writing ${TOTAL_MB} MB of random source files in ${dir} (${fsType(dir)})\n`);
    writeRandom(join(src, 'big.img'), Math.max(0, Math.round(bigBytes)));
    for (let i = 0; i < small; i++) writeRandom(join(src, `part-${String(i).padStart(2, '0')}.bin`), 4 * MiB);

    const { privateKey, publicKey } = generateKeyPairSync('ed25519');
    const trust = parseTrustRoot(createRootBytes({ version: 1, expires: '2099-01-01T00:00:00Z', threshold: 1, keys: [publicKey], signers: [privateKey] }));
    const file = join(dir, 'bench.fltb');
    const built = await buildBundle({ out: file, dir: src, keys: [privateKey], manifest: { name: 'bench', kind: 'firmware', version: '1.0.0', sequence: 1, expires: '2099-01-01T00:00:00Z', targets: {} } });
    rmSync(src, { recursive: true, force: true }); // keep only the bundle in the page cache
    const size = statSync(file).size;
    process.stderr.write(`bundle ${size} bytes, sha256 ${built.sha256}\n`);

    const loadBefore = loadavg();
    // untimed warm-up of both, so both read from the page cache
    opensslOnce(file);
    await verifyBundle(file, { trust });

    const ours: number[] = [];
    const theirs: number[] = [];
    const oursCpu: number[] = [];
    const theirsCpu: number[] = [];
    for (let i = 0; i < RUNS; i++) {
      const c0 = process.cpuUsage();
      const t0 = performance.now();
      const v = await verifyBundle(file, { trust });
      ours.push(performance.now() - t0);
      const c = process.cpuUsage(c0); // all threads of this process (libuv reads included)
      oursCpu.push((c.user + c.system) / 1000);
      if (v.sha256 !== built.sha256) throw new Error('verifyBundle sha256 differs from the build');
      const o = opensslOnce(file);
      theirs.push(o.ms);
      if (o.cpuMs !== undefined) theirsCpu.push(o.cpuMs);
      if (o.sha256 !== built.sha256) throw new Error('openssl sha256 differs from ours');
      process.stderr.write(`run ${i + 1}: verifyBundle ${ours[i]!.toFixed(0)} ms (CPU ${oursCpu[i]!.toFixed(0)} ms), openssl ${o.ms.toFixed(0)} ms (CPU ${o.cpuMs?.toFixed(0) ?? '?'} ms)\n`);
    }
    const loadAfter = loadavg();
    const best = (xs: number[]) => Math.min(...xs);
    const mbps = (ms: number) => size / 1e6 / (ms / 1000);
    const oursMBps = mbps(best(ours));
    const opensslMBps = mbps(best(theirs));
    const ratio = oursMBps / opensslMBps;
    const openssl = spawnSync('openssl', ['version'], { encoding: 'utf8' }).stdout.trim();
    const result = {
      bench: 'bundle-verify',
      date: new Date().toISOString(),
      bundleBytes: size,
      files: small + 1,
      runs: RUNS,
      oursMs: ours.map((x) => Math.round(x)),
      opensslMs: theirs.map((x) => Math.round(x)),
      oursCpuMs: oursCpu.map((x) => Math.round(x)),
      opensslCpuMs: theirsCpu.map((x) => Math.round(x)),
      oursMBps: Math.round(oursMBps),
      opensslMBps: Math.round(opensslMBps),
      ratio: Number(ratio.toFixed(3)),
      target: 0.8,
      pass: ratio >= 0.8,
      notes: 'best of N; CPU = user + sys, ours for the whole process, openssl from /usr/bin/time; MB = 10^6 bytes; both from the page cache; verifyBundle in-process (tail read, signature, manifest and policy checks, then one SHA-256 pass giving the signed payload digest and the whole-file sha256), openssl as a child process (includes its start-up, a few ms)',
      machine: { model: cpus()[0]?.model, cores: cpus().length, memGiB: Math.round(totalmem() / 2 ** 30), kernel: release(), node: process.version, openssl, loadavgBefore: loadBefore.map((x) => Number(x.toFixed(2))), loadavgAfter: loadAfter.map((x) => Number(x.toFixed(2))), fs: fsType(dir) },
    };
    const table = [
      '| figure | ours (verifyBundle) | openssl dgst -sha256 | ratio | target |',
      '|---|---:|---:|---:|---:|',
      `| ${(size / 1e6).toFixed(0)} MB bundle, MB/s (best of ${RUNS}) | ${oursMBps.toFixed(0)} | ${opensslMBps.toFixed(0)} | ${ratio.toFixed(2)}x | ≥ 0.8x ${ratio >= 0.8 ? 'pass' : 'FAIL'} |`,
      `| info: CPU ms per verify (min; ours = whole process) | ${Math.min(...oursCpu).toFixed(0)} | ${theirsCpu.length ? Math.min(...theirsCpu).toFixed(0) : '?'} | | one SHA-256 pass each |`,
    ].join('\n');
    process.stdout.write(`${table}\nload average before ${loadBefore.map((x) => x.toFixed(2)).join(' ')}, after ${loadAfter.map((x) => x.toFixed(2)).join(' ')}; ${result.machine.model}, ${result.machine.cores} cores, node ${process.version}, ${openssl}\n`);
    const outDir = join(process.cwd(), 'scripts/bench/results');
    mkdirSync(outDir, { recursive: true });
    const out = join(outDir, `bundle-verify-${result.date.slice(0, 10)}.json`);
    writeFileSync(out, JSON.stringify(result, null, 2) + '\n');
    process.stderr.write(`wrote ${out}\n`);
  } finally {
    cleanup();
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`bundle-verify bench failed: ${String((err as Error).stack ?? err)}\n`);
  process.exit(1);
});
