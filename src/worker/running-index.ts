import { constants } from 'node:fs';
import { type FileHandle, lstat, mkdir, open, readdir, stat, unlink } from 'node:fs/promises';
import path from 'node:path';
import { type HeldDir, holdDirectory } from '../job/paths.js';
import { isDriveFailure } from '../shared/errors.js';
import { idProblem } from '../shared/ids.js';
import type { Logger } from '../shared/log.js';

// The index of running claims: one empty file per job that a slot claimed and whose result has not yet reached
// the broker, `{jobs-dir}/.mqtt-fs-worker/running/{id}`. The claim in the job's folder stays the truth; the
// index only saves idle slots from walking every job folder to find the jobs whose worker died. A job id never
// starts with a dot, so the folder cannot be a job's.
//
// Whoever can write the jobs directory can plant things here, and every idle slot acts on this folder every few
// seconds: both folders are opened without following links and held, and checked to be real directories owned by
// this worker's user or the jobs directory's owner; an entry is created with O_EXCL|O_NOFOLLOW and removed with
// unlink (which never follows a link) below the held folder. Anything else is refused, said once, and left alone.

export const INDEX_DIR = '.mqtt-fs-worker';
const RUNNING_DIR = 'running';

/** Refusals already logged by this process: an idle slot looks every few seconds, and one line says it. */
const said = new Set<string>();

function refuse(log: Logger | undefined, why: string, sub: string): undefined {
  if (!said.has(why)) {
    said.add(why);
    log?.warn(
      sub === RUNNING_DIR
        ? `the index of running jobs is not used: ${why}; orphaned jobs are taken over only when redelivered`
        : `the slots' presence on the drive is not written: ${why}; \`workers\` shows this slot from the broker only`,
    );
  }
  return undefined;
}

/**
 * Opens `{parent}/{name}` as a directory without following a link (creating it with `create`), and checks who
 * owns it. Undefined (with the reason logged) for a link, a non-directory or a foreign owner.
 */
async function openDir(
  parent: string,
  name: string,
  shown: string,
  owners: ReadonlySet<number>,
  create: boolean,
  log: Logger | undefined,
  sub: string,
): Promise<FileHandle | undefined> {
  const full = path.join(parent, name);
  if (create) await mkdir(full, { mode: 0o755 }).catch(() => {}); // EEXIST, or the open below says why
  let handle: FileHandle;
  try {
    handle = await open(full, constants.O_RDONLY | constants.O_DIRECTORY | constants.O_NOFOLLOW);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') return undefined;
    // With O_DIRECTORY, Linux answers ENOTDIR for a link as for a file: lstat tells them apart.
    const link =
      code === 'ELOOP' ||
      (code === 'ENOTDIR' &&
        (await lstat(full).then(
          (s) => s.isSymbolicLink(),
          () => false,
        )));
    if (link) return refuse(log, `${shown} is a symbolic link`, sub);
    if (code === 'ENOTDIR') return refuse(log, `${shown} is not a directory`, sub);
    return refuse(log, `${shown} cannot be opened (${code})`, sub);
  }
  const uid = await handle.stat().then(
    (stats) => stats.uid,
    async (error: unknown) => {
      await handle.close();
      throw error;
    },
  );
  if (!owners.has(uid)) {
    await handle.close();
    return refuse(
      log,
      `${shown} is owned by uid ${uid}, neither this worker's user nor the jobs directory's owner`,
      sub,
    );
  }
  return handle;
}

/** `{jobs}/.mqtt-fs-worker/{sub}`, held; undefined where it does not exist (and `create` is false) or is refused. */
async function holdIndex(
  jobsRoot: string,
  sub: string,
  create: boolean,
  log: Logger | undefined,
): Promise<HeldDir | undefined> {
  let root: HeldDir;
  try {
    root = await holdDirectory(jobsRoot);
  } catch {
    return undefined; // the jobs directory itself is gone: nothing to index
  }
  try {
    const rootOwner = (await stat(root.path)).uid;
    const owners = new Set([process.geteuid?.() ?? rootOwner, rootOwner]);
    const shown = path.join(jobsRoot, INDEX_DIR);
    const top = await openDir(root.path, INDEX_DIR, shown, owners, create, log, sub);
    if (!top) return undefined;
    const held = await openDir(
      `/proc/self/fd/${top.fd}`,
      sub,
      path.join(shown, sub),
      owners,
      create,
      log,
      sub,
    ).finally(() => top.close());
    if (!held) return undefined;
    return { path: `/proc/self/fd/${held.fd}`, close: () => held.close().catch(() => {}) };
  } finally {
    await root.close();
  }
}

