import { lstat, mkdir, realpath } from 'node:fs/promises';
import path from 'node:path';
import { describeValue, ErrorCode, WorkerError } from './errors.js';

export const MAX_ID_LENGTH = 128;
// One path segment that is also a valid MQTT topic level and client id: no `/`, `+`, `#`, NUL, spaces or dots
// at the start (so never `.` or `..` or a hidden file).
const ID_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_.-]*$/;

/** Why `value` is not a usable job or worker id, or undefined when it is one. */
export function idProblem(value: unknown, what = 'id'): string | undefined {
  if (typeof value !== 'string') return `Expected \`${what}\` to be a string, got ${describeValue(value)}`;
  if (value.length === 0) return `Expected \`${what}\` to be a non-empty string`;
  if (value.length > MAX_ID_LENGTH) {
    return `Expected \`${what}\` to be at most ${MAX_ID_LENGTH} characters, got ${value.length}`;
  }
  if (!ID_PATTERN.test(value)) {
    return `Expected \`${what}\` to be letters, digits, '.', '_' or '-' (starting with a letter or digit), got ${describeValue(value)}`;
  }
  return undefined;
}

export function assertJobId(value: unknown): asserts value is string {
  const problem = idProblem(value);
  if (problem) throw new WorkerError(ErrorCode.INVALID_ID, problem);
}

/** Is `child` the same as or below `parent`? Both must be absolute and normalised. */
export function isInside(parent: string, child: string): boolean {
  const relative = path.relative(parent, child);
  return relative === '' || (!relative.startsWith('..') && !path.isAbsolute(relative));
}

export interface JobPaths {
  /** The jobs root after symlinks. */
  readonly root: string;
  /** The job's folder after symlinks; always inside `root`. */
  readonly jobDir: string;
  /** `{jobDir}/results`. */
  readonly resultsDir: string;
  /** Whether the folder existed before this run (false: created for a request that carries its own steps). */
  readonly existed: boolean;
}

/**
 * Resolves `{jobsRoot}/{id}` after symlinks and proves it lies inside the jobs root. With `create`, a missing
 * folder is created (requests that carry their own steps need none); otherwise it is JOB_NOT_FOUND. A missing
 * jobs root is created only with `createRoot` (a dry run): for a worker it means an unmounted shared drive.
 */
export async function resolveJobPaths(
  jobsRoot: string,
  id: string,
  create: boolean,
  createRoot = false,
): Promise<JobPaths> {
  assertJobId(id);
  let root: string;
  try {
    if (create && createRoot) await mkdir(jobsRoot, { recursive: true });
    root = await realpath(jobsRoot);
  } catch (error) {
    throw new WorkerError(ErrorCode.JOB_NOT_FOUND, `Jobs directory ${jobsRoot} is not accessible`, {
      cause: error,
    });
  }
  const candidate = path.join(root, id);
  let existed = true;
  try {
    await lstat(candidate);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'ENOENT') {
      throw new WorkerError(ErrorCode.JOB_NOT_FOUND, `Job folder ${candidate} is not accessible`, {
        cause: error,
      });
    }
    if (!create) throw new WorkerError(ErrorCode.JOB_NOT_FOUND, `Job folder ${candidate} does not exist`);
    await mkdir(candidate, { recursive: true });
    existed = false;
  }
  const jobDir = await realpath(candidate).catch((error: unknown) => {
    throw new WorkerError(ErrorCode.JOB_NOT_FOUND, `Job folder ${candidate} is a broken link`, {
      cause: error,
    });
  });
  if (!isInside(root, jobDir) || jobDir === root) {
    throw new WorkerError(
      ErrorCode.JOB_OUTSIDE_ROOT,
      `Job folder ${candidate} resolves to ${jobDir}, outside the jobs directory ${root}`,
    );
  }
  const stats = await lstat(jobDir);
  if (!stats.isDirectory()) throw new WorkerError(ErrorCode.JOB_NOT_FOUND, `${candidate} is not a directory`);
  return { root, jobDir, resultsDir: path.join(jobDir, 'results'), existed };
}

/** Creates `results/` if needed and refuses one that is a symlink or a file (nothing is written through it). */
export async function ensureResultsDir(resultsDir: string): Promise<void> {
  const stats = await lstat(resultsDir).catch((error: NodeJS.ErrnoException) => {
    if (error.code === 'ENOENT') return undefined;
    throw error;
  });
  if (!stats) {
    await mkdir(resultsDir).catch((error: NodeJS.ErrnoException) => {
      if (error.code !== 'EEXIST') throw error;
    });
    return ensureResultsDir(resultsDir);
  }
  if (!stats.isDirectory()) {
    const what = stats.isSymbolicLink() ? 'a symlink' : 'not a directory';
    throw new WorkerError(
      ErrorCode.RESULTS_NOT_DIRECTORY,
      `${resultsDir} is ${what}; the worker writes only into a real results/ folder`,
    );
  }
}
