import { mkdir, readdir, readFile, symlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import {
  addRunning,
  IndexRound,
  LOOK_SIZE,
  listRunning,
  removeRunning,
} from '../../src/worker/running-index.js';
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

  it('a look inspects at most LOOK_SIZE entries, and successive looks go round the whole index', async () => {
    const { jobs } = await jobsAndVictim();
    const ids = Array.from({ length: 40 }, (_, i) => `job-${String(i).padStart(2, '0')}`);
    for (const id of ids) await addRunning(jobs, id);
    const listed = await listRunning(jobs);
    expect(listed.sort()).toEqual(ids);
    const round = new IndexRound(LOOK_SIZE, () => 0.5); // starts in the middle: job-20
    const rounds = Math.ceil(40 / LOOK_SIZE);
    const looks = Array.from({ length: rounds }, () => round.pick(listed));
    for (const look of looks) expect(new Set(look).size).toBe(LOOK_SIZE);
    expect(looks[0]?.[0]).toBe('job-20');
    // ceil(40 / LOOK_SIZE) looks cover all 40, wrapping past the end.
    expect(new Set(looks.flat()).size).toBe(40);
    // An entry added behind the round is reached when the round comes back to it, not skipped.
    await addRunning(jobs, 'job-20a');
    const later = Array.from({ length: Math.ceil(41 / LOOK_SIZE) }, () =>
      round.pick(listed.concat('job-20a')),
    ).flat();
    expect(later).toContain('job-20a');
  });

  it('a small index is looked at whole every time; two slots start their rounds at different places', () => {
    const few = ['a', 'b', 'c'];
    expect(new IndexRound(LOOK_SIZE, () => 0.99).pick(few)).toEqual(few);
    const many = Array.from({ length: 100 }, (_, i) => `job-${String(i).padStart(3, '0')}`);
    const first = new IndexRound(LOOK_SIZE, () => 0).pick(many);
    const second = new IndexRound(LOOK_SIZE, () => 0.5).pick(many);
    expect(first[0]).toBe('job-000');
    expect(second[0]).toBe('job-050');
    expect(first.filter((id) => second.includes(id))).toEqual([]);
  });

  it("a restarted slot's first look starts with the job its previous process died in, then goes round", () => {
    const many = Array.from({ length: 100 }, (_, i) => `job-${String(i).padStart(3, '0')}`);
    const round = new IndexRound(LOOK_SIZE, () => 0, 'job-077');
    const first = round.pick(many);
    expect(first).toHaveLength(LOOK_SIZE);
    expect(first[0]).toBe('job-077');
    expect(first.slice(1)).toEqual(many.slice(0, LOOK_SIZE - 1));
    expect(round.pick(many)[0]).toBe(`job-${String(LOOK_SIZE - 1).padStart(3, '0')}`);
    // A job no longer in the index is not looked for.
    expect(new IndexRound(LOOK_SIZE, () => 0, 'gone').pick(many)[0]).toBe('job-000');
  });
});
