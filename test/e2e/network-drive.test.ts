import { appendFile, mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { acquireClaim, inspectClaim, markPublished, selfIdentity } from '../../src/worker/claim.js';
import { addRunning } from '../../src/worker/running-index.js';
import { freshBrokerPerTest } from '../helpers/mosquitto.js';
import {
  DEFAULTS,
  FRESH,
  type Mounted,
  onHost,
  SHORT,
  sshfsAvailable,
  sshfsPerFile,
} from '../helpers/sshfs.js';
import { sleep, tempDir, waitFor } from '../helpers/tmp.js';
import {
  collect,
  publishJob,
  pullArgs,
  registerSlots,
  runWorkerOnce,
  slot,
  slotLoop,
  testClient,
} from '../helpers/worker.js';

// The shared drive as fleets have it: one folder served over SFTP and mounted once per "host" by sshfs, each
// mount with its own caches (as NFS clients have), each host's slots in their own UTS namespace. What must hold
// there: a lost claim race is never a wrong result, a finished job is never published twice, a runner cut off
// from the drive stops and publishes nothing, and a re-run stages what the controller changed.

const { broker } = freshBrokerPerTest();
const sshfs = sshfsPerFile();

interface Host {
  readonly name: string;
  readonly mount: Mounted;
  readonly dirs: { jobs: string; workspaces: string };
}

async function hosts(options: readonly string[], count: number): Promise<Host[]> {
  const made: Host[] = [];
  for (let i = 0; i < count; i++) {
    const mount = await sshfs().mount(options);
    const workspaces = path.join(await tempDir('mfw-host-'), 'workspaces');
    await mkdir(workspaces);
    made.push({ name: `host-${i}`, mount, dirs: { jobs: mount.path, workspaces } });
  }
  return made;
}

/** A folder of the server's disk for this test's jobs: every host sees it at `{mount}/{sub}`. */
async function jobsFolder(all: Host[], sub: string): Promise<Host[]> {
  await mkdir(path.join(sshfs().root, sub), { recursive: true });
  return all.map((h) => ({ ...h, dirs: { ...h.dirs, jobs: path.join(h.mount.path, sub) } }));
}

const ledgerLines = async (file: string): Promise<string[]> =>
  (await readFile(file, 'utf8').catch(() => '')).trim().split('\n').filter(Boolean);

describe.skipIf(!sshfsAvailable)('claims over a network filesystem with client caches (sshfs)', () => {
  it('decides every claim race (and index entry) through three mounts by reading back: one winner, never an error', async () => {
    const all = await jobsFolder(await hosts(DEFAULTS, 3), 'race');
    const identities = all.map((h, i) => selfIdentity(`racer-${i}`, h.name, process.pid));
    let won = 0;
    for (let round = 0; round < 60; round++) {
      const dirs = all.map((h) => path.join(h.dirs.jobs, `r${round}`));
      await mkdir(dirs[0] as string);
      const claims = await Promise.all(
        all.map((_, i) =>
          acquireClaim(dirs[i] as string, identities[i] as never, 1, new Date(), { request: '{"id":"r"}' }),
        ),
      );
      const winners = claims.filter((c) => c !== undefined);
      expect(winners, `round ${round}`).toHaveLength(1);
      // Every slot that meets the job adds it to the index of running jobs: the same race, never an error.
      const warnings: string[] = [];
      const log = { warn: (line: string) => warnings.push(line) } as never;
      await Promise.all(all.map((h) => addRunning(h.dirs.jobs, `r${round}`, log)));
      expect(warnings, `round ${round}`).toEqual([]);
      won++;
      for (const claim of winners) claim?.stopHeartbeat();
    }
    expect(won).toBe(60);
  });

  it('finds a marker and a newer claim made through another mount at once, whatever its listing cache says', async () => {
    const [x, y] = await jobsFolder(await hosts(DEFAULTS, 2), 'lookups');
    const results = (h: Host | undefined) => path.join(h?.dirs.jobs ?? '', 'job/results');
    await mkdir(results(y), { recursive: true });
    const runner = selfIdentity('runner', 'host-y', process.pid);
    const claim = await acquireClaim(results(y), runner, 1, new Date(), { request: '{"id":"job"}' });
    await writeFile(
      path.join(results(y), 'result.json'),
      JSON.stringify({ id: 'job', attempt: 1, worker: { id: 'runner' } }),
    );
    const me = selfIdentity('looker', 'host-x', process.pid);
    // x lists the folder now: its cached listing has no marker (sshfs keeps it for 20 s).
    expect(await readdir(results(x))).not.toContain('.mqtt-fs-worker.published.1');
    await markPublished(results(y), 1);
    expect(await readdir(results(x))).not.toContain('.mqtt-fs-worker.published.1'); // still the cached listing
    expect(await inspectClaim(results(x), me, 60_000, Date.now())).toMatchObject({
      kind: 'finished',
      published: true,
    });
    // A take-over through y (attempt 2) is seen through x at once too, and stops the first runner publishing.
    const heir = await acquireClaim(results(y), selfIdentity('heir', 'host-y', process.pid), 2, new Date(), {
      request: '{"id":"job"}',
    });
    expect(await claim?.standing()).toBe('taken-over');
    // Both claims hold a descriptor: closed here, not left to the garbage collector (Node warns, and will throw).
    claim?.stopHeartbeat();
    heir?.stopHeartbeat();
  });

  for (const [caching, options] of [
    ['sshfs defaults', DEFAULTS],
    ['3 s caches', SHORT],
  ] as const) {
    it(`30 jobs one at a time to 3 idle slots on 3 hosts: 30 results, all success (${caching})`, {
      timeout: 240_000,
    }, async () => {
      const all = await jobsFolder(await hosts(options, 3), `one-at-a-time-${options.length}`);
      const ledger = path.join(await tempDir('mfw-ledger-'), 'runs');
      const url = broker().url;
      const ids = all.map((h) => slot(`nfs-${h.name}-${options.length}`));
      for (const [i, h] of all.entries()) await registerSlots(url, h.dirs, [ids[i] as string]);
      const client = await testClient(url);
      const results = await collect(client, 'jobs/results/+');
      const loops = all.map((h, i) =>
        slotLoop(
          () => pullArgs(url, h.dirs, ids[i] as string),
          {},
          (args, env) => onHost(h.name, args, env),
        ),
      );
      for (let n = 0; n < 30; n++) {
        const id = `seq-${n}`;
        await publishJob(client, { id, steps: [`echo "$JOB_WORKER_ID" >> ${ledger}`] });
        await waitFor(() => results.some((r) => r.body.id === id), 30_000, 25);
      }
      await sleep(500); // a second result for any job would be out by now
      const runs = (await Promise.all(loops.map((loop) => loop.stop()))).flat();
      expect(results.filter((r) => r.body.status !== 'success').map((r) => r.body)).toEqual([]);
      expect(results).toHaveLength(30);
      expect(new Set(results.map((r) => r.body.id)).size).toBe(30);
      expect(await ledgerLines(ledger)).toHaveLength(30);
      const logs = runs.map((run) => run.stderr).join('\n');
      expect(logs).not.toContain('INTERNAL');
      // Every slot took part in the races.
      expect(new Set(results.map((r) => r.body.workerId)).size).toBeGreaterThan(1);
      await client.endAsync();
    });
  }

  it('40 jobs through 3 hosts with 5 SIGKILLs: every job done, one result message per run', {
    timeout: 240_000,
  }, async () => {
    const all = await jobsFolder(await hosts(SHORT, 3), 'chaos');
    const ledger = await tempDir('mfw-ledger-');
    const url = broker().url;
    const ids = all.map((h) => slot(`chaos-${h.name}`));
    for (const [i, h] of all.entries()) await registerSlots(url, h.dirs, [ids[i] as string]);
    const client = await testClient(url);
    const results = await collect(client, 'jobs/results/+');
    const jobs = Array.from({ length: 40 }, (_, i) => `chaos-${i}`);
    for (const id of jobs)
      await publishJob(client, { id, steps: [`echo "$JOB_ATTEMPT" >> ${ledger}/${id}; sleep 0.3`] });
    const loops = all.map((h, i) =>
      slotLoop(
        () => pullArgs(url, h.dirs, ids[i] as string, ['--claim-lease', '10s']),
        {},
        (args, env) => onHost(h.name, args, env),
      ),
    );
    let seed = 7;
    const random = (): number => {
      seed = (seed * 1103515245 + 12345) % 2 ** 31;
      return seed / 2 ** 31;
    };
    let kills = 0;
    while (kills < 5) {
      await sleep(300 + random() * 700);
      const victim = loops[Math.floor(random() * loops.length)]?.current();
      if (victim && victim.child.exitCode === null) {
        victim.child.kill('SIGKILL');
        kills++;
      }
    }
    await waitFor(() => new Set(results.map((r) => r.body.id)).size === jobs.length, 180_000, 100);
    await sleep(1000);
    await Promise.all(loops.map((loop) => loop.stop()));
    expect(results.every((r) => r.body.status === 'success')).toBe(true);
    // One message per run: a second message may only be the documented window (a kill between the broker's
    // PUBACK and the published marker), and is then the same run's, byte for byte.
    const byRun = new Map<string, string>();
    for (const r of results) {
      const key = `${r.body.id}#${r.body.attempt}`;
      const body = JSON.stringify(r.body);
      expect(byRun.get(key) ?? body, key).toBe(body);
      byRun.set(key, body);
    }
    const runsPerJob = new Map<string, Set<unknown>>();
    for (const r of results)
      runsPerJob.set(String(r.body.id), (runsPerJob.get(String(r.body.id)) ?? new Set()).add(r.body.attempt));
    expect([...runsPerJob.values()].every((attempts) => attempts.size === 1)).toBe(true);
    await client.endAsync();
  });

  it('a 10 s lease: refused on sshfs defaults (20 s caches), and with 3 s caches a finished job is not published again after the lease', {
    timeout: 90_000,
  }, async () => {
    const url = broker().url;
    const [cached] = await jobsFolder(await hosts(DEFAULTS, 1), 'lease-defaults');
    const refused = await runWorkerOnce(
      pullArgs(url, cached?.dirs as Host['dirs'], slot('lease-refused'), ['--claim-lease', '10s']),
    );
    expect(refused.code).toBe(8);
    expect(refused.stderr).toContain('--claim-lease 10.0s cannot be honoured');

    const [a, b] = await jobsFolder(await hosts(SHORT, 2), 'lease-short');
    const ids = [slot('lease-a'), slot('lease-b')];
    const lease = ['--claim-lease', '10s'];
    await registerSlots(url, a?.dirs as Host['dirs'], [ids[0] as string], (u, d, id, x = []) =>
      pullArgs(u, d, id, [...lease, ...x]),
    );
    await registerSlots(url, b?.dirs as Host['dirs'], [ids[1] as string], (u, d, id, x = []) =>
      pullArgs(u, d, id, [...lease, ...x]),
    );
    const client = await testClient(url);
    const results = await collect(client, 'jobs/results/+');
    await publishJob(client, { id: 'once', steps: ['true'] });
    const ran = await onHost('host-a', pullArgs(url, a?.dirs as Host['dirs'], ids[0] as string, lease))
      .exited;
    expect(ran.code, ran.stderr).toBe(0);
    await waitFor(() => results.length === 1);
    // host-b meets its copy of the request once the runner's heartbeat is older than the lease.
    await sleep(11_000);
    const late = await onHost(
      'host-b',
      pullArgs(url, b?.dirs as Host['dirs'], ids[1] as string, [...lease, '--idle-timeout', '1s']),
    ).exited;
    expect(late.code, late.stderr).toBe(0);
    expect(late.stderr).toContain('already finished (attempt 1, success); its result was published');
    await sleep(300);
    expect(results).toHaveLength(1);
    await client.endAsync();
  });

  it('a mount cut mid-job: the cut-off runner stops and publishes nothing; another host completes the job once', {
    timeout: 90_000,
  }, async () => {
    const url = broker().url;
    const [a, b] = await jobsFolder(await hosts(SHORT, 2), 'cut');
    const ids = [slot('cut-a'), slot('cut-b')];
    const lease = ['--claim-lease', '10s'];
    for (const [i, h] of [a, b].entries())
      await registerSlots(url, h?.dirs as Host['dirs'], [ids[i] as string], (u, d, id, x = []) =>
        pullArgs(u, d, id, [...lease, ...x]),
      );
    const client = await testClient(url);
    const results = await collect(client, 'jobs/results/+');
    await publishJob(client, {
      id: 'cut-job',
      steps: ['if [ "$JOB_ATTEMPT" = 1 ]; then sleep 60; fi; echo "done by $JOB_WORKER_ID"'],
    });
    const runner = onHost('host-b', pullArgs(url, b?.dirs as Host['dirs'], ids[1] as string, lease));
    await runner.sawLog('step 0 started');
    const heir = onHost(
      'host-a',
      pullArgs(url, a?.dirs as Host['dirs'], ids[0] as string, [...lease, '--idle-timeout', '40s']),
    );
    await heir.sawLog('already claimed by live worker');
    const cutAt = Date.now();
    await b?.mount.cut();
    const cutOff = await runner.exited;
    // Self-fencing: it stopped its step (long before the step's 60 s) once half the lease passed without a heartbeat.
    expect(cutOff.code, cutOff.stderr).toBe(8);
    expect(cutOff.stderr).toContain('no claim heartbeat reached the shared drive');
    expect(Date.now() - cutAt).toBeLessThan(40_000);
    const took = await heir.exited;
    expect(took.code, took.stderr).toBe(0);
    expect(took.stderr).toContain('taking over from the index of running jobs');
    await sleep(300);
    expect(results.map((r) => r.body)).toEqual([
      expect.objectContaining({ id: 'cut-job', status: 'success', attempt: 2, workerId: ids[0] }),
    ]);
    await client.endAsync();
  });

  for (const stage of ['copy', 'overlay'] as const) {
    it(`a re-run after the controller changed an input and added one stages both (prescribed options, --stage ${stage})`, {
      timeout: 60_000,
    }, async () => {
      const url = broker().url;
      const [worker] = await jobsFolder(await hosts(FRESH, 1), `rerun-${stage}`);
      const [controller] = await jobsFolder(await hosts(DEFAULTS, 1), `rerun-${stage}`);
      const job = path.join(controller?.dirs.jobs ?? '', 'inputs');
      await mkdir(path.join(job, 'in'), { recursive: true });
      await writeFile(path.join(job, 'in/f1'), 'one\n');
      await writeFile(path.join(job, 'job.json'), JSON.stringify({ steps: ['cat in/*; ls in'] }));
      const id = slot(`rerun-${stage}`);
      const args = () => pullArgs(url, worker?.dirs as Host['dirs'], id, ['--stage', stage]);
      await registerSlots(url, worker?.dirs as Host['dirs'], [id]);
      const client = await testClient(url);
      const results = await collect(client, 'jobs/results/inputs');
      await publishJob(client, { id: 'inputs' });
      expect((await runWorkerOnce(args())).code).toBe(0);
      await waitFor(() => results.length === 1);
      // The controller grows f1 and adds a file, through its own mount, and asks for a re-run.
      await appendFile(path.join(job, 'in/f1'), 'two\n');
      await writeFile(path.join(job, 'in/new.txt'), 'new\n');
      await publishJob(client, { id: 'inputs', rerun: 'after-change' });
      const second = await runWorkerOnce(args());
      expect(second.code, second.stderr).toBe(0);
      await waitFor(() => results.length === 2);
      const log = await readFile(path.join(job, 'results/step_0.log'), 'utf8');
      expect(log).toBe('one\ntwo\nnew\nf1\nnew.txt\n');
      await client.endAsync();
    });
  }

  it('doctor warns about sshfs defaults (stale inputs on a re-run) and is quiet with the prescribed options', async () => {
    const [cached] = await hosts(DEFAULTS, 1);
    const [fresh] = await hosts(FRESH, 1);
    const warned = await runWorkerOnce([
      'doctor',
      '--jobs-dir',
      cached?.dirs.jobs ?? '',
      '--url',
      broker().url,
    ]);
    expect(warned.stdout).toMatch(
      /^warn {2}shared drive .*mount with -o cache=no,attr_timeout=0,entry_timeout=0/m,
    );
    const quiet = await runWorkerOnce([
      'doctor',
      '--jobs-dir',
      fresh?.dirs.jobs ?? '',
      '--url',
      broker().url,
    ]);
    expect(quiet.code, quiet.stdout).toBe(0);
    expect(quiet.stdout).toMatch(
      /^ok {4}shared drive +fuse\.sshfs at .*: attribute cache 0ms \+ timestamp precision 1\.0s/m,
    );
    expect(quiet.stdout).not.toContain('warn');
  });
});
