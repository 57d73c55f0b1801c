import { constants, readFileSync } from 'node:fs';
import { type FileHandle, open, readdir, unlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import type { Manifest } from '../job/report.js';
import { CLAIM_PREFIX, MANIFEST_NAME, PUBLISHED_PREFIX, PUBLISHER_PREFIX } from '../job/results-layout.js';
import { createRecordFile, exists, lookUp, readRecord } from './record-file.js';

// A claim is a small file `results/.mqtt-fs-worker.claim.{attempt}` in the job's folder on the shared drive: exactly
// one worker wins each attempt. Its mtime is the heartbeat. It also holds the request it runs, so that any slot can
// take over a job whose worker died without the message that carried it. `.published.{attempt}` says that
// attempt's result reached the broker; `.publisher.{attempt}` is held by the one slot that publishes a result its
// runner could not. results/ is never staged and its reset at the start of a run keeps these files.
//
// On a network drive neither an error code nor a link count decides an exclusive create: sshfs answers link(2)
// onto an existing file with EPERM about 1 time in 8, and reports st_nlink 1 for a hard-linked file. So every
// record carries a nonce, and whoever created it is decided by reading back what the name holds. Names are looked
// up by path (a lookup revalidates), never through a directory listing, which clients cache (sshfs for 20 s, NFS
// for acdirmax): a listing is only a hint of where to start looking. Claims of earlier attempts are kept, so that
// attempt numbers have no gaps and the newest is found by looking up N+1 until it is not there.

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
  /** Random, per record: the read-back that decides who created it. */
  readonly nonce?: string;
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

function attemptsOf(names: readonly string[], prefix: string): number[] {
  return names
    .filter((name) => name.startsWith(prefix))
    .map((name) => Number(name.slice(prefix.length)))
    .filter((n) => Number.isSafeInteger(n) && n > 0)
    .sort((a, b) => b - a);
}

/**
 * The newest attempt whose claim file exists: from the listing's newest (a hint, which a client may cache), then
 * N+1, N+2… looked up by path until one is not there.
 */
async function newestAttempt(resultsDir: string, hint: number): Promise<number> {
  let top = hint;
  while (await exists(claimFile(resultsDir, top + 1))) top++;
  return top;
}

async function currentClaim(
  resultsDir: string,
  top: number,
  listed: readonly number[],
): Promise<{ record: ClaimRecord; heartbeatMs: number } | undefined> {
  const candidates = [...new Set([top, ...listed.filter((n) => n < top)])];
  for (const attempt of candidates) {
    const read = await readRecord<ClaimRecord>(claimFile(resultsDir, attempt));
    // A damaged or planted claim: look at the one before it.
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
  const listed = attemptsOf(await readdir(resultsDir), CLAIM_PREFIX);
  const top = await newestAttempt(resultsDir, listed[0] ?? 0);
  const [claim, manifest] = await Promise.all([
    currentClaim(resultsDir, top, listed),
    storedManifest(resultsDir),
  ]);
  if (!claim) {
    // Claim files that cannot be read (a FIFO, a link, garbage planted in the job folder) block their attempt
    // numbers (no create can take them): run the next one.
    return top === 0
      ? { kind: 'free', attempt: 1 }
      : { kind: 'free', attempt: top + 1, why: `claim file ${top} is not a readable claim` };
  }
  const { record, heartbeatMs } = claim;
  const holder = holderState(record, heartbeatMs, self, leaseMs, now);
  if (manifest && manifest.attempt === record.attempt && manifest.worker?.id === record.workerId) {
    return {
      kind: 'finished',
      manifest,
      claim: record,
      published: await exists(path.join(resultsDir, `${PUBLISHED_PREFIX}${record.attempt}`)),
      ownerAlive: holder.alive,
    };
  }
  if (holder.alive) return { kind: 'live', claim: record };
  return {
    kind: 'free',
    attempt: Math.max(top, record.attempt) + 1,
    previous: record,
    why: `${holder.why} during attempt ${record.attempt}`,
  };
}

/** What a runner learns when it checks its claim before publishing. */
export type Standing = 'ours' | 'taken-over' | 'unreachable';

/**
 * A claim this process holds: its heartbeat keeps other hosts from taking the job over. The heartbeat goes
 * through the claim file's descriptor, so a link planted in its place is never followed.
 */
export class Claim {
  readonly attempt: number;
  readonly resultsDir: string;
  readonly #handle: FileHandle;
  readonly #nonce: string;
  #timers: NodeJS.Timeout[] = [];

  constructor(resultsDir: string, attempt: number, handle: FileHandle, nonce: string) {
    this.resultsDir = resultsDir;
    this.attempt = attempt;
    this.#handle = handle;
    this.#nonce = nonce;
  }

  /**
   * Touches the claim every `everyMs`. Once no touch has succeeded for `fenceAfterMs` (half the lease: another
   * host takes over after a whole one), `onFenced` is called once: the runner must stop and publish nothing. A
   * touch that hangs (a network drive gone quiet) counts as failing; the check does not wait for it.
   */
  startHeartbeat(
    everyMs: number,
    fenceAfterMs: number,
    onError: (error: Error) => void,
    onFenced: (silentForMs: number) => void,
  ): void {
    let lastOk = Date.now();
    let inFlight = false;
    let fenced = false;
    const touch = (): void => {
      if (inFlight) return;
      inFlight = true;
      const now = new Date();
      this.#handle
        .utimes(now, now)
        .then(() => {
          lastOk = Date.now();
        }, onError)
        .finally(() => {
          inFlight = false;
        });
    };
    const check = (): void => {
      const silent = Date.now() - lastOk;
      if (fenced || silent < fenceAfterMs) return;
      fenced = true;
      onFenced(silent);
    };
    this.#timers = [setInterval(touch, everyMs), setInterval(check, Math.max(50, Math.floor(everyMs / 8)))];
    for (const timer of this.#timers) timer.unref();
  }

  stopHeartbeat(): void {
    for (const timer of this.#timers) clearInterval(timer);
    this.#handle.close().catch(() => {});
  }

  /**
   * Before its result goes out: is this still the job's current claim? Read back by path: the claim holds our
   * nonce and no claim of a later attempt exists (a take-over after this runner was cut off).
   */
  async standing(): Promise<Standing> {
    try {
      const mine = await lookUp<ClaimRecord>(claimFile(this.resultsDir, this.attempt));
      if (mine.kind !== 'record' || mine.record.nonce !== this.#nonce) return 'taken-over';
      return (await exists(claimFile(this.resultsDir, this.attempt + 1))) ? 'taken-over' : 'ours';
    } catch {
      return 'unreachable';
    }
  }

  /** Records that this attempt's result reached the broker: no slot publishes it again. */
  markPublished(): Promise<void> {
    return markPublished(this.resultsDir, this.attempt);
  }
}

/**
 * Claims `attempt` of the job; undefined when another worker claimed that attempt first. Claims of earlier
 * attempts stay (see the top of this file).
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
  const nonce = await createRecordFile(resultsDir, `${CLAIM_PREFIX}${attempt}`, record, self);
  if (nonce === undefined) return undefined;
  const handle = await open(claimFile(resultsDir, attempt), constants.O_RDONLY | constants.O_NOFOLLOW);
  return new Claim(resultsDir, attempt, handle, nonce);
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
  if ((await createRecordFile(resultsDir, name, record, self)) !== undefined) return true;
  const held = await readRecord<Identity>(path.join(resultsDir, name));
  if (held && holderState(held.record, held.heartbeatMs, self, leaseMs, now).alive) return false;
  // Its publisher died before it could publish: the next slot that sees it takes its place.
  await unlink(path.join(resultsDir, name)).catch(() => {});
  return (await createRecordFile(resultsDir, name, record, self)) !== undefined;
}
