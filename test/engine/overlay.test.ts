import { execFileSync } from 'node:child_process';
import { readdir, readFile, stat } from 'node:fs/promises';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { runJob } from '../../src/job/run-job.js';
import { mountsUnder, OVERLAY_FROM_FILES } from '../../src/job/workspace/overlay.js';
import { silentLogger } from '../../src/shared/log.js';
import { engineFixture, leftIn } from '../helpers/engine.js';
import { tempDir, writeTree } from '../helpers/tmp.js';
import { BIN, runWorkerOnce, startProcess, startWorker } from '../helpers/worker.js';

// Overlay staging on this machine (root can mount overlays): what a step sees, what comes back, what is left, and
// the copy it falls back to where the kernel says no. The engine suite (job.test.ts) runs in both modes as well.

const isRoot = process.getuid?.() === 0;
const run = (id: string) => ({ request: { id, steps: undefined }, attempt: 1, log: silentLogger });

describe.skipIf(!isRoot)('overlay staging', () => {
  it('shows the job folder without results/ and special files, keeps it unchanged, and syncs only what the job wrote', async () => {
    const { jobs, workspaces, config } = await engineFixture({ stage: 'overlay' });
    await writeTree(jobs, {
      'j/job.json': JSON.stringify({
        steps: [
          [
            'ls -A > seen.txt; ls -A sub >> seen.txt',
            'echo changed >> keep.txt', // modify an input
            'rm gone.txt', // delete an input: no artifact
            'echo new > sub/new.txt', // create in an existing folder
            'mkdir -p fresh/deep && echo deep > fresh/deep/f.txt',
            'ln -s /etc made-link', // links never come back as files
            'chmod 600 mode.txt', // a metadata change is a change, as with a copy
            'test -w /proc/self/fd || true',
          ].join(' && '),
        ],
      }),
      'j/keep.txt': 'original\n',
      'j/gone.txt': 'bye\n',
      'j/mode.txt': 'mode\n',
      'j/sub/old.txt': 'old\n',
      'j/results/stale.txt': 'from an earlier run\n',
    });
    execFileSync('mkfifo', [path.join(jobs, 'j/sub/pipe')]);
    const { manifest } = await runJob(config, run('j'));
    expect(manifest.status, JSON.stringify(manifest.error)).toBe('success');
    expect(manifest.artifacts.map((a) => a.path)).toEqual([
      'fresh/deep/f.txt',
      'keep.txt',
      'mode.txt',
      'seen.txt',
      'sub/new.txt',
    ]);
    // Staging's skips first, then the sync's, as with a copy.
    expect(manifest.skipped).toEqual([
      { path: 'sub/pipe', reason: 'special-file' },
      { path: 'made-link', reason: 'symlink' },
    ]);
    // The step saw neither results/ nor the FIFO.
    const seen = (await readFile(path.join(jobs, 'j/results/seen.txt'), 'utf8')).split('\n');
    expect(seen).not.toContain('results');
    expect(seen).not.toContain('pipe');
    expect(seen).toContain('old.txt');
    // The job folder itself is as it was; the changes are in results/.
    expect(await readFile(path.join(jobs, 'j/keep.txt'), 'utf8')).toBe('original\n');
    expect(await readFile(path.join(jobs, 'j/results/keep.txt'), 'utf8')).toBe('original\nchanged\n');
    expect(await readFile(path.join(jobs, 'j/gone.txt'), 'utf8')).toBe('bye\n');
    expect((await stat(path.join(jobs, 'j/mode.txt'))).mode & 0o777).not.toBe(0o600);
    // Nothing mounted or left behind.
    expect(mountsUnder(workspaces)).toEqual([]);
    expect(await leftIn(workspaces)).toEqual([]);
  });

  it('auto mounts an overlay for a big folder and copies a small one', async () => {
    const { jobs, config } = await engineFixture({ stage: 'auto' });
    const many = Object.fromEntries(
      Array.from({ length: OVERLAY_FROM_FILES }, (_, i) => [`big/f${i}.txt`, `${i}\n`]),
    );
    await writeTree(jobs, {
      ...many,
      'big/job.json': JSON.stringify({
        steps: ['awk \'$5 == ENVIRON["PWD"] {print $9}\' /proc/self/mountinfo > fs.txt'],
      }),
      'small/job.json': JSON.stringify({
        steps: ['awk \'$5 == ENVIRON["PWD"] {print $9}\' /proc/self/mountinfo > fs.txt'],
      }),
    });
    const lines: string[] = [];
    const log = { ...silentLogger, info: (line: string) => lines.push(line), child: () => log };
    const big = await runJob(config, { ...run('big'), log: log as never });
    const small = await runJob(config, { ...run('small'), log: log as never });
    expect([big.manifest.status, small.manifest.status]).toEqual(['success', 'success']);
    expect(await readFile(path.join(jobs, 'big/results/fs.txt'), 'utf8')).toBe('overlay\n');
    expect(await readFile(path.join(jobs, 'small/results/fs.txt'), 'utf8')).toBe('');
    expect(lines.some((line) => line.includes('as an overlay'))).toBe(true);
  });

  it('sweeps the overlay a SIGKILLed run left mounted, without touching the job folder', {
    timeout: 60_000,
  }, async () => {
    const base = await tempDir('mfw-ov-');
    const jobs = path.join(base, 'jobs');
    const workspaces = path.join(base, 'workspaces');
    await writeTree(base, {
      // Its step outlives the worker (no cgroup, --limits off) and keeps the mount busy: the sweep detaches it.
      'jobs/j/job.json': JSON.stringify({ steps: ['echo started; exec sleep 299.17'] }),
      'jobs/j/input.txt': 'keep me\n',
      'workspaces/': null,
      'p.json': '{"id":"j"}',
    });
    const args = [
      '--dry-run',
      'p.json',
      '--jobs-dir',
      jobs,
      '--workspaces-dir',
      workspaces,
      '--stage',
      'overlay',
      '--limits',
      'off',
    ];
    const crashed = startWorker(args, {}, base);
    await crashed.sawLog('step 0 | started');
    expect(mountsUnder(workspaces)).toHaveLength(1);
    crashed.child.kill('SIGKILL');
    await crashed.exited;
    expect(mountsUnder(workspaces)).toHaveLength(1); // still there: nobody unmounted it
    // The next dry run gets the same identity (dry-run-N) and sweeps it before anything else.
    await writeTree(jobs, { 'j/job.json': JSON.stringify({ steps: ['cat input.txt'] }) });
    const next = await runWorkerOnce(args, {}, base);
    expect(next.code, next.stderr).toBe(0);
    expect(mountsUnder(workspaces)).toEqual([]);
    expect(await readFile(path.join(jobs, 'j/input.txt'), 'utf8')).toBe('keep me\n');
    expect(await readFile(path.join(jobs, 'j/results/step_0.log'), 'utf8')).toBe('keep me\n');
    expect(await leftIn(workspaces)).toEqual([]);
    execFileSync('pkill', ['-f', 'sleep 299.17']);
  });

  it('falls back to the copy, saying why, where the kernel refuses the mount (a user namespace)', async () => {
    const base = await tempDir('mfw-ov-');
    const many = Object.fromEntries(
      Array.from({ length: OVERLAY_FROM_FILES }, (_, i) => [`jobs/j/f${i}.txt`, `${i}\n`]),
    );
    await writeTree(base, {
      ...many,
      'jobs/j/job.json': JSON.stringify({ steps: ['cat f7.txt'] }),
      'workspaces/': null,
      'p.json': '{"id":"j"}',
    });
    // Root inside a user namespace of its own, without a mount namespace: mount(2) says EPERM.
    const fallback = await runInNamespace(base, 'auto');
    expect(fallback.code, fallback.stderr).toBe(0);
    expect(fallback.stderr).toMatch(
      /staging by copy: mount: .*(permission denied|must be superuser|not permitted)/i,
    );
    expect(fallback.stderr).toContain(`staged ${OVERLAY_FROM_FILES + 1} files (`);
    expect(await readFile(path.join(base, 'jobs/j/results/step_0.log'), 'utf8')).toBe('7\n');
    const forced = await runInNamespace(base, 'overlay');
    expect(forced.code).toBe(1);
    expect(JSON.parse(forced.stdout)).toMatchObject({ status: 'error', error: { code: 'STAGING_FAILED' } });
    expect(forced.stderr).toContain('STAGING_FAILED');
  });
});

