import { lstat, readdir, readFile, symlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import type { Manifest } from '../../src/job/report.js';
import { type JobEvent, JobInterrupted, runJob, runJobHeld } from '../../src/job/run-job.js';
import { silentLogger } from '../../src/shared/log.js';
import { engineFixture, leftIn, STAGE_MODES, stageFixturesBy } from '../helpers/engine.js';
import { tempDir, writeTree } from '../helpers/tmp.js';

const run = (id: string, steps?: unknown[], extra: Partial<Parameters<typeof runJob>[1]> = {}) => ({
  request: { id, steps: steps as never },
  attempt: 1,
  log: silentLogger,
  ...extra,
});

async function manifestOf(jobs: string, id: string): Promise<Manifest> {
  return JSON.parse(await readFile(path.join(jobs, id, 'results', 'result.json'), 'utf8'));
}

describe.each(STAGE_MODES)('runJob, staged by %s', (stage) => {
  beforeAll(() => stageFixturesBy(stage));

  it('runs job.json end to end and writes the manifest of schema v1', async () => {
    const { jobs, workspaces, config } = await engineFixture();
    await writeTree(jobs, {
      'j1/job.json': JSON.stringify({
        steps: [
          'cat input.txt > output.txt',
          {
            name: 'env',
            run: 'echo "$JOB_ID $JOB_ATTEMPT $JOB_WORKER_ID $JOB_STEP_INDEX $JOB_STEP_NAME $FROM_JOB $FROM_STEP"',
            env: { FROM_STEP: 's' },
          },
        ],
        env: { FROM_JOB: 'j' },
      }),
      'j1/input.txt': 'data',
    });
    const events: JobEvent[] = [];
    const { manifest, manifestWritten } = await runJob(
      config,
      run('j1', undefined, { onEvent: (e) => events.push(e) }),
    );
    expect(manifestWritten).toBe(true);
    expect(manifest).toMatchObject({
      schemaVersion: 1,
      id: 'j1',
      status: 'success',
      exitCode: 0,
      error: null,
      attempt: 1,
    });
    expect(await manifestOf(jobs, 'j1')).toEqual(manifest);
    expect(manifest.worker).toEqual({ id: config.workerId, host: 'test-host', version: '0.0.0-test' });
    expect(manifest.steps.map((s) => [s.index, s.name, s.status, s.exitCode, s.log])).toEqual([
      [0, 'step 0', 'success', 0, 'step_0.log'],
      [1, 'env', 'success', 0, 'step_1.log'],
    ]);
    expect(await readFile(path.join(jobs, 'j1/results/step_1.log'), 'utf8')).toBe(
      `j1 1 ${config.workerId} 1 env j s\n`,
    );
    expect(manifest.artifacts.map((a) => a.path)).toEqual(['output.txt']);
    expect(manifest.durationMs).toBe(Date.parse(manifest.endedAt) - Date.parse(manifest.startedAt));
    const { stagingMs, runningMs, syncingMs } = manifest.phases;
    expect(manifest.durationMs).toBeGreaterThanOrEqual(stagingMs + runningMs + syncingMs);
    expect(Object.keys(manifest.phases)).toEqual(['stagingMs', 'runningMs', 'syncingMs']);
    expect(events.map((e) => e.type)).toEqual([
      'staging',
      'step-started',
      'step-ended',
      'step-started',
      'step-ended',
      'syncing',
      'done',
    ]);
    // The workspace is gone afterwards.
    expect(await leftIn(workspaces)).toEqual([]);
  });

  it('holds the workspace until released once result.json is written (the worker publishes in between)', async () => {
    const { jobs, workspaces, config } = await engineFixture();
    const held = await runJobHeld(config, run('early', ['echo made > made.txt']));
    expect(held.manifest.status).toBe('success');
    expect((await manifestOf(jobs, 'early')).status).toBe('success');
    expect(await readdir(path.join(workspaces, config.workerId))).toEqual(['early']);
    await held.release();
    expect(await leftIn(workspaces)).toEqual([]);
    await held.release(); // a second release finds nothing more to do
    expect(await leftIn(workspaces)).toEqual([]);
  });

  it('stops at the first failing step and records the rest as skipped', async () => {
    const { jobs, config } = await engineFixture();
    await writeTree(jobs, {
      'j/job.json': JSON.stringify({ steps: ['true', 'exit 4', 'echo never > never.txt'] }),
    });
    const { manifest } = await runJob(config, run('j'));
    expect(manifest.status).toBe('failed');
    expect(manifest.exitCode).toBe(4);
    expect(manifest.steps.map((s) => s.status)).toEqual(['success', 'failed', 'skipped']);
    expect(manifest.steps[2]).toMatchObject({ exitCode: null, log: null, startedAt: null });
    await expect(lstat(path.join(jobs, 'j/results/step_2.log'))).rejects.toMatchObject({ code: 'ENOENT' });
  });

  it('goes on past a step with continueOnError', async () => {
    const { jobs, config } = await engineFixture();
    await writeTree(jobs, {
      'j/job.json': JSON.stringify({
        steps: [{ run: 'exit 2', continueOnError: true }, 'echo after > after.txt'],
      }),
    });
    const { manifest } = await runJob(config, run('j'));
    expect(manifest.status).toBe('success');
    expect(manifest.steps.map((s) => [s.status, s.exitCode])).toEqual([
      ['failed', 2],
      ['success', 0],
    ]);
    expect(manifest.artifacts.map((a) => a.path)).toEqual(['after.txt']);
  });

  it('syncs what a failed job produced', async () => {
    const { jobs, config } = await engineFixture();
    await writeTree(jobs, {
      'j/job.json': JSON.stringify({ steps: ['echo partial > partial.txt; exit 1'] }),
    });
    const { manifest } = await runJob(config, run('j'));
    expect(manifest.status).toBe('failed');
    expect(await readFile(path.join(jobs, 'j/results/partial.txt'), 'utf8')).toBe('partial\n');
  });

  it('times out a step with its own timeout, and the job with the job timeout', async () => {
    const { jobs, config } = await engineFixture();
    await writeTree(jobs, {
      'a/job.json': JSON.stringify({ steps: [{ run: 'sleep 30', timeout: '300ms' }, 'true'] }),
      'b/job.json': JSON.stringify({ steps: ['sleep 0.2', 'sleep 30', 'true'], timeout: '600ms' }),
    });
    const a = (await runJob(config, run('a'))).manifest;
    expect(a.status).toBe('timeout');
    expect(a.exitCode).toBe(143);
    expect(a.steps.map((s) => s.status)).toEqual(['timeout', 'skipped']);
    const started = Date.now();
    const b = (await runJob(config, run('b'))).manifest;
    expect(Date.now() - started).toBeLessThan(5000);
    expect(b.status).toBe('timeout');
    expect(b.steps.map((s) => s.status)).toEqual(['success', 'timeout', 'skipped']);
  });

  it('runs a request that carries its own steps without a job folder', async () => {
    const { jobs, config } = await engineFixture();
    const { manifest } = await runJob(config, run('adhoc', ['echo hi > hi.txt']));
    expect(manifest.status).toBe('success');
    expect(await readFile(path.join(jobs, 'adhoc/results/hi.txt'), 'utf8')).toBe('hi\n');
  });

  it('lets request steps override job.json but keeps its env', async () => {
    const { jobs, config } = await engineFixture();
    await writeTree(jobs, { 'j/job.json': JSON.stringify({ steps: ['exit 9'], env: { WHO: 'job' } }) });
    const { manifest } = await runJob(config, run('j', ['echo $WHO']));
    expect(manifest.status).toBe('success');
    expect(await readFile(path.join(jobs, 'j/results/step_0.log'), 'utf8')).toBe('job\n');
  });

  it.each([
    ['a missing folder', {}, 'JOB_NOT_FOUND'],
    ['a folder without job.json', { 'j/data.txt': 'x' }, 'INVALID_JOB_FILE'],
    ['an invalid job.json', { 'j/job.json': '{"steps": [42], "timeout": "soon"}' }, 'INVALID_JOB_FILE'],
    ['job.json that is not JSON', { 'j/job.json': 'steps: [a]' }, 'INVALID_JOB_FILE'],
    ['job.json that is a directory', { 'j/job.json/': null }, 'INVALID_JOB_FILE'],
  ] as [string, Record<string, string | null>, string][])(
    'gives status error for %s',
    async (_name, tree, code) => {
      const { jobs, workspaces, config } = await engineFixture();
      await writeTree(jobs, tree);
      const { manifest } = await runJob(config, run('j'));
      expect(manifest.status).toBe('error');
      expect(manifest.exitCode).not.toBe(0);
      expect(manifest.error?.code).toBe(code);
      expect(manifest.error?.message).not.toMatch(/\n\s+at /);
      expect(await leftIn(workspaces)).toEqual([]);
    },
  );

  it('writes the manifest of an invalid job.json with every problem', async () => {
    const { jobs, config } = await engineFixture();
    await writeTree(jobs, { 'j/job.json': '{"steps": [42], "timeout": "soon"}' });
    await runJob(config, run('j'));
    const manifest = await manifestOf(jobs, 'j');
    expect(manifest.error?.message).toContain('steps[0]');
    expect(manifest.error?.message).toContain('timeout');
  });

  it('refuses a job.json that is a symlink', async () => {
    const { jobs, config } = await engineFixture();
    const outside = await tempDir();
    await writeFile(path.join(outside, 'job.json'), '{"steps":["true"]}');
    await writeTree(jobs, { 'j/job.json': { link: path.join(outside, 'job.json') } });
    const { manifest } = await runJob(config, run('j'));
    expect(manifest.error).toMatchObject({
      code: 'INVALID_JOB_FILE',
      message: expect.stringContaining('symlink'),
    });
  });

  it('refuses a results/ that is a symlink, and writes nothing through it', async () => {
    const { jobs, config } = await engineFixture();
    const outside = await tempDir();
    await writeTree(jobs, { 'j/job.json': '{"steps":["true"]}', 'j/results': { link: outside } });
    const { manifest, manifestWritten } = await runJob(config, run('j'));
    expect(manifest.error?.code).toBe('RESULTS_NOT_DIRECTORY');
    expect(manifestWritten).toBe(false);
    expect(await readdir(outside)).toEqual([]);
  });

  it('clears an earlier attempt from results/ but keeps the claim files', async () => {
    const { jobs, config } = await engineFixture();
    await writeTree(jobs, {
      'j/job.json': '{"steps":["true"]}',
      'j/results/stale.txt': 'old',
      'j/results/step_5.log': 'old',
      'j/results/.mqtt-fs-worker.claim': 'claim',
    });
    await runJob(config, run('j'));
    expect((await readdir(path.join(jobs, 'j/results'))).sort()).toEqual([
      '.mqtt-fs-worker.claim',
      'result.json',
      'step_0.log',
    ]);
  });

  it('throws JobInterrupted and removes the workspace when interrupted', async () => {
    const { jobs, workspaces, config } = await engineFixture();
    await writeTree(jobs, { 'j/job.json': '{"steps":["sleep 30"]}' });
    const controller = new AbortController();
    setTimeout(() => controller.abort('interrupted'), 300);
    await expect(runJob(config, run('j', undefined, { signal: controller.signal }))).rejects.toBeInstanceOf(
      JobInterrupted,
    );
    expect(await leftIn(workspaces)).toEqual([]);
    await expect(lstat(path.join(jobs, 'j/results/result.json'))).rejects.toMatchObject({ code: 'ENOENT' });
  });

  it('records cancellation as status cancelled', async () => {
    const { jobs, config } = await engineFixture();
    await writeTree(jobs, { 'j/job.json': '{"steps":["sleep 30", "true"]}' });
    const controller = new AbortController();
    setTimeout(() => controller.abort('cancelled'), 300);
    const { manifest } = await runJob(config, run('j', undefined, { signal: controller.signal }));
    expect(manifest.status).toBe('cancelled');
    expect(manifest.steps.map((s) => s.status)).toEqual(['cancelled', 'skipped']);
  });

  it('does not pass the symlink of a staged input back as an artifact', async () => {
    const { jobs, config } = await engineFixture();
    const outside = await tempDir();
    await writeFile(path.join(outside, 'secret'), 'secret');
    await writeTree(jobs, { 'j/job.json': '{"steps":["cat link-to-secret > copy.txt || true"]}' });
    await symlink(path.join(outside, 'secret'), path.join(jobs, 'j/link-to-secret'));
    const { manifest } = await runJob(config, run('j'));
    expect(manifest.artifacts.map((a) => a.path)).toEqual(['copy.txt']);
    expect(manifest.skipped).toEqual([]);
  });
});
