import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { chromium, type Browser, type Page } from 'playwright-core';
import { AgentConfigSchema } from '../../agent/config.ts';
import { startAgent, type AgentHandle } from '../../agent/index.ts';
import * as bundles from '../../bundles/index.ts';
import { buildAppBundle, installTrustRoot, makeKeys } from '../fixtures/ota/kit.ts';
import { tempDir, testLogger, waitFor } from '../helpers.ts';

/**
 * The technician's page end to end: a real agent on 127.0.0.1:0 supervising the real
 * sample app (a child process), driven by headless Debian Chromium through playwright-core.
 * No skip when Chromium is missing: .ci/run installs it, so its absence is a failure.
 * Screenshots go to test-results/agent-page/ (gitignored) and their paths are printed.
 */
const CHROMIUM = '/usr/bin/chromium';
const ROOT = new URL('../../', import.meta.url).pathname;
const SHOTS = join(ROOT, 'test-results', 'agent-page');

/** console errors and page errors (a CSP violation shows up as a console error) */
function watchErrors(page: Page): string[] {
  const errors: string[] = [];
  page.on('console', (m) => {
    if (m.type() === 'error') errors.push(m.text());
  });
  page.on('pageerror', (e) => errors.push(`pageerror: ${e.message}`));
  return errors;
}

async function streamsOpen(base: string): Promise<number> {
  const text = await (await fetch(`${base}/metrics`)).text();
  return Number(/^fleet_agent_api_streams (\d+)$/m.exec(text)?.[1] ?? NaN);
}

test('technician page in headless Chromium: restart raises the count, live log tail, crash-loop flagged, phone layout', async (t) => {
  assert.ok(existsSync(CHROMIUM), `${CHROMIUM} is missing: install Debian chromium (.ci/run does)`);
  mkdirSync(SHOTS, { recursive: true });
  const tmp = tempDir();
  let browser: Browser | null = null;
  let agent: AgentHandle | null = null;
  try {
    agent = await startAgent(
      AgentConfigSchema.parse({
        deviceId: 'dev-page',
        stateDir: tmp.dir,
        api: { port: 0 },
        metrics: { sampleMs: 250, publishMs: 10_000 },
        apps: [
          {
            name: 'sample',
            command: process.execPath,
            args: ['--import', 'tsx', join(ROOT, 'cli/main.ts'), 'sample-app', '--port', '0', '--log-every-ms', '300'],
            cwd: ROOT,
            stopTimeoutMs: 5000,
          },
          // crash-loops at once; its output is markup that must show as text
          { name: 'crasher', command: '/bin/sh', args: ['-c', 'echo "<b>not bold</b><img src=x onerror=window.pwned=1>"; echo crashing >&2; exit 3'] },
        ],
      }),
      testLogger(),
      '1.2.3-test',
    );
    const a = agent;
    const base = `http://127.0.0.1:${a.apiPort}`;
    const tech = readFileSync(a.tokenFiles.technician, 'utf8').trim();
    const ro = readFileSync(a.tokenFiles.readonly, 'utf8').trim();

    browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'] });
    const page = await browser.newPage({ viewport: { width: 1200, height: 1000 } });
    const errors = watchErrors(page);
    await page.goto(`${base}/`);

    // identity and versions
    await page.waitForFunction(() => document.getElementById('device')?.textContent === 'dev-page');
    assert.match((await page.textContent('#ident')) ?? '', /1\.2\.3-test/);
    assert.equal(await page.textContent('#uplink'), 'no hub configured');
    assert.match((await page.textContent('#outbox')) ?? '', /^outbox \d+ queued/);

    // the app row, running
    const row = page.locator('[data-app="sample"]');
    await row.locator('.state', { hasText: 'running' }).waitFor({ timeout: 30_000 });
    assert.equal(await row.locator('.restarts').textContent(), '0');

    // the live log tail (SSE through fetch) shows what the app printed, and keeps going
    await page.locator('#log', { hasText: /sample-app pid \d+ listening/ }).waitFor({ timeout: 30_000 });
    const beats = () => page.locator('#log div', { hasText: 'sample-app heartbeat' }).count();
    const before = await beats();
    await waitFor(async () => (await beats()) > before + 1, 'new heartbeat lines arriving live', 15_000);
    assert.equal(await page.textContent('#logstate'), 'live');

    // restart: no token → told to enter it; read-only token → FLEET_FORBIDDEN; technician → count rises
    await row.locator('button[data-action="restart"]').click();
    await page.locator('#msg', { hasText: 'Enter the technician token' }).waitFor();
    await page.fill('#token', ro);
    await row.locator('button[data-action="restart"]').click();
    await page.locator('#msg', { hasText: 'FLEET_FORBIDDEN' }).waitFor();
    assert.equal(await row.locator('.restarts').textContent(), '0');
    await page.fill('#token', tech);
    await row.locator('button[data-action="restart"]').click();
    await row.locator('.restarts', { hasText: /^1$/ }).waitFor({ timeout: 30_000 });
    await row.locator('.state', { hasText: 'running' }).waitFor({ timeout: 30_000 });
    assert.equal(a.supervisor.apps.get('sample')?.restarts, 1, 'the page shows what the supervisor counts');
    // the follower saw the restart as state changes in the stream
    await page.locator('#log div.sys', { hasText: /sample (stopped|backoff|starting|running).*restarts 1/ }).waitFor({ timeout: 15_000 });

    // crash-loop is flagged on the row, in a banner, and in the events list
    await page.locator('#alerts .banner', { hasText: 'crasher is crash-looping' }).waitFor({ timeout: 30_000 });
    assert.equal(await page.locator('[data-app="crasher"].crash .state').textContent(), 'CRASH-LOOP');
    await page.locator('#events li[data-type="app.crash-loop"]').waitFor({ timeout: 10_000 });

    // escaping: the crasher's markup shows as text and does not run
    await page.selectOption('#logapp', 'crasher');
    await page.locator('#log', { hasText: '<b>not bold</b><img src=x onerror=window.pwned=1>' }).waitFor({ timeout: 15_000 });
    assert.equal(await page.locator('#log b, #log img').count(), 0);
    assert.equal(await page.evaluate(() => (window as unknown as { pwned?: number }).pwned), undefined);

    // sparklines drawn from the history
    await page.locator('#mem polyline').waitFor({ state: 'attached', timeout: 15_000 });

    const desktop = join(SHOTS, 'agent-page-desktop.png');
    await page.screenshot({ path: desktop, fullPage: true });
    t.diagnostic(`screenshot: ${desktop}`);

    // a phone: 390x844, no horizontal scrolling, the restart button reachable
    const phone = await browser.newPage({ viewport: { width: 390, height: 844 }, deviceScaleFactor: 2, isMobile: true, hasTouch: true });
    const phoneErrors = watchErrors(phone);
    await phone.goto(`${base}/`);
    await phone.locator('[data-app="sample"] .state', { hasText: 'running' }).waitFor({ timeout: 30_000 });
    await phone.locator('#log', { hasText: 'sample-app' }).waitFor({ timeout: 15_000 });
    const width = await phone.evaluate(() => document.documentElement.scrollWidth);
    assert.ok(width <= 390, `page is ${width}px wide on a 390px phone`);
    const box = await phone.locator('[data-app="sample"] button[data-action="restart"]').boundingBox();
    assert.ok(box && box.x >= 0 && box.x + box.width <= 390 && box.height >= 36, `restart button on screen and touch-sized: ${JSON.stringify(box)}`);
    const mobile = join(SHOTS, 'agent-page-phone.png');
    await phone.screenshot({ path: mobile, fullPage: true });
    t.diagnostic(`screenshot: ${mobile}`);
    const firstScreen = join(SHOTS, 'agent-page-phone-first-screen.png');
    await phone.screenshot({ path: firstScreen });
    t.diagnostic(`screenshot: ${firstScreen}`);

    // strict CSP and no script errors: nothing was blocked or thrown (the one 403 is the
    // read-only token's restart above, which Chromium logs as a failed resource)
    assert.deepEqual([...errors.filter((e) => !/status of 403/.test(e)), ...phoneErrors], []);
    assert.equal(errors.filter((e) => /status of 403/.test(e)).length, 1);

    // followers are released when the browser goes away
    assert.ok((await streamsOpen(base)) >= 2, 'both pages follow a log');
    await browser.close();
    browser = null;
    await waitFor(async () => (await streamsOpen(base)) === 0, 'log streams closed after the browser left', 10_000);
  } finally {
    await browser?.close();
    await agent?.stop();
    tmp.cleanup();
  }
});

