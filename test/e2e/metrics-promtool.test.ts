import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { AgentConfigSchema } from '../../agent/config.ts';
import { startAgent } from '../../agent/index.ts';
import { HubConfigSchema } from '../../hub/config.ts';
import { startHub } from '../../hub/index.ts';
import { tempDir, testLogger, waitFor } from '../helpers.ts';

/** Prometheus's own linter (Debian `prometheus`, installed by .ci/run) on our /metrics pages. */
function promtool(text: string): { status: number | null; out: string } {
  const r = spawnSync('promtool', ['check', 'metrics'], { input: text, encoding: 'utf8' });
  if (r.error) throw r.error; // promtool missing is a failure, not a skip
  return { status: r.status, out: `${r.stdout}${r.stderr}` };
}

test('promtool accepts the hub and agent /metrics pages', { timeout: 60_000 }, async () => {
  const tmp = tempDir();
  const hub = await startHub(HubConfigSchema.parse({ mqttPort: 0, httpPort: 0, stateDir: `${tmp.dir}/hub` }), testLogger('hub'));
  let started: Awaited<ReturnType<typeof startAgent>> | undefined;
  try {
    const agent = (started = await startAgent(
      AgentConfigSchema.parse({ deviceId: 'prom-1', stateDir: `${tmp.dir}/agent`, api: { port: 0 }, metrics: { sampleMs: 100, publishMs: 200 }, apps: [{ name: 'sleeper', command: '/bin/sleep', args: ['30'] }] }),
      testLogger('agent'),
      '1.0.0',
    ));
    await waitFor(() => agent.supervisor.apps.get('sleeper')?.state === 'running', 'app running');
    for (const url of [`http://127.0.0.1:${hub.httpPort}/metrics`, `http://127.0.0.1:${agent.apiPort}/metrics`]) {
      const res = await fetch(url);
      assert.match(res.headers.get('content-type') ?? '', /^text\/plain; version=0\.0\.4/);
      const text = await res.text();
      assert.ok(text.length > 100, url);
      const r = promtool(text);
      assert.equal(r.status, 0, `${url}: ${r.out}`);
      // and the linter does fail on a bad page, so the check above means something
      assert.notEqual(promtool(`${text}# TYPE broken_total counter\nbroken_total{a="1"} x\n`).status, 0);
    }
    // the agent's device and per-app families (docs/agent.md#metrics), with samples where this machine has them
    const page = await waitFor(async () => {
      const t = await (await fetch(`http://127.0.0.1:${agent.apiPort}/metrics`)).text();
      return /^fleet_agent_app_memory_rss_bytes\{app="sleeper"\} [1-9]/m.test(t) ? t : null;
    }, 'the sleeper app sampled');
    for (const fam of [
      'fleet_device_cpu_utilization_percent',
      'fleet_device_load1',
      'fleet_device_load5',
      'fleet_device_load15',
      'fleet_device_memory_total_bytes',
      'fleet_device_memory_available_bytes',
      'fleet_device_memory_used_bytes',
      'fleet_device_swap_total_bytes',
      'fleet_device_uptime_seconds',
      'fleet_device_filesystem_size_bytes',
      'fleet_device_filesystem_avail_bytes',
      'fleet_device_network_receive_bytes_total',
      'fleet_device_network_transmit_bytes_total',
      'fleet_device_network_receive_packets_total',
      'fleet_device_network_transmit_packets_total',
      'fleet_device_network_receive_bytes_per_second',
      'fleet_device_temperature_celsius',
      'fleet_agent_app_cpu_utilization_percent',
      'fleet_agent_app_cpu_seconds_total',
      'fleet_agent_app_memory_rss_bytes',
      'fleet_agent_app_processes',
      'fleet_agent_app_healthy',
    ]) {
      assert.match(page, new RegExp(`^# TYPE ${fam} (gauge|counter)$`, 'm'), fam);
    }
    assert.match(page, /^fleet_device_filesystem_avail_bytes\{path="\/"\} \d+$/m);
    // the app and the launch shim's watcher (agent/shim.ts) share its process group
    assert.match(page, /^fleet_agent_app_processes\{app="sleeper"\} [1-9]\d*$/m);
    assert.doesNotMatch(page, /^fleet_agent_app_healthy\{app="sleeper"\}/m, 'no health check, no health series');
    assert.match(page, /^fleet_agent_app_cpu_seconds_total\{app="sleeper"\} [\d.]+$/m);
    const r = promtool(page);
    assert.equal(r.status, 0, r.out);
  } finally {
    await started?.stop(); // also when its start failed: the hub would keep this file running
    await hub.stop();
    tmp.cleanup();
  }
});
