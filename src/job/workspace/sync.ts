import { constants, type Dirent, lstatSync, type ReadStream, readdirSync, type Stats } from 'node:fs';
import { chmod, mkdir, open, readlink, rename, unlink } from 'node:fs/promises';
import path from 'node:path';
import { pipeline } from 'node:stream/promises';
import picomatch from 'picomatch';
import { ErrorCode, WorkerError } from '../../shared/errors.js';
import { forEachLimit } from '../../shared/pool.js';
import { type HeldDir, holdDirectory } from '../paths.js';
import { isReservedName } from '../results-layout.js';
import {
  fileFingerprint,
  isLinkFingerprint,
  linkFingerprint,
  type SkippedEntry,
  type Snapshot,
} from './stage.js';

// node:crypto is loaded by the first file synced, not by every job's start (it costs ~5 ms).
const crypto = () => process.getBuiltinModule('node:crypto');

export interface Artifact {
  readonly path: string;
  readonly bytes: number;
  readonly sha256: string;
}

export interface SyncResult {
  readonly artifacts: readonly Artifact[];
  readonly skipped: readonly SkippedEntry[];
  readonly bytes: number;
}

export interface SyncInput {
  readonly workspace: string;
  readonly resultsDir: string;
  readonly snapshot: Snapshot;
  readonly include: readonly string[];
  readonly exclude: readonly string[];
  /** `workspace` is an overlay's upper layer: its whiteouts (deletions, hidden entries) are no artifacts. */
  readonly overlayUpper?: boolean;
}

// Names in results/ that belong to the worker: an artifact never replaces them.
const SYNC_CONCURRENCY = 8;
const TEMP_FLAGS = constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW;

/** Entries of the workspace that are new or changed since staging, as relative paths with their lstat. */
export async function findChanges(input: Omit<SyncInput, 'resultsDir'>): Promise<{
  changed: { path: string; stats: Stats }[];
  skipped: SkippedEntry[];
}> {
  const entries = walkWorkspace(input.workspace, input.include, input.exclude).filter(
    (entry) => !(input.overlayUpper && isWhiteout(entry.stats)),
  );
  const changed: { path: string; stats: Stats }[] = [];
  const skipped: SkippedEntry[] = [];
  for (const entry of entries) {
    const stats = entry.stats;
    const before = input.snapshot.get(entry.path);
    if (stats.isFile()) {
      if (before !== fileFingerprint(stats)) changed.push({ path: entry.path, stats });
    } else if (stats.isSymbolicLink()) {
      if (
        before === undefined ||
        !isLinkFingerprint(before) ||
        before !== (await linkTarget(input.workspace, entry.path))
      ) {
        skipped.push({ path: entry.path, reason: 'symlink' });
      }
    } else {
      skipped.push({ path: entry.path, reason: 'special-file' });
    }
  }
  return { changed, skipped };
}

/**
 * Every non-directory entry under `root` that the patterns select, with its lstat. The job's patterns are matched
 * with `.` matching a newline too, so a name with one is a name like any other (fast-glob's own matching of `**`
 * never selects such a name, nor anything below a folder so named: the sync walks the workspace itself). A
 * directory an exclude matches is not entered, as with a glob's ignore.
 */
function walkWorkspace(
  root: string,
  include: readonly string[],
  exclude: readonly string[],
): { path: string; stats: Stats }[] {
  const options = { dot: true, flags: 's' };
  const included = picomatch(include as string[], options);
  const excluded = exclude.length > 0 ? picomatch(exclude as string[], options) : () => false;
  const found: { path: string; stats: Stats }[] = [];
  // Synchronous calls: the workspace is local and its metadata cached after the steps, so each call takes a few
  // microseconds where a promise through the thread pool costs tens (bench/run's 20,000-file row: 257 ms, against
  // 340 ms with fast-glob and 598 ms with promises).
  const visit = (relative: string): void => {
    let entries: Dirent[];
    try {
      entries = readdirSync(path.join(root, relative), { withFileTypes: true });
    } catch {
      return; // removed while listed, or unreadable: nothing to sync there
    }
    for (const entry of entries) {
      const rel = relative ? `${relative}/${entry.name}` : entry.name;
      if (excluded(rel)) continue;
      if (entry.isDirectory()) visit(rel);
      else if (included(rel)) {
        const stats = lstatOrUndefined(path.join(root, rel));
        if (stats) found.push({ path: rel, stats });
      }
    }
  };
  visit('');
  return found;
}

/** An overlay whiteout: a character device with device number 0:0. */
function isWhiteout(stats: Stats): boolean {
  return stats.isCharacterDevice() && stats.rdev === 0;
}

function lstatOrUndefined(file: string): Stats | undefined {
  try {
    return lstatSync(file);
  } catch {
    return undefined; // gone since the listing
  }
}

async function linkTarget(workspace: string, relative: string): Promise<string | undefined> {
  return readlink(path.join(workspace, relative)).then(linkFingerprint, () => undefined);
}

/**
 * Copies every new or changed workspace file into `results/` at its relative path, hashing it in the same pass.
 * Links are never followed, on either side: a directory in results/ that a step replaced with a symlink is not
 * written through, and each file lands by rename, so a reader never sees half of it.
 */
