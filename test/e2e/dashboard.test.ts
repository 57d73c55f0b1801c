import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { chromium } from 'playwright-core';
import { afterEach, describe, expect, it } from 'vitest';
import { freshBrokerPerTest } from '../helpers/mosquitto.js';
import { tempDir, waitFor } from '../helpers/tmp.js';
import {
  BIN,
  collect,
  fleetDirs,
  publishJob,
  pullArgs,
  registerSlots,
  slot,
  startWorker,
  testClient,
} from '../helpers/worker.js';

// The dashboard in a real browser (Debian's Chromium driven by Playwright): the page lists a busy slot, shows a
// running job's output as it grows, and its Cancel button stops the job.

const { broker } = freshBrokerPerTest();
const CHROMIUM = '/usr/bin/chromium';

// Every dashboard a test starts is stopped after it, whatever failed.
const started: ChildProcess[] = [];
afterEach(() => {
  for (const child of started.splice(0)) if (child.exitCode === null) child.kill('SIGKILL');
});

function startDashboard(args: string[]): ChildProcess & { stdout: NodeJS.ReadableStream } {
  const child = spawn(process.execPath, [BIN, 'dashboard', '--port', '0', ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  started.push(child);
  return child as ChildProcess & { stdout: NodeJS.ReadableStream };
}

describe.skipIf(!existsSync(CHROMIUM))('the dashboard in a browser', () => {
  it('lists a running slot, shows its job output as it grows, and cancels it', {
    timeout: 90_000,
  }, async () => {
    const url = broker().url;
    const dirs = await fleetDirs();
    const me = slot('dash');
    await registerSlots(url, dirs, [me]);
    const worker = startWorker(pullArgs(url, dirs, me));
    await worker.sawLog('waiting for one job');
    const dashboard = startDashboard(['--url', url, '--jobs-dir', dirs.jobs, '--allow-cancel']);
    const address = await new Promise<string>((resolve, reject) => {
      let out = '';
      dashboard.stdout.on('data', (chunk: Buffer) => {
        out += chunk.toString();
        if (out.includes('\n')) resolve(out.trim());
      });
      dashboard.once('exit', (code) => reject(new Error(`dashboard exited ${code}`)));
    });
    expect(address).toMatch(/^http:\/\/127\.0\.0\.1:\d+\/$/);
    const browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: [
        '--no-sandbox',
        '--disable-gpu',
        '--disable-background-networking',
        '--disable-component-update',
        '--no-first-run',
      ],
    });
    const client = await testClient(url);
    const results = await collect(client, 'jobs/results/+');
    try {
      const page = await browser.newPage();
      await page.goto(address);
      await page.locator('#status', { hasText: 'live' }).waitFor();
      await publishJob(client, {
        id: 'slow-talk',
        steps: ['for i in 1 2 3 4 5 6 7 8 9 10; do echo "tick $i"; sleep 0.3; done; sleep 60'],
      });
      // The slot turns busy with the job, the job appears: select it.
      await page.locator(`tr[data-slot="${me}"] td.busy`).waitFor();
      await page.locator('tr[data-job="slow-talk"]').click();
      await page.locator('#log', { hasText: 'tick 2' }).waitFor();
      // It grows while the page is open.
      await page.locator('#log', { hasText: 'tick 6' }).waitFor();
      await page.screenshot({ path: `${await tempDir('mfw-shot-')}/dashboard.png` });
      await page.locator('#cancel').click();
      await waitFor(() => results.length === 1, 30_000);
      expect(results[0]?.body).toMatchObject({ id: 'slow-talk', status: 'cancelled' });
      await page.locator('tr[data-job="slow-talk"] td.cancelled').waitFor();
      expect((await worker.exited).code).toBe(0);
    } finally {
      await browser.close();
      dashboard.kill('SIGTERM');
      await client.endAsync();
    }
    expect(await new Promise((resolve) => dashboard.once('exit', resolve))).toBe(0);
  });

  it('serves the page without --allow-cancel, and refuses a cancel then', async () => {
    const url = broker().url;
    const dashboard = startDashboard(['--url', url, '--jobs-dir', '/nowhere']);
    const address = await new Promise<string>((resolve) => {
      dashboard.stdout.once('data', (chunk: Buffer) => resolve(chunk.toString().trim()));
    });
    const page = await fetch(address);
    expect(page.status).toBe(200);
    expect(await page.text()).toContain('<title>mqtt-fs-worker fleet</title>');
    const refused = await fetch(`${address}api/cancel/some-job`, { method: 'POST' });
    expect(refused.status).toBe(403);
    dashboard.kill('SIGTERM');
  });
});
