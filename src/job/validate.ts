import { stat } from 'node:fs/promises';
import path from 'node:path';
import { isWorkerError } from '../shared/errors.js';
import { readSmallFile } from './job-file.js';
import { type JobSpec, MAX_JOB_FILE_BYTES, parseJobFile } from './spec.js';

export type ValidationReport =
  | { readonly ok: true; readonly file: string; readonly spec: JobSpec }
  | { readonly ok: false; readonly file: string; readonly problems: readonly string[] };

/** Checks a job definition (a job folder or a `job.json`) and returns every problem found. */
export async function validateJobDefinition(target: string): Promise<ValidationReport> {
  let file = target;
  try {
    if ((await stat(target)).isDirectory()) file = path.join(target, 'job.json');
  } catch {
    // Reported below by the read.
  }
  try {
    const spec = parseJobFile(await readSmallFile(file, MAX_JOB_FILE_BYTES), path.basename(file));
    return { ok: true, file, spec };
  } catch (error) {
    if (isWorkerError(error)) return { ok: false, file, problems: error.problems };
    const code = (error as NodeJS.ErrnoException).code;
    return { ok: false, file, problems: [`Cannot read ${file}: ${code ?? (error as Error).message}`] };
  }
}
