import { chmod, chown, lchown, mkdir, readdir, readFile, stat } from 'node:fs/promises';
import { hostname } from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { freshBrokerPerTest } from '../helpers/mosquitto.js';
import { tempDir, waitFor, writeTree } from '../helpers/tmp.js';
import {
  collect,
  fleetDirs,
  publishJob,
  pullArgs,
  registerSlots,
  runWorkerOnce,
  slot,
  startWorker,
  testClient,
} from '../helpers/worker.js';

// The index of running jobs, `{jobs-dir}/.mqtt-fs-worker/running/`, is read by every idle slot every few seconds
// and written at every claim. Whoever can write the jobs directory can plant links there: nothing outside the jobs
// directory may ever be deleted or truncated through it, and a claim planted in a job folder runs nothing.

const { broker } = freshBrokerPerTest();
const NOBODY = 65534;

/** Files whose names are valid job ids, outside the jobs directory: what a planted link would aim at. */
async function victims(): Promise<{ dir: string; intact: () => Promise<void> }> {
  const dir = await tempDir('mfw-victims-');
  const files = { passwd: 'root:x:0:0', hosts: '127.0.0.1 localhost', crontab: '* * * * * true' };
  await writeTree(dir, { ...files, 'running/passwd': 'nested', 'running/hosts': 'nested' });
  const { expect } = await import('vitest');
  return {
    dir,
    intact: async () => {
      for (const [name, content] of Object.entries(files))
        expect(await readFile(path.join(dir, name), 'utf8'), name).toBe(content);
      expect((await readdir(path.join(dir, 'running'))).sort()).toEqual(['hosts', 'passwd']);
      expect(await readFile(path.join(dir, 'running/passwd'), 'utf8')).toBe('nested');
    },
  };
}

/**
 * One job through a slot, then the same slot idle long enough to read the index several times (a short lease
 * makes it look every 500 ms). Returns both runs' logs.
 */
async function runJobThenIdle(
  dirs: { jobs: string; workspaces: string },
  id: string,
  extra: string[] = [],
): Promise<string> {
  const me = slot(`idx-${id}`);
  const url = broker().url;
  await registerSlots(url, dirs, [me]);
  const client = await testClient(url);
  const results = await collect(client, `jobs/results/${id}`);
  await publishJob(client, { id, steps: ['echo ran > out.txt'] });
  const ran = await runWorkerOnce(pullArgs(url, dirs, me, extra));
  expect(ran.code, ran.stderr).toBe(0);
  await waitFor(() => results.length === 1);
  expect(results[0]?.body.status, ran.stderr).toBe('success');
  const idle = await runWorkerOnce(
    pullArgs(url, dirs, me, [...extra, '--claim-lease', '2s', '--idle-timeout', '2s']),
  );
  expect(idle.code, idle.stderr).toBe(0);
  await client.endAsync();
  return ran.stderr + idle.stderr;
}

