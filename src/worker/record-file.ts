import { randomBytes } from 'node:crypto';
import { constants } from 'node:fs';
import { link, lstat, open, unlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { WORKER_FILE_PREFIX } from '../job/results-layout.js';
import { ErrorCode, isDriveFailure, WorkerError } from '../shared/errors.js';
import type { Identity } from './claim.js';

// The small JSON records a slot keeps in a job's results/ (claims, publisher locks), as a network drive with client
// caches allows them to be made and read: an exclusive create is decided by reading back the nonce the record
// holds, never by an error code or a link count (see claim.ts); a read goes through one descriptor, never follows a
// link, never blocks on a FIFO.

/** A claim is a few hundred bytes plus the request (at most 256 KiB); anything larger is not ours. */
const MAX_RECORD_BYTES = 1024 * 1024;

/** What a name on the drive holds: a record, nothing, or something that is no record (planted, damaged). */
type Lookup<T> =
  | { readonly kind: 'record'; readonly record: T; readonly mtimeMs: number }
  | { readonly kind: 'missing' }
  | { readonly kind: 'unreadable' };

/**
 * Reads a small record through one descriptor: the open revalidates an NFS client's cached attributes
 * (close-to-open), so the mtime is the server's, not one up to `actimeo` old; O_NONBLOCK and O_NOFOLLOW keep a
 * FIFO or a link planted in its place from hanging or redirecting the read. A failure of the drive itself
 * (ENOTCONN, EIO, ESTALE, …) is thrown: it decides nothing.
 */
export async function lookUp<T>(file: string): Promise<Lookup<T>> {
  let handle: Awaited<ReturnType<typeof open>> | undefined;
  try {
    handle = await open(file, constants.O_RDONLY | constants.O_NONBLOCK | constants.O_NOFOLLOW);
    const stats = await handle.stat();
    if (!stats.isFile() || stats.size > MAX_RECORD_BYTES) return { kind: 'unreadable' };
    const record = JSON.parse(await handle.readFile('utf8')) as T;
    return record && typeof record === 'object'
      ? { kind: 'record', record, mtimeMs: stats.mtimeMs }
      : { kind: 'unreadable' };
  } catch (error) {
    if (isDriveFailure(error)) throw error;
    return (error as NodeJS.ErrnoException).code === 'ENOENT' ? { kind: 'missing' } : { kind: 'unreadable' };
  } finally {
    await handle?.close().catch(() => {});
  }
}

export async function readRecord<T>(file: string): Promise<{ record: T; heartbeatMs: number } | undefined> {
  const found = await lookUp<T>(file);
  return found.kind === 'record' ? { record: found.record, heartbeatMs: found.mtimeMs } : undefined;
}

/** Whether `file` exists (anything at all, never followed), asked by path. */
export async function exists(file: string): Promise<boolean> {
  try {
    await lstat(file);
    return true;
  } catch (error) {
    if (isDriveFailure(error)) throw error;
    return false;
  }
}

/**
 * Creates `{dir}/{name}` holding `record` if nothing is there yet: the record's nonce when this process created it,
 * undefined when the name holds something else (another worker's record, or anything planted). Decided by reading back the
 * name, whatever link(2) answered. A create that leaves the name empty is tried again; one that never takes
 * throws (a drive failure as it is, any other error as CLAIM_FAILED: every slot would meet it).
 */
export async function createRecordFile(
  dir: string,
  name: string,
  record: object,
  self: Identity,
): Promise<string | undefined> {
  const nonce = randomBytes(12).toString('hex');
  const temp = path.join(dir, `${WORKER_FILE_PREFIX}tmp.${self.workerId}.${process.pid}.${nonce}`);
  const target = path.join(dir, name);
  let failure: unknown = await writeFile(temp, `${JSON.stringify({ ...record, nonce })}\n`, {
    flag: 'wx',
  }).then(
    () => undefined,
    (error: unknown) => error,
  );
  if (failure) return unmade(name, failure);
  try {
    for (let tries = 0; tries < 5; tries++) {
      failure = await link(temp, target).then(
        () => undefined,
        (error: unknown) => error,
      );
      const held = await lookUp<{ nonce?: string }>(target);
      if (held.kind === 'record') return held.record.nonce === nonce ? nonce : undefined;
      if (held.kind === 'unreadable') return undefined;
      await sleep(20 * 2 ** tries); // the name is still free: link(2) failed without anyone taking it
    }
  } finally {
    await unlink(temp).catch(() => {});
  }
  return unmade(name, failure);
}

function unmade(name: string, failure: unknown): never {
  if (isDriveFailure(failure)) throw failure;
  throw new WorkerError(
    ErrorCode.CLAIM_FAILED,
    `Cannot create ${name} in the job's results/: ${(failure as Error | undefined)?.message ?? 'it never appeared'}`,
    { cause: failure },
  );
}
