import { execFileSync } from 'node:child_process';
import { lstat, readFile, readlink, stat, utimes } from 'node:fs/promises';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { createWorkspace, purgeWorkspace, stageJob } from '../../src/job/workspace/stage.js';
import { tempDir, writeTree } from '../helpers/tmp.js';

describe('stageJob', () => {
  it('copies files and folders with their mode and mtime, but never results/', async () => {
    const job = await tempDir();
    const ws = await tempDir();
    await writeTree(job, {
      'job.json': '{"steps":["true"]}',
      'src/a.txt': 'alpha',
      'src/deep/b.bin': Buffer.alloc(70_000, 7),
      'empty/': null,
      'results/step_0.log': 'old log',
    });
    execFileSync('chmod', ['755', path.join(job, 'src/a.txt')]);
    await utimes(path.join(job, 'src/a.txt'), new Date('2020-01-01'), new Date('2020-01-02'));

    const staged = await stageJob(job, ws);

    expect(await readFile(path.join(ws, 'src/a.txt'), 'utf8')).toBe('alpha');
    expect((await readFile(path.join(ws, 'src/deep/b.bin'))).equals(Buffer.alloc(70_000, 7))).toBe(true);
    expect((await stat(path.join(ws, 'empty'))).isDirectory()).toBe(true);
    expect((await stat(path.join(ws, 'src/a.txt'))).mode & 0o777).toBe(0o755);
    expect((await stat(path.join(ws, 'src/a.txt'))).mtime.toISOString()).toBe('2020-01-02T00:00:00.000Z');
    await expect(lstat(path.join(ws, 'results'))).rejects.toMatchObject({ code: 'ENOENT' });
    expect(staged.files).toBe(3);
    expect(staged.bytes).toBe(18 + 5 + 70_000);
    expect([...staged.snapshot.keys()].sort()).toEqual(['job.json', 'src/a.txt', 'src/deep/b.bin']);
  });

  it('copies symlinks as links and never follows them out of the folder', async () => {
    const job = await tempDir();
    const ws = await tempDir();
    const outside = await tempDir();
    await writeTree(outside, { 'secret.txt': 'do not copy', 'dir/x': 'x' });
    await writeTree(job, {
      'link-to-secret': { link: path.join(outside, 'secret.txt') },
      'link-to-dir': { link: path.join(outside, 'dir') },
      'relative-link': { link: 'real.txt' },
      'real.txt': 'real',
    });
    const staged = await stageJob(job, ws);
    expect(await readlink(path.join(ws, 'link-to-secret'))).toBe(path.join(outside, 'secret.txt'));
    expect((await lstat(path.join(ws, 'link-to-dir'))).isSymbolicLink()).toBe(true);
    expect(await readlink(path.join(ws, 'relative-link'))).toBe('real.txt');
    expect(staged.bytes).toBe(4);
  });

  it('skips special files such as FIFOs', async () => {
    const job = await tempDir();
    const ws = await tempDir();
    execFileSync('mkfifo', [path.join(job, 'pipe')]);
    const staged = await stageJob(job, ws);
    expect(staged.skipped).toEqual([{ path: 'pipe', reason: 'special-file' }]);
    await expect(lstat(path.join(ws, 'pipe'))).rejects.toMatchObject({ code: 'ENOENT' });
  });

  it('fails with STAGING_FAILED naming the cause when the folder cannot be read', async () => {
    const job = await tempDir();
    const ws = await tempDir();
    await expect(stageJob(path.join(job, 'vanished'), ws)).rejects.toMatchObject({
      code: 'STAGING_FAILED',
      message: expect.stringContaining('ENOENT'),
    });
  });
});

describe('workspaces', () => {
  it('removes what an earlier run of the same worker left, and only that', async () => {
    const root = await tempDir();
    await writeTree(root, { 'w1/old-job/file': 'stale', 'w2/other/file': 'keep' });
    const ws = await createWorkspace(root, 'w1', 'new-job');
    expect(ws).toBe(path.join(root, 'w1', 'new-job'));
    await expect(lstat(path.join(root, 'w1/old-job'))).rejects.toMatchObject({ code: 'ENOENT' });
    expect(await readFile(path.join(root, 'w2/other/file'), 'utf8')).toBe('keep');
    expect(await purgeWorkspace(root, 'w1')).toBeUndefined();
    await expect(lstat(path.join(root, 'w1'))).rejects.toMatchObject({ code: 'ENOENT' });
  });
});
