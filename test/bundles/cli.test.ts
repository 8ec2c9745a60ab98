import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmodSync, existsSync, mkdirSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { tempDir } from '../helpers.ts';

interface Run {
  status: number | null;
  stdout: string;
  stderr: string;
}

/** `fleetlet bundle ...` as a real child process (node --import tsx cli/main.ts). */
function cli(...args: string[]): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--import', 'tsx', 'cli/main.ts', 'bundle', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), 60_000);
    child.on('error', reject);
    child.on('close', (status) => {
      clearTimeout(timer);
      resolve({ status, stdout, stderr });
    });
  });
}

const ok = (r: Run) => {
  assert.equal(r.status, 0, `exit ${r.status}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
  return r;
};

test('CLI round trip: keygen, root (2 of 3), build, sign, verify, inspect, extract; refusals exit 1 with their code', async () => {
  const tmp = tempDir();
  const p = (...x: string[]) => join(tmp.dir, ...x);
  try {
    await Promise.all(['a', 'b', 'c'].map((k) => cli('keygen', '--out', p(k)).then(ok)));
    const keyA = JSON.parse(ok(await cli('keygen', '--out', p('d'), '--json')).stdout) as { keyid: string; privateFile: string };
    assert.match(keyA.keyid, /^[0-9a-f]{64}$/);

    const root = JSON.parse(ok(await cli('root', '--pub', p('a.pub'), '--pub', p('b.pub'), '--pub', p('c.pub'), '--threshold', '2', '--key', p('a.key'), '--key', p('b.key'), '--out', p('root.json'), '--json')).stdout) as { version: number; threshold: number; keys: string[] };
    assert.equal(root.threshold, 2);
    assert.equal(root.keys.length, 3);

    mkdirSync(p('app', 'bin'), { recursive: true });
    writeFileSync(p('app', 'bin', 'run.sh'), '#!/bin/sh\necho hello\n');
    chmodSync(p('app', 'bin', 'run.sh'), 0o755);
    writeFileSync(p('app', 'config.yaml'), 'greeting: hi\n');
    writeFileSync(
      p('manifest.yaml'),
      ['name: hello', 'kind: app', 'version: 1.0.0', 'sequence: 3', 'targets:', '  arch: [x64, arm64]', '  deviceClass: [pi4]', 'app:', '  command: bin/run.sh', '  args: ["--loud"]', ''].join('\n'),
    );
    const bundle = p('hello.fltb');
    const built = JSON.parse(ok(await cli('build', '--dir', p('app'), '--manifest', p('manifest.yaml'), '--out', bundle, '--key', p('a.key'), '--json')).stdout) as { sha256: string; files: number; signatures: string[] };
    assert.equal(built.files, 2);
    assert.equal(built.signatures.length, 1);
    assert.equal(built.sha256, createHash('sha256').update(readFileSync(bundle)).digest('hex'));

    // one signature, threshold 2
    const few = await cli('verify', '--root', p('root.json'), bundle, '--json');
    assert.equal(few.status, 1);
    assert.match(few.stderr, /FLEET_BUNDLE_THRESHOLD/);
    assert.equal((JSON.parse(few.stdout) as { ok: boolean; error: { code: string } }).error.code, 'FLEET_BUNDLE_THRESHOLD');

    ok(await cli('sign', '--key', p('b.key'), bundle));
    const v = JSON.parse(ok(await cli('verify', '--root', p('root.json'), bundle, '--arch', 'arm64', '--device-class', 'pi4', '--floor', '3', '--kind', 'app', '--json')).stdout) as { ok: boolean; signedBy: string[]; sequence: number; sha256: string };
    assert.equal(v.ok, true);
    assert.equal(v.signedBy.length, 2);
    assert.equal(v.sequence, 3);
    assert.equal(v.sha256, createHash('sha256').update(readFileSync(bundle)).digest('hex'));

    const text = ok(await cli('verify', '--root', p('root.json'), bundle, '--extract', p('release-3')));
    assert.match(text.stdout, /^ok: .*app hello 1\.0\.0 \(sequence 3\)/);
    assert.equal(readFileSync(p('release-3', 'bin', 'run.sh'), 'utf8'), '#!/bin/sh\necho hello\n');

    const insp = JSON.parse(ok(await cli('inspect', bundle, '--json')).stdout) as { verified: boolean; manifest: { name: string; app: { command: string; args: string[] }; files: Array<{ path: string; mode: number }> }; signatures: string[] };
    assert.equal(insp.verified, false);
    assert.equal(insp.manifest.app.command, 'bin/run.sh');
    assert.deepEqual(insp.manifest.app.args, ['--loud']);
    assert.deepEqual(insp.manifest.files.map((f) => [f.path, f.mode]), [['bin/run.sh', 0o755], ['config.yaml', 0o644]]);
    assert.equal(insp.signatures.length, 2);
    assert.match(ok(await cli('inspect', bundle)).stdout, /NOT verified/);

    // refusals through the CLI: each exits 1 with its code and extracts nothing
    const refused = async (code: string, ...args: string[]) => {
      const r = await cli('verify', ...args, '--extract', p('release-x'));
      assert.equal(r.status, 1, r.stderr);
      assert.match(r.stderr, new RegExp(code));
      assert.equal(existsSync(p('release-x')), false);
    };
    await refused('FLEET_BUNDLE_ROLLBACK', '--root', p('root.json'), bundle, '--floor', '4');
    await refused('FLEET_BUNDLE_TARGET', '--root', p('root.json'), bundle, '--arch', 'riscv64');
    await refused('FLEET_BUNDLE_TARGET', '--root', p('root.json'), bundle, '--arch', 'x64', '--device-class', 'jetson');
    await refused('FLEET_BUNDLE_KIND', '--root', p('root.json'), bundle, '--kind', 'agent');
    await refused('FLEET_BUNDLE_UNKNOWN_KEY', '--pub', p('c.pub'), bundle);
    const bytes = readFileSync(bundle);
    bytes[bytes.indexOf('echo hello')]! ^= 1; // a payload byte
    writeFileSync(p('tampered.fltb'), bytes);
    await refused('FLEET_BUNDLE_HASH', '--root', p('root.json'), p('tampered.fltb'));
    // --pub with one of the signers: an ad-hoc threshold-1 check
    ok(await cli('verify', '--pub', p('a.pub'), bundle));

    // usage errors exit 2
    assert.equal((await cli('verify', bundle)).status, 2);
    assert.equal((await cli('verify', '--root', p('root.json'), bundle, '--kind', 'nope')).status, 2);
    assert.equal((await cli('build', '--dir', p('app'))).status, 2);
    assert.deepEqual(readdirSync(tmp.dir).filter((f) => f.startsWith('.')), [], 'no temp files left behind');
  } finally {
    tmp.cleanup();
  }
});
