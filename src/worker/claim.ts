import { constants, readFileSync } from 'node:fs';
import { type FileHandle, link, open, readdir, unlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import type { Manifest } from '../job/report.js';
import {
  CLAIM_PREFIX,
  MANIFEST_NAME,
  PUBLISHED_PREFIX,
  PUBLISHER_PREFIX,
  WORKER_FILE_PREFIX,
} from '../job/results-layout.js';

// A claim is a small file `results/.mqtt-fs-worker.claim.{attempt}` in the job's folder on the shared drive,
// created with link(2) (atomic, also on NFS) so that exactly one worker wins each attempt. Its mtime is the
// heartbeat. It also holds the request it runs, so that any slot can take over a job whose worker died without
// the message that carried it. `.published.{attempt}` says that attempt's result reached the broker;
// `.publisher.{attempt}` is held by the one slot that publishes a result its runner could not. results/ is
// never staged and its reset at the start of a run keeps these files.

/** A claim is a few hundred bytes plus the request (at most 256 KiB); anything larger is not ours. */
const MAX_RECORD_BYTES = 1024 * 1024;

/** Who a worker process is, as far as another one needs to know to tell whether it is still alive. */
export interface Identity {
  readonly workerId: string;
  readonly host: string;
  /** The kernel's boot id: a pid means the same process only within one boot of one host. */
  readonly bootId: string;
  readonly pid: number;
  /** The process's start time in clock ticks since boot (pids are reused; this pair is not). */
  readonly pidStart: number;
}

/** What a run was asked to do: enough for another slot to run it again, or to answer it, without the message. */
export interface StoredRequest {
  /** The request as the worker accepted it (`id`, `steps`, `rerun`), JSON. */
  readonly request: string;
  /** The MQTT 5 response topic and correlation data (base64) the result also goes to. */
  readonly responseTopic?: string;
  readonly correlationData?: string;
}

export interface ClaimRecord extends Identity, Partial<StoredRequest> {
  readonly attempt: number;
  readonly claimedAt: string;
  /** The re-run token of the request that started this attempt (see "Re-runs"). */
  readonly rerun?: string;
}

export type ClaimState =
  /** Nobody has claimed the job, or its claimant is dead: run it as `attempt`. */
  | {
      readonly kind: 'free';
      readonly attempt: number;
      readonly previous?: ClaimRecord;
      readonly why?: string;
    }
  /**
   * The current attempt finished. `published`: its result reached the broker. `ownerAlive`: its runner still
   * lives (and so still publishes it itself).
   */
  | {
      readonly kind: 'finished';
      readonly manifest: Manifest;
      readonly claim: ClaimRecord;
      readonly published: boolean;
      readonly ownerAlive: boolean;
    }
  /** A live worker runs it: it will publish the result. */
  | { readonly kind: 'live'; readonly claim: ClaimRecord };

/** Reads this process's identity from /proc; tolerant of systems without it (then only the heartbeat counts). */
export function selfIdentity(workerId: string, host: string, pid: number): Identity {
  return { workerId, host, bootId: readBootId(), pid, pidStart: processStart(pid) ?? 0 };
}

function readBootId(): string {
  try {
    return readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
  } catch {
    return '';
  }
}

/** Field 22 of /proc/{pid}/stat (start time); undefined when there is no such process. */
function processStart(pid: number): number | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // The command name (field 2) may hold spaces and parentheses: split after its closing parenthesis.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return Number(fields[19]);
  } catch {
    return undefined;
  }
}

function claimFile(resultsDir: string, attempt: number): string {
  return path.join(resultsDir, `${CLAIM_PREFIX}${attempt}`);
}

/**
 * Reads a small regular file through one descriptor: the open revalidates an NFS client's cached attributes
 * (close-to-open), so the mtime is the server's, not one up to `actimeo` old; O_NONBLOCK and O_NOFOLLOW keep a
 * FIFO or a link planted in its place from hanging or redirecting the read.
 */
async function readSmallFile(file: string): Promise<{ text: string; mtimeMs: number } | undefined> {
  let handle: Awaited<ReturnType<typeof open>> | undefined;
  try {
    handle = await open(file, constants.O_RDONLY | constants.O_NONBLOCK | constants.O_NOFOLLOW);
    const stats = await handle.stat();
    if (!stats.isFile() || stats.size > MAX_RECORD_BYTES) return undefined;
    return { text: await handle.readFile('utf8'), mtimeMs: stats.mtimeMs };
  } catch {
    return undefined;
  } finally {
    await handle?.close().catch(() => {});
  }
}

