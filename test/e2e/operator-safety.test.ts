import { readdir, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { freshBrokerPerTest } from '../helpers/mosquitto.js';
import { sleep, tempDir, waitFor, writeTree } from '../helpers/tmp.js';
import {
  collect,
  fleetDirs,
  publishJob,
  pullArgs,
  registerSlots,
  runWorkerOnce,
  slot,
  testClient,
} from '../helpers/worker.js';

// What an operator does by hand never costs the fleet its record.

const { broker } = freshBrokerPerTest();

describe("an operator's commands and the fleet's record", () => {
  it('a dry run of a job the fleet ran is refused: result.json stays byte for byte, and a plain request runs nothing', async () => {
    const url = broker().url;
    const dirs = await fleetDirs();
    const ledger = path.join(await tempDir('mfw-ledger-'), 'runs');
    await writeTree(dirs.jobs, {
      'deploy/job.json': JSON.stringify({ steps: [`echo deployed >> ${ledger}`] }),
    });
    const me = slot('op-deploy');
    await registerSlots(url, dirs, [me]);
    const client = await testClient(url);
    const results = await collect(client, 'jobs/results/+');
    await publishJob(client, { id: 'deploy' });
    expect((await runWorkerOnce(pullArgs(url, dirs, me))).code).toBe(0);
    await waitFor(() => results.length === 1);
    const resultsDir = path.join(dirs.jobs, 'deploy/results');
    const before = await readFile(path.join(resultsDir, 'result.json'));
    const filesBefore = (await readdir(resultsDir)).sort();

    const cwd = await tempDir('mfw-dry-');
    await writeFile(path.join(cwd, 'test-payload.json'), '{"id":"deploy"}');
    const dry = await runWorkerOnce(
      ['--dry-run', '--jobs-dir', dirs.jobs, '--workspaces-dir', dirs.workspaces],
      {},
      cwd,
    );
    expect(dry.code).toBe(2);
    expect(dry.stderr).toContain(`job deploy has a fleet's record (attempt 1 claimed by ${me})`);
    expect(await readFile(path.join(resultsDir, 'result.json'))).toEqual(before);
    expect((await readdir(resultsDir)).sort()).toEqual(filesBefore);

    // The same request again (a plain one, no re-run token): finished, nothing runs, nothing is published.
    await publishJob(client, { id: 'deploy' });
    const again = await runWorkerOnce(pullArgs(url, dirs, me, ['--idle-timeout', '1s']));
    expect(again.code, again.stderr).toBe(0);
    expect(again.stderr).toContain('already finished (attempt 1, success); its result was published');
    await sleep(200);
    expect(results).toHaveLength(1);
    expect(await readFile(ledger, 'utf8')).toBe('deployed\n');
    await client.endAsync();
  });

  it('submit --wait with every slot offline says so at once, and waits', async () => {
    const url = broker().url;
    const dirs = await fleetDirs();
    const gone = slot('op-offline');
    // MQTT 3.1.1 has no will delay: the slot shows offline as soon as its process is gone.
    await registerSlots(url, dirs, [gone], (u, d, id, x = []) =>
      pullArgs(u, d, id, ['--protocol', '3.1.1', ...x]),
    );
    await waitFor(
      async () => {
        const listed = await runWorkerOnce(['workers', '--url', url, '--json']);
        return (JSON.parse(listed.stdout) as { id: string; state: string }[]).some(
          (row) => row.id === gone && row.state === 'offline',
        );
      },
      10_000,
      100,
    );
    const submitted = await runWorkerOnce([
      'submit',
      'nobody-home',
      '--url',
      url,
      '--wait',
      '--timeout',
      '4s',
    ]);
    expect(submitted.code).toBe(5);
    const lines = submitted.stderr.split('\n');
    const published = lines.find((line) => line.includes('published job nobody-home'));
    const warned = lines.find((line) =>
      line.includes('no slot is online: the request waits in 1 offline session'),
    );
    expect(warned, submitted.stderr).toBeDefined();
    // Said after publishing and before the 4 s timeout ended the wait: the line is said at once and then every 30 s,
    // so one that came within the 4 s is the one said at once.
    expect(lines.indexOf(warned as string)).toBeGreaterThan(lines.indexOf(published as string));
    expect(lines.indexOf(warned as string)).toBeLessThan(
      lines.findIndex((line) => line.includes('no result for nobody-home within --timeout')),
    );
  });

  it('submit --follow shows the step output of a job whose folder appears only when a slot claims it', async () => {
    const url = broker().url;
    const dirs = await fleetDirs();
    const me = slot('op-follow');
    await registerSlots(url, dirs, [me]);
    const worker = (await import('../helpers/worker.js')).startWorker(pullArgs(url, dirs, me));
    await worker.sawLog('waiting for one job');
    const followed = await runWorkerOnce([
      'submit',
      'ad-hoc',
      '--url',
      url,
      '--jobs-dir',
      dirs.jobs,
      '--steps',
      'sleep 0.3; echo hello-from-ad-hoc',
      '--follow',
    ]);
    expect(followed.code, followed.stderr).toBe(0);
    expect(followed.stderr).toContain('step 0 | hello-from-ad-hoc');
    expect((await worker.exited).code).toBe(0);
  });
});
