import { createHash } from 'node:crypto';
import { appendFile, lstat, mkdir, readdir, readFile, symlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { stageJob } from '../../src/job/workspace/stage.js';
import { syncResults } from '../../src/job/workspace/sync.js';
import { tempDir, writeTree } from '../helpers/tmp.js';

const sha = (text: string | Buffer): string => createHash('sha256').update(text).digest('hex');

async function staged(tree: Parameters<typeof writeTree>[1]) {
  const job = await tempDir();
  const ws = await tempDir();
  const results = path.join(job, 'results');
  await writeTree(job, tree);
  await mkdir(results, { recursive: true });
  const { snapshot } = await stageJob(job, ws);
  /** Syncs everything back, as a job without `artifacts` rules does. */
  const syncAll = () =>
    syncResults({ workspace: ws, resultsDir: results, snapshot, include: ['**'], exclude: [] });
  return { job, ws, results, snapshot, syncAll };
}

describe('syncResults', () => {
  it('copies new and modified files back, not unchanged inputs', async () => {
    const { ws, results, syncAll } = await staged({
      'job.json': '{}',
      'in/keep.txt': 'same',
      'in/edit.txt': 'v1',
    });
    await appendFile(path.join(ws, 'in/edit.txt'), '+v2');
    await writeTree(ws, { 'out/new.txt': 'new', 'out/deep/er.bin': Buffer.alloc(3_000_000, 1) });

    const synced = await syncAll();

    expect(synced.artifacts).toEqual([
      { path: 'in/edit.txt', bytes: 5, sha256: sha('v1+v2') },
      { path: 'out/deep/er.bin', bytes: 3_000_000, sha256: sha(Buffer.alloc(3_000_000, 1)) },
      { path: 'out/new.txt', bytes: 3, sha256: sha('new') },
    ]);
    expect(await readFile(path.join(results, 'in/edit.txt'), 'utf8')).toBe('v1+v2');
    expect((await readFile(path.join(results, 'out/deep/er.bin'))).length).toBe(3_000_000);
    await expect(lstat(path.join(results, 'in/keep.txt'))).rejects.toMatchObject({ code: 'ENOENT' });
    await expect(lstat(path.join(results, 'job.json'))).rejects.toMatchObject({ code: 'ENOENT' });
    // No temp files are left behind.
    expect((await readdir(path.join(results, 'in'))).sort()).toEqual(['edit.txt']);
  });

  it('sees a rewrite with the same size and content length', async () => {
    const { ws, syncAll } = await staged({ 'a.txt': 'aaaa' });
    await writeFile(path.join(ws, 'a.txt'), 'bbbb');
    const synced = await syncAll();
    expect(synced.artifacts.map((a) => a.path)).toEqual(['a.txt']);
  });

  it('never follows a symlink, and records new ones as skipped', async () => {
    const outside = await tempDir();
    await writeTree(outside, { 'secret.txt': 'secret', 'dir/file': 'x' });
    const { ws, results, syncAll } = await staged({
      'old-link': { link: path.join(outside, 'secret.txt') },
    });
    await symlink(path.join(outside, 'secret.txt'), path.join(ws, 'new-link'));
    await symlink(path.join(outside, 'dir'), path.join(ws, 'dir-link'));

    const synced = await syncAll();

    expect(synced.artifacts).toEqual([]);
    expect(synced.skipped).toEqual([
      { path: 'dir-link', reason: 'symlink' },
      { path: 'new-link', reason: 'symlink' },
    ]);
    expect(await readdir(results)).toEqual([]);
  });

  it('honours artifacts.include and artifacts.exclude', async () => {
    const { ws, results, snapshot } = await staged({});
    await writeTree(ws, {
      'dist/app.js': 'app',
      'dist/app.tmp': 'tmp',
      'node_modules/x/index.js': 'x',
      'notes.txt': 'n',
    });
    const synced = await syncResults({
      workspace: ws,
      resultsDir: results,
      snapshot,
      include: ['dist/**', 'node_modules/**'],
      exclude: ['node_modules/**', '**/*.tmp'],
    });
    expect(synced.artifacts.map((a) => a.path)).toEqual(['dist/app.js']);
  });

  it('never lets an artifact replace result.json or a step log', async () => {
    const { ws, results, syncAll } = await staged({});
    await writeFile(path.join(results, 'step_0.log'), 'the real log');
    await writeTree(ws, { 'result.json': 'fake', 'step_0.log': 'fake', 'sub/result.json': 'fine' });
    const synced = await syncAll();
    expect(synced.artifacts.map((a) => a.path)).toEqual(['sub/result.json']);
    expect(synced.skipped).toEqual([
      { path: 'result.json', reason: 'reserved-name' },
      { path: 'step_0.log', reason: 'reserved-name' },
    ]);
    expect(await readFile(path.join(results, 'step_0.log'), 'utf8')).toBe('the real log');
  });

  it('does not write through a directory in results/ that a step replaced with a symlink', async () => {
    const outside = await tempDir();
    const { ws, results, syncAll } = await staged({});
    // A step wrote a link into results/ (it may: $JOB_RESULTS_DIR), hoping the sync writes through it.
    await symlink(outside, path.join(results, 'dist'));
    await writeTree(ws, { 'dist/app.js': 'payload' });
    const synced = await syncAll();
    expect(synced.artifacts).toEqual([]);
    expect(synced.skipped).toEqual([{ path: 'dist/app.js', reason: 'not-a-directory' }]);
    expect(await readdir(outside)).toEqual([]);
  });
});