export async function syncResults(input: SyncInput): Promise<SyncResult> {
  const done: Progress = { artifacts: [], skipped: [], bytes: 0 };
  try {
    await copyChanges(input, done);
    return sorted(done);
  } catch (error) {
    // What was copied before the failure is in results/: the manifest lists exactly that.
    const failure =
      error instanceof WorkerError
        ? error
        : new WorkerError(ErrorCode.SYNC_FAILED, `Sync to results/ failed: ${(error as Error).message}`, {
            cause: error,
          });
    throw Object.assign(failure, { partial: sorted(done) });
  }
}

function sorted(result: SyncResult): SyncResult {
  const byPath = <T extends { path: string }>(a: T, b: T) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0);
  return {
    ...result,
    artifacts: [...result.artifacts].sort(byPath),
    skipped: [...result.skipped].sort(byPath),
  };
}

/** What a sync has done so far: filled in as it goes, so that a failure still knows what was copied. */
interface Progress {
  artifacts: Artifact[];
  skipped: SkippedEntry[];
  bytes: number;
}

async function copyChanges(input: SyncInput, done: Progress): Promise<void> {
  const { changed, skipped } = await findChanges(input);
  done.skipped.push(...skipped);
  const dirs = new SafeDirs(input.resultsDir);
  try {
    await forEachLimit(changed, SYNC_CONCURRENCY, async ({ path: relative, stats }) => {
      if (!relative.includes('/') && isReservedName(relative)) {
        done.skipped.push({ path: relative, reason: 'reserved-name' });
        return;
      }
      const parent = await dirs.ensure(path.posix.dirname(relative));
      if (parent === undefined) {
        done.skipped.push({ path: relative, reason: 'not-a-directory' });
        return;
      }
      const sha256 = await copyHashed(
        path.join(input.workspace, relative),
        path.join(parent, path.posix.basename(relative)),
        stats,
      );
      if (sha256 === undefined) {
        done.skipped.push({ path: relative, reason: 'unreadable' });
        return;
      }
      done.artifacts.push({ path: relative, bytes: stats.size, sha256 });
      done.bytes += stats.size;
    });
  } finally {
    await dirs.close();
  }
}

/** Copies `from` to `to` through a temp file and a rename; undefined when the source cannot be read. */
async function copyHashed(from: string, to: string, stats: Stats): Promise<string | undefined> {
  let source: ReadStream;
  try {
    const handle = await open(from, constants.O_RDONLY | constants.O_NOFOLLOW);
    source = handle.createReadStream({ highWaterMark: 1024 * 1024 });
  } catch {
    return undefined;
  }
  // A short name beside the target: the target's own name may already be as long as the filesystem allows.
  const temp = path.join(
    path.dirname(to),
    `.mfw-${process.pid}-${Math.random().toString(36).slice(2, 10)}.tmp`,
  );
  const hash = crypto().createHash('sha256');
  try {
    const target = await open(temp, TEMP_FLAGS, 0o600);
    try {
      await pipeline(
        source,
        async function* (chunks: AsyncIterable<Buffer>) {
          for await (const chunk of chunks) {
            hash.update(chunk);
            yield chunk;
          }
        },
        target.createWriteStream({ highWaterMark: 1024 * 1024 }),
      );
    } finally {
      await target.close().catch(() => {});
    }
    await chmod(temp, stats.mode & 0o777);
    await rename(temp, to);
    return hash.digest('hex');
  } catch (error) {
    source.destroy();
    await unlink(temp).catch(() => {});
    throw new WorkerError(
      ErrorCode.SYNC_FAILED,
      `Cannot copy ${path.basename(from)} to results: ${(error as Error).message}`,
      {
        cause: error,
      },
    );
  }
}

/**
 * Creates directories below a root, refusing to pass through anything that is not a real directory, and holds
 * each one open (see holdDirectory): a folder in results/ that someone swaps for a symlink while the sync runs
 * cannot redirect a file into the link's target.
 */
class SafeDirs {
  readonly #root: string;
  readonly #known = new Map<string, Promise<string | undefined>>();
  readonly #held: HeldDir[] = [];

  constructor(root: string) {
    this.#root = root;
  }

  /** The held path of `relative` (created if missing), or undefined when something else is in its way. */
  ensure(relative: string): Promise<string | undefined> {
    if (relative === '.' || relative === '') return Promise.resolve(this.#root);
    let known = this.#known.get(relative);
    if (!known) {
      known = this.ensure(path.posix.dirname(relative)).then((parent) =>
        parent === undefined ? undefined : this.#make(parent, path.posix.basename(relative)),
      );
      this.#known.set(relative, known);
    }
    return known;
  }

  async #make(parent: string, name: string): Promise<string | undefined> {
    const full = path.join(parent, name);
    await mkdir(full).catch((error: NodeJS.ErrnoException) => {
      if (error.code !== 'EEXIST') throw error;
    });
    try {
      const held = await holdDirectory(full);
      this.#held.push(held);
      return held.path;
    } catch (error) {
      const code = (error as NodeJS.ErrnoException).code;
      if (code === 'ELOOP' || code === 'ENOTDIR') return undefined;
      throw error;
    }
  }

  async close(): Promise<void> {
    await Promise.all(this.#held.splice(0).map((held) => held.close()));
  }
}
