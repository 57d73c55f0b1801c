import { execFileSync } from 'node:child_process';
import { readdir, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { freshBrokerPerTest } from '../helpers/mosquitto.js';
import { sleep, type Tree, tempDir, waitFor, writeTree } from '../helpers/tmp.js';
import {
  collect,
  fleetDirs,
  publishJob,
  registerSlots,
  runWorkerOnce,
  slot,
  startWorker,
  testClient,
  workerArgs,
} from '../helpers/worker.js';

const { broker, replace } = freshBrokerPerTest();

/** Connects a slot once so that its persistent session (and shared subscription) exists, then lets it go. */
async function register(dirs: { jobs: string; workspaces: string }, id: string): Promise<void> {
  await registerSlots(broker().url, dirs, [id], workerArgs);
}

/** Job folders written, slot-a's session registered, and a client collecting every result. */
async function registeredSlot(jobs: Tree = {}) {
  const dirs = await fleetDirs();
  await writeTree(dirs.jobs, jobs);
  await register(dirs, slot('slot-a'));
  const client = await testClient(broker().url);
  const results = await collect(client, 'jobs/results/+');
  return { dirs, client, results };
}

describe('the broker worker', () => {
  it('takes one job from a shared subscription, runs it, publishes the result and exits 0', async () => {
    const dirs = await fleetDirs();
    await writeTree(dirs.jobs, { 'job_1/job.json': JSON.stringify({ steps: ['echo out > out.txt'] }) });
    const client = await testClient(broker().url);
    const results = await collect(client, 'jobs/results/+');
    const events = await collect(client, 'jobs/status/job_1');
    const presence = await collect(client, 'jobs/workers/+');
    const responses = await collect(client, 'replies/mine');
    const worker = startWorker(
      workerArgs(broker().url, dirs, slot('slot-a'), ['--response-topic-prefix', 'replies/']),
    );
    await worker.sawLog('waiting for one job');
    await publishJob(
      client,
      { id: 'job_1' },
      { responseTopic: 'replies/mine', correlationData: Buffer.from('corr-1') },
    );
    const exit = await worker.exited;
    expect(exit.code, exit.stderr).toBe(0);
    await waitFor(() => results.length === 1 && responses.length === 1);
    expect(results[0]).toMatchObject({
      topic: 'jobs/results/job_1',
      body: {
        id: 'job_1',
        status: 'success',
        exitCode: 0,
        manifestFile: 'results/result.json',
        attempt: 1,
        workerId: slot('slot-a'),
      },
    });
    expect(responses[0]?.body).toEqual(results[0]?.body);
    expect(
      (responses[0]?.properties as { correlationData?: Buffer } | undefined)?.correlationData?.toString(),
    ).toBe('corr-1');
    expect(await readFile(path.join(dirs.jobs, 'job_1/results/out.txt'), 'utf8')).toBe('out\n');
    await waitFor(() => events.some((e) => e.body.event === 'done'));
    expect(events.map((e) => e.body.event)).toEqual([
      'claimed',
      'staging',
      'step-started',
      'step-ended',
      'syncing',
      'done',
    ]);
    expect(events.every((e) => e.body.workerId === slot('slot-a'))).toBe(true);
    expect(presence.map((p) => p.body.state)).toContain('busy');
    await client.endAsync();
  });

  it('leaves a second delivered job in the slot session for the next run, never acking it', async () => {
    const { dirs, client, results } = await registeredSlot({
      'first/job.json': JSON.stringify({ steps: ['sleep 1'] }),
      'second/job.json': JSON.stringify({ steps: ['true'] }),
    });
    // Both are dealt to the only member's session while it is offline.
    await publishJob(client, { id: 'first' });
    await publishJob(client, { id: 'second' });
    const one = await runWorkerOnce(workerArgs(broker().url, dirs, slot('slot-a')));
    expect(one.code, one.stderr).toBe(0);
    await waitFor(() => results.length === 1);
    expect(results.map((r) => r.body.id)).toEqual(['first']);
    const two = await runWorkerOnce(workerArgs(broker().url, dirs, slot('slot-a'), ['--idle-timeout', '5s']));
    expect(two.code, two.stderr).toBe(0);
    await waitFor(() => results.length === 2);
    expect(results.map((r) => r.body.id)).toEqual(['first', 'second']);
    await client.endAsync();
  });

  it('finishes a job on the slot next run with attempt 2 after the worker was SIGKILLed mid-job', async () => {
    const { dirs, client, results } = await registeredSlot({
      'k/job.json': JSON.stringify({ steps: ['echo "attempt $JOB_ATTEMPT" > attempt.txt; sleep 2'] }),
    });
    await publishJob(client, { id: 'k' });
    const first = startWorker(workerArgs(broker().url, dirs, slot('slot-a')));
    await first.sawLog('step 0 started');
    first.child.kill('SIGKILL');
    await first.exited;
    const second = await runWorkerOnce(
      workerArgs(broker().url, dirs, slot('slot-a'), ['--idle-timeout', '10s']),
    );
    expect(second.code, second.stderr).toBe(0);
    expect(second.stderr).toContain('taking over');
    await waitFor(() => results.length === 1);
    expect(results[0]?.body).toMatchObject({ id: 'k', status: 'success', attempt: 2 });
    expect(await readFile(path.join(dirs.jobs, 'k/results/attempt.txt'), 'utf8')).toBe('attempt 2\n');
    // Each attempt's claim stays (attempt numbers have no gaps: the newest is found by path); the workspace of
    // the killed run is gone.
    const claims = (await readdir(path.join(dirs.jobs, 'k/results'))).filter((n) => n.includes('claim'));
    expect(claims.sort()).toEqual(['.mqtt-fs-worker.claim.1', '.mqtt-fs-worker.claim.2']);
    // Only the worker's own record of its session (`.mqtt-fs-worker/sessions/`) is left there.
    expect(await readdir(dirs.workspaces)).toEqual(['.mqtt-fs-worker']);
    expect(await readdir(path.join(dirs.workspaces, '.mqtt-fs-worker'))).toEqual(['sessions']);
    await client.endAsync();
  });

  it('neither runs a finished job again nor publishes a second result when it is delivered again', async () => {
    const { dirs, client, results } = await registeredSlot({
      'f/job.json': JSON.stringify({ steps: ['echo ran >> "$JOB_RESULTS_DIR/../runs.txt"'] }),
    });
    await publishJob(client, { id: 'f' });
    expect((await runWorkerOnce(workerArgs(broker().url, dirs, slot('slot-a')))).code).toBe(0);
    await waitFor(() => results.length === 1);
    await publishJob(client, { id: 'f' });
    // The same process skips it and waits for the next delivery (here: until its idle timeout).
    const again = await runWorkerOnce(
      workerArgs(broker().url, dirs, slot('slot-a'), ['--idle-timeout', '1s']),
    );
    expect(again.code).toBe(0);
    expect(again.stderr).toContain('already finished (attempt 1, success); its result was published');
    expect(again.stderr).toContain('no job within the idle timeout');
    // A result published now would be on its way: a round trip through the broker shows there is none.
    await client.publishAsync('jobs/results/barrier', '{}', { qos: 1 });
    await waitFor(() => results.some((r) => r.topic === 'jobs/results/barrier'));
    expect(results.map((r) => r.topic)).toEqual(['jobs/results/f', 'jobs/results/barrier']);
    expect(await readFile(path.join(dirs.jobs, 'f/runs.txt'), 'utf8')).toBe('ran\n');
    await client.endAsync();
  });

  it('runs a finished job again for a request with a new re-run token, once per token', async () => {
    const { dirs, client, results } = await registeredSlot({
      'f/job.json': JSON.stringify({ steps: ['echo "$JOB_ATTEMPT" >> "$JOB_RESULTS_DIR/../runs.txt"'] }),
    });
    await publishJob(client, { id: 'f' });
    expect((await runWorkerOnce(workerArgs(broker().url, dirs, slot('slot-a')))).code).toBe(0);
    await publishJob(client, { id: 'f', rerun: 'fix-1' });
    await publishJob(client, { id: 'f', rerun: 'fix-1' });
    const rerun = await runWorkerOnce(workerArgs(broker().url, dirs, slot('slot-a')));
    expect(rerun.stderr).toContain('re-run fix-1');
    const after = await runWorkerOnce(
      workerArgs(broker().url, dirs, slot('slot-a'), ['--idle-timeout', '1s']),
    );
    expect(after.stderr).toContain('already finished (attempt 2, success)');
    await waitFor(() => results.length === 2);
    expect(results.map((r) => r.body.attempt)).toEqual([1, 2]);
    expect(await readFile(path.join(dirs.jobs, 'f/runs.txt'), 'utf8')).toBe('1\n2\n');
    // submit --rerun makes a token of its own; without it, submit --wait gets the stored result from a slot.
    const submit = (extra: string[]) =>
      runWorkerOnce(['submit', 'f', '--url', broker().url, '--wait', '--timeout', '20s', ...extra]);
    const worker = startWorker(workerArgs(broker().url, dirs, slot('slot-a')));
    const again = await submit(['--rerun']);
    expect(again.code, again.stderr).toBe(0);
    expect(JSON.parse(again.stdout)).toMatchObject({ id: 'f', status: 'success', attempt: 3 });
    expect((await worker.exited).code).toBe(0);
    const idle = startWorker(workerArgs(broker().url, dirs, slot('slot-a'), ['--idle-timeout', '3s']));
    const stored = await submit([]);
    expect(stored.code, stored.stderr).toBe(0);
    expect(JSON.parse(stored.stdout)).toMatchObject({ id: 'f', status: 'success', attempt: 3 });
    expect(idle.child.exitCode).toBeNull(); // it ran nothing: the stored result came on submit's reply topic
    await idle.exited;
    expect(await readFile(path.join(dirs.jobs, 'f/runs.txt'), 'utf8')).toBe('1\n2\n3\n');
    await client.endAsync();
  });

  it('loses nothing when the broker restarts in the middle of a run', async () => {
    const dirs = await fleetDirs();
    await writeTree(dirs.jobs, {
      'r/job.json': JSON.stringify({ steps: ['sleep 2; echo done > done.txt'] }),
    });
    await register(dirs, slot('slot-a'));
    const client = await testClient(broker().url);
    await publishJob(client, { id: 'r' });
    await client.endAsync();
    const worker = startWorker(workerArgs(broker().url, dirs, slot('slot-a')));
    await worker.sawLog('step 0 started');
    await broker().restart();
    const first = await worker.exited;
    // The job finished and wrote result.json, but its result could not be published: exit 3.
    expect(first.code, first.stderr).toBe(3);
    expect(JSON.parse(await readFile(path.join(dirs.jobs, 'r/results/result.json'), 'utf8')).status).toBe(
      'success',
    );
    const watcher = await testClient(broker().url);
    const results = await collect(watcher, 'jobs/results/+');
    const second = await runWorkerOnce(
      workerArgs(broker().url, dirs, slot('slot-a'), ['--idle-timeout', '10s']),
    );
    expect(second.code, second.stderr).toBe(0);
    expect(second.stderr).toContain('already finished');
    await waitFor(() => results.length === 1);
    expect(results[0]?.body).toMatchObject({ id: 'r', status: 'success', attempt: 1 });
    await watcher.endAsync();
  });

  it('cancels the running job on jobs/cancel/{id}', async () => {
    const dirs = await fleetDirs();
    await writeTree(dirs.jobs, { 'c/job.json': JSON.stringify({ steps: ['sleep 30', 'true'] }) });
    const client = await testClient(broker().url);
    const results = await collect(client, 'jobs/results/+');
    const worker = startWorker(workerArgs(broker().url, dirs, slot('slot-a')));
    await worker.sawLog('waiting for one job');
    await publishJob(client, { id: 'c' });
    await worker.sawLog('step 0 started');
    await client.publishAsync('jobs/cancel/c', '{}', { qos: 1 });
    const exit = await worker.exited;
    expect(exit.code, exit.stderr).toBe(0);
    await waitFor(() => results.length === 1);
    expect(results[0]?.body).toMatchObject({ id: 'c', status: 'cancelled', exitCode: 143 });
    await client.endAsync();
  });

  it('on SIGTERM during a job stops it, exits 143 and leaves the job for the slot next run', async () => {
    const dirs = await fleetDirs();
    await writeTree(dirs.jobs, { 's/job.json': JSON.stringify({ steps: ['sleep 30'] }) });
    const client = await testClient(broker().url);
    const results = await collect(client, 'jobs/results/+');
    const worker = startWorker(workerArgs(broker().url, dirs, slot('slot-a')));
    await worker.sawLog('waiting for one job');
    await publishJob(client, { id: 's' });
    await worker.sawLog('step 0 started');
    worker.child.kill('SIGTERM');
    const exit = await worker.exited;
    expect(exit.code, exit.stderr).toBe(143);
    expect(results).toEqual([]);
    await writeFile(path.join(dirs.jobs, 's/job.json'), JSON.stringify({ steps: ['true'] }));
    const next = await runWorkerOnce(
      workerArgs(broker().url, dirs, slot('slot-a'), ['--idle-timeout', '10s']),
    );
    expect(next.code, next.stderr).toBe(0);
    await waitFor(() => results.length === 1);
    expect(results[0]?.body).toMatchObject({ id: 's', status: 'success', attempt: 2 });
    await client.endAsync();
  });

  it('exits 0 on SIGTERM while waiting, and 0 after --idle-timeout', async () => {
    const dirs = await fleetDirs();
    const worker = startWorker(workerArgs(broker().url, dirs, slot('slot-a')));
    await worker.sawLog('waiting for one job');
    worker.child.kill('SIGTERM');
    expect((await worker.exited).code).toBe(0);
    const started = Date.now();
    const idle = await runWorkerOnce(
      workerArgs(broker().url, dirs, slot('slot-a'), ['--idle-timeout', '500ms']),
    );
    expect(idle.code).toBe(0);
    expect(idle.stderr).toContain('no job within the idle timeout');
    expect(Date.now() - started).toBeLessThan(5000);
  });

  it('publishes an error result for a job folder that does not exist, and acks it', async () => {
    const { dirs, client, results } = await registeredSlot();
    await publishJob(client, { id: 'ghost' });
    const run = await runWorkerOnce(workerArgs(broker().url, dirs, slot('slot-a'), ['--idle-timeout', '1s']));
    expect(run.code).toBe(0);
    await waitFor(() => results.length === 1);
    expect(results[0]?.body).toMatchObject({
      id: 'ghost',
      status: 'error',
      error: { code: 'JOB_NOT_FOUND' },
    });
    // Acked: the slot's next run gets nothing.
    const next = await runWorkerOnce(
      workerArgs(broker().url, dirs, slot('slot-a'), ['--idle-timeout', '500ms']),
    );
    expect(next.stderr).toContain('no job within the idle timeout');
    await client.endAsync();
  });

  it('rejects a message without a usable id on jobs/rejected, acks it, and the slot then runs a good job', async () => {
    const dirs = await fleetDirs();
    await writeTree(dirs.jobs, { good: null });
    await register(dirs, slot('slot-a'));
    const client = await testClient(broker().url);
    const rejected = await collect(client, 'jobs/rejected');
    const results = await collect(client, 'jobs/results/+');
    await publishJob(client, 'not json at all');
    const bad = await runWorkerOnce(workerArgs(broker().url, dirs, slot('slot-a'), ['--idle-timeout', '1s']));
    expect(bad.code).toBe(0);
    expect(bad.stderr).toContain('INVALID_PAYLOAD');
    expect(bad.stderr).not.toMatch(/\n\s+at /);
    await waitFor(() => rejected.length === 1);
    expect(rejected[0]?.body).toMatchObject({ workerId: slot('slot-a'), error: { code: 'INVALID_PAYLOAD' } });
    await publishJob(client, { id: 'good', steps: ['true'] });
    expect((await runWorkerOnce(workerArgs(broker().url, dirs, slot('slot-a')))).code).toBe(0);
    await waitFor(() => results.length === 1);
    expect(results[0]?.body).toMatchObject({ id: 'good', status: 'success' });
    await client.endAsync();
  });

  it('acknowledges a job whose claim cannot be written, with a CLAIM_FAILED error result, so it never loops', async () => {
    const dirs = await fleetDirs();
    await writeTree(dirs.jobs, {
      'frozen/job.json': JSON.stringify({ steps: ['true'] }),
      'frozen/results/': null,
    });
    // An immutable results/ (even root cannot write there): the claim file cannot be created.
    execFileSync('chattr', ['+i', path.join(dirs.jobs, 'frozen/results')]);
    try {
      await register(dirs, slot('slot-a'));
      const client = await testClient(broker().url);
      const results = await collect(client, 'jobs/results/+');
      await publishJob(client, { id: 'frozen' });
      const run = await runWorkerOnce(
        workerArgs(broker().url, dirs, slot('slot-a'), ['--idle-timeout', '1s']),
      );
      expect(run.code, run.stderr).toBe(0);
      await waitFor(() => results.length === 1);
      expect(results[0]?.body).toMatchObject({
        id: 'frozen',
        status: 'error',
        error: { code: 'CLAIM_FAILED' },
      });
      const next = await runWorkerOnce(
        workerArgs(broker().url, dirs, slot('slot-a'), ['--idle-timeout', '500ms']),
      );
      expect(next.stderr).toContain('no job within the idle timeout');
      await client.endAsync();
    } finally {
      execFileSync('chattr', ['-i', path.join(dirs.jobs, 'frozen/results')]);
    }
  });

  it('warns that --clean loses queued jobs', async () => {
    const dirs = await fleetDirs();
    const run = await runWorkerOnce(
      workerArgs(broker().url, dirs, slot('slot-c'), ['--clean', '--idle-timeout', '200ms']),
    );
    expect(run.code).toBe(0);
    expect(run.stderr).toContain('--clean');
    expect(run.stderr).toMatch(/lost/);
  });

  it('runs through a job that outlives several keepalive periods without losing the connection', async () => {
    const dirs = await fleetDirs();
    await writeTree(dirs.jobs, { long: null });
    const client = await testClient(broker().url);
    const results = await collect(client, 'jobs/results/+');
    const worker = startWorker(workerArgs(broker().url, dirs, slot('slot-a'), ['--keepalive', '1s']));
    await worker.sawLog('waiting for one job');
    await publishJob(client, { id: 'long', steps: ['sleep 4'] });
    const exit = await worker.exited;
    expect(exit.code, exit.stderr).toBe(0);
    await waitFor(() => results.length === 1);
    expect(results[0]?.body).toMatchObject({ id: 'long', status: 'success', attempt: 1 });
    await client.endAsync();
  });
});

describe('connection failures', () => {
  it('exits 3 with a clear message when the broker cannot be reached', async () => {
    const dirs = await fleetDirs();
    const port = broker().port;
    await broker().stop();
    const started = Date.now();
    const run = await runWorkerOnce(
      workerArgs(`mqtt://127.0.0.1:${port}`, dirs, slot('slot-a'), ['--connect-timeout', '2s']),
    );
    expect(run.code).toBe(3);
    expect(run.stderr).toContain('BROKER_UNREACHABLE');
    expect(run.stderr).toContain('ECONNREFUSED');
    expect(Date.now() - started).toBeLessThan(5000);
  });

  it('exits 4 when the broker refuses the credentials from a password file, and never prints the password', async () => {
    const dir = await tempDir();
    const passwd = path.join(dir, 'passwd');
    execFileSync('mosquitto_passwd', ['-b', '-c', passwd, 'worker', 'right-password']);
    await replace({ listenerLines: ['allow_anonymous false', `password_file ${passwd}`] });
    const dirs = await fleetDirs();
    await writeFile(path.join(dir, 'wrong'), 'wrong-password\n');
    await writeFile(path.join(dir, 'right'), 'right-password\n');
    const refused = await runWorkerOnce(
      workerArgs(broker().url, dirs, slot('slot-a'), ['--username', 'worker', '--idle-timeout', '200ms']),
      { MQTT_PASSWORD_FILE: path.join(dir, 'wrong') },
    );
    expect(refused.code).toBe(4);
    expect(refused.stderr).toContain('BROKER_REFUSED');
    expect(refused.stderr).not.toContain('wrong-password');
    const accepted = await runWorkerOnce(
      workerArgs(broker().url, dirs, slot('slot-a'), ['--username', 'worker', '--idle-timeout', '200ms']),
      { MQTT_PASSWORD_FILE: path.join(dir, 'right') },
    );
    expect(accepted.code, accepted.stderr).toBe(0);
  });

  it('connects over TLS with certificates the test makes, and refuses an untrusted server', async () => {
    const dir = await tempDir();
    const ssl = (args: string[]) => execFileSync('openssl', args, { cwd: dir, stdio: 'ignore' });
    ssl([
      'req',
      '-x509',
      '-newkey',
      'rsa:2048',
      '-nodes',
      '-days',
      '1',
      '-subj',
      '/CN=test-ca',
      '-keyout',
      'ca.key',
      '-out',
      'ca.crt',
    ]);
    ssl([
      'req',
      '-newkey',
      'rsa:2048',
      '-nodes',
      '-subj',
      '/CN=127.0.0.1',
      '-keyout',
      'server.key',
      '-out',
      'server.csr',
    ]);
    await writeFile(path.join(dir, 'ext'), 'subjectAltName=IP:127.0.0.1\n');
    ssl([
      'x509',
      '-req',
      '-in',
      'server.csr',
      '-CA',
      'ca.crt',
      '-CAkey',
      'ca.key',
      '-CAcreateserial',
      '-days',
      '1',
      '-extfile',
      'ext',
      '-out',
      'server.crt',
    ]);
    ssl([
      'req',
      '-newkey',
      'rsa:2048',
      '-nodes',
      '-subj',
      '/CN=worker',
      '-keyout',
      'client.key',
      '-out',
      'client.csr',
    ]);
    ssl([
      'x509',
      '-req',
      '-in',
      'client.csr',
      '-CA',
      'ca.crt',
      '-CAkey',
      'ca.key',
      '-CAcreateserial',
      '-days',
      '1',
      '-out',
      'client.crt',
    ]);
    await replace({
      tls: true,
      listenerLines: [
        'allow_anonymous true',
        `cafile ${dir}/ca.crt`,
        `certfile ${dir}/server.crt`,
        `keyfile ${dir}/server.key`,
        'require_certificate true',
      ],
    });
    const dirs = await fleetDirs();
    const tls = ['--ca', `${dir}/ca.crt`, '--cert', `${dir}/client.crt`, '--key', `${dir}/client.key`];
    const ok = await runWorkerOnce(
      workerArgs(broker().url, dirs, slot('slot-a'), [...tls, '--idle-timeout', '200ms']),
    );
    expect(ok.code, ok.stderr).toBe(0);
    expect(ok.stderr).toContain('connected to the broker');
    const untrusted = await runWorkerOnce(
      workerArgs(broker().url, dirs, slot('slot-a'), ['--idle-timeout', '200ms', '--connect-timeout', '3s']),
    );
    expect(untrusted.code).toBe(3);
    expect(untrusted.stderr).toMatch(/BROKER_UNREACHABLE.*(certificate|CERT)/i);
  });
});

describe('submit and drain', () => {
  it('submit --wait publishes, waits for the result and exits with the job outcome', async () => {
    const dirs = await fleetDirs();
    await writeTree(dirs.jobs, { ok: null, bad: null });
    await register(dirs, slot('slot-a'));
    const worker = startWorker(workerArgs(broker().url, dirs, slot('slot-a')));
    const ok = await runWorkerOnce([
      'submit',
      'ok',
      '--url',
      broker().url,
      '--steps',
      'echo hi',
      '--wait',
      '--timeout',
      '20s',
    ]);
    expect(ok.code, ok.stderr).toBe(0);
    expect(JSON.parse(ok.stdout)).toMatchObject({ id: 'ok', status: 'success' });
    await worker.exited;
    const slot2 = startWorker(workerArgs(broker().url, dirs, slot('slot-a')));
    const bad = await runWorkerOnce([
      'submit',
      'bad',
      '--url',
      broker().url,
      '--steps',
      '["exit 3"]',
      '--wait',
      '--timeout',
      '20s',
    ]);
    expect(bad.code).toBe(1);
    expect(JSON.parse(bad.stdout)).toMatchObject({ id: 'bad', status: 'failed', exitCode: 3 });
    await slot2.exited;
  });

  it('submit retries while nobody is subscribed and times out with exit 5', async () => {
    const started = Date.now();
    const run = await runWorkerOnce(['submit', 'lonely', '--url', broker().url, '--timeout', '1500ms']);
    expect(run.code).toBe(5);
    expect(run.stderr).toContain('nobody is subscribed');
    expect(Date.now() - started).toBeLessThan(8000);
  });

  it('loses no job published while a drain runs', { timeout: 60_000 }, async () => {
    const dirs = await fleetDirs();
    await register(dirs, slot('slot-old'));
    await register(dirs, slot('slot-new'));
    const client = await testClient(broker().url);
    const results = await collect(client, 'jobs/results/+');
    const ids = Array.from({ length: 10 }, (_, i) => `live-${i}`);
    for (const id of ids.slice(0, 4)) await publishJob(client, { id, steps: ['true'] });
    const draining = runWorkerOnce([
      'drain',
      '--url',
      broker().url,
      '--id',
      slot('slot-old'),
      '--topic',
      '$share/workers/jobs/pending',
      '--quiet',
      '1500ms',
      // Its process exited a moment ago: its will (offline) comes 10 s later.
      '--force',
    ]);
    for (const id of ids.slice(4)) {
      await sleep(150);
      await publishJob(client, { id, steps: ['true'] });
    }
    const drained = await draining;
    expect(drained.code, drained.stderr).toBe(0);
    for (let i = 0; i < 20 && results.length < ids.length; i++) {
      await runWorkerOnce(workerArgs(broker().url, dirs, slot('slot-new'), ['--idle-timeout', '1s']));
    }
    expect(results.map((r) => r.body.id).sort()).toEqual([...ids].sort());
    await client.endAsync();
  });

  it('drain moves the jobs stranded in a retired slot session to a live slot', async () => {
    const dirs = await fleetDirs();
    await writeTree(dirs.jobs, { d1: null, d2: null, d3: null, d4: null });
    await register(dirs, slot('slot-retired'));
    await register(dirs, slot('slot-live'));
    const client = await testClient(broker().url);
    const results = await collect(client, 'jobs/results/+');
    for (const id of ['d1', 'd2', 'd3', 'd4']) await publishJob(client, { id, steps: ['true'] });
    // Round robin: two of the four sit in the retired slot's session.
    const drained = await runWorkerOnce([
      'drain',
      '--url',
      broker().url,
      '--id',
      slot('slot-retired'),
      '--topic',
      '$share/workers/jobs/pending',
      '--quiet',
      '1s',
      '--force',
    ]);
    expect(drained.code, drained.stderr).toBe(0);
    expect(JSON.parse(drained.stdout)).toMatchObject({
      slot: slot('slot-retired'),
      mode: 'shared',
      moved: 2,
    });
    for (let i = 0; i < 4; i++) {
      const run = await runWorkerOnce(
        workerArgs(broker().url, dirs, slot('slot-live'), ['--idle-timeout', '3s']),
      );
      expect(run.code, run.stderr).toBe(0);
    }
    await waitFor(() => results.length === 4);
    expect(results.map((r) => r.body.id).sort()).toEqual(['d1', 'd2', 'd3', 'd4']);
    // The retired slot is no longer a member: new jobs all go to the live slot.
    await publishJob(client, { id: 'd1', steps: ['true'] });
    await sleep(200);
    const after = await runWorkerOnce(
      workerArgs(broker().url, dirs, slot('slot-live'), ['--idle-timeout', '3s']),
    );
    expect(after.stderr).toContain('already finished');
    await client.endAsync();
  });
});
