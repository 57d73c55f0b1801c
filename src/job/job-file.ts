import { constants } from 'node:fs';
import { open } from 'node:fs/promises';
import path from 'node:path';
import { ErrorCode, WorkerError } from '../shared/errors.js';
import { formatBytes } from '../shared/units.js';
import type { JobPaths } from './paths.js';
import { type JobRequest, type JobSpec, MAX_JOB_FILE_BYTES, parseJobFile, specFromSteps } from './spec.js';

// Reading `job.json` from the job folder (and other small files a job or a dry run keeps): never through a link,
// never a FIFO or a device, never more than a bound.

/** The job's definition: `job.json` (its steps replaced by the request's, if any), or the request's steps alone. */
export async function loadSpec(paths: JobPaths, request: JobRequest): Promise<JobSpec> {
  const file = path.join(paths.jobDir, 'job.json');
  let text: string;
  try {
    text = await readSmallFile(file, MAX_JOB_FILE_BYTES);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' && request.steps) return specFromSteps(request.steps);
    if (code === 'ENOENT')
      throw new WorkerError(
        ErrorCode.INVALID_JOB_FILE,
        `${file} does not exist and the request carries no steps`,
      );
    if (code === 'ELOOP')
      throw new WorkerError(
        ErrorCode.INVALID_JOB_FILE,
        `${file} is a symlink; job.json must be a regular file`,
      );
    throw new WorkerError(ErrorCode.INVALID_JOB_FILE, `Cannot read ${file}: ${(error as Error).message}`, {
      cause: error,
    });
  }
  return parseJobFile(text, 'job.json', request.steps);
}

/** Reads a regular file of at most `maxBytes` without following a link. */
export async function readSmallFile(file: string, maxBytes: number): Promise<string> {
  // O_NONBLOCK: a FIFO planted as job.json must not hang the worker before fstat shows what it is.
  const handle = await open(file, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
  try {
    const stats = await handle.stat();
    if (!stats.isFile()) throw new WorkerError(ErrorCode.INVALID_JOB_FILE, `${file} is not a regular file`);
    if (stats.size > maxBytes) {
      throw new WorkerError(
        ErrorCode.INVALID_JOB_FILE,
        `${file} is ${formatBytes(stats.size)}, more than the ${formatBytes(maxBytes)} allowed`,
      );
    }
    return await handle.readFile('utf8');
  } finally {
    await handle.close();
  }
}
