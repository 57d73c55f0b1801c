import { execFileSync } from 'node:child_process';
import { mkdir, readdir, readFile, symlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { signRequest } from '../../src/shared/signing.js';
import { freshBrokerPerTest } from '../helpers/mosquitto.js';
import { tempDir, waitFor, writeTree } from '../helpers/tmp.js';
import {
  collect,
  fleetDirs,
  publishJob,
  runWorkerOnce,
  slot as slotId,
  startWorker,
  testClient,
  workerArgs,
} from '../helpers/worker.js';

// A corpus of hostile messages and job folders, each sent to the same slot: every one gets an outcome, is
// acknowledged (it must not come back), writes nothing outside the job folder and workspace, and the slot then
// still runs a good job.

const { broker } = freshBrokerPerTest();

type Expect = { rejected: string } | { result: string; id: string };

describe('hostile input', () => {
  it('answers every bad message and job folder clearly, and the slot keeps working', {
    timeout: 180_000,
  }, async () => {
    const dirs = await fleetDirs();
    const outside = await tempDir('mfw-outside-');
    await writeFile(path.join(outside, 'sentinel'), 'untouched');
    await writeTree(dirs.jobs, {
      'results-file/job.json': '{"steps":["true"]}',
      'results-file/results': 'a file, not a folder',
      'results-link/job.json': '{"steps":["true"]}',
      'results-link/results': { link: outside },
      'jobjson-link/job.json': { link: path.join(outside, 'sentinel') },
      'bad-json/job.json': '{"steps": [1, 2], "timeout": "never"}',
      'no-jobjson/input.txt': 'x',
      'inner-links/job.json': '{"steps":["cat etc-link/passwd > copy.txt || true; ln -s /etc made-link"]}',
      'inner-links/etc-link': { link: '/etc' },
    });
    await symlink(outside, path.join(dirs.jobs, 'escape'));
    await mkdir(path.join(dirs.jobs, 'fifo-jobjson'));
    execFileSync('mkfifo', [path.join(dirs.jobs, 'fifo-jobjson/job.json')]);
    const slot = slotId('slot-h');
    const args = workerArgs(broker().url, dirs, slot, ['--idle-timeout', '3s']);
    expect(
      (await runWorkerOnce(workerArgs(broker().url, dirs, slot, ['--idle-timeout', '100ms']))).code,
    ).toBe(0);
    const client = await testClient(broker().url);
    const rejected = await collect(client, 'jobs/rejected/#');
    const results = await collect(client, 'jobs/results/+');

    const cases: [string, string | Buffer, Expect][] = [
      ['not JSON', 'hello', { rejected: 'INVALID_PAYLOAD' }],
      ['empty', '', { rejected: 'INVALID_PAYLOAD' }],
      ['binary', Buffer.from([0xde, 0xad, 0xbe, 0xef, 0x00]), { rejected: 'INVALID_PAYLOAD' }],
      ['an array', '[{"id":"a"}]', { rejected: 'INVALID_PAYLOAD' }],
      ['no id', '{"steps":["true"]}', { rejected: 'INVALID_ID' }],
      ['an empty id', '{"id":""}', { rejected: 'INVALID_ID' }],
      ['a numeric id', '{"id":7}', { rejected: 'INVALID_ID' }],
      ['a dot-dot id', '{"id":".."}', { rejected: 'INVALID_ID' }],
      ['a traversal id', '{"id":"../../etc"}', { rejected: 'INVALID_ID' }],
      ['a slash id', '{"id":"a/b"}', { rejected: 'INVALID_ID' }],
      ['an absolute id', '{"id":"/etc/passwd"}', { rejected: 'INVALID_ID' }],
      ['a NUL id', '{"id":"a\\u0000b"}', { rejected: 'INVALID_ID' }],
      ['a huge id', JSON.stringify({ id: 'x'.repeat(5000) }), { rejected: 'INVALID_ID' }],
      [
        'an oversized payload',
        JSON.stringify({ id: 'big', pad: 'x'.repeat(400 * 1024) }),
        { rejected: 'INVALID_PAYLOAD' },
      ],
      ['steps of the wrong type', '{"id":"wrong-steps","steps":"rm -rf /"}', { rejected: 'INVALID_PAYLOAD' }],
      // A misspelled key: refused, never half-understood (job.json's steps would otherwise run).
      ['a misspelled key', '{"id":"typo","stpes":["touch /tmp/never"]}', { rejected: 'INVALID_PAYLOAD' }],
      [
        'a request nested 100,000 levels deep',
        `{"id":"deep","x":${'['.repeat(100_000)}${']'.repeat(100_000)}}`,
        { rejected: 'INVALID_PAYLOAD' },
      ],
      ['a FIFO as job.json', '{"id":"fifo-jobjson"}', { result: 'INVALID_JOB_FILE', id: 'fifo-jobjson' }],
      ['a missing folder', '{"id":"ghost"}', { result: 'JOB_NOT_FOUND', id: 'ghost' }],
      ['a folder without job.json', '{"id":"no-jobjson"}', { result: 'INVALID_JOB_FILE', id: 'no-jobjson' }],
      ['an invalid job.json', '{"id":"bad-json"}', { result: 'INVALID_JOB_FILE', id: 'bad-json' }],
      [
        'a job.json that is a symlink',
        '{"id":"jobjson-link"}',
        { result: 'INVALID_JOB_FILE', id: 'jobjson-link' },
      ],
      [
        'a folder linking out of the jobs root',
        '{"id":"escape"}',
        { result: 'JOB_OUTSIDE_ROOT', id: 'escape' },
      ],
      [
        'a results/ that is a file',
        '{"id":"results-file"}',
        { result: 'RESULTS_NOT_DIRECTORY', id: 'results-file' },
      ],
      [
        'a results/ that links out',
        '{"id":"results-link"}',
        { result: 'RESULTS_NOT_DIRECTORY', id: 'results-link' },
      ],
    ];
    for (const [name, payload, expected] of cases) {
      const before = { rejected: rejected.length, results: results.length };
      await publishJob(client, payload);
      const run = await runWorkerOnce(args);
      expect(run.code, `${name}: ${run.stderr}`).toBe(0);
      expect(run.stderr, name).not.toMatch(/\n\s+at /);
      if ('rejected' in expected) {
        await waitFor(() => rejected.length > before.rejected, 5000);
        expect(rejected.at(-1)?.body, `${name}: ${JSON.stringify(rejected.at(-1)?.body)}`).toMatchObject({
          workerId: slot,
          error: { code: expected.rejected },
        });
        expect(run.stderr, name).toContain(expected.rejected);
      } else {
        await waitFor(() => results.length > before.results, 5000);
        expect(results.at(-1)?.body, name).toMatchObject({
          id: expected.id,
          status: 'error',
          error: { code: expected.result },
        });
      }
    }

    // A refused request that names a usable id is refused under that id, never with a result.
    for (const id of ['big', 'wrong-steps'])
      expect(rejected.find((r) => r.body.id === id)?.topic, id).toBe(`jobs/rejected/${id}`);
    expect(results.map((r) => r.body.id)).not.toContain('wrong-steps');

    // Symlinks inside a job folder are staged as links and never followed back out.
    await publishJob(client, { id: 'inner-links' });
    expect((await runWorkerOnce(args)).code).toBe(0);
    await waitFor(() => results.at(-1)?.body.id === 'inner-links');
    const manifest = JSON.parse(
      await readFile(path.join(dirs.jobs, 'inner-links/results/result.json'), 'utf8'),
    );
    expect(manifest.skipped).toEqual([{ path: 'made-link', reason: 'symlink' }]);

    // Nothing outside was touched; every message was acknowledged (the slot has nothing left); it still works.
    expect(await readdir(outside)).toEqual(['sentinel']);
    expect(await readFile(path.join(outside, 'sentinel'), 'utf8')).toBe('untouched');
    // Nothing but the worker's own record of its session (`.mqtt-fs-worker/sessions/`).
    expect(await readdir(dirs.workspaces)).toEqual(['.mqtt-fs-worker']);
    const idle = await runWorkerOnce(workerArgs(broker().url, dirs, slot, ['--idle-timeout', '1s']));
    expect(idle.stderr).toContain('no job within the idle timeout');
    await publishJob(client, { id: 'good-after', steps: ['echo fine'] });
    expect((await runWorkerOnce(args)).code).toBe(0);
    await waitFor(() => results.at(-1)?.body.id === 'good-after');
    expect(results.at(-1)?.body).toMatchObject({ status: 'success' });
    await client.endAsync();
  });

  it('after each message that used to freeze a slot, SIGTERM stops the worker within the grace, and the slot then runs a good job', {
    timeout: 180_000,
  }, async () => {
    const dirs = await fleetDirs();
    await writeTree(dirs.jobs, {
      'share-reply': null,
      'sys-reply': null,
      'fifo-claim/job.json': '{"steps":["true"]}',
    });
    await mkdir(path.join(dirs.jobs, 'fifo-claim/results'));
    execFileSync('mkfifo', [path.join(dirs.jobs, 'fifo-claim/results/.mqtt-fs-worker.claim.1')]);
    const slot = slotId('slot-t');
    const grace = ['--kill-grace', '10s', '--secret', 'k3y', '--idle-timeout', '10m'];
    const client = await testClient(broker().url);
    const results = await collect(client, 'jobs/results/+');
    const deep = `{"id":"deep","x":${'['.repeat(100_000)}${']'.repeat(100_000)}}`;
    const signed = (id: string) => JSON.stringify(signRequest({ id, steps: ['true'] }, 'k3y', Date.now()));
    // Rejected ones leave the worker waiting for the next request; the others run, publish and exit.
    const cases: [string, string, Record<string, string>, 'waiting' | 'exited'][] = [
      ['deeply nested JSON with --secret', deep, {}, 'waiting'],
      ['a 1 MB request', JSON.stringify({ id: 'huge', pad: 'x'.repeat(1024 * 1024) }), {}, 'waiting'],
      [
        'a response topic under $share',
        signed('share-reply'),
        { responseTopic: '$share/g/replies' },
        'exited',
      ],
      ['a response topic under $SYS', signed('sys-reply'), { responseTopic: '$SYS/x' }, 'exited'],
      ['a FIFO as a claim file', signed('fifo-claim'), {}, 'exited'],
    ];
    for (const [name, payload, properties, expected] of cases) {
      const before = results.length;
      const worker = startWorker(workerArgs(broker().url, dirs, slot, grace));
      await worker.sawLog('waiting for one job');
      await publishJob(client, payload, properties);
      // Answered: rejected and acknowledged (the worker waits for the next), or run and published (it exits).
      const settled = await Promise.race([
        worker.sawLog(/rejected|INVALID|nested more than/).then(() => 'waiting' as const),
        worker.exited.then(() => 'exited' as const),
      ]);
      expect(settled, name).toBe(expected);
      if (settled === 'waiting') {
        const stopped = Date.now();
        worker.child.kill('SIGTERM');
        const exit = await worker.exited;
        expect(Date.now() - stopped, name).toBeLessThan(10_000);
        expect(exit.code, `${name}: ${exit.stderr}`).toBe(0);
      } else {
        expect((await worker.exited).code, name).toBe(0);
        await waitFor(() => results.length > before, 5000);
      }
      expect((await worker.exited).stderr, name).not.toMatch(/\n\s+at /);
      // The same slot runs a good job next: the hostile message neither came back nor blocked anything.
      const good = `good-${cases.findIndex((c) => c[0] === name)}`;
      await writeTree(dirs.jobs, { [good]: null });
      await publishJob(client, signed(good));
      const next = await runWorkerOnce(workerArgs(broker().url, dirs, slot, grace));
      expect(next.code, `${name}: ${next.stderr}`).toBe(0);
      await waitFor(() => results.some((r) => r.body.id === good));
      expect(results.find((r) => r.body.id === good)?.body, name).toMatchObject({ status: 'success' });
    }
    await client.endAsync();
  });

  it('ignores a response topic it may not publish to ($SYS, $share, wildcards) and keeps working', async () => {
    const dirs = await fleetDirs();
    await writeTree(dirs.jobs, { a: null, b: null, c: null, d: null, good: null });
    const slot = slotId('slot-r');
    const client = await testClient(broker().url);
    const results = await collect(client, 'jobs/results/+');
    const worker = startWorker(workerArgs(broker().url, dirs, slot));
    await worker.sawLog('waiting for one job');
    await publishJob(client, { id: 'a', steps: ['true'] }, { responseTopic: '$SYS/broker/x' });
    expect((await worker.exited).code).toBe(0);
    const cancels = await collect(client, 'jobs/cancel/#');
    for (const [id, responseTopic] of [
      ['b', '$share/g/replies'],
      ['c', 'replies/#'],
      // Outside --response-topic-prefix (default: the results root): it would cancel another job.
      ['d', 'jobs/cancel/victim'],
    ] as const) {
      await publishJob(client, { id, steps: ['true'] }, { responseTopic });
      const run = await runWorkerOnce(workerArgs(broker().url, dirs, slot, ['--idle-timeout', '3s']));
      expect(run.code, run.stderr).toBe(0);
      expect(run.stderr).toContain('ignoring the request');
    }
    await waitFor(() => results.length === 4);
    expect(results.map((r) => [r.body.id, r.body.status])).toEqual([
      ['a', 'success'],
      ['b', 'success'],
      ['c', 'success'],
      ['d', 'success'],
    ]);
    expect(cancels).toEqual([]);
    await client.endAsync();
  });

  it('with --secret runs only signed requests: forged, stale and unsigned are rejected, a replay is not run again', {
    timeout: 120_000,
  }, async () => {
    const dirs = await fleetDirs();
    const ledger = path.join(await tempDir(), 'runs');
    const secret = 's3cret-shared-key';
    const args = workerArgs(broker().url, dirs, slotId('slot-s'), [
      '--idle-timeout',
      '3s',
      '--secret',
      secret,
    ]);
    await runWorkerOnce(workerArgs(broker().url, dirs, slotId('slot-s'), ['--idle-timeout', '100ms']));
    const client = await testClient(broker().url);
    const rejected = await collect(client, 'jobs/rejected/#');
    const results = await collect(client, 'jobs/results/+');
    const job = { id: 'signed-1', steps: [`echo run >> ${ledger}`] };

    for (const [name, body, reason] of [
      ['unsigned', job, 'not signed'],
      ['forged', signRequest(job, 'not-the-secret', Date.now()), 'does not match'],
      ['stale', signRequest(job, secret, Date.now() - 3_600_000), 'older than'],
      // Signing walks the request: nested this deep it overflowed the stack on every redelivery.
      ['deeply nested', `{"id":"deep","x":${'['.repeat(100_000)}${']'.repeat(100_000)}}`, 'nested more than'],
    ] as const) {
      await publishJob(client, body);
      const run = await runWorkerOnce(args);
      expect(run.code, name).toBe(0);
      await waitFor(() =>
        rejected.some((r) => String((r.body.error as { message: string }).message).includes(reason)),
      );
      expect(run.stderr, name).not.toContain(secret);
    }
    expect(results).toEqual([]);

    const signed = JSON.stringify(signRequest(job, secret, Date.now()));
    await publishJob(client, signed);
    expect((await runWorkerOnce(args)).code).toBe(0);
    await waitFor(() => results.length === 1);
    expect(results[0]?.body).toMatchObject({ id: 'signed-1', status: 'success' });
    // The same signed bytes again (a replay within --max-age): the claim says finished; nothing runs twice.
    await publishJob(client, signed);
    const replay = await runWorkerOnce(args);
    expect(replay.stderr).toContain('already finished');
    expect(await readFile(ledger, 'utf8')).toBe('run\n');

    // submit signs when it has the secret.
    const slot = runWorkerOnce(args);
    const submitted = await runWorkerOnce([
      'submit',
      'signed-2',
      '--url',
      broker().url,
      '--secret',
      secret,
      '--steps',
      'true',
      '--wait',
      '--timeout',
      '20s',
    ]);
    expect(submitted.code, submitted.stderr).toBe(0);
    expect(JSON.parse(submitted.stdout)).toMatchObject({ id: 'signed-2', status: 'success' });
    await slot;
    await client.endAsync();
  });

  it('with --no-payload-steps refuses a request that carries steps under its id, never with a result', async () => {
    const dirs = await fleetDirs();
    await writeTree(dirs.jobs, { 'has-steps': null });
    const slot = slotId('slot-n');
    await runWorkerOnce(workerArgs(broker().url, dirs, slot, ['--idle-timeout', '100ms']));
    const client = await testClient(broker().url);
    const results = await collect(client, 'jobs/results/+');
    const rejected = await collect(client, 'jobs/rejected/#');
    await publishJob(client, { id: 'has-steps', steps: ['touch pwned'] });
    const run = await runWorkerOnce(
      workerArgs(broker().url, dirs, slot, ['--idle-timeout', '3s', '--no-payload-steps']),
    );
    expect(run.code).toBe(0);
    await waitFor(() => rejected.length === 1);
    expect(rejected[0]).toMatchObject({
      topic: 'jobs/rejected/has-steps',
      body: { id: 'has-steps', workerId: slot, error: { code: 'INVALID_PAYLOAD' } },
    });
    expect(await readdir(path.join(dirs.jobs, 'has-steps'))).toEqual([]);
    // submit --wait hears the refusal of its own request, and only of its own (the bytes' SHA-256 must match).
    const worker = runWorkerOnce(
      workerArgs(broker().url, dirs, slot, ['--idle-timeout', '3s', '--no-payload-steps']),
    );
    const submitted = await runWorkerOnce([
      'submit',
      'has-steps',
      '--url',
      broker().url,
      '--steps',
      'touch pwned',
      '--wait',
      '--timeout',
      '20s',
    ]);
    expect(submitted.code, submitted.stderr).toBe(1);
    expect(JSON.parse(submitted.stdout)).toMatchObject({
      id: 'has-steps',
      error: { code: 'INVALID_PAYLOAD' },
    });
    await worker;
    expect(results).toEqual([]);
    await client.endAsync();
  });

  it('masks a password from --password-file or inside --url, and warns about --password on the command line', async () => {
    const dirs = await fleetDirs();
    await writeTree(dirs.jobs, { f: null, u: null });
    const file = path.join(await tempDir(), 'pw');
    await writeFile(file, 'file-pw-value\n');
    const client = await testClient(broker().url);
    const results = await collect(client, 'jobs/results/+');
    const slot = slotId('slot-pw');
    const withUrl = broker().url.replace('mqtt://', 'mqtt://u:url-pw-value@');
    for (const [id, url, extra, secret] of [
      ['f', broker().url, ['--password-file', file], 'file-pw-value'],
      ['u', withUrl, [], 'url-pw-value'],
    ] as const) {
      const worker = startWorker([...workerArgs(url, dirs, slot), ...extra], { MQTT_USERNAME: 'u' });
      await worker.sawLog('waiting for one job');
      await publishJob(client, { id, steps: [`echo "the password: ${secret}"`] });
      const run = await worker.exited;
      expect(run.code, run.stderr).toBe(0);
      expect(await readFile(path.join(dirs.jobs, id, 'results/step_0.log'), 'utf8'), id).toBe(
        'the password: ***\n',
      );
      expect(run.stderr).not.toContain(secret);
    }
    await waitFor(() => results.length === 2);
    const onCommandLine = await runWorkerOnce(
      workerArgs(broker().url, dirs, slot, ['-p', 'cli-pw-value', '--idle-timeout', '100ms']),
      { MQTT_USERNAME: 'u' },
    );
    expect(onCommandLine.stderr).toContain('visible to every user of this host');
    expect(onCommandLine.stderr).not.toContain('cli-pw-value');
    await client.endAsync();
  });

  it('never prints the broker password or --mask values in the worker log, and masks them in step logs', async () => {
    const dirs = await fleetDirs();
    await writeTree(dirs.jobs, { m: null });
    const client = await testClient(broker().url);
    const results = await collect(client, 'jobs/results/+');
    await runWorkerOnce(workerArgs(broker().url, dirs, slotId('slot-m'), ['--idle-timeout', '100ms']));
    await publishJob(client, { id: 'm', steps: ['echo "token=tok-12345 and $API_TOKEN"'] });
    const run = await runWorkerOnce(
      workerArgs(broker().url, dirs, slotId('slot-m'), [
        '--idle-timeout',
        '3s',
        '--mask',
        'tok-12345',
        '--log-format',
        'json',
      ]),
      {
        API_TOKEN: 'from-the-env-value',
        MQTT_USERNAME: 'anyone',
        MQTT_PASSWORD: 'broker-pw-unused',
      },
    );
    expect(run.code, run.stderr).toBe(0);
    await waitFor(() => results.length === 1);
    expect(await readFile(path.join(dirs.jobs, 'm/results/step_0.log'), 'utf8')).toBe('token=*** and ***\n');
    for (const line of run.stderr.trim().split('\n')) {
      const entry = JSON.parse(line);
      expect(entry).toMatchObject({ worker: slotId('slot-m') });
    }
    expect(run.stderr).not.toContain('broker-pw-unused');
    await client.endAsync();
  });
});

describe('secrets in connection errors', () => {
  it('never prints a password from the broker URL or the password option', async () => {
    const dirs = await fleetDirs();
    const run = await runWorkerOnce(
      workerArgs('mqtt://user:url-secret-pw@127.0.0.1:1', dirs, slotId('slot-x'), [
        '--connect-timeout',
        '1s',
        '--password',
        'flag-secret-pw',
      ]),
    );
    expect(run.code).toBe(3);
    expect(run.stderr).toContain('mqtt://user:***@127.0.0.1:1');
    expect(run.stderr).not.toContain('url-secret-pw');
    expect(run.stderr).not.toContain('flag-secret-pw');
  });
});