async function readRecord<T>(file: string): Promise<{ record: T; heartbeatMs: number } | undefined> {
  const read = await readSmallFile(file);
  if (!read) return undefined;
  try {
    const record = JSON.parse(read.text) as T;
    return record && typeof record === 'object' ? { record, heartbeatMs: read.mtimeMs } : undefined;
  } catch {
    return undefined;
  }
}

function attemptsOf(names: readonly string[], prefix: string): number[] {
  return names
    .filter((name) => name.startsWith(prefix))
    .map((name) => Number(name.slice(prefix.length)))
    .filter((n) => Number.isSafeInteger(n) && n > 0)
    .sort((a, b) => b - a);
}

async function currentClaim(
  resultsDir: string,
  names: readonly string[],
): Promise<{ record: ClaimRecord; heartbeatMs: number } | undefined> {
  for (const attempt of attemptsOf(names, CLAIM_PREFIX)) {
    const read = await readRecord<ClaimRecord>(claimFile(resultsDir, attempt));
    // A claim being written or removed right now, or damaged: look at the next one.
    if (read) return { record: { ...read.record, attempt }, heartbeatMs: read.heartbeatMs };
  }
  return undefined;
}

async function storedManifest(resultsDir: string): Promise<Manifest | undefined> {
  return (await readRecord<Manifest>(path.join(resultsDir, MANIFEST_NAME)))?.record;
}

/** Whether the process behind `record` still lives, and if not, why it is taken for dead. */
function holderState(
  record: Identity,
  heartbeatMs: number,
  self: Identity,
  leaseMs: number,
  now: number,
): { alive: true } | { alive: false; why: string } {
  if (record.workerId === self.workerId) {
    // One process per worker id (slot-lock.ts): an earlier claim of this id is a process that died.
    return { alive: false, why: `this slot's earlier process (pid ${record.pid}) died` };
  }
  if (record.host === self.host && record.bootId === self.bootId && self.bootId !== '') {
    if (processStart(record.pid) === record.pidStart) return { alive: true };
    return { alive: false, why: `worker ${record.workerId} (pid ${record.pid}, this host) is gone` };
  }
  const age = now - heartbeatMs;
  if (age <= leaseMs) return { alive: true };
  return {
    alive: false,
    why: `worker ${record.workerId} on ${record.host} sent no heartbeat for ${Math.round(age / 1000)}s`,
  };
}

/**
 * Decides what a delivery of this job means (`resultsDir`: the held results/, see holdResults): run it (free), leave it (live, or finished), or publish a finished
 * attempt's result that never reached the broker. A result counts as finished only when it is the current
 * claim's: a dry run's result, or a results/ copied from elsewhere, never stops the fleet from running the job.
 */
export async function inspectClaim(
  resultsDir: string,
  self: Identity,
  leaseMs: number,
  now: number,
): Promise<ClaimState> {
  const names = await readdir(resultsDir);
  const [claim, manifest] = await Promise.all([currentClaim(resultsDir, names), storedManifest(resultsDir)]);
  if (!claim) {
    // Claim files that cannot be read (a FIFO, a link, garbage planted in the job folder) block their attempt
    // numbers (link(2) would fail on them): run the next one.
    const newest = attemptsOf(names, CLAIM_PREFIX)[0];
    return newest === undefined
      ? { kind: 'free', attempt: 1 }
      : { kind: 'free', attempt: newest + 1, why: `claim file ${newest} is not a readable claim` };
  }
  const { record, heartbeatMs } = claim;
  const holder = holderState(record, heartbeatMs, self, leaseMs, now);
  if (manifest && manifest.attempt === record.attempt && manifest.worker?.id === record.workerId) {
    return {
      kind: 'finished',
      manifest,
      claim: record,
      published: names.includes(`${PUBLISHED_PREFIX}${record.attempt}`),
      ownerAlive: holder.alive,
    };
  }
  if (holder.alive) return { kind: 'live', claim: record };
  return {
    kind: 'free',
    attempt: record.attempt + 1,
    previous: record,
    why: `${holder.why} during attempt ${record.attempt}`,
  };
}

