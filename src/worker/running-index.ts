import { mkdir, readdir, unlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { idProblem } from '../shared/ids.js';

// The index of running claims: one empty file per job that a slot claimed and whose result has not yet reached
// the broker, `{jobs-dir}/.mqtt-fs-worker/running/{id}`. The claim in the job's folder stays the truth; the
// index only saves idle slots from walking every job folder to find the jobs whose worker died. A job id never
// starts with a dot, so the folder cannot be a job's.

export const INDEX_DIR = '.mqtt-fs-worker';

function runningDir(jobsRoot: string): string {
  return path.join(jobsRoot, INDEX_DIR, 'running');
}

/** Adds `id` to the index (before its job runs, so a death at any later point leaves it there). */
export async function addRunning(jobsRoot: string, id: string): Promise<void> {
  const dir = runningDir(jobsRoot);
  await mkdir(dir, { recursive: true });
  await writeFile(path.join(dir, id), '');
}

/** Removes `id` from the index; never throws (a stale entry costs a look, nothing more). */
export async function removeRunning(jobsRoot: string, id: string): Promise<void> {
  await unlink(path.join(runningDir(jobsRoot), id)).catch(() => {});
}

/** The ids in the index; none when it does not exist yet. Names that are not job ids are ignored. */
export async function listRunning(jobsRoot: string): Promise<string[]> {
  const names = await readdir(runningDir(jobsRoot)).catch(() => [] as string[]);
  return names.filter((name) => idProblem(name) === undefined);
}
