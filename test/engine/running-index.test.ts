import { mkdir, readdir, readFile, symlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { addRunning, listRunning, removeRunning } from '../../src/worker/running-index.js';
import { tempDir } from '../helpers/tmp.js';

// The index of running jobs on real files, with links planted where a writer of the jobs directory could put them.
// (The whole worker meeting the same links is test/e2e/running-index.test.ts.)

async function jobsAndVictim(): Promise<{ jobs: string; victim: string }> {
  const jobs = await tempDir('mfw-index-');
  const outside = await tempDir('mfw-outside-');
  const victim = path.join(outside, 'passwd');
  await writeFile(victim, 'root:x:0:0');
  return { jobs, victim };
}

describe('the index of running jobs', () => {
  it('adds and removes entries in a real index', async () => {
    const { jobs } = await jobsAndVictim();
    await addRunning(jobs, 'job-1');
    await addRunning(jobs, 'job-1'); // already there: fine
    expect(await listRunning(jobs)).toEqual(['job-1']);
    await removeRunning(jobs, 'job-1');
    expect(await listRunning(jobs)).toEqual([]);
  });

  it('never writes through an entry planted as a link to a file', async () => {
    const { jobs, victim } = await jobsAndVictim();
    await mkdir(path.join(jobs, '.mqtt-fs-worker/running'), { recursive: true });
    await symlink(victim, path.join(jobs, '.mqtt-fs-worker/running/job-c'));
    await addRunning(jobs, 'job-c');
    expect(await readFile(victim, 'utf8')).toBe('root:x:0:0');
    // Removing the entry removes the link, never what it points at.
    await removeRunning(jobs, 'job-c');
    expect(await readFile(victim, 'utf8')).toBe('root:x:0:0');
  });

  it('neither lists nor removes through .mqtt-fs-worker or running/ planted as links', async () => {
    for (const planted of ['.mqtt-fs-worker', '.mqtt-fs-worker/running']) {
      const { jobs, victim } = await jobsAndVictim();
      await mkdir(path.dirname(path.join(jobs, planted)), { recursive: true });
      await symlink(path.dirname(victim), path.join(jobs, planted));
      const warnings: string[] = [];
      const log = { warn: (line: string) => warnings.push(line) } as never;
      expect(await listRunning(jobs, log), planted).toEqual([]);
      await removeRunning(jobs, 'passwd', log);
      await addRunning(jobs, 'passwd', log);
      expect(await readFile(victim, 'utf8'), planted).toBe('root:x:0:0');
      expect(await readdir(path.dirname(victim))).toEqual(['passwd']);
      // One line says it, however often the index is looked at.
      expect(warnings, planted).toEqual([expect.stringContaining(`${planted} is a symbolic link`)]);
    }
  });
});
