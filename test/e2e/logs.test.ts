import { spawn } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { freshBrokerPerTest } from '../helpers/mosquitto.js';
import { tempDir, waitFor } from '../helpers/tmp.js';
import {
  BIN,
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

// A job's output seen from anywhere: published as the log gets it on `jobs/logs/{id}`, read by `logs --follow`
// where the shared drive is not reachable, and the jobs under a drive listed by `jobs`.

const { broker } = freshBrokerPerTest();

describe('step output over MQTT', () => {
  it('logs --follow with no drive shows four lines as they come, and exits 0 with the job; jobs lists it', {
    timeout: 60_000,
  }, async () => {
    const url = broker().url;
    const dirs = await fleetDirs();
    const me = slot('logs-talk');
    await registerSlots(url, dirs, [me]);
    const worker = startWorker(pullArgs(url, dirs, me));
    await worker.sawLog('waiting for one job');
    const follower = spawn(
      process.execPath,
      [BIN, 'logs', 'talk', '--follow', '--url', url, '--jobs-dir', '/nowhere'],
      {
        stdio: ['ignore', 'pipe', 'pipe'],
      },
    );
    const arrivals: { line: string; at: number }[] = [];
    let partial = '';
    follower.stdout.on('data', (chunk: Buffer) => {
      const lines = (partial + chunk.toString()).split('\n');
      partial = lines.pop() ?? '';
      for (const line of lines) arrivals.push({ line, at: Date.now() });
    });
    let stderr = '';
    follower.stderr.on('data', (chunk: Buffer) => {
      stderr += chunk.toString();
    });
    const exited = new Promise<number | null>((resolve) => follower.on('close', resolve));
    await new Promise((resolve) => setTimeout(resolve, 500)); // its subscription is made
    const client = await testClient(url);
    // Each line waits for the test to have seen the one before (a flag file): so every line is shown while the
    // job still runs, as it comes, whatever the machine's load (no clock in the verdict).
    const flags = await tempDir('mfw-talk-');
    const step =
      'for i in 1 2 3 4; do echo "line $i"; sleep 0.4; while [ ! -e "$FLAGS/$i" ]; do sleep 0.05; done; done';
    await publishJob(client, { id: 'talk', steps: [`FLAGS=${flags}; ${step}`] });
    for (let i = 1; i <= 4; i++) {
      await waitFor(() => arrivals.some((a) => a.line === `step 0 | line ${i}`), 30_000, 20);
      writeFileSync(path.join(flags, String(i)), '');
    }
    expect(await exited, stderr).toBe(0);
    expect(arrivals.map((a) => a.line)).toEqual([
      'step 0 | line 1',
      'step 0 | line 2',
      'step 0 | line 3',
      'step 0 | line 4',
    ]);
    expect(stderr).toContain('talk: success');
    expect((await worker.exited).code).toBe(0);
    const listed = await runWorkerOnce(['jobs', '--json', '--jobs-dir', dirs.jobs]);
    expect(JSON.parse(listed.stdout)).toEqual([
      expect.objectContaining({ id: 'talk', state: 'finished', status: 'success', slot: me, attempt: 1 }),
    ]);
    await client.endAsync();
  });

  it('submit --follow without the drive shows the step output from MQTT, in order with the status lines', {
    timeout: 60_000,
  }, async () => {
    const url = broker().url;
    const dirs = await fleetDirs();
    const me = slot('logs-submit');
    await registerSlots(url, dirs, [me]);
    const worker = startWorker(pullArgs(url, dirs, me));
    await worker.sawLog('waiting for one job');
    const followed = await runWorkerOnce([
      'submit',
      'remote',
      '--url',
      url,
      '--jobs-dir',
      '/nowhere',
      '--steps',
      'echo alpha; sleep 0.2; echo beta',
      '--follow',
    ]);
    expect(followed.code, followed.stderr).toBe(0);
    const lines = followed.stderr.split('\n');
    const at = (text: string) => lines.findIndex((line) => line.includes(text));
    expect(at('step 0 | alpha')).toBeGreaterThan(at('step 0 started'));
    expect(at('step 0 | beta')).toBeGreaterThan(at('step 0 | alpha'));
    expect(at('step 0 success')).toBeGreaterThan(at('step 0 | beta'));
    expect((await worker.exited).code).toBe(0);
  });

  it('publishes exactly what the log gets: masked, capped, in order, offsets without gaps; nothing with --logs-topic off', {
    timeout: 60_000,
  }, async () => {
    const url = broker().url;
    const dirs = await fleetDirs();
    const me = slot('logs-chunks');
    const extra = ['--max-log-size', '64K', '--mask', 'hunter2-secret'];
    await registerSlots(url, dirs, [me], (u, d, id, x = []) => pullArgs(u, d, id, [...extra, ...x]));
    const client = await testClient(url);
    const chunks = await collect(client, 'jobs/logs/+');
    const results = await collect(client, 'jobs/results/+');
    const step = 'echo "the password is hunter2-secret"; seq 1 40000; printf "é%.0s" $(seq 1 3000)';
    await publishJob(client, { id: 'chatty', steps: [step, 'echo second step'] });
    expect((await runWorkerOnce(pullArgs(url, dirs, me, extra))).code).toBe(0);
    await waitFor(() => results.length === 1);
    await new Promise((resolve) => setTimeout(resolve, 300)); // QoS 0 batches sent before the result
    for (const index of [0, 1]) {
      const mine = chunks.map((c) => c.body).filter((b) => b.step === index);
      let offset = 0;
      for (const chunk of mine) {
        expect(chunk.offset, `step ${index}`).toBe(offset);
        offset += Number(chunk.bytes);
        expect(Buffer.byteLength(String(chunk.text))).toBe(chunk.bytes); // whole characters in every batch
      }
      const log = await readFile(path.join(dirs.jobs, `chatty/results/step_${index}.log`), 'utf8');
      expect(mine.map((c) => c.text).join(''), `step ${index}`).toBe(log);
    }
    const all = chunks.map((c) => String(c.body.text)).join('');
    expect(all).not.toContain('hunter2-secret');
    expect(all).toContain('the password is ***');
    // Batched: far fewer messages than lines.
    expect(chunks.length).toBeLessThan(40);

    chunks.length = 0;
    await publishJob(client, { id: 'quiet', steps: ['echo not published'] });
    expect((await runWorkerOnce(pullArgs(url, dirs, me, [...extra, '--logs-topic', 'off']))).code).toBe(0);
    await waitFor(() => results.length === 2);
    await new Promise((resolve) => setTimeout(resolve, 300));
    expect(chunks).toEqual([]);
    await client.endAsync();
  });

  it('logs without --follow reads the drive; jobs lists 10,000 folders with their states', {
    timeout: 120_000,
  }, async () => {
    const jobs = await tempDir('mfw-many-');
    const finished = JSON.stringify({
      id: 'x',
      attempt: 1,
      status: 'success',
      worker: { id: 'slot-z' },
      steps: [],
      endedAt: 'now',
      durationMs: 5,
      artifacts: [],
    });
    const claim = JSON.stringify({
      workerId: 'slot-z',
      host: 'elsewhere',
      bootId: 'b',
      pid: 1,
      pidStart: 1,
      attempt: 1,
      claimedAt: 'then',
    });
    for (let i = 0; i < 10_000; i++) {
      const dir = path.join(jobs, `job-${String(i).padStart(5, '0')}`);
      if (i % 2 === 0) {
        mkdirSync(path.join(dir, 'results'), { recursive: true });
        writeFileSync(path.join(dir, 'results/.mqtt-fs-worker.claim.1'), claim);
        writeFileSync(path.join(dir, 'results/result.json'), finished.replace('"x"', `"job-${i}"`));
      } else mkdirSync(dir);
    }
    writeFileSync(path.join(jobs, 'job-00000/results/step_0.log'), 'hello from the drive\n');
    const listed = await runWorkerOnce(['jobs', '--json', '--jobs-dir', jobs]);
    expect(listed.code, listed.stderr).toBe(0);
    const rows = JSON.parse(listed.stdout) as { id: string; state: string }[];
    expect(rows).toHaveLength(10_000);
    expect(rows.filter((r) => r.state === 'finished')).toHaveLength(5_000);
    expect(rows.filter((r) => r.state === 'queued')).toHaveLength(5_000);
    const onlyQueued = await runWorkerOnce(['jobs', '--json', '--state', 'queued', '--jobs-dir', jobs]);
    expect(JSON.parse(onlyQueued.stdout)).toHaveLength(5_000);
    const logs = await runWorkerOnce(['logs', 'job-00000', '--jobs-dir', jobs]);
    expect(logs.code, logs.stderr).toBe(0);
    expect(logs.stdout).toBe('step 0 | hello from the drive\n');
  });
});
