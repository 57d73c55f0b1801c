import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { freshBrokerPerTest } from '../helpers/mosquitto.js';
import { tempDir, waitFor } from '../helpers/tmp.js';
import {
  collect,
  fleetDirs,
  publishJob,
  pullArgs,
  runWorkerOnce,
  slot,
  startWorker,
  testClient,
} from '../helpers/worker.js';

// --respawn: one process that stays up and runs each job in a fresh worker process, against a real Mosquitto.

const { broker } = freshBrokerPerTest();

const pids = (stderr: string): string[] =>
  [...stderr.matchAll(/started worker process (\d+)/g)].map((m) => m[1] as string);

describe('--respawn', () => {
  it('runs 20 jobs in one parent, each in a fresh worker process, backs off while the broker is down, stops on SIGTERM', {
    timeout: 120_000,
  }, async () => {
    const dirs = await fleetDirs();
    const id = slot('respawn');
    const client = await testClient(broker().url);
    const results = await collect(client, 'jobs/results/+');
    const parent = startWorker(pullArgs(broker().url, dirs, id, ['--respawn']));
    await parent.sawLog('waiting for one job');
    const ids = Array.from({ length: 20 }, (_, i) => `r-${i}`);
    for (const job of ids) await publishJob(client, { id: job, steps: ['true'] });
    await waitFor(() => new Set(results.map((r) => r.body.id)).size === ids.length, 60_000, 50);
    expect(parent.child.exitCode).toBeNull();

    // The broker goes away: the workers fail to connect and the parent backs off, then carries on.
    await broker().stop();
    await parent.sawLog(/starting the next one in \d+ ms[\s\S]*starting the next one in \d+ ms/, 30_000);
    await broker().resume();
    const after = await testClient(broker().url);
    const late = await collect(after, 'jobs/results/+');
    await publishJob(after, { id: 'after-restart', steps: ['true'] });
    await waitFor(() => late.some((r) => r.body.id === 'after-restart'), 60_000, 50);

    parent.child.kill('SIGTERM');
    const exit = await parent.exited;
    expect(exit.code, exit.stderr).toBe(0);
    // Its children logged to the same stderr: one fresh process per job, at least.
    expect(new Set(pids(exit.stderr)).size).toBeGreaterThanOrEqual(ids.length + 1);
    await client.endAsync();
    await after.endAsync();
  });

  it('on SIGTERM during a job stops it through the worker, exits 143, and the job runs on the next start', {
    timeout: 60_000,
  }, async () => {
    const dirs = await fleetDirs();
    const id = slot('respawn-term');
    const client = await testClient(broker().url);
    const results = await collect(client, 'jobs/results/+');
    const marker = path.join(await tempDir('mfw-respawn-'), 'ran');
    const parent = startWorker(pullArgs(broker().url, dirs, id, ['--respawn']));
    await parent.sawLog('waiting for one job');
    await publishJob(client, { id: 'long', steps: [`[ -e ${marker} ] || { touch ${marker}; sleep 30; }`] });
    await parent.sawLog('step 0 started');
    parent.child.kill('SIGTERM');
    const exit = await parent.exited;
    expect(exit.code, exit.stderr).toBe(143);
    expect(exit.stderr).toContain('stays queued');
    const next = await runWorkerOnce(pullArgs(broker().url, dirs, id, ['--idle-timeout', '5s']));
    expect(next.code, next.stderr).toBe(0);
    await waitFor(() => results.length === 1);
    expect(results[0]?.body).toMatchObject({ id: 'long', status: 'success', attempt: 2 });
    await client.endAsync();
  });
});