/** Runs `use` on the held `{jobs}/.mqtt-fs-worker/{sub}` folder; `otherwise` where there is none or it is refused. */
export async function withIndexFolder<T>(
  jobsRoot: string,
  sub: string,
  create: boolean,
  log: Logger | undefined,
  use: (dir: string) => Promise<T>,
  otherwise: T,
): Promise<T> {
  const held = await holdIndex(jobsRoot, sub, create, log);
  if (!held) return otherwise;
  try {
    return await use(held.path);
  } finally {
    await held.close();
  }
}

/** Adds `id` to the index (before its job runs, so a death at any later point leaves it there). */
export async function addRunning(jobsRoot: string, id: string, log?: Logger): Promise<void> {
  await withIndexFolder(
    jobsRoot,
    RUNNING_DIR,
    true,
    log,
    async (dir) => {
      const flags = constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW;
      const entry = path.join(dir, id);
      await open(entry, flags, 0o644).then(
        (handle) => handle.close(),
        async (error: NodeJS.ErrnoException) => {
          // Already there (also a link planted under the name: O_EXCL never follows it, nothing is written). Read
          // back, not taken from the code: two hosts adding the same job race, and sshfs answers EPERM as often
          // as EEXIST.
          if (
            await lstat(entry).then(
              () => true,
              () => false,
            )
          )
            return;
          if (isDriveFailure(error)) throw error;
          // The index only saves a walk: a job that cannot be listed still runs.
          log?.warn(`cannot add ${id} to the index of running jobs: ${error.message}`);
        },
      );
    },
    undefined,
  );
}

/** Removes `id` from the index; never throws (a stale entry costs a look, nothing more). */
export async function removeRunning(jobsRoot: string, id: string, log?: Logger): Promise<void> {
  await withIndexFolder(
    jobsRoot,
    RUNNING_DIR,
    false,
    log,
    (dir) => unlink(path.join(dir, id)).catch(() => {}),
    undefined,
  ).catch(() => {});
}

/** The ids in the index; none when it does not exist yet or is refused. Names that are not job ids are ignored. */
export async function listRunning(jobsRoot: string, log?: Logger): Promise<string[]> {
  const names = await withIndexFolder(
    jobsRoot,
    RUNNING_DIR,
    false,
    log,
    (dir) => readdir(dir),
    [] as string[],
  ).catch(() => [] as string[]);
  return names.filter((name) => idProblem(name) === undefined);
}

/**
 * How many entries one look at the index inspects (each costs ~2 ms of a worker's CPU: its job folder opened, its
 * claim read): a look costs the same in a fleet of 10 slots or 10,000.
 */
export const LOOK_SIZE = 8;

/**
 * Which entries each look of one process inspects. With LOOK_SIZE or fewer, all of them. With more, the LOOK_SIZE
 * names that follow where the last look stopped (in name order, wrapping), starting at a random place: one idle
 * slot goes round the whole index in ceil(entries / LOOK_SIZE) looks, and slots that start together look at
 * different entries instead of all racing for the same orphan. `first`, the job this slot's previous process
 * died in, is looked at first by the first look (a restarted slot takes its own job over at once).
 */
export class IndexRound {
  #after: string | undefined;
  #first: string | undefined;
  readonly #size: number;
  readonly #random: () => number;

  constructor(size = LOOK_SIZE, random: () => number = Math.random, first?: string) {
    this.#size = size;
    this.#random = random;
    this.#first = first;
  }

  pick(ids: readonly string[]): string[] {
    const first = this.#first !== undefined && ids.includes(this.#first) ? [this.#first] : [];
    this.#first = undefined;
    const rest = first.length > 0 ? ids.filter((id) => id !== first[0]) : ids;
    return [...first, ...this.#next(rest, this.#size - first.length)];
  }

  #next(ids: readonly string[], size: number): string[] {
    if (ids.length <= size) return [...ids];
    const sorted = [...ids].sort();
    const after = this.#after;
    const start =
      after === undefined
        ? Math.floor(this.#random() * sorted.length)
        : Math.max(
            0,
            sorted.findIndex((id) => id > after),
          );
    const picked = Array.from({ length: size }, (_, i) => sorted[(start + i) % sorted.length] as string);
    this.#after = picked.at(-1);
    return picked;
  }
}
