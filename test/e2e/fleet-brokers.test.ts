import { existsSync } from 'node:fs';
import { mkdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Ejabberd, RabbitMq, type SuiteBroker } from '../helpers/erlang-brokers.js';
import { sleep, waitFor } from '../helpers/tmp.js';
import {
  type Exited,
  fleetDirs,
  killAndCount,
  publishJob,
  pullArgs,
  registerSlots,
  runWorkerOnce,
  type SlotArgs,
  slot,
  slotLoop,
  startWorker,
  testClient,
  workerArgs,
} from '../helpers/worker.js';

// The fleet on the brokers users run besides Mosquitto (test/e2e/dispatch.test.ts) and Aedes (brokers.test.ts):
// RabbitMQ 3.10 with its MQTT plugin (MQTT 3.1.1 only) and ejabberd 23.01's mod_mqtt, from Debian, each started
// once for its block on free loopback ports. One compact fleet per broker, and each edge the issue found there.

interface Case {
  readonly title: string;
  readonly start: () => Promise<SuiteBroker>;
  /** What a graceful broker restart does to requests queued for offline slots (measured: docs/brokers.md). */
  readonly restartKeepsQueued: boolean;
  /** Does the broker hand retained messages to a wildcard subscription (the slots' presence on `jobs/workers/+`)? */
  readonly retainedToWildcards: boolean;
}

const CASES: Case[] = [
  {
    title: 'RabbitMQ 3.10 + rabbitmq_mqtt, MQTT 3.1.1',
    start: () => RabbitMq.start(),
    restartKeepsQueued: true,
    retainedToWildcards: false,
  },
  {
    title: 'ejabberd 23.01 mod_mqtt, MQTT 5',
    start: () => Ejabberd.start('5'),
    restartKeepsQueued: false,
    retainedToWildcards: true,
  },
];

