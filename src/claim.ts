import { readFileSync } from 'node:fs';
import { link, readdir, readFile, stat, unlink, utimes, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { ensureResultsDir } from './paths.js';
import { MANIFEST_NAME, type Manifest } from './report.js';

// A claim is a small file `results/.mqtt-fs-worker.claim.{attempt}` in the job's folder on the shared drive,
// created with link(2) (atomic, also on NFS) so that exactly one worker wins each attempt. Its mtime is the
// heartbeat. results/ is never staged and its reset at the start of a run keeps these files.

const PREFIX = '.mqtt-fs-worker.claim.';

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

export interface ClaimRecord extends Identity {
  readonly attempt: number;
  readonly claimedAt: string;
}

export type ClaimState =
  /** Nobody has claimed the job, or its claimant is dead: run it as `attempt`. */
  | {
      readonly kind: 'free';
      readonly attempt: number;
      readonly previous?: ClaimRecord;
      readonly why?: string;
    }
  /** The current attempt finished: its manifest is there to publish again. */
  | { readonly kind: 'finished'; readonly manifest: Manifest }
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
  return path.join(resultsDir, `${PREFIX}${attempt}`);
}

async function currentClaim(
  resultsDir: string,
): Promise<{ record: ClaimRecord; heartbeatMs: number } | undefined> {
  const attempts = (await readdir(resultsDir))
    .filter((name) => name.startsWith(PREFIX))
    .map((name) => Number(name.slice(PREFIX.length)))
    .filter((n) => Number.isSafeInteger(n) && n > 0)
    .sort((a, b) => b - a);
  for (const attempt of attempts) {
    const file = claimFile(resultsDir, attempt);
    try {
      const [text, stats] = await Promise.all([readFile(file, 'utf8'), stat(file)]);
      return { record: { ...(JSON.parse(text) as ClaimRecord), attempt }, heartbeatMs: stats.mtimeMs };
    } catch {
      // A claim being written or removed right now, or damaged: look at the next one.
    }
  }
  return undefined;
}

async function storedManifest(resultsDir: string): Promise<Manifest | undefined> {
  try {
    return JSON.parse(await readFile(path.join(resultsDir, MANIFEST_NAME), 'utf8')) as Manifest;
  } catch {
    return undefined;
  }
}

/** Decides what a delivery of this job means: run it, publish its stored result again, or leave it to its owner. */
export async function inspectClaim(
  resultsDir: string,
  self: Identity,
  leaseMs: number,
  now: number,
): Promise<ClaimState> {
  await ensureResultsDir(resultsDir);
  const [claim, manifest] = await Promise.all([currentClaim(resultsDir), storedManifest(resultsDir)]);
  if (!claim) return manifest ? { kind: 'finished', manifest } : { kind: 'free', attempt: 1 };
  const { record, heartbeatMs } = claim;
  if (manifest && manifest.attempt === record.attempt) return { kind: 'finished', manifest };
  const next = { kind: 'free' as const, attempt: record.attempt + 1, previous: record };
  if (record.workerId === self.workerId) {
    // One process per slot at a time: an earlier claim of this slot is a process that died (SIGKILL, crash).
    return {
      ...next,
      why: `this slot's earlier process (pid ${record.pid}) died during attempt ${record.attempt}`,
    };
  }
  if (record.host === self.host && record.bootId === self.bootId && self.bootId !== '') {
    if (processStart(record.pid) === record.pidStart) return { kind: 'live', claim: record };
    return { ...next, why: `worker ${record.workerId} (pid ${record.pid}, this host) is gone` };
  }
  const age = now - heartbeatMs;
  if (age <= leaseMs) return { kind: 'live', claim: record };
  return {
    ...next,
    why: `worker ${record.workerId} on ${record.host} sent no heartbeat for ${Math.round(age / 1000)}s`,
  };
}

/** A claim this process holds: its heartbeat keeps other hosts from taking the job over. */
export class Claim {
  readonly attempt: number;
  readonly file: string;
  #timer: NodeJS.Timeout | undefined;

  constructor(file: string, attempt: number) {
    this.file = file;
    this.attempt = attempt;
  }

  startHeartbeat(everyMs: number, onError: (error: Error) => void): void {
    this.#timer = setInterval(() => {
      const now = new Date();
      utimes(this.file, now, now).catch(onError);
    }, everyMs);
    this.#timer.unref();
  }

  stopHeartbeat(): void {
    clearInterval(this.#timer);
  }
}

/**
 * Claims `attempt` of the job; undefined when another worker claimed that attempt first. Older claim files are
 * removed once the new one stands.
 */
export async function acquireClaim(
  resultsDir: string,
  self: Identity,
  attempt: number,
  now: Date,
): Promise<Claim | undefined> {
  const record: ClaimRecord = { ...self, attempt, claimedAt: now.toISOString() };
  const file = claimFile(resultsDir, attempt);
  const temp = path.join(resultsDir, `.mqtt-fs-worker.tmp.${self.workerId}.${process.pid}.${Date.now()}`);
  await writeFile(temp, `${JSON.stringify(record)}\n`, { flag: 'wx' });
  try {
    await link(temp, file);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'EEXIST') return undefined;
    throw error;
  } finally {
    await unlink(temp).catch(() => {});
  }
  for (let older = attempt - 1; older > 0; older--)
    await unlink(claimFile(resultsDir, older)).catch(() => {});
  return new Claim(file, attempt);
}