test('technician page in headless Chromium: upload a signed bundle, see it committed; a forged one refused with its code', async (t) => {
  assert.ok(existsSync(CHROMIUM), `${CHROMIUM} is missing: install Debian chromium (.ci/run does)`);
  mkdirSync(SHOTS, { recursive: true });
  const tmp = tempDir();
  let browser: Browser | null = null;
  let agent: AgentHandle | null = null;
  try {
    const keys = makeKeys();
    const state = join(tmp.dir, 'agent');
    installTrustRoot(state, keys);
    const good = await buildAppBundle({ dir: tmp.dir, keys, name: 'web', version: '1.0.0', sequence: 1 });
    // signed by a key the device does not trust
    const forged = await buildAppBundle({ dir: tmp.dir, keys: makeKeys(), name: 'web', version: '6.6.6', sequence: 9 });
    agent = await startAgent(
      AgentConfigSchema.parse({ deviceId: 'dev-upload', stateDir: state, api: { port: 0, rateLimit: 0 }, update: { probationMs: 500 } }),
      testLogger(),
      '1.2.3-test',
      { bundles },
    );
    const base = `http://127.0.0.1:${agent.apiPort}`;
    browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'] });
    const page = await browser.newPage({ viewport: { width: 1200, height: 1000 } });
    const errors = watchErrors(page);
    await page.goto(`${base}/`);
    await page.locator('#upcur', { hasText: 'no update in progress' }).waitFor({ timeout: 15_000 });
    await page.fill('#token', readFileSync(agent.tokenFiles.technician, 'utf8').trim());

    await page.setInputFiles('#bundle', good.file);
    await page.click('#upload');
    await page.locator('#upmsg', { hasText: 'accepted' }).waitFor({ timeout: 15_000 });
    await page.locator('#uphist li[data-state="committed"]', { hasText: 'web 1.0.0' }).waitFor({ timeout: 30_000 });
    await page.locator('[data-app="web"] .state', { hasText: 'running' }).waitFor({ timeout: 15_000 });

    await page.setInputFiles('#bundle', forged.file);
    await page.click('#upload');
    const refused = page.locator('#uphist li[data-state="failed"]');
    await refused.waitFor({ timeout: 30_000 });
    assert.match((await refused.textContent()) ?? '', /FLEET_BUNDLE_UNKNOWN_KEY/);
    assert.equal(agent.supervisor.apps.get('web')?.spec.command.includes('1.0.0'), true, 'still on 1.0.0');

    const shot = join(SHOTS, 'agent-page-updates.png');
    await page.screenshot({ path: shot, fullPage: true });
    t.diagnostic(`screenshot: ${shot}`);
    assert.deepEqual(errors, []);
  } finally {
    await browser?.close();
    await agent?.stop();
    tmp.cleanup();
  }
});
