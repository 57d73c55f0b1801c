import { constants } from 'node:fs';
import { access, lstat, mkdir, open, realpath, stat } from 'node:fs/promises';
import path from 'node:path';
import { ErrorCode, WorkerError } from '../shared/errors.js';
import { assertJobId } from '../shared/ids.js';
import { RESULTS_DIR } from './results-layout.js';

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

/** The jobs root after symlinks; JOB_NOT_FOUND when it is missing (an unmounted shared drive) or unreadable. */
export async function resolveJobsRoot(jobsRoot: string, create = false): Promise<string> {
  try {
    if (create) await mkdir(jobsRoot, { recursive: true });
    return await realpath(jobsRoot);
  } catch (error) {
    throw new WorkerError(ErrorCode.JOB_NOT_FOUND, `Jobs directory ${jobsRoot} is not accessible`, {
      cause: error,
    });
  }
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
  const root = await resolveJobsRoot(jobsRoot, create && createRoot);
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
    await makeDirectory(candidate);
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
  return { root, jobDir, resultsDir: path.join(jobDir, RESULTS_DIR), existed };
}

/**
 * Creates a directory that other hosts may be creating at the same moment. Whether it now exists is read back,
 * not taken from the error: a network drive answers a lost race with EEXIST, but also with EPERM or EIO (sshfs).
 */
async function makeDirectory(dir: string): Promise<void> {
  try {
    await mkdir(dir);
  } catch (error) {
    const made = await lstat(dir).then(
      (stats) => stats.isDirectory(),
      () => false,
    );
    if (!made) throw error;
  }
}

/** Creates `results/` if needed and refuses one that is a symlink or a file (nothing is written through it). */
export async function ensureResultsDir(resultsDir: string): Promise<void> {
  const stats = await lstat(resultsDir).catch((error: NodeJS.ErrnoException) => {
    if (error.code === 'ENOENT') return undefined;
    throw error;
  });
  if (!stats) {
    await makeDirectory(resultsDir);
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

/** A directory held open, and the path that reaches it through the descriptor. */
export interface HeldDir {
  /** `/proc/self/fd/N`: names below it resolve from the open directory, not from the directory's name. */
  readonly path: string;
  close(): Promise<void>;
}

/**
 * Opens a directory (never through a link) and returns a path to it through its descriptor. Whoever can write
 * the folder above it may rename it or swap in a symlink after this, and a write by name would follow; a write
 * below the held path lands in the directory that was opened. Where /proc is not there (not Linux), the path is
 * the name.
 */
export async function holdDirectory(dir: string): Promise<HeldDir> {
  const handle = await open(dir, constants.O_RDONLY | constants.O_DIRECTORY | constants.O_NOFOLLOW);
  const close = () => handle.close().catch(() => {});
  const via = `/proc/self/fd/${handle.fd}`;
  const usable = await access(via).then(
    () => true,
    () => false,
  );
  return { path: usable ? via : dir, close };
}

/**
 * Creates `results/` if needed and holds it open (see holdDirectory): everything the worker writes there — claims,
 * step logs, artifacts, result.json — goes through the held path, so a step (or anyone who can write the job
 * folder) that replaces `results/` with a symlink mid-run cannot redirect a write outside the job folder.
 */
export async function holdResults(resultsDir: string): Promise<HeldDir> {
  await ensureResultsDir(resultsDir);
  let held: HeldDir;
  try {
    held = await holdDirectory(resultsDir);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code !== 'ELOOP' && code !== 'ENOTDIR') throw error;
    throw new WorkerError(ErrorCode.RESULTS_NOT_DIRECTORY, `${resultsDir} is not a real directory`);
  }
  // Swapped between the check and the open: refuse it rather than write into whatever it now is.
  const opened = await realpath(held.path).catch(() => undefined);
  if (opened !== resultsDir) {
    await held.close();
    throw new WorkerError(ErrorCode.RESULTS_NOT_DIRECTORY, `${resultsDir} changed while it was opened`);
  }
  return held;
}

/**
 * Whether a held directory was deleted after it was opened (the job folder removed while its job ran): a
 * deleted directory keeps its descriptor but has no links left; a network drive may answer ENOENT or ESTALE.
 */
export async function heldDirGone(held: HeldDir): Promise<boolean> {
  try {
    return (await stat(held.path)).nlink === 0;
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    return code === 'ENOENT' || code === 'ESTALE';
  }
}

/** Why the jobs directory cannot serve jobs (missing, not a directory, unreadable), or undefined. */
export async function jobsDirProblem(jobsDir: string): Promise<string | undefined> {
  try {
    if (!(await stat(jobsDir)).isDirectory()) return `the jobs directory ${jobsDir} is not a directory`;
    await access(jobsDir, constants.R_OK | constants.W_OK | constants.X_OK);
    return undefined;
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    return code === 'ENOENT'
      ? `the jobs directory ${jobsDir} does not exist (is the shared drive mounted?)`
      : `the jobs directory ${jobsDir} cannot be used: ${code}`;
  }
}
