import assert from 'node:assert/strict';
import { mkdirSync, readlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { UpdateConfigSchema } from '../../agent/update/config.ts';
import { readJson, switchSymlink, writeJsonAtomic } from '../../agent/update/files.ts';
import { Layout, META_FILE } from '../../agent/update/layout.ts';
import { STATE_VERSION } from '../../agent/update/machine.ts';
import { bootCheck, bootstrapAgentRelease } from '../../agent/update/selfupdate.ts';
import type { UpdateRecord } from '../../agent/update/types.ts';
import { tempDir, testLogger } from '../helpers.ts';

// The boot counter's time limit (update.agentHealthyWithinS), on real files: a state dir laid
// out as `agent install` does (releases/1.0.0-s0, current, committed), then switched to 2.0.0-s1
// with the update record in probation, as the updater leaves it before the new binary starts.

function switchedDevice(dir: string, switchedAgoS: number): { stateDir: string; layout: Layout; now: number } {
  const stateDir = join(dir, `dev-${switchedAgoS}`);
  const bin = join(dir, 'fleetlet-1.0.0');
  writeFileSync(bin, '#!/bin/sh\necho 1.0.0\n', { mode: 0o755 });
  bootstrapAgentRelease(stateDir, bin, '1.0.0');
  const layout = new Layout(stateDir);
  const next = join(layout.releases('agent', 'fleetlet'), '2.0.0-s1');
  mkdirSync(next, { recursive: true });
  writeFileSync(join(next, 'fleetlet'), '#!/bin/sh\necho 2.0.0\n', { mode: 0o755 });
  writeJsonAtomic(join(next, META_FILE), { name: 'fleetlet', kind: 'agent', version: '2.0.0', sequence: 1, sha256: 'x', stagedAt: 0 });
  switchSymlink(layout.currentLink('agent', 'fleetlet'), next);
  const now = Date.now();
  const rec: UpdateRecord = {
    v: STATE_VERSION,
    id: 'u-test',
    state: 'probation',
    source: 'hub',
    file: join(dir, 'agent.bundle'),
    kind: 'agent',
    name: 'fleetlet',
    version: '2.0.0',
    sequence: 1,
    release: '2.0.0-s1',
    previous: '1.0.0-s0',
    previousVersion: '1.0.0',
    history: [],
    resumes: 0,
    startedAt: now - switchedAgoS * 1000 - 5000,
    updatedAt: now - switchedAgoS * 1000,
    switchedAt: now - switchedAgoS * 1000,
    reported: false,
  };
  writeJsonAtomic(layout.stateFile, rec);
  return { stateDir, layout, now };
}

const tmp = tempDir('fleetlet-bootcheck-');
after(() => tmp.cleanup());

const current = (layout: Layout) => readlinkSync(layout.currentLink('agent', 'fleetlet'));

test('boot check: a new agent still inside update.agentHealthyWithinS is counted and kept', () => {
  const config = UpdateConfigSchema.parse({ agentMaxStarts: 3, agentHealthyWithinS: 120 });
  const d = switchedDevice(tmp.dir, 60);
  assert.equal(bootCheck(d.stateDir, config, testLogger(), 'pre-start', d.now), 'counted');
  assert.match(current(d.layout), /2\.0\.0-s1$/);
  const rec = readJson<UpdateRecord>(d.layout.stateFile, null as never);
  assert.equal(rec.state, 'probation');
  assert.equal(rec.boots, 1);
});

test('boot check: past update.agentHealthyWithinS since the switch, the previous binary is restored (one start only)', () => {
  // many starts left, but the time is up: the time limit alone decides
  const config = UpdateConfigSchema.parse({ agentMaxStarts: 10, agentHealthyWithinS: 120 });
  const d = switchedDevice(tmp.dir, 121);
  assert.equal(bootCheck(d.stateDir, config, testLogger(), 'agent', d.now), 'rolled-back');
  assert.match(current(d.layout), /1\.0\.0-s0$/, 'current points at the previous release again');
  const rec = readJson<UpdateRecord>(d.layout.stateFile, null as never);
  assert.equal(rec.state, 'rolled-back');
  assert.equal(rec.code, 'FLEET_UPDATE_BOOT');
  assert.match(rec.reason ?? '', /within 120 s/);
  assert.equal(rec.boots, 1);
  assert.equal(rec.reported, false, 'left for the agent that runs next to report');
  // the next start finds nothing to do
  assert.equal(bootCheck(d.stateDir, config, testLogger(), 'pre-start', d.now + 1000), 'no-update');
  assert.match(current(d.layout), /1\.0\.0-s0$/);
});
