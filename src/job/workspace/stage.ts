import { constants, type Dirent } from 'node:fs';
import { copyFile, lchown, lstat, mkdir, readdir, readlink, rm, symlink, utimes } from 'node:fs/promises';
import path from 'node:path';
import { ErrorCode, WorkerError } from '../../shared/errors.js';
import { forEachLimit } from '../../shared/pool.js';
import { RESULTS_DIR } from '../results-layout.js';
import { overlayLayers, unmountUnder } from './overlay.js';

/** A path the worker did not copy (staging) or did not sync back, and why. */
export interface SkippedEntry {
  readonly path: string;
  readonly reason:
    | 'symlink'
    | 'special-file'
    | 'excluded'
    | 'reserved-name'
    | 'unreadable'
    | 'not-a-directory';
}

/**
 * What each staged workspace entry looked like right after staging, keyed by its relative path (with `/`).
 * Files: size, mtime, ctime and inode of the workspace copy, so any later write (which always moves ctime) or
 * replacement shows; symlinks: their target.
 */
export type Snapshot = ReadonlyMap<string, string>;

export interface StageResult {
  readonly snapshot: Snapshot;
  readonly files: number;
  readonly bytes: number;
  readonly skipped: readonly SkippedEntry[];
}

/** The name of the job folder's output directory; never staged. */
const COPY_CONCURRENCY = 16;

export function fileFingerprint(stats: {
  size: number;
  mtimeMs: number;
  ctimeMs: number;
  ino: number;
}): string {
  return `f:${stats.size}:${stats.mtimeMs}:${stats.ctimeMs}:${stats.ino}`;
}

export function linkFingerprint(target: string): string {
  return `l:${target}`;
}

/** Whether a snapshot entry is a link's (see linkFingerprint): the one place that knows the format. */
export function isLinkFingerprint(fingerprint: string): boolean {
  return fingerprint.startsWith('l:');
}

/** Relative path with forward slashes, as the manifest and globs use. */
export function toPosix(relative: string): string {
  return path.sep === '/' ? relative : relative.split(path.sep).join('/');
}

/**
 * Copies the job folder (minus `results/`) into `workspace`, which must exist and be empty. Regular files are
 * copied with their mode and mtime (copy-on-write clones where the filesystem can), symlinks are recreated as
 * links and never followed, and special files (devices, FIFOs, sockets) are skipped so that a job folder cannot
 * smuggle a device node into a step's reach. With `owner` (--run-as), every entry is handed to that user as it is
 * made, before its fingerprint is taken (a change of owner moves ctime, which the sync compares).
 */
export async function stageJob(
  jobDir: string,
  workspace: string,
  owner?: { readonly uid: number; readonly gid: number },
): Promise<StageResult> {
  const own = owner ? (to: string) => lchown(to, owner.uid, owner.gid) : async () => {};
  await own(workspace);
  const snapshot = new Map<string, string>();
  const skipped: SkippedEntry[] = [];
  const files = await makeTree(jobDir, workspace, own, snapshot, skipped);
  const bytes = await copyFiles(files, own, snapshot);
  return { snapshot, files: files.length, bytes, skipped };
}

type Own = (to: string) => Promise<void>;

interface FileToCopy {
  readonly from: string;
  readonly to: string;
  readonly relative: string;
}

function stagingFailed(relative: string, error: unknown): never {
  const reason = (error as NodeJS.ErrnoException).code ?? (error as Error).message;
  throw new WorkerError(ErrorCode.STAGING_FAILED, `Staging failed at ${relative || '.'}: ${reason}`, {
    cause: error,
  });
}

/** Directories and links first (cheap, ordered); returns the files, for the parallel copy. */
async function makeTree(
  jobDir: string,
  workspace: string,
  own: Own,
  snapshot: Map<string, string>,
  skipped: SkippedEntry[],
): Promise<FileToCopy[]> {
  const files: FileToCopy[] = [];
  const walk = async (relative: string): Promise<void> => {
    let entries: Dirent[];
    try {
      entries = await readdir(path.join(jobDir, relative), { withFileTypes: true });
    } catch (error) {
      return stagingFailed(relative, error);
    }
    for (const entry of entries) {
      const rel = relative ? path.join(relative, entry.name) : entry.name;
      if (!relative && entry.name === RESULTS_DIR) continue;
      const from = path.join(jobDir, rel);
      const to = path.join(workspace, rel);
      if (entry.isDirectory()) {
        await mkdir(to)
          .then(() => own(to))
          .catch((error: unknown) => stagingFailed(rel, error));
        await walk(rel);
      } else if (entry.isFile()) {
        files.push({ from, to, relative: rel });
      } else if (entry.isSymbolicLink()) {
        try {
          const target = await readlink(from);
          await symlink(target, to);
          await own(to);
          snapshot.set(toPosix(rel), linkFingerprint(target));
        } catch (error) {
          stagingFailed(rel, error);
        }
      } else {
        skipped.push({ path: toPosix(rel), reason: 'special-file' });
      }
    }
  };
  await walk('');
  return files;
}

/** Copies the files (clones where the filesystem can), COPY_CONCURRENCY at a time; returns their bytes. */
async function copyFiles(
  files: readonly FileToCopy[],
  own: Own,
  snapshot: Map<string, string>,
): Promise<number> {
  let bytes = 0;
  await forEachLimit(files, COPY_CONCURRENCY, async ({ from, to, relative }) => {
    try {
      const source = await lstat(from);
      await copyFile(from, to, constants.COPYFILE_FICLONE);
      await utimes(to, source.atime, source.mtime);
      await own(to);
      const copied = await lstat(to);
      snapshot.set(toPosix(relative), fileFingerprint(copied));
      bytes += source.size;
    } catch (error) {
      stagingFailed(relative, error);
    }
  });
  return bytes;
}

/** `{workspacesDir}/{workerId}`: everything this worker keeps locally; only it ever writes there. */
export function workerHome(workspacesDir: string, workerId: string): string {
  return path.join(workspacesDir, workerId);
}

/**
 * Creates a fresh, empty workspace for a job, first removing whatever an earlier run of this worker left behind
 * (a SIGKILLed worker cannot clean up after itself).
 */
export async function createWorkspace(
  workspacesDir: string,
  workerId: string,
  jobId: string,
): Promise<string> {
  const home = workerHome(workspacesDir, workerId);
  try {
    // An overlay a crashed run left mounted goes first: removing through it would only whiteout the job's files.
    await unmountUnder(home);
    await removeHome(workspacesDir, workerId);
    const workspace = path.join(home, jobId);
    await mkdir(workspace, { recursive: true, mode: 0o755 });
    return workspace;
  } catch (error) {
    throw new WorkerError(
      ErrorCode.STAGING_FAILED,
      `Cannot prepare workspace in ${home}: ${(error as Error).message}`,
      {
        cause: error,
      },
    );
  }
}

/** Removes this worker's workspaces; never throws (a purge failure must not hide the job's outcome). */
export async function purgeWorkspace(workspacesDir: string, workerId: string): Promise<Error | undefined> {
  try {
    await unmountUnder(workerHome(workspacesDir, workerId));
    await removeHome(workspacesDir, workerId);
    return undefined;
  } catch (error) {
    return error as Error;
  }
}

/** The worker's home and its overlay layers (unmounted first by the caller). */
async function removeHome(workspacesDir: string, workerId: string): Promise<void> {
  await Promise.all([
    rm(workerHome(workspacesDir, workerId), { recursive: true, force: true, maxRetries: 3 }),
    rm(overlayLayers(workspacesDir, workerId).base, { recursive: true, force: true, maxRetries: 3 }),
  ]);
}