describe('the index of running jobs', () => {
  it('never follows .mqtt-fs-worker as a link: nothing it points at is deleted', async () => {
    const dirs = await fleetDirs();
    const target = await victims();
    await writeTree(dirs.jobs, { '.mqtt-fs-worker': { link: target.dir } });
    const log = await runJobThenIdle(dirs, 'job-a');
    await target.intact();
    expect(log).toContain('.mqtt-fs-worker is a symbolic link');
    // Said once per process, not at every look.
    expect(log.split('is a symbolic link').length - 1).toBeLessThanOrEqual(2);
  });

  it('never follows running/ as a link: nothing it points at is deleted', async () => {
    const dirs = await fleetDirs();
    const target = await victims();
    await writeTree(dirs.jobs, { '.mqtt-fs-worker/running': { link: target.dir } });
    const log = await runJobThenIdle(dirs, 'job-b');
    await target.intact();
    expect(log).toContain(`${path.join('.mqtt-fs-worker', 'running')} is a symbolic link`);
  });

  it('refuses an index folder owned by another user and leaves its entries alone', async () => {
    const dirs = await fleetDirs();
    await writeTree(dirs.jobs, { '.mqtt-fs-worker/running/precious': 'not a job' });
    await chown(path.join(dirs.jobs, '.mqtt-fs-worker'), 4242, 4242);
    const log = await runJobThenIdle(dirs, 'job-d');
    expect(log).toMatch(/\.mqtt-fs-worker is owned by uid 4242/);
    expect(await readFile(path.join(dirs.jobs, '.mqtt-fs-worker/running/precious'), 'utf8')).toBe(
      'not a job',
    );
  });

  it('--run-as nobody with a jobs directory nobody owns: a link nobody planted deletes no root file', async () => {
    const dirs = await fleetDirs();
    const target = await victims();
    await chown(dirs.jobs, NOBODY, NOBODY);
    await chmod(path.dirname(dirs.workspaces), 0o755);
    await writeTree(dirs.jobs, { '.mqtt-fs-worker': { link: target.dir } });
    await lchown(path.join(dirs.jobs, '.mqtt-fs-worker'), NOBODY, NOBODY);
    const log = await runJobThenIdle(dirs, 'job-e', ['--run-as', 'nobody']);
    await target.intact();
    expect(log).toContain('is a symbolic link');
    expect((await stat(path.join(target.dir, 'passwd'))).uid).toBe(0);
  });

  it("takes over nothing from a planted claim whose request names another job, and clears the claim's entry", async () => {
    const dirs = await fleetDirs();
    const marker = path.join(await tempDir('mfw-marker-'), 'ran');
    const bootId = (await readFile('/proc/sys/kernel/random/boot_id', 'utf8')).trim();
    // A claim of a "dead" worker on this host (no such pid), holding a request for another id.
    const claim = {
      workerId: 'someone-else',
      host: hostname(),
      bootId,
      pid: 4_000_000,
      pidStart: 1,
      attempt: 1,
      claimedAt: new Date().toISOString(),
      request: JSON.stringify({ id: 'other', steps: [`touch ${marker}`] }),
    };
    await writeTree(dirs.jobs, {
      'victim/results/.mqtt-fs-worker.claim.1': JSON.stringify(claim),
      '.mqtt-fs-worker/running/victim': '',
    });
    const me = slot('idx-tampered');
    const url = broker().url;
    const client = await testClient(url);
    const results = await collect(client, 'jobs/results/+');
    const idle = await runWorkerOnce(
      pullArgs(url, dirs, me, ['--claim-lease', '2s', '--idle-timeout', '1500ms']),
    );
    expect(idle.code, idle.stderr).toBe(0);
    expect(idle.stderr).toContain('refusing to take over victim: its claim holds a request for "other"');
    await expect(stat(marker)).rejects.toThrow();
    await expect(stat(path.join(dirs.jobs, 'other'))).rejects.toThrow();
    expect(await readdir(path.join(dirs.jobs, '.mqtt-fs-worker/running'))).toEqual([]);
    expect(results).toEqual([]);
    await client.endAsync();
  });

  it('a real index still works: a dead runner on this host is taken over from it', async () => {
    // The control for the refusals above: the same look at the index runs a genuine orphan.
    const { dirs, url, client, results } = await diesMidJob('orphan', slot('idx-dies'));
    // A slot with no copy of the request (its session is new): only the index can lead it to the job.
    const heir = await runWorkerOnce(pullArgs(url, dirs, slot('idx-heir'), ['--idle-timeout', '5s']));
    expect(heir.code, heir.stderr).toBe(0);
    expect(heir.stderr).toContain('taking over from the index of running jobs');
    await waitFor(() => results.length === 1);
    expect(results[0]?.body).toMatchObject({ status: 'success', attempt: 2 });
    expect(await readdir(path.join(dirs.jobs, '.mqtt-fs-worker/running'))).toEqual([]);
    await client.endAsync();
  });

  it('a look at a large index inspects 8 entries, and an idle slot goes round all of them', async () => {
    // What a look costs must not grow with the fleet: 40 entries (jobs whose folders are gone, so each entry a
    // look inspects is cleared and the count shows how many it inspected).
    const dirs = await fleetDirs();
    const running = path.join(dirs.jobs, '.mqtt-fs-worker/running');
    await writeTree(dirs.jobs, goneEntries(40));
    const url = broker().url;
    const me = slot('idx-large');
    // One look: with a 20 s lease the next would come 5 s later, and the slot stays idle for 1 s.
    const once = await runWorkerOnce(
      pullArgs(url, dirs, me, ['--claim-lease', '20s', '--idle-timeout', '1s']),
    );
    expect(once.code, once.stderr).toBe(0);
    expect(await readdir(running)).toHaveLength(40 - 8);
    // A look every 500 ms (2 s lease): four more looks clear the remaining 32.
    const idle = await runWorkerOnce(
      pullArgs(url, dirs, me, ['--claim-lease', '2s', '--idle-timeout', '6s']),
    );
    expect(idle.code, idle.stderr).toBe(0);
    expect(await readdir(running)).toEqual([]);
  });

  it('a slot restarted after dying mid-job looks at its own job first, however large the index', async () => {
    const me = slot('idx-restarted');
    const { dirs, url, client, results } = await diesMidJob('mine', me);
    const running = path.join(dirs.jobs, '.mqtt-fs-worker/running');
    // 30 more entries (gone jobs): a look that inspected any of them before this slot's own job would clear it.
    await writeTree(dirs.jobs, goneEntries(30));
    const again = await runWorkerOnce(
      pullArgs(url, dirs, me, ['--claim-lease', '20s', '--idle-timeout', '1s']),
    );
    expect(again.code, again.stderr).toBe(0);
    expect(again.stderr).toContain('taking over from the index of running jobs');
    await waitFor(() => results.length === 1);
    expect(results[0]?.body).toMatchObject({ status: 'success', attempt: 2 });
    expect(await readdir(running)).toHaveLength(30);
    await client.endAsync();
  });
});

/**
 * A slot that is SIGKILLed in the first attempt of job `id`, once its presence file says it runs it: what is left
 * is the job's claim, its index entry and the slot's last word on the drive.
 */
async function diesMidJob(id: string, dies: string) {
  const dirs = await fleetDirs();
  await mkdir(path.join(dirs.jobs, id));
  const url = broker().url;
  await registerSlots(url, dirs, [dies]);
  const client = await testClient(url);
  const results = await collect(client, `jobs/results/${id}`);
  await publishJob(client, { id, steps: ['if [ "$JOB_ATTEMPT" = 1 ]; then sleep 30; fi'] });
  const victim = startWorker(pullArgs(url, dirs, dies));
  await victim.sawLog('step 0 started');
  const said = path.join(dirs.jobs, '.mqtt-fs-worker/slots', `${dies}.json`);
  await waitFor(async () => (await readFile(said, 'utf8').catch(() => '')).includes('"state":"busy"'));
  victim.child.kill('SIGKILL');
  await victim.exited;
  return { dirs, url, client, results };
}

/** Index entries for jobs whose folders are gone: a look that inspects one clears it. */
function goneEntries(count: number): Record<string, string> {
  return Object.fromEntries(
    Array.from({ length: count }, (_, i) => [`.mqtt-fs-worker/running/gone-${i}`, '']),
  );
}
