import { mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { freshBrokerPerTest } from '../helpers/mosquitto.js';
import { sleep, tempDir, waitFor, writeTree } from '../helpers/tmp.js';
import {
  BIN,
  collect,
  expectAllSucceeded,
  fleetDirs,
  publishJob,
  pullArgs,
  type Running,
  registerSlots,
  runWorkerOnce,
  type SlotArgs,
  slot,
  slotLoop,
  startProcess,
  startWorker,
  testClient,
  workerArgs,
} from '../helpers/worker.js';

// Fleet dispatch against a real Mosquitto: pull (every slot sees every request, the claim decides) against
// shared subscriptions, slots that die for good, one process per worker id, dry runs beside slots.

const { broker } = freshBrokerPerTest();

type Dirs = { jobs: string; workspaces: string };

async function registerAll(dirs: Dirs, ids: string[], args: SlotArgs = pullArgs): Promise<void> {
  await registerSlots(broker().url, dirs, ids, args);
}

/** A job that runs until the test lets it go (no clock in the test's verdict). */
function heldJob(flag: string): { steps: string[] } {
  return { steps: [`while [ ! -e ${flag} ]; do sleep 0.05; done`] };
}

type Result = { topic: string; body: Record<string, unknown> };

/** Bounded fan-out of 2: slots `x-1`, `x-3` share one group, `x-2`, `x-4` the other (their ordinals). */
const fanout2: SlotArgs = (url, dirs, id, extra = []) => pullArgs(url, dirs, id, ['--fanout', '2', ...extra]);

const ids = (results: Result[]): string[] => results.map((r) => String(r.body.id));

/** Long job first, then 12 short ones, through 3 slots; returns which short jobs finished while the long one ran. */
async function headOfLine(args: typeof pullArgs): Promise<{ whileLong: string[]; results: Result[] }> {
  const dirs = await fleetDirs();
  const flag = path.join(await tempDir('mfw-flag-'), 'go');
  const slots = ['hol-1', 'hol-2', 'hol-3'].map(slot);
  await registerAll(dirs, slots, args);
  const client = await testClient(broker().url);
  const results = await collect(client, 'jobs/results/+');
  const shorts = Array.from({ length: 12 }, (_, i) => `short-${i}`);
  await publishJob(client, { id: 'long', ...heldJob(flag) });
  for (const id of shorts) await publishJob(client, { id, steps: ['sleep 0.3'] });
  const loops = slots.map((id) => slotLoop(() => args(broker().url, dirs, id)));
  // The shorts that can finish while the long job holds its slot: all of them, or those not dealt to it.
  let seen = -1;
  while (seen !== results.length) {
    seen = results.length;
    if (seen === shorts.length) break;
    await sleep(4000);
  }
  const whileLong = ids(results);
  await writeFile(flag, '');
  await waitFor(() => new Set(ids(results)).size === shorts.length + 1, 60_000, 50);
  await Promise.all(loops.map((loop) => loop.stop()));
  await client.endAsync();
  return { whileLong, results };
}

describe('pull dispatch', () => {
  it('never makes a short job wait for a long one: idle slots take the next job', {
    timeout: 120_000,
  }, async () => {
    const { whileLong, results } = await headOfLine(pullArgs);
    expect(whileLong.sort()).toEqual(Array.from({ length: 12 }, (_, i) => `short-${i}`).sort());
    expect(results.every((r) => r.body.status === 'success')).toBe(true);
    expect(results).toHaveLength(13); // one result message per job
  });

  it('with --fanout 2 (each request reaches one slot in each of two share groups), no short job waits either', {
    timeout: 120_000,
  }, async () => {
    const { whileLong, results } = await headOfLine(fanout2);
    expect(whileLong.sort()).toEqual(Array.from({ length: 12 }, (_, i) => `short-${i}`).sort());
    expect(results.every((r) => r.body.status === 'success')).toBe(true);
    expect(results).toHaveLength(13);
  });

  it('Mosquitto deals equal fan-out groups in step (fixed pairs) and groups of 3 and 4 to every pair', async () => {
    // What `workers` warns about: with --fanout 2 and groups of equal size, a request's two copies always reach
    // the same two slots; sizes with no common factor go through all of the groups' pairs.
    const pairsSeen = async (sizes: number[], topic: string): Promise<number> => {
      const copies = new Map<string, string[]>();
      const members = await Promise.all(
        sizes.flatMap((size, g) =>
          Array.from({ length: size }, async (_, i) => {
            const member = await testClient(broker().url);
            member.on('message', (_t, payload) => {
              const id = payload.toString();
              copies.set(id, [...(copies.get(id) ?? []), `g${g}-${i}`].sort());
            });
            await member.subscribeAsync(`$share/mqtt-fs-worker-fanout-${g}/${topic}`, { qos: 1 });
            return member;
          }),
        ),
      );
      const publisher = await testClient(broker().url);
      for (let j = 0; j < 24; j++) await publisher.publishAsync(topic, String(j), { qos: 1 });
      await waitFor(() => [...copies.values()].filter((c) => c.length === 2).length === 24);
      await Promise.all([publisher, ...members].map((client) => client.endAsync()));
      return new Set([...copies.values()].map((c) => c.join('+'))).size;
    };
    expect(await pairsSeen([4, 4], 'lockstep/even')).toBe(4);
    expect(await pairsSeen([3, 4], 'lockstep/coprime')).toBe(12);
  });

  it('with a shared subscription, jobs dealt to the busy slot wait for its long job (the price)', {
    timeout: 120_000,
  }, async () => {
    const { whileLong, results } = await headOfLine(workerArgs);
    // Mosquitto dealt every third short job to the long job's slot at publish time: those, and only those, waited
    // for it, and its slot ran them once the long job let go.
    const longSlot = results.find((r) => r.body.id === 'long')?.body.workerId;
    const waited = results.filter((r) => r.body.id !== 'long' && !whileLong.includes(String(r.body.id)));
    expect(waited.length).toBeGreaterThan(0);
    expect(waited.map((r) => r.body.workerId)).toEqual(waited.map(() => longSlot));
    expect(results.every((r) => r.body.status === 'success')).toBe(true);
  });

  it('publishes exactly one result per job and runs each once, with 3 slots and 30 jobs', {
    timeout: 150_000,
  }, async () => {
    const dirs = await fleetDirs();
    const ledger = await tempDir('mfw-ledger-');
    const slots = ['one-1', 'one-2', 'one-3'].map(slot);
    await registerAll(dirs, slots);
    const client = await testClient(broker().url);
    const results = await collect(client, 'jobs/results/+');
    const jobs = Array.from({ length: 30 }, (_, i) => `once-${i}`);
    for (const id of jobs) await mkdir(path.join(dirs.jobs, id));
    for (const id of jobs)
      await publishJob(client, { id, steps: [`echo "$JOB_WORKER_ID" >> ${ledger}/${id}`] });
    const loops = slots.map((id) => slotLoop(() => pullArgs(broker().url, dirs, id)));
    await waitFor(() => new Set(ids(results)).size === jobs.length, 120_000, 100);
    // Every slot goes through the whole backlog: let each one skip what is left, then count.
    await waitFor(async () => (await readdir(path.join(dirs.jobs, '.mqtt-fs-worker/running'))).length === 0);
    await sleep(2000);
    const runs = (await Promise.all(loops.map((loop) => loop.stop()))).flat();
    expect(ids(results).sort()).toEqual([...jobs].sort());
    expect(results.every((r) => r.body.status === 'success' && r.body.attempt === 1)).toBe(true);
    for (const id of jobs)
      expect((await readFile(path.join(ledger, id), 'utf8')).trim().split('\n')).toHaveLength(1);
    // Skipping costs no process: fewer runs than deliveries (3 slots x 30 copies).
    expect(runs.length).toBeLessThan(jobs.length + 3 * 3);
    await client.endAsync();
  });

  it('finishes the job of a slot that dies for good on another slot of the same host, at once', {
    timeout: 90_000,
  }, async () => {
    const dirs = await fleetDirs();
    const flag = path.join(await tempDir('mfw-flag-'), 'go');
    const [a, b] = ['gone-a', 'gone-b'].map(slot) as [string, string];
    await registerAll(dirs, [a, b]);
    const client = await testClient(broker().url);
    const results = await collect(client, 'jobs/results/+');
    const loopA = slotLoop(() => pullArgs(broker().url, dirs, a));
    await loopA.current()?.sawLog('waiting for one job');
    await publishJob(client, { id: 'orphan', ...heldJob(flag) });
    await (loopA.current() as Running).sawLog('step 0 started');
    await loopA.retire();
    // Slot b starts only now: its copy of the request says "claimed", the index says its worker is gone.
    const loopB = slotLoop(() => pullArgs(broker().url, dirs, b));
    await (loopB.current() as Running).sawLog('taking over');
    await writeFile(flag, '');
    await waitFor(() => results.length === 1, 30_000);
    expect(results[0]?.body).toMatchObject({ id: 'orphan', status: 'success', attempt: 2, workerId: b });
    await loopB.stop();
    await client.endAsync();
  });

  it('takes over from a worker on another host once its heartbeat is older than --claim-lease', {
    timeout: 90_000,
  }, async () => {
    const dirs = await fleetDirs();
    const [far, near] = ['far', 'near'].map(slot) as [string, string];
    await registerAll(dirs, [far, near]);
    const client = await testClient(broker().url);
    const results = await collect(client, 'jobs/results/+');
    // The far slot runs in a UTS namespace of its own: another host name, as a worker on another host has.
    const farArgs = pullArgs(broker().url, dirs, far, ['--claim-lease', '3s']);
    const farWorker = startProcess('unshare', [
      '--uts',
      'sh',
      '-c',
      `hostname far-host && exec "$0" "$@"`,
      process.execPath,
      BIN,
      ...farArgs,
    ]);
    await publishJob(client, { id: 'remote', steps: ['sleep 1; echo "$JOB_ATTEMPT" > attempt.txt'] });
    await farWorker.sawLog('step 0 started');
    farWorker.child.kill('SIGKILL');
    await farWorker.exited;
    const claim = JSON.parse(
      await readFile(path.join(dirs.jobs, 'remote/results/.mqtt-fs-worker.claim.1'), 'utf8'),
    ) as { host: string };
    expect(claim.host).toBe('far-host');
    const nearWorker = startWorker(pullArgs(broker().url, dirs, near, ['--claim-lease', '3s']));
    await nearWorker.sawLog(/sent no heartbeat for \d+s/, 20_000);
    expect((await nearWorker.exited).code).toBe(0);
    await waitFor(() => results.length === 1, 10_000);
    expect(results[0]?.body).toMatchObject({ id: 'remote', status: 'success', attempt: 2, workerId: near });
    expect(await readFile(path.join(dirs.jobs, 'remote/results/attempt.txt'), 'utf8')).toBe('2\n');
    await client.endAsync();
  });
});

describe('one worker id, one process', () => {
  it('refuses a second process with the same id (exit 6) and leaves the holder and its job alone', {
    timeout: 60_000,
  }, async () => {
    const dirs = await fleetDirs();
    const flag = path.join(await tempDir('mfw-flag-'), 'go');
    const id = slot('twin');
    const client = await testClient(broker().url);
    const results = await collect(client, 'jobs/results/+');
    const holder = startWorker(pullArgs(broker().url, dirs, id));
    await holder.sawLog('waiting for one job');
    await publishJob(client, { id: 'held', ...heldJob(flag) });
    await holder.sawLog('step 0 started');
    const twin = await runWorkerOnce(pullArgs(broker().url, dirs, id, ['--idle-timeout', '1s']));
    expect(twin.code).toBe(6);
    expect(twin.stderr).toContain(`ID_IN_USE: worker id ${id} is already held by another process`);
    expect(await readdir(path.join(dirs.workspaces, id))).toEqual(['held']);
    await writeFile(flag, '');
    expect((await holder.exited).code).toBe(0);
    await waitFor(() => results.length === 1);
    expect(results[0]?.body).toMatchObject({ id: 'held', status: 'success', attempt: 1 });
    await client.endAsync();
  });

  it('gives each dry run an identity of its own: two at once and a slot beside them all succeed', {
    timeout: 60_000,
  }, async () => {
    const dirs = await fleetDirs();
    const flag = path.join(await tempDir('mfw-flag-'), 'go');
    const id = slot('beside');
    const client = await testClient(broker().url);
    const results = await collect(client, 'jobs/results/+');
    const worker = startWorker(pullArgs(broker().url, dirs, id));
    await worker.sawLog('waiting for one job');
    await publishJob(client, { id: 'fleet-job', ...heldJob(flag) });
    await worker.sawLog('step 0 started');
    const local = await tempDir('mfw-dry-');
    await writeTree(local, {
      'one.json': JSON.stringify({ id: 'dry-1', steps: ['sleep 1; echo "$JOB_WORKER_ID" > who'] }),
      'two.json': JSON.stringify({ id: 'dry-2', steps: ['sleep 1; echo "$JOB_WORKER_ID" > who'] }),
    });
    const dry = (file: string) =>
      runWorkerOnce(
        ['--dry-run', file, '--jobs-dir', dirs.jobs, '--workspaces-dir', dirs.workspaces],
        {},
        local,
      );
    const [one, two] = await Promise.all([dry('one.json'), dry('two.json')]);
    expect(one.code, one.stderr).toBe(0);
    expect(two.code, two.stderr).toBe(0);
    const who = await Promise.all(
      ['dry-1', 'dry-2'].map((job) => readFile(path.join(dirs.jobs, job, 'results/who'), 'utf8')),
    );
    expect(new Set(who.map((w) => w.trim()))).toEqual(new Set(['dry-run-1', 'dry-run-2']));
    // The slot's workspace and job were untouched.
    expect(await readdir(path.join(dirs.workspaces, id))).toEqual(['fleet-job']);
    await writeFile(flag, '');
    expect((await worker.exited).code).toBe(0);
    await waitFor(() => results.length === 1);
    expect(results[0]?.body).toMatchObject({ id: 'fleet-job', status: 'success', attempt: 1 });
    await client.endAsync();
  });

  it('runs a job through the fleet after a dry run of the same id left its result', async () => {
    const dirs = await fleetDirs();
    const id = slot('after-dry');
    await writeTree(dirs.jobs, {
      'same/job.json': JSON.stringify({ steps: ['echo "$JOB_WORKER_ID" > who'] }),
    });
    const local = await tempDir('mfw-dry-');
    await writeFile(path.join(local, 'p.json'), JSON.stringify({ id: 'same' }));
    const dry = await runWorkerOnce(
      ['--dry-run', 'p.json', '--jobs-dir', dirs.jobs, '--workspaces-dir', dirs.workspaces],
      {},
      local,
    );
    expect(dry.code, dry.stderr).toBe(0);
    const client = await testClient(broker().url);
    const results = await collect(client, 'jobs/results/+');
    const worker = startWorker(pullArgs(broker().url, dirs, id));
    await worker.sawLog('waiting for one job');
    await publishJob(client, { id: 'same' });
    expect((await worker.exited).code).toBe(0);
    await waitFor(() => results.length === 1);
    expect(results[0]?.body).toMatchObject({ id: 'same', status: 'success', workerId: id });
    expect((await readFile(path.join(dirs.jobs, 'same/results/who'), 'utf8')).trim()).toBe(id);
    await client.endAsync();
  });
});

describe('clean sessions', () => {
  it('--clean with a shared subscription leaves no ghost member: the next job reaches the next worker', {
    timeout: 60_000,
  }, async () => {
    const dirs = await fleetDirs();
    const clean = (id: string) => workerArgs(broker().url, dirs, id, ['--clean']);
    const client = await testClient(broker().url);
    const results = await collect(client, 'jobs/results/+');
    for (const [n, id] of ['clean-1', 'clean-2', 'clean-3'].map(slot).entries()) {
      const worker = startWorker(clean(id));
      const submitted = runWorkerOnce([
        'submit',
        `c-${n}`,
        '--url',
        broker().url,
        '--topic',
        '$share/workers/jobs/pending',
        '--steps',
        'true',
        '--wait',
        '--timeout',
        '20s',
      ]);
      expect((await worker.exited).code).toBe(0);
      const done = await submitted;
      expect(done.code, done.stderr).toBe(0);
    }
    expect(ids(results)).toEqual(['c-0', 'c-1', 'c-2']);
    await client.endAsync();
  });
});

describe('chaos', () => {
  for (const [mode, args] of [
    ['pull', pullArgs],
    ['--fanout 2', fanout2],
  ] as const)
    it(`loses nothing with SIGKILLs, a broker restart and a slot retired for good mid-job (${mode})`, {
      timeout: 240_000,
    }, async () => {
      const dirs = await fleetDirs();
      const ledger = await tempDir('mfw-ledger-');
      const slots = ['pc-1', 'pc-2', 'pc-3', 'pc-4'].map((name) =>
        slot(`${name}-${mode === 'pull' ? 'p' : 'f'}`),
      );
      await registerAll(dirs, slots, args);
      // A persistent session of its own: results published while the broker restarts and this client reconnects
      // wait for it instead of going by.
      const client = await testClient(broker().url, {
        reconnectPeriod: 200,
        clean: false,
        clientId: slot(`chaos-watcher-${mode === 'pull' ? 'p' : 'f'}`),
        properties: { sessionExpiryInterval: 3600 },
      });
      const results = await collect(client, 'jobs/results/+');
      const jobs = Array.from({ length: 40 }, (_, i) => `pc-${i}`);
      for (const id of jobs) await mkdir(path.join(dirs.jobs, id));
      for (const id of jobs)
        await publishJob(client, {
          id,
          steps: [`echo "$JOB_ATTEMPT" >> ${ledger}/${id}; sleep 0.$((RANDOM % 5 + 2))`],
        });
      const loops = slots.map((id) =>
        slotLoop(() => args(broker().url, dirs, id, ['--connect-timeout', '2s'])),
      );
      let seed = 7;
      const random = (): number => {
        seed = (seed * 1103515245 + 12345) % 2 ** 31;
        return seed / 2 ** 31;
      };
      const retired = loops[3] as (typeof loops)[number];
      await (retired.current() as Running).sawLog('step 0 started', 60_000);
      await retired.retire();
      let kills = 0;
      const chaosUntil = Date.now() + 12_000;
      let restarted = false;
      while (Date.now() < chaosUntil) {
        await sleep(200 + random() * 600);
        if (!restarted && Date.now() > chaosUntil - 6000) {
          await broker().stop('SIGTERM');
          await broker().resume();
          restarted = true;
        }
        const victim = loops[Math.floor(random() * 3)]?.current();
        if (victim && victim.child.exitCode === null) {
          victim.child.kill('SIGKILL');
          kills++;
        }
      }
      try {
        await waitFor(() => new Set(ids(results)).size === jobs.length, 180_000, 200);
      } finally {
        const runs = (await Promise.all(loops.slice(0, 3).map((loop) => loop.stop()))).flat();
        const missing = jobs.filter((id) => !ids(results).includes(id));
        if (missing.length > 0) {
          const found = await Promise.all(
            missing.map((id) => readdir(path.join(dirs.jobs, id, 'results')).catch(() => [])),
          );
          console.error(`missing ${missing.map((id, i) => `${id}: ${found[i]?.join(',')}`).join('; ')}`);
          console.error(runs.map((r) => r.stderr).join('\n---\n'));
        }
      }
      expect(kills).toBeGreaterThan(5);
      await expectAllSucceeded(dirs.jobs, jobs, results);
      await client.endAsync();
    });
});

describe('preflight: a slot that cannot run jobs takes none', () => {
  it('exits 8 before connecting when the jobs directory is missing, and 2 for defaults above the ceilings', async () => {
    const dirs = await fleetDirs();
    const missing = { ...dirs, jobs: path.join(dirs.jobs, 'not-mounted') };
    const run = await runWorkerOnce(pullArgs(broker().url, missing, slot('pre-1'), ['--idle-timeout', '1s']));
    expect(run.code, run.stderr).toBe(8);
    expect(run.stderr).toContain('NOT_READY: the jobs directory');
    expect(run.stderr).toContain('is the shared drive mounted?');
    expect(run.stderr).not.toContain('connected to the broker');
    const ceilings = await runWorkerOnce(
      pullArgs(broker().url, dirs, slot('pre-1'), ['--cpus', '3', '--max-cpus', '2', '--idle-timeout', '1s']),
    );
    expect(ceilings.code, ceilings.stderr).toBe(2);
    expect(ceilings.stderr).toContain("--cpus is 3, above the worker's ceiling of 2");
  });

  it('doctor prints each check: all ok here, and a FAIL line with exit 1 for a missing jobs directory', async () => {
    const dirs = await fleetDirs();
    const args = (jobs: string) => ['doctor', ...pullArgs(broker().url, { ...dirs, jobs }, slot('doc'))];
    const good = await runWorkerOnce(args(dirs.jobs));
    expect(good.code, good.stdout + good.stderr).toBe(0);
    for (const name of ['jobs directory', 'workspaces directory', 'limits', 'cgroups', 'broker'])
      expect(good.stdout).toMatch(new RegExp(`^ok +${name}`, 'm'));
    const bad = await runWorkerOnce(args(path.join(dirs.jobs, 'gone')));
    expect(bad.code).toBe(1);
    expect(bad.stdout).toMatch(/^FAIL +jobs directory .*does not exist/m);
  });

  it('leaves a request unacknowledged and exits 8 when the jobs directory goes away while it waits', async () => {
    const dirs = await fleetDirs();
    const id = slot('pre-2');
    const client = await testClient(broker().url);
    const results = await collect(client, 'jobs/results/+');
    const worker = startWorker(pullArgs(broker().url, dirs, id));
    await worker.sawLog('waiting for one job');
    const { rename } = await import('node:fs/promises');
    await rename(dirs.jobs, `${dirs.jobs}.away`);
    await publishJob(client, { id: 'kept', steps: ['true'] });
    const exit = await worker.exited;
    expect(exit.code, exit.stderr).toBe(8);
    expect(exit.stderr).toContain('job kept stays queued');
    // The drive is back: the slot's next run gets the same request and runs it.
    await rename(`${dirs.jobs}.away`, dirs.jobs);
    const next = await runWorkerOnce(pullArgs(broker().url, dirs, id, ['--idle-timeout', '5s']));
    expect(next.code, next.stderr).toBe(0);
    await waitFor(() => results.length === 1);
    expect(results[0]?.body).toMatchObject({ id: 'kept', status: 'success' });
    await client.endAsync();
  });
});
