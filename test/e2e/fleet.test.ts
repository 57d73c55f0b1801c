import { mkdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { freshBrokerPerTest } from '../helpers/mosquitto.js';
import { sleep, tempDir, waitFor } from '../helpers/tmp.js';
import {
  collect,
  fleetDirs,
  publishJob,
  registerSlots,
  slot,
  slotLoop,
  testClient,
  workerArgs,
} from '../helpers/worker.js';

// Fleets of one-shot workers in restart loops (as `restart: always` runs them) against a real Mosquitto.

const { broker } = freshBrokerPerTest();

async function fleet(slots: string[]) {
  const dirs = await fleetDirs();
  const ledger = await tempDir('mfw-ledger-');
  await registerSlots(broker().url, dirs, slots, workerArgs);
  return { dirs, ledger };
}

describe('a fleet of slots', () => {
  it('runs 3 slots x 30 jobs, each job exactly once', { timeout: 180_000 }, async () => {
    const slots = [slot('slot-1'), slot('slot-2'), slot('slot-3')];
    const { dirs, ledger } = await fleet(slots);
    const client = await testClient(broker().url);
    const results = await collect(client, 'jobs/results/+');
    const ids = Array.from({ length: 90 }, (_, i) => `job-${i}`);
    for (const id of ids) await mkdir(path.join(dirs.jobs, id));
    for (const id of ids)
      await publishJob(client, { id, steps: [`echo "$JOB_WORKER_ID" >> ${ledger}/${id}`] });
    const loops = slots.map((slot) => slotLoop(() => workerArgs(broker().url, dirs, slot)));
    await waitFor(() => new Set(results.map((r) => r.body.id)).size === ids.length, 150_000, 200);
    const runs = (await Promise.all(loops.map((loop) => loop.stop()))).flat();
    // Every run exits 0 after its job; the last run of each slot is stopped by SIGTERM while waiting (0), or
    // before it had even installed its handlers (killed by the signal).
    const unexpected = runs.filter(
      (run) => run.code !== 0 && !(run.code === null && run.signal === 'SIGTERM'),
    );
    expect(unexpected.map((run) => run.stderr)).toEqual([]);
    expect(results.every((r) => r.body.status === 'success' && r.body.attempt === 1)).toBe(true);
    expect(results).toHaveLength(ids.length);
    for (const id of ids) {
      const lines = (await readFile(path.join(ledger, id), 'utf8')).trim().split('\n');
      expect(lines, id).toHaveLength(1);
    }
    // Every slot took its share (Mosquitto deals round robin).
    const bySlot = new Map<string, number>();
    for (const r of results)
      bySlot.set(String(r.body.workerId), (bySlot.get(String(r.body.workerId)) ?? 0) + 1);
    expect([...bySlot.values()]).toEqual([30, 30, 30]);
    await client.endAsync();
  });

  it('loses no job when workers are SIGKILLed at random in restart loops (chaos)', {
    timeout: 240_000,
  }, async () => {
    const slots = [slot('chaos-1'), slot('chaos-2'), slot('chaos-3')];
    const { dirs, ledger } = await fleet(slots);
    const client = await testClient(broker().url);
    const results = await collect(client, 'jobs/results/+');
    const ids = Array.from({ length: 36 }, (_, i) => `chaos-${i}`);
    for (const id of ids) await mkdir(path.join(dirs.jobs, id));
    for (const id of ids) {
      await publishJob(client, {
        id,
        steps: [`echo "$JOB_ATTEMPT" >> ${ledger}/${id}; sleep 0.$((RANDOM % 6 + 2))`],
      });
    }
    const loops = slots.map((slot) => slotLoop(() => workerArgs(broker().url, dirs, slot)));
    // A seeded sequence of kills: reproducible, and it hits every phase (connecting, staging, running, publishing).
    let seed = 42;
    const random = (): number => {
      seed = (seed * 1103515245 + 12345) % 2 ** 31;
      return seed / 2 ** 31;
    };
    let kills = 0;
    const chaosUntil = Date.now() + 15_000;
    while (Date.now() < chaosUntil) {
      await sleep(150 + random() * 600);
      const victim = loops[Math.floor(random() * loops.length)]?.current();
      if (victim && victim.child.exitCode === null) {
        victim.child.kill('SIGKILL');
        kills++;
      }
    }
    await waitFor(() => new Set(results.map((r) => r.body.id)).size === ids.length, 180_000, 200);
    await Promise.all(loops.map((loop) => loop.stop()));
    expect(kills).toBeGreaterThan(10);
    const finished = new Map<string, Record<string, unknown>>();
    for (const r of results) finished.set(String(r.body.id), r.body);
    expect([...finished.keys()].sort()).toEqual([...ids].sort());
    for (const id of ids) {
      expect(finished.get(id)?.status, id).toBe('success');
      const manifest = JSON.parse(await readFile(path.join(dirs.jobs, id, 'results/result.json'), 'utf8'));
      expect(manifest.status).toBe('success');
    }
    // Some jobs were really interrupted and taken over.
    const retried = results.filter((r) => Number(r.body.attempt) > 1);
    expect(retried.length).toBeGreaterThan(0);
    await client.endAsync();
  });
});