/**
 * A claim this process holds: its heartbeat keeps other hosts from taking the job over. The heartbeat goes
 * through the claim file's descriptor, so a link planted in its place is never followed.
 */
export class Claim {
  readonly attempt: number;
  readonly resultsDir: string;
  readonly #handle: FileHandle;
  #timer: NodeJS.Timeout | undefined;

  constructor(resultsDir: string, attempt: number, handle: FileHandle) {
    this.resultsDir = resultsDir;
    this.attempt = attempt;
    this.#handle = handle;
  }

  startHeartbeat(everyMs: number, onError: (error: Error) => void): void {
    this.#timer = setInterval(() => {
      const now = new Date();
      this.#handle.utimes(now, now).catch(onError);
    }, everyMs);
    this.#timer.unref();
  }

  stopHeartbeat(): void {
    clearInterval(this.#timer);
    this.#handle.close().catch(() => {});
  }

  /** Records that this attempt's result reached the broker: no slot publishes it again. */
  markPublished(): Promise<void> {
    return markPublished(this.resultsDir, this.attempt);
  }
}

/** Creates `{dir}/{name}` holding `record`, atomically and only if it does not exist (false: it does). */
async function createRecordFile(dir: string, name: string, record: object, self: Identity): Promise<boolean> {
  const temp = path.join(dir, `${WORKER_FILE_PREFIX}tmp.${self.workerId}.${process.pid}.${Date.now()}`);
  await writeFile(temp, `${JSON.stringify(record)}\n`, { flag: 'wx' });
  try {
    await link(temp, path.join(dir, name));
    return true;
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'EEXIST') return false;
    throw error;
  } finally {
    await unlink(temp).catch(() => {});
  }
}

/**
 * Claims `attempt` of the job; undefined when another worker claimed that attempt first. Older claim files and
 * the markers of older attempts are removed once the new claim stands.
 */
export async function acquireClaim(
  resultsDir: string,
  self: Identity,
  attempt: number,
  now: Date,
  stored: StoredRequest & { rerun?: string | undefined },
): Promise<Claim | undefined> {
  const { rerun, ...request } = stored;
  const record: ClaimRecord = {
    ...self,
    attempt,
    claimedAt: now.toISOString(),
    ...request,
    ...(rerun !== undefined ? { rerun } : {}),
  };
  if (!(await createRecordFile(resultsDir, `${CLAIM_PREFIX}${attempt}`, record, self))) return undefined;
  const names = await readdir(resultsDir).catch(() => [] as string[]);
  const older = names.filter((name) =>
    [CLAIM_PREFIX, PUBLISHED_PREFIX, PUBLISHER_PREFIX].some(
      (prefix) => name.startsWith(prefix) && Number(name.slice(prefix.length)) < attempt,
    ),
  );
  await Promise.all(older.map((name) => unlink(path.join(resultsDir, name)).catch(() => {})));
  const handle = await open(claimFile(resultsDir, attempt), constants.O_RDONLY | constants.O_NOFOLLOW);
  return new Claim(resultsDir, attempt, handle);
}

export async function markPublished(resultsDir: string, attempt: number): Promise<void> {
  const flags = constants.O_WRONLY | constants.O_CREAT | constants.O_NOFOLLOW;
  await writeFile(path.join(resultsDir, `${PUBLISHED_PREFIX}${attempt}`), '', { flag: flags }).catch(
    () => {},
  );
}

/**
 * Makes this process the one that publishes a finished attempt's result its runner could not: true when it is
 * (no other live slot holds the publisher file), false when another slot does.
 */
export async function acquirePublisher(
  resultsDir: string,
  attempt: number,
  self: Identity,
  leaseMs: number,
  now: number,
): Promise<boolean> {
  const name = `${PUBLISHER_PREFIX}${attempt}`;
  const record = { ...self, attempt, claimedAt: new Date(now).toISOString() };
  if (await createRecordFile(resultsDir, name, record, self)) return true;
  const held = await readRecord<Identity>(path.join(resultsDir, name));
  if (held && holderState(held.record, held.heartbeatMs, self, leaseMs, now).alive) return false;
  // Its publisher died before it could publish: the next slot that sees it takes its place.
  await unlink(path.join(resultsDir, name)).catch(() => {});
  return createRecordFile(resultsDir, name, record, self);
}
