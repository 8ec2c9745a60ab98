import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdirSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { AppMetrics, collectInventory, collectInventoryInChild, DeviceMetrics, Inventory, MetricsCollector, pageSize, parseMeminfo, parseNetDev, parsePidStat } from '../../agent/metrics.ts';
import { MetricsRegistry } from '../../core/metrics.ts';
import { tempDir, waitFor } from '../helpers.ts';

test('parsePidStat counts fields after the last ")" (comm with spaces and parentheses)', () => {
  const line = '4242 (my (odd) app) S 1 4240 4240 0 -1 4194560 100 0 0 0 250 50 7 3 20 0 1 0 12345 1000000 321 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n';
  assert.deepEqual(parsePidStat(line), { pgrp: 4240, ticks: 300, rssPages: 321 });
  assert.equal(parsePidStat('garbage'), null);
});

test('parseNetDev and parseMeminfo read the kernel formats', () => {
  const dev = [
    'Inter-|   Receive                                                |  Transmit',
    ' face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed',
    '    lo:  1000      10    0    0    0     0          0         0     1000      10    0    0    0     0       0          0',
    '  eth0: 123456789 98765 2 0 0 0 0 0 987654 4321 1 0 0 0 0 0',
  ].join('\n');
  assert.deepEqual(parseNetDev(dev)[1], { iface: 'eth0', rxBytes: 123456789, rxPackets: 98765, rxErrors: 2, txBytes: 987654, txPackets: 4321, txErrors: 1 });
  const mem = parseMeminfo('MemTotal:        8000000 kB\nMemFree:  1 kB\nMemAvailable:    6000000 kB\nSwapTotal: 1024 kB\nSwapFree: 512 kB\n');
  assert.deepEqual(mem, { total: 8_192_000_000, available: 6_144_000_000, swapTotal: 1_048_576, swapFree: 524_288 });
});

test('pageSize is a power of two the kernel uses', () => {
  const p = pageSize();
  assert.ok([4096, 16384, 65536].includes(p), String(p));
});

test('DeviceMetrics on this machine: CPU, load, memory, disk of / and the state dir, interfaces without lo, thermal zones as present', async () => {
  const tmp = tempDir();
  try {
    const d = new DeviceMetrics({ diskPaths: [tmp.dir, '/'] });
    await sleep(300);
    const s = d.sample();
    assert.ok(s.cpuUtil !== null && s.cpuUtil >= 0 && s.cpuUtil <= 100, `cpu ${s.cpuUtil}`);
    assert.ok(s.cpus >= 1);
    assert.ok(s.memTotal > 0 && s.memAvailable > 0 && s.memAvailable <= s.memTotal);
    assert.ok(s.uptimeS > 0 && s.load1 >= 0);
    assert.deepEqual(s.disks.map((k) => k.path), [tmp.dir, '/']);
    for (const k of s.disks) assert.ok(k.totalBytes > 0 && k.availBytes <= k.freeBytes && k.freeBytes <= k.totalBytes, JSON.stringify(k));
    assert.equal(s.diskFree, s.disks[0]!.availBytes);
    const kernel = parseNetDev(readFileSync('/proc/net/dev', 'utf8')).filter((n) => n.iface !== 'lo');
    assert.deepEqual(s.net.map((n) => n.iface).sort(), kernel.map((n) => n.iface).sort());
    assert.ok(s.net.every((n) => n.rxBytesPerS === null), 'no rate on the first sample');
    await sleep(200);
    const s2 = d.sample();
    assert.ok(s2.net.every((n) => n.rxBytesPerS !== null && n.rxBytesPerS >= 0 && n.txPacketsPerS !== null));
    // thermal: exactly the zones this machine has (none on most VMs): nothing is made up
    let zones: string[] = [];
    try {
      zones = readdirSync('/sys/class/thermal').filter((z) => /^thermal_zone\d+$/.test(z));
    } catch {
      // no /sys/class/thermal at all
    }
    assert.equal(d.thermalZones.length, zones.length);
    assert.ok(s2.thermal.length <= zones.length);
  } finally {
    tmp.cleanup();
  }
});