for (const c of CASES) {
  describe(c.title, () => {
    let broker: SuiteBroker;
    beforeAll(async () => {
      broker = await c.start();
    }, 180_000);
    afterAll(async () => {
      await broker?.dispose();
    }, 60_000);

    const args: SlotArgs = (url, dirs, id, extra = []) =>
      pullArgs(url, dirs, id, [...broker.clientArgs, ...extra]);
    const clientOptions = () => ({
      protocolVersion: broker.protocolVersion,
      ...(broker.username ? { username: broker.username, password: broker.password } : {}),
    });
    const brokerArgs = () => ['--url', broker.url, ...broker.clientArgs];

    it('runs a pull fleet with SIGKILLs mid-job: every job once, one result each', {
      timeout: 240_000,
    }, async () => {
      const tag = broker.name.toLowerCase();
      await killAndCount({
        url: broker.url,
        names: [`${tag}-1`, `${tag}-2`, `${tag}-3`],
        count: 12,
        kills: 3,
        args,
        client: clientOptions(),
      });
    });

    it('stops a $share/ slot with exit 7 within seconds, and doctor says why', {
      timeout: 60_000,
    }, async () => {
      const dirs = await fleetDirs();
      const shared = [...workerArgs(broker.url, dirs, slot(`${broker.name}-share`)), ...broker.clientArgs];
      const run = await runWorkerOnce(shared);
      expect(run.code, run.stderr).toBe(7);
      expect(run.stderr).toContain('BROKER_UNSUITABLE');
      expect(run.stderr).not.toMatch(/INTERNAL|\n\s+at /);
      const doctor = await runWorkerOnce(['doctor', ...shared]);
      expect(doctor.code).toBe(1);
      expect(doctor.stdout).toMatch(/^FAIL {2}broker .*shared subscriptions/m);
    });

    it("drain ends a gone slot's session: the requests queued in it go nowhere", {
      timeout: 90_000,
    }, async () => {
      const dirs = await fleetDirs();
      const gone = slot(`${broker.name}-drain`);
      await registerSlots(broker.url, dirs, [gone], args);
      const client = await testClient(broker.url, clientOptions());
      for (let i = 0; i < 3; i++) await publishJob(client, { id: `drained-${i}`, steps: ['true'] });
      await client.endAsync();
      const file = path.join(dirs.jobs, '.mqtt-fs-worker', 'slots', `${gone}.json`);
      expect(existsSync(file)).toBe(true);
      const drained = await runWorkerOnce([
        'drain',
        ...brokerArgs(),
        '--id',
        gone,
        '--force',
        '--jobs-dir',
        dirs.jobs,
      ]);
      expect(drained.code, drained.stderr).toBe(0);
      // Its presence goes too, from the broker and from the drive: `workers` no longer lists it.
      expect(existsSync(file)).toBe(false);
      // The slot's next start finds no session, hence none of the three.
      const next = await runWorkerOnce(args(broker.url, dirs, gone, ['--idle-timeout', '1s']));
      expect(next.code, next.stderr).toBe(0);
      expect(next.stderr).toContain('session=new');
      expect(next.stderr).not.toContain('step 0 started');
    });

    it('lists the fleet in workers, from the broker or from the drive', { timeout: 60_000 }, async () => {
      const dirs = await fleetDirs();
      const id = slot(`${broker.name}-seen`);
      const worker = startWorker(args(broker.url, dirs, id));
      await worker.sawLog('waiting for one job');
      const stateIn = async (jobsDir: string) => {
        const listed = await runWorkerOnce(['workers', ...brokerArgs(), '--jobs-dir', jobsDir, '--json']);
        const rows = JSON.parse(listed.stdout || '[]') as { id: string; state: string }[];
        return rows.find((row) => row.id === id)?.state;
      };
      await waitFor(async () => (await stateIn(dirs.jobs)) === 'idle', 20_000, 200);
      // From the broker alone (a jobs directory without the slots' files): only where it hands retained
      // messages to a wildcard subscription.
      const elsewhere = (await fleetDirs()).jobs;
      expect(await stateIn(elsewhere)).toBe(c.retainedToWildcards ? 'idle' : undefined);
      worker.child.kill('SIGTERM');
      expect((await worker.exited).code).toBe(0);
    });

    it('answers submit --wait for a job finished before it asked, on its reply topic', {
      timeout: 60_000,
    }, async () => {
      const dirs = await fleetDirs();
      const id = slot(`${broker.name}-replies`);
      await mkdir(path.join(dirs.jobs, 'asked-twice'));
      const submit = () =>
        runWorkerOnce([
          'submit',
          'asked-twice',
          ...brokerArgs(),
          '--steps',
          'echo once >> count.txt',
          '--wait',
          '--timeout',
          '30s',
        ]);
      const first = startWorker(args(broker.url, dirs, id));
      await first.sawLog('waiting for one job');
      expect((await submit()).code).toBe(0);
      expect((await first.exited).code).toBe(0);
      const second = startWorker(args(broker.url, dirs, id));
      await second.sawLog('waiting for one job');
      const again = await submit();
      expect(again.code, again.stderr).toBe(0);
      expect(JSON.parse(again.stdout)).toMatchObject({ id: 'asked-twice', status: 'success', attempt: 1 });
      second.child.kill('SIGTERM');
      expect((await second.exited).stderr).toContain("answering on the request's response topic");
      expect(await readFile(path.join(dirs.jobs, 'asked-twice/results/count.txt'), 'utf8')).toBe('once\n');
    });

    it(`loses ${c.restartKeepsQueued ? 'nothing' : 'what was queued'} on a graceful restart; submit --confirm loses nothing`, {
      timeout: 240_000,
    }, async () => {
      const dirs = await fleetDirs();
      const slots = [1, 2].map((n) => slot(`${broker.name}-restart-${n}`));
      await registerSlots(broker.url, dirs, slots, args);
      const plain = [0, 1, 2, 3, 4, 5].map((i) => `plain-${i}`);
      const confirmed = [0, 1, 2, 3].map((i) => `confirmed-${i}`);
      for (const id of [...plain, ...confirmed]) await mkdir(path.join(dirs.jobs, id));
      const client = await testClient(broker.url, clientOptions());
      for (const id of plain) await publishJob(client, { id, steps: ['true'] });
      await client.endAsync();
      const submits = confirmed.map((id) => {
        const run = startWorker([
          'submit',
          id,
          ...brokerArgs(),
          '--jobs-dir',
          dirs.jobs,
          '--steps',
          'true',
          '--wait',
          '--confirm',
          '1s',
          '--timeout',
          '180s',
          '--connect-timeout',
          '2s',
        ]);
        return { run, published: run.sawLog('published job', 30_000) };
      });
      await Promise.all(submits.map((s) => s.published));
      await broker.stop('SIGTERM');
      await broker.resume();
      const loops = slots.map((id) =>
        slotLoop(() => args(broker.url, dirs, id, ['--idle-timeout', '2s', '--connect-timeout', '2s'])),
      );
      const answers = await Promise.all(submits.map((s) => s.run.exited));
      const looped = (await Promise.all(loops.map((loop) => loop.stop()))).flat();
      for (const [i, answer] of answers.entries()) {
        expect(answer.code, `${confirmed[i]}: ${answer.stderr}`).toBe(0);
        expect(JSON.parse(answer.stdout)).toMatchObject({ id: confirmed[i], status: 'success' });
      }
      // Whatever is still queued in the slots' sessions is taken now: each slot runs until a run finds nothing.
      for (const id of slots) await runUntilIdle(() => args(broker.url, dirs, id, ['--idle-timeout', '1s']));
      const ran = plain.filter((id) => existsSync(path.join(dirs.jobs, id, 'results/result.json')));
      if (c.restartKeepsQueued) {
        expect(ran).toEqual(plain);
      } else {
        expect(ran).toEqual([]);
        expect(looped.map((run) => run.stderr).join('\n')).toContain('SESSION LOST');
      }
    });

    if (c.title.startsWith('ejabberd')) {
      it("doctor reports the session expiry the broker grants a slot (ejabberd's cap)", async () => {
        const dirs = await fleetDirs();
        const doctor = await runWorkerOnce(['doctor', ...args(broker.url, dirs, slot('ejabberd-doctor'))]);
        expect(doctor.stdout).toMatch(
          /^ok {4}broker .*keeps this slot's session for 300s only \(asked for 86400s\)/m,
        );
      });

      it('stops a $share/ slot on MQTT 3.1.1 too: exit 7, never INTERNAL, never a restart loop', async () => {
        const dirs = await fleetDirs();
        const run = await runWorkerOnce([
          ...workerArgs(broker.url, dirs, slot('ejabberd-share-311')),
          ...broker.clientArgs,
          '--protocol',
          '3.1.1',
        ]);
        expect(run.code, run.stderr).toBe(7);
        expect(run.stderr).toContain('BROKER_UNSUITABLE');
        expect(run.stderr).not.toMatch(/INTERNAL|\n\s+at /);
      });
    }
  });
}

/** Runs a slot again and again until one of its runs takes no job (its session has nothing left). */
async function runUntilIdle(args: () => string[]): Promise<Exited[]> {
  const runs: Exited[] = [];
  for (let i = 0; i < 20; i++) {
    const run = await runWorkerOnce(args());
    runs.push(run);
    expect(run.code, run.stderr).toBe(0);
    if (!run.stderr.includes('step 0 started')) return runs;
    await sleep(50);
  }
  throw new Error(`the slot kept finding jobs:\n${runs.map((r) => r.stderr).join('\n---\n')}`);
}
