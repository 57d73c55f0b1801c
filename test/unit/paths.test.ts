import { mkdir, symlink } from 'node:fs/promises';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { isInside, resolveJobPaths } from '../../src/job/paths.js';
import { idProblem } from '../../src/shared/ids.js';
import { tempDir } from '../helpers/tmp.js';

describe('idProblem', () => {
  it.each(['job_2026_01', 'a', 'A.b-c_d', '0', 'x'.repeat(128)])('accepts %s', (id) => {
    expect(idProblem(id)).toBeUndefined();
  });
  it.each([
    '',
    '.',
    '..',
    '../x',
    'a/b',
    'a\\b',
    '/abs',
    'a\0b',
    ' a',
    '-a',
    '.hidden',
    'a b',
    'a+b',
    'a#',
    'é',
    'x'.repeat(129),
  ])('refuses %j', (id) => {
    expect(idProblem(id)).toMatch(/Expected `id`/);
  });
  it.each([null, 3, {}, []])('refuses the non-string %j', (id) => {
    expect(idProblem(id)).toMatch(/to be a string/);
  });
});

describe('isInside', () => {
  it.each([
    ['/a', '/a', true],
    ['/a', '/a/b', true],
    ['/a', '/ab', false],
    ['/a', '/', false],
    ['/a/b', '/a', false],
  ])('%s contains %s: %s', (parent, child, inside) => {
    expect(isInside(parent, child)).toBe(inside);
  });
});

describe('resolveJobPaths', () => {
  it('resolves a job folder inside the root', async () => {
    const root = await tempDir();
    await mkdir(path.join(root, 'job1'));
    const paths = await resolveJobPaths(root, 'job1', false);
    expect(paths).toEqual({
      root,
      jobDir: path.join(root, 'job1'),
      resultsDir: path.join(root, 'job1', 'results'),
      existed: true,
    });
  });

  it('is JOB_NOT_FOUND for a missing folder unless asked to create it', async () => {
    const root = await tempDir();
    await expect(resolveJobPaths(root, 'nope', false)).rejects.toMatchObject({ code: 'JOB_NOT_FOUND' });
    const created = await resolveJobPaths(root, 'nope', true);
    expect(created.existed).toBe(false);
  });

  it('refuses a job folder that is a symlink leading out of the root', async () => {
    const root = await tempDir();
    const outside = await tempDir();
    await symlink(outside, path.join(root, 'escape'));
    await expect(resolveJobPaths(root, 'escape', false)).rejects.toMatchObject({ code: 'JOB_OUTSIDE_ROOT' });
  });

  it('refuses a symlink to the root itself', async () => {
    const root = await tempDir();
    await symlink('.', path.join(root, 'self'));
    await expect(resolveJobPaths(root, 'self', false)).rejects.toMatchObject({ code: 'JOB_OUTSIDE_ROOT' });
  });

  it('accepts a symlink to another folder inside the root', async () => {
    const root = await tempDir();
    await mkdir(path.join(root, 'real'));
    await symlink('real', path.join(root, 'alias'));
    expect((await resolveJobPaths(root, 'alias', false)).jobDir).toBe(path.join(root, 'real'));
  });

  it('refuses an invalid id before touching the filesystem', async () => {
    await expect(resolveJobPaths('/nonexistent', '../x', true)).rejects.toMatchObject({ code: 'INVALID_ID' });
  });

  it('does not create a missing jobs root unless told to', async () => {
    const base = await tempDir();
    await expect(resolveJobPaths(path.join(base, 'jobs'), 'a', true)).rejects.toMatchObject({
      code: 'JOB_NOT_FOUND',
    });
    await expect(resolveJobPaths(path.join(base, 'jobs'), 'a', true, true)).resolves.toMatchObject({
      existed: false,
    });
  });
});