test('thermal zones with their types, from a fake sysfs tree (mocked: this machine has no thermal zones)', () => {
  const tmp = tempDir();
  try {
    const zone = (n: number, type: string, temp?: string) => {
      const dir = join(tmp.dir, 'class', 'thermal', `thermal_zone${n}`);
      mkdirSync(dir, { recursive: true });
      writeFileSync(join(dir, 'type'), `${type}\n`);
      if (temp !== undefined) writeFileSync(join(dir, 'temp'), `${temp}\n`);
    };
    zone(0, 'cpu-thermal', '48312'); // Raspberry Pi
    zone(10, 'GPU-therm', '39500'); // Jetson: sorted numerically after zone 2
    zone(2, 'CPU-therm', '41000');
    zone(3, 'PMIC-Die'); // a sensor that does not answer: skipped
    mkdirSync(join(tmp.dir, 'class', 'thermal', 'cooling_device0'), { recursive: true });
    const d = new DeviceMetrics({ diskPaths: ['/'], sysRoot: tmp.dir });
    assert.deepEqual(d.thermalZones.map((z) => z.zone), ['thermal_zone0', 'thermal_zone2', 'thermal_zone3', 'thermal_zone10']);
    assert.deepEqual(d.sample().thermal, [
      { zone: 'thermal_zone0', type: 'cpu-thermal', celsius: 48.312 },
      { zone: 'thermal_zone2', type: 'CPU-therm', celsius: 41 },
      { zone: 'thermal_zone10', type: 'GPU-therm', celsius: 39.5 },
    ]);
    const reg = new MetricsRegistry();
    const c = new MetricsCollector({ diskPaths: ['/'], sysRoot: tmp.dir }, () => []);
    c.register(reg);
    c.sample();
    assert.match(reg.render(), /^fleet_device_temperature_celsius\{type="cpu-thermal",zone="thermal_zone0"\} 48\.312$/m);
    assert.ok(c.toSamples().some((s) => s.n === 'temp.thermal_zone10' && s.v === 39.5 && s.u === 'Cel'));
  } finally {
    tmp.cleanup();
  }
});

