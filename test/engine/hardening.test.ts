import { execFileSync } from 'node:child_process';
import { chmod, chown, mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import type { Manifest } from '../../src/job/report.js';
import { runJob } from '../../src/job/run-job.js';
import { silentLogger } from '../../src/shared/log.js';
import { inspectClaim, selfIdentity } from '../../src/worker/claim.js';
import { engineFixture } from '../helpers/engine.js';
import { isAlive, tempDir, waitFor, writeTree } from '../helpers/tmp.js';

// What a step (or anyone who can write a job folder) may try against the root worker: real files, real users.

const isRoot = process.getuid?.() === 0;

/** Temp folders are 0700: let another user reach what lies below `dir`. */
async function openUpTo(dir: string): Promise<void> {
  for (let d = dir; d !== path.dirname(d) && d.startsWith('/tmp/'); d = path.dirname(d))
    await chmod(d, 0o755);
}

async function asNobody() {
  const { resolveRunAs } = await import('../../src/step/run-as.js');
  const user = await resolveRunAs('nobody', true);
  const fixture = await engineFixture({ runAs: user });
  await openUpTo(fixture.workspaces);
  await openUpTo(fixture.jobs);
  return { user, ...fixture };
}

// The step swaps results/ for a link to a folder only root may write, then waits: the worker's writes after the
// steps (logs, artifacts, result.json) must not land there.
const SWAP =
  'mv "$JOB_RESULTS_DIR" "$JOB_RESULTS_DIR.moved" && ln -s "$TARGET" "$JOB_RESULTS_DIR" && echo "* * * * * root evil" > evil-cron';

describe.skipIf(!isRoot)('writes after the steps stay in the job folder', () => {
  it('--run-as: a step that swaps results/ for a symlink never makes root write through it', async () => {
    const { user, jobs, config } = await asNobody();
    const rootOnly = await tempDir('mfw-root-only-');
    await writeTree(jobs, { 'j/job.json': JSON.stringify({ steps: [SWAP], env: { TARGET: rootOnly } }) });
    // The job folder belongs to the step user, as a user's own job folder on a shared drive does.
    await chown(path.join(jobs, 'j'), user.uid, user.gid);
    await chown(path.join(jobs, 'j/job.json'), user.uid, user.gid);
    const { manifest } = await runJob(config, {
      request: { id: 'j', steps: undefined },
      attempt: 1,
      log: silentLogger,
    });
    expect(manifest.steps[0]?.status, JSON.stringify(manifest)).toBe('success');
    expect(await readdir(rootOnly)).toEqual([]);
    // What the worker wrote is in the folder it opened (now renamed by the step), inside the job folder.
    const moved = path.join(jobs, 'j/results.moved');
    expect(JSON.parse(await readFile(path.join(moved, 'result.json'), 'utf8')).status).toBe('success');
    expect(await readFile(path.join(moved, 'evil-cron'), 'utf8')).toContain('evil');
  });

  it('without --run-as: a results/ swapped by whoever writes the job folder is not written through either', async () => {
    const { jobs, config } = await engineFixture();
    const elsewhere = await tempDir('mfw-elsewhere-');
    await writeTree(jobs, { 'j/job.json': JSON.stringify({ steps: [SWAP], env: { TARGET: elsewhere } }) });
    const { manifest } = await runJob(config, {
      request: { id: 'j', steps: undefined },
      attempt: 1,
      log: silentLogger,
    });
    expect(manifest.status).toBe('success');
    expect(await readdir(elsewhere)).toEqual([]);
    expect(await readdir(path.join(jobs, 'j/results.moved'))).toEqual(
      expect.arrayContaining(['result.json', 'step_0.log', 'evil-cron']),
    );
  });

  it('a folder inside results/ swapped for a link during the sync is never written through', async () => {
    const { jobs, config } = await engineFixture();
    const elsewhere = await tempDir('mfw-elsewhere-');
    // The step makes out/ in results/ a link before the sync creates it.
    await writeTree(jobs, {
      'j/job.json': JSON.stringify({
        steps: ['mkdir -p out && echo made > out/file.txt && ln -s "$TARGET" "$JOB_RESULTS_DIR/out"'],
        env: { TARGET: elsewhere },
      }),
    });
    const { manifest } = await runJob(config, {
      request: { id: 'j', steps: undefined },
      attempt: 1,
      log: silentLogger,
    });
    expect(manifest.status).toBe('success');
    expect(manifest.skipped).toEqual([{ path: 'out/file.txt', reason: 'not-a-directory' }]);
    expect(manifest.artifacts).toEqual([]);
    expect(await readdir(elsewhere)).toEqual([]);
  });

  it('--run-as: unchanged inputs and job.json are not copied back', async () => {
    const { jobs, config } = await asNobody();
    await writeTree(jobs, {
      'j/job.json': JSON.stringify({ steps: ['echo new > made.txt'] }),
      'j/input.txt': 'in',
      'j/sub/deeper.txt': 'in',
    });
    const { manifest } = await runJob(config, {
      request: { id: 'j', steps: undefined },
      attempt: 1,
      log: silentLogger,
    });
    expect(manifest.status, JSON.stringify(manifest)).toBe('success');
    expect(manifest.artifacts.map((a: Manifest['artifacts'][number]) => a.path)).toEqual(['made.txt']);
  });
});

describe('file names', () => {
  it('syncs a file whose name is as long as the filesystem allows', async () => {
    const { jobs, config } = await engineFixture();
    const long = `${'n'.repeat(251)}.txt`;
    await mkdir(path.join(jobs, 'j'));
    const { manifest } = await runJob(config, {
      request: { id: 'j', steps: [`echo a > ${long}`, 'mkdir -p d && echo b > d/short'] },
      attempt: 1,
      log: silentLogger,
    });
    expect(manifest.status, JSON.stringify(manifest.error)).toBe('success');
    expect(manifest.artifacts.map((a: Manifest['artifacts'][number]) => a.path).sort()).toEqual([
      'd/short',
      long,
    ]);
    expect(await readFile(path.join(jobs, 'j/results', long), 'utf8')).toBe('a\n');
  });

  it('syncs names with a newline or a tab like any other, by the default and by a pattern', async () => {
    const { jobs, config } = await engineFixture();
    await mkdir(path.join(jobs, 'j'));
    const make = `printf x > "$(printf 'new\\nline')"; mkdir -p "d/$(printf 'sub\\ndir')"; printf y > "d/$(printf 'sub\\ndir')/f"; printf z > "$(printf 'tab\\tname')"`;
    const run = async (artifacts?: object) => {
      await writeFile(path.join(jobs, 'j/job.json'), JSON.stringify({ steps: [make], artifacts }));
      const { manifest } = await runJob(config, {
        request: { id: 'j', steps: undefined },
        attempt: 1,
        log: silentLogger,
      });
      expect(manifest.status, JSON.stringify(manifest.error)).toBe('success');
      expect(manifest.skipped).toEqual([]);
      return manifest.artifacts.map((a: Manifest['artifacts'][number]) => a.path).sort();
    };
    expect(await run()).toEqual(['d/sub\ndir/f', 'new\nline', 'tab\tname']);
    expect(await readFile(path.join(jobs, 'j/results/d/sub\ndir/f'), 'utf8')).toBe('y');
    expect(await run({ include: ['d/**'] })).toEqual(['d/sub\ndir/f']);
    expect(await run({ exclude: ['d/**', 'tab*'] })).toEqual(['new\nline']);
  });
});

describe('files planted in results/', () => {
  it('a FIFO as a claim file or as result.json neither blocks the claim check nor the job', async () => {
    const { jobs, config } = await engineFixture();
    const mkfifo = (file: string) => execFileSync('mkfifo', [file]);
    await writeTree(jobs, {
      'j/job.json': JSON.stringify({ steps: ['echo ran > ran.txt'] }),
      'j/results/': null,
    });
    mkfifo(path.join(jobs, 'j/results/.mqtt-fs-worker.claim.1'));
    mkfifo(path.join(jobs, 'j/results/result.json'));
    const self = selfIdentity(config.workerId, 'test-host', process.pid);
    const state = await inspectClaim(path.join(jobs, 'j/results'), self, 60_000, Date.now());
    expect(state).toMatchObject({ kind: 'free', attempt: 2, why: 'claim file 1 is not a readable claim' });
    const { manifest } = await runJob(config, {
      request: { id: 'j', steps: undefined },
      attempt: 2,
      log: silentLogger,
    });
    expect(manifest.status).toBe('success');
    expect(await readFile(path.join(jobs, 'j/results/ran.txt'), 'utf8')).toBe('ran\n');
  });
});

describe.skipIf(!isRoot)('a full drive', () => {
  it('cuts a log that fills the drive, lets the step finish, and still writes result.json', {
    timeout: 60_000,
  }, async () => {
    const mount = await tempDir('mfw-tmpfs-');
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=8m', 'tmpfs', mount]);
    try {
      const { config } = await engineFixture({ jobsDir: mount, maxLogBytes: 100 * 1024 * 1024 });
      await mkdir(path.join(mount, 'j'));
      const { manifest, manifestWritten } = await runJob(config, {
        // 20 MB of output into an 8 MB drive; the step then reports it was not cut short.
        request: { id: 'j', steps: ['head -c 20000000 /dev/zero | tr "\\0" a; echo done-printing >&2'] },
        attempt: 1,
        log: silentLogger,
      });
      expect(manifestWritten).toBe(true);
      expect(manifest.steps[0]).toMatchObject({ status: 'success', exitCode: 0, logTruncated: true });
      const written = JSON.parse(await readFile(path.join(mount, 'j/results/result.json'), 'utf8'));
      expect(written.status).toBe('success');
      const log = await readFile(path.join(mount, 'j/results/step_0.log'), 'utf8');
      expect(log).toContain('[mqtt-fs-worker] log cut: the drive is full');
      expect(await readdir(path.join(mount, 'j/results'))).toEqual(['result.json', 'step_0.log']);
    } finally {
      execFileSync('umount', [mount]);
    }
  });

  it('a sync that fills the drive is NO_SPACE, and the manifest lists exactly what was copied', {
    timeout: 60_000,
  }, async () => {
    const mount = await tempDir('mfw-tmpfs-');
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', mount]);
    try {
      const { config } = await engineFixture({ jobsDir: mount });
      await mkdir(path.join(mount, 'j'));
      const { manifest } = await runJob(config, {
        request: { id: 'j', steps: ['echo small > a-small.txt && head -c 9000000 /dev/zero > z-big.bin'] },
        attempt: 1,
        log: silentLogger,
      });
      expect(manifest).toMatchObject({ status: 'error', error: { code: 'NO_SPACE' } });
      const onDisk = (await readdir(path.join(mount, 'j/results'))).filter(
        (n) => !/^(result\.json|step_\d+\.log)$/.test(n),
      );
      expect(manifest.artifacts.map((a: Manifest['artifacts'][number]) => a.path)).toEqual(onDisk.sort());
      expect(onDisk).toEqual(['a-small.txt']); // no half-written z-big.bin or temp file left behind
      const written = JSON.parse(await readFile(path.join(mount, 'j/results/result.json'), 'utf8'));
      expect(written.error.code).toBe('NO_SPACE');
    } finally {
      execFileSync('umount', [mount]);
    }
  });
});

describe('without cgroups', () => {
  it('kills a double-forked daemon a step left, counts it, and says what it cannot catch', async () => {
    const { jobs, config } = await engineFixture(); // no limits settings: --limits off
    const dir = await tempDir();
    await writeTree(jobs, {
      'j/job.json': JSON.stringify({
        steps: [
          `sh -c "setsid sh -c 'echo \\$\\$ > ${dir}/daemon.pid; exec sleep 300' & exit 0"; until [ -s ${dir}/daemon.pid ]; do sleep 0.05; done`,
        ],
      }),
    });
    const { manifest } = await runJob(config, {
      request: { id: 'j', steps: undefined },
      attempt: 1,
      log: silentLogger,
    });
    expect(manifest.status, JSON.stringify(manifest.error)).toBe('success');
    expect(manifest.limits.mode).toBe('none');
    expect(manifest.limits.reason).toContain('except any that cleared their environment');
    expect(manifest.steps[0]?.leftoversKilled).toBe(1);
    const pid = Number(await readFile(path.join(dir, 'daemon.pid'), 'utf8'));
    await waitFor(() => !isAlive(pid), 2000);
  });
});

describe('a job folder deleted while its job runs', () => {
  // Wherever the deletion is met first (the next step's log, the sync, result.json), the cause is named.
  for (const [what, steps] of [
    ['before the next step', ['rm -rf "$JOB_FOLDER_TO_DELETE"', 'echo never']],
    ['before the sync', ['echo made > out.txt; rm -rf "$JOB_FOLDER_TO_DELETE"']],
  ] as const) {
    it(`is JOB_FOLDER_GONE, not INTERNAL, with no stack trace (${what})`, async () => {
      const { jobs, config } = await engineFixture();
      const folder = path.join(jobs, 'doomed');
      await writeTree(jobs, {
        'doomed/job.json': JSON.stringify({ steps, env: { JOB_FOLDER_TO_DELETE: folder } }),
      });
      const lines: string[] = [];
      const log = {
        ...silentLogger,
        error: (line: string, fields?: unknown) => lines.push(`${line} ${JSON.stringify(fields ?? {})}`),
      };
      const { manifest, manifestWritten } = await runJob(config, {
        request: { id: 'doomed', steps: undefined },
        attempt: 1,
        log: log as typeof silentLogger,
      });
      expect(manifest.status).toBe('error');
      expect(manifest.error).toEqual({
        code: 'JOB_FOLDER_GONE',
        message: `The job folder ${folder} was deleted while the job ran`,
      });
      expect(manifestWritten).toBe(false);
      expect(lines.join('\n')).not.toContain('stack');
    });
  }
});