describe.skipIf(!isRoot)('a slot that needs overlays where none can be mounted', () => {
  it('--stage overlay refuses to start (NOT_READY, exit 8) before it could take a job; doctor says why', async () => {
    const base = await tempDir('mfw-ov-');
    await writeTree(base, { 'jobs/': null, 'workspaces/': null });
    const common = [
      '--jobs-dir',
      'jobs',
      '--workspaces-dir',
      'workspaces',
      '--limits',
      'off',
      '--url',
      'mqtt://127.0.0.1:9',
    ];
    const slot = await startProcess(
      'unshare',
      [
        '--user',
        '--map-root-user',
        process.execPath,
        BIN,
        ...common,
        '--id',
        `ov-slot-p${process.pid}`,
        '--stage',
        'overlay',
      ],
      {},
      base,
    ).exited;
    expect(slot.code, slot.stderr).toBe(8);
    expect(slot.stderr).toMatch(
      /NOT_READY: --stage overlay, but an overlay cannot be mounted here: mount: .*permission denied/i,
    );
    const doctor = await startProcess(
      'unshare',
      [
        '--user',
        '--map-root-user',
        process.execPath,
        BIN,
        'doctor',
        ...common,
        '--id',
        `ov-doc-p${process.pid}`,
      ],
      {},
      base,
    ).exited;
    expect(doctor.stdout).toMatch(/ok\s+staging\s+copy \(an overlay cannot be used: mount: /);
    // As root of the host it can: doctor mounts one and says auto will use it for big folders.
    const here = await runWorkerOnce(['doctor', ...common, '--id', `ov-doc2-p${process.pid}`], {}, base);
    expect(here.stdout).toMatch(/ok\s+staging\s+overlay for folders of 256 files/);
    expect(mountsUnder(path.join(base, 'workspaces'))).toEqual([]);
  });
});

/** The dry run as root of a user namespace of its own (no mount namespace: mounting is refused). */
async function runInNamespace(cwd: string, stage: string) {
  return startProcess(
    'unshare',
    [
      '--user',
      '--map-root-user',
      process.execPath,
      BIN,
      '--dry-run',
      'p.json',
      '--jobs-dir',
      'jobs',
      '--workspaces-dir',
      'workspaces',
      '--stage',
      stage,
      '--limits',
      'off',
    ],
    {},
    cwd,
  ).exited;
}

describe.skipIf(!isRoot)('overlay staging with --run-as', () => {
  it('auto copies (the step user must own its files), and says so', async () => {
    const { resolveRunAs } = await import('../../src/step/run-as.js');
    const user = await resolveRunAs('nobody', true);
    const { jobs, workspaces, config } = await engineFixture({ stage: 'auto', runAs: user });
    for (let d = workspaces; d.startsWith('/tmp/') && d !== '/tmp'; d = path.dirname(d))
      execFileSync('chmod', ['755', d]);
    const many = Object.fromEntries(
      Array.from({ length: OVERLAY_FROM_FILES }, (_, i) => [`j/f${i}.txt`, `${i}\n`]),
    );
    await writeTree(jobs, { ...many, 'j/job.json': JSON.stringify({ steps: ['echo more >> f1.txt'] }) });
    const lines: string[] = [];
    const log = { ...silentLogger, info: (line: string) => lines.push(line), child: () => log };
    const { manifest } = await runJob(config, { ...run('j'), log: log as never });
    expect(manifest.status, JSON.stringify(manifest.error)).toBe('success');
    expect(lines.find((line) => line.startsWith('staging by copy'))).toContain('--run-as');
    expect(await readdir(path.join(jobs, 'j/results'))).toContain('f1.txt');
  });
});