test('AppMetrics sums CPU and RSS over the whole process group of each app, in one /proc scan', async () => {
  // two real apps, each its own process group (as the supervisor spawns them): one burns CPU in a grandchild
  // the loop ends by itself within 30 s should this process be killed before its finally (a group
  // of its own is not reached by the runner's kill); --foreground keeps it in the app's group
  const busy = spawn('/bin/sh', ['-c', "sleep 30 & sleep 30 & timeout --foreground 30 sh -c 'while :; do :; done' & wait"], { detached: true, stdio: 'ignore' });
  const idle = spawn('/bin/sleep', ['30'], { detached: true, stdio: 'ignore' });
  const apps = [
    { name: 'busy', pid: busy.pid!, state: 'running', restarts: 2, health: { status: 'healthy' } },
    { name: 'idle', pid: idle.pid!, state: 'running', restarts: 0 },
    { name: 'gone', pid: null, state: 'backoff', restarts: 7, health: 'unhealthy' },
  ];
  try {
    const m = new AppMetrics('/proc', 0); // a full /proc pass at every sample
    await waitFor(() => m.sample(apps)[0]!.processes >= 4, 'busy group has sh + 2 sleeps + the loop');
    await sleep(600);
    const [b, i, g] = m.sample(apps);
    assert.equal(b!.pgid, busy.pid);
    assert.ok(b!.processes >= 4, `processes ${b!.processes}`);
    assert.ok(b!.cpuPercent !== null && b!.cpuPercent > 0, `busy cpu ${b!.cpuPercent}`);
    assert.ok(b!.cpuSecondsTotal > 0);
    assert.ok(b!.rssBytes > i!.rssBytes, 'four processes hold more than one');
    assert.equal(b!.health, 'healthy');
    assert.equal(b!.restarts, 2);
    assert.equal(i!.processes, 1);
    assert.ok(i!.rssBytes > 100_000, `sleep rss ${i!.rssBytes}`);
    assert.ok(i!.cpuPercent !== null && i!.cpuPercent < b!.cpuPercent!);
    // the idle app's RSS is what the kernel says in /proc/<pid>/status (kB), within the slack of the
    // kernel's per-CPU RSS counters, which /proc/<pid>/stat reads without summing exactly
    const kb = Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${idle.pid}/status`, 'utf8'))![1]);
    assert.ok(Math.abs(i!.rssBytes - kb * 1024) <= Math.max(512 * 1024, kb * 1024 * 0.2), `${i!.rssBytes} vs ${kb} kB`);
    // between full passes only the known members are read: same groups, same figures
    const inc = new AppMetrics('/proc', 60_000);
    const first = inc.sample(apps);
    await sleep(400);
    const [b2, i2] = inc.sample(apps);
    assert.equal(inc.fullScans, 1, 'one full pass, then only the members');
    assert.equal(b2!.processes, first[0]!.processes);
    assert.equal(i2!.processes, 1);
    assert.ok(b2!.cpuPercent !== null && b2!.cpuPercent > 0, `busy cpu ${b2!.cpuPercent}`);
    assert.ok(Math.abs(b2!.rssBytes - b!.rssBytes) < b!.rssBytes * 0.5);
    assert.deepEqual({ ...g, cpuSecondsTotal: 0 }, { name: 'gone', pgid: null, processes: 0, cpuPercent: null, cpuSecondsTotal: 0, rssBytes: 0, restarts: 7, running: false, health: 'unhealthy' });
  } finally {
    for (const c of [busy, idle]) {
      try {
        process.kill(-c.pid!, 'SIGKILL');
      } catch {
        // already gone
      }
    }
  }
});

test('MetricsCollector: telemetry samples and /metrics families; network counters equal the kernel counters', async () => {
  const child = spawn('/bin/sleep', ['30'], { detached: true, stdio: 'ignore' });
  try {
    const reg = new MetricsRegistry();
    const c = new MetricsCollector({ diskPaths: ['/'] }, () => [{ name: 'app-1', pid: child.pid!, state: 'running', restarts: 1, health: 'starting' }]);
    c.register(reg);
    await sleep(200);
    const kernel = () => new Map(parseNetDev(readFileSync('/proc/net/dev', 'utf8')).map((n) => [n.iface, n.rxBytes]));
    const before = kernel();
    const s = c.sample();
    const names = new Set(c.toSamples().map((x) => x.n));
    for (const n of ['load.1m', 'load.5m', 'load.15m', 'mem.used', 'mem.total', 'swap.used', 'uptime', 'cpu.util', 'disk.state.avail', 'disk.state.total', 'app.app-1.cpu', 'app.app-1.rss']) assert.ok(names.has(n), n);
    for (const n of s.device.net) {
      // interfaces that never carried a byte stay out of telemetry (still on /metrics)
      const idle = n.rxBytes === 0 && n.txBytes === 0;
      assert.equal(names.has(`net.${n.iface}.rx`) && names.has(`net.${n.iface}.tx.packets`), !idle, n.iface);
    }
    assert.deepEqual(
      c.appStateSamples(5).map((x) => x.n),
      ['app.app-1.up', 'app.app-1.restarts', 'app.app-1.health'],
    );
    const text = reg.render();
    for (const fam of ['fleet_device_load15', 'fleet_device_memory_available_bytes', 'fleet_device_uptime_seconds', 'fleet_device_filesystem_avail_bytes', 'fleet_agent_app_cpu_seconds_total', 'fleet_agent_app_memory_rss_bytes', 'fleet_agent_app_healthy']) {
      assert.match(text, new RegExp(`^# TYPE ${fam} `, 'm'), fam);
    }
    assert.match(text, /^fleet_agent_app_processes\{app="app-1"\} 1$/m);
    assert.match(text, /^fleet_agent_app_healthy\{app="app-1"\} 0$/m);
    // the kernel's own counters, read by the test before and after: the exported value lies between
    const after = kernel();
    assert.deepEqual(s.device.net.map((n) => n.iface).sort(), [...after.keys()].filter((i) => i !== 'lo').sort(), 'every interface but loopback (off by default)');
    for (const n of s.device.net) {
      const m = new RegExp(`^fleet_device_network_receive_bytes_total\\{iface="${n.iface}"\\} (\\d+)$`, 'm').exec(text);
      assert.equal(Number(m?.[1]), n.rxBytes, n.iface);
      assert.ok(before.get(n.iface)! <= n.rxBytes && n.rxBytes <= after.get(n.iface)!, `${n.iface}: ${before.get(n.iface)} <= ${n.rxBytes} <= ${after.get(n.iface)}`);
    }
  } finally {
    child.kill('SIGKILL');
  }
});

test('Inventory: a collection still under way at stop() reports nothing after it (the agent closes its outbox right after), and no refresh starts after stop (collector held by the test)', async () => {
  let release!: () => void;
  const held = new Promise<void>((r) => (release = r));
  let calls = 0;
  const reported: unknown[] = [];
  const inv = new Inventory({
    collect: async () => {
      calls++;
      await held;
      return { model: 'Pi 4' };
    },
    everyMs: 0,
    onSighup: false,
    onChange: (i) => reported.push(i),
    onError: (e) => reported.push(e),
  });
  inv.start();
  const underWay = inv.refresh(); // shared with the start's
  inv.stop();
  release();
  await underWay;
  await inv.refresh();
  assert.deepEqual(reported, [], 'nothing reported after stop');
  assert.equal(calls, 1, 'no collection after stop');
});

test('Inventory: gathered at start, on SIGHUP, reported only when it changes; the real one comes from systeminformation', async () => {
  let calls = 0;
  let model = 'Pi 4';
  const changes: unknown[] = [];
  const inv = new Inventory({ collect: async () => ({ model, n: (calls++, 1) }), everyMs: 0, onChange: (i) => changes.push(i) });
  inv.start();
  try {
    await waitFor(() => inv.current, 'first inventory');
    await inv.refresh();
    assert.equal(changes.length, 1, 'same inventory twice: one change');
    model = 'Pi 5';
    process.kill(process.pid, 'SIGHUP');
    await waitFor(() => changes.length === 2, 'SIGHUP refresh');
    assert.deepEqual(inv.current, { model: 'Pi 5', n: 1 });
    assert.ok(calls >= 3);
  } finally {
    inv.stop();
  }
  const real = await collectInventory();
  assert.equal(typeof real.kernel, 'string');
  assert.ok(Array.isArray(real.interfaces) && Array.isArray(real.thermalZones));
  assert.ok(typeof real.memTotal === 'number' && real.memTotal > 0);
});

test('inventory from a child process (`fleetlet agent inventory`, as the single binary gathers it); a failing child is an error', { timeout: 90_000 }, async () => {
  const inv = await collectInventoryInChild(process.execPath, ['--import', 'tsx', 'cli/main.ts', 'agent', 'inventory']);
  assert.equal(typeof inv.kernel, 'string');
  assert.ok(Array.isArray(inv.interfaces));
  await assert.rejects(collectInventoryInChild('/bin/sh', ['-c', 'echo oops >&2; exit 3']), /failed: .*oops/);
  await assert.rejects(collectInventoryInChild('/bin/echo', ['[1]']), /printed no inventory: not a JSON object/);
});

