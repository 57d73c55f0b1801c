import { close, openSync, write } from 'node:fs';
import { readdir, rmdir } from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { ErrorCode, WorkerError } from '../shared/errors.js';
import type { LimitName, StepAccounting, StepSandbox } from '../step/run-step.js';
import { readKernelFile } from './detect.js';

// What both cgroup versions share: the cgroupfs itself (control files, process lists, removal), the accounting
// read when a step ends, and the job's handle.

export interface EffectiveLimits {
  readonly cpus: number | null;
  readonly memoryBytes: number | null;
  readonly pids: number | null;
  /** Bytes per second, per direction, on each of `ioDevices` (see io.ts); absent or null: no limit. */
  readonly ioReadBps?: number | null;
  readonly ioWriteBps?: number | null;
  /** The block devices the I/O limits apply to (`MAJ:MIN`). */
  readonly ioDevices?: readonly string[];
}

/** Whether any I/O limit is in play. */
export function limitsIo(limits: EffectiveLimits): boolean {
  return (limits.ioReadBps ?? null) !== null || (limits.ioWriteBps ?? null) !== null;
}

/** A job's cgroups: one sandbox per step, all below a folder named after the worker. */
export interface JobCgroups {
  readonly mode: 'cgroup1' | 'cgroup2';
  step(index: number): Promise<StepSandbox>;
  /** Removes the job's cgroups, the steps' included (a step's sandbox starts removing its own when closed). */
  close(): Promise<void>;
}

/**
 * Removals of closed steps' cgroups. They wait on the kernel and nothing of the step's outcome depends on them, so
 * they run while the job goes on; the job's close waits for them and reports the first failure.
 */
export class Removals {
  readonly #pending: Promise<unknown>[] = [];

  start(removal: Promise<unknown>): void {
    // Turned into a value at once: a failure waits for `done`, it must not surface as an unhandled rejection.
    this.#pending.push(
      removal.then(
        () => undefined,
        (error: unknown) => error ?? new Error('removal failed'),
      ),
    );
  }

  /** Waits for every removal; the first failure, if any. */
  async done(): Promise<unknown> {
    return (await Promise.all(this.#pending)).find((failure) => failure !== undefined);
  }
}

export const CPU_PERIOD_US = 100_000;

export const DOCKER_FIX =
  'Docker Engine >= 28: --cgroupns=private --security-opt writable-cgroups=true --init (older: --privileged); systemd: Delegate=yes';

/** Why cgroups cannot be used, with the fix, from the error of a first write. */
export function unavailable(where: string, error: unknown): WorkerError {
  const code = (error as NodeJS.ErrnoException).code;
  const why =
    code === 'EROFS'
      ? `the cgroup filesystem is read-only at ${where}`
      : code === 'EACCES' || code === 'EPERM'
        ? `not allowed to create cgroups at ${where} (the worker must run as root, or own a delegated cgroup)`
        : `cannot create cgroups at ${where}: ${code ?? (error as Error).message}`;
  return new WorkerError(ErrorCode.LIMITS_UNAVAILABLE, `${why}. Fix: ${DOCKER_FIX}`, { cause: error });
}

/**
 * Writes a cgroup interface file in one trip to the thread pool. `fs.promises.writeFile` takes three (open, write,
 * close), each waiting for the main thread in between: behind a spawn or a garbage collection, a move into a
 * cgroup reached the kernel ~15 ms after it was asked for. Opening an interface file never blocks; the write may
 * (a move into cgroup.procs can wait for an RCU grace period), so only the write leaves the main thread.
 */
export async function writeControl(file: string, value: string): Promise<void> {
  const fd = openSync(file, 'w');
  await new Promise<void>((resolve, reject) => {
    write(fd, value, (error) => {
      close(fd, () => {}); // nothing waits for it
      if (error) reject(error);
      else resolve();
    });
  });
}

export function readNumber(file: string): number | null {
  const text = readKernelFile(file);
  const value = text === undefined ? Number.NaN : Number(text.trim());
  return Number.isFinite(value) ? value : null;
}

/** `key value` lines (memory.events, cpu.stat, memory.oom_control). */
export function readKeyed(file: string, key: string): number | null {
  const text = readKernelFile(file);
  const match = text ? new RegExp(`^${key} (\\d+)$`, 'm').exec(text) : null;
  return match ? Number(match[1]) : null;
}

export function procsOf(dir: string): number[] {
  const text = readKernelFile(path.join(dir, 'cgroup.procs')) ?? '';
  return text.split('\n').filter(Boolean).map(Number);
}

/** Waits (up to a second) until the killed processes of a cgroup have left it. */
export async function waitEmpty(dir: string): Promise<void> {
  for (let i = 0; i < 100 && procsOf(dir).length > 0; i++) {
    await sleep(10);
  }
}

export function signalAll(pids: number[], signal: NodeJS.Signals): void {
  for (const pid of pids) {
    try {
      process.kill(pid, signal);
    } catch {
      // Gone already.
    }
  }
}

// rmdir of a cgroup fails with EBUSY while a killed process is still exiting; give it a moment.
export async function removeCgroup(dir: string): Promise<void> {
  for (let attempt = 0; attempt < 50; attempt++) {
    try {
      await rmdir(dir);
      return;
    } catch (error) {
      const code = (error as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') return;
      if (code !== 'EBUSY' || attempt === 49) throw error;
      await sleep(2 + attempt);
    }
  }
}

/** Removes a folder of cgroups depth first, killing what is left in them (stale cgroups of a crashed run). */
export async function sweep(
  dir: string,
  kill: (leaf: string) => Promise<void>,
  remove: (dir: string) => Promise<void> = removeCgroup,
): Promise<void> {
  const entries = await readdir(dir, { withFileTypes: true }).catch(() => undefined);
  if (!entries) return;
  for (const entry of entries) if (entry.isDirectory()) await sweep(path.join(dir, entry.name), kill, remove);
  await kill(dir);
  await remove(dir).catch(() => {});
}

// ---------------------------------------------------------------------------------------------------- v2 ----

export function accounting(
  peak: number | null,
  oomKills: number | null,
  cpuMs: number | null,
  hit: StepAccounting['limitsHit'],
  io: { read: number | null; write: number | null } = { read: null, write: null },
): StepAccounting {
  return {
    peakMemoryBytes: peak,
    cpuMs: cpuMs === null ? null : Math.round(cpuMs),
    oomKilled: oomKills === null ? null : oomKills > 0,
    limitsHit: hit,
    ioReadBytes: io.read,
    ioWriteBytes: io.write,
  };
}

/**
 * The limits a step ran into, from the kernel's own counters (null where none could be read); `io` is a judgement
 * from byte counts (see io.ts), counted as one more counter.
 */
export function limitsHit(
  counters: Record<'cpus' | 'memory' | 'pids', number | null> & { io?: boolean | null },
): StepAccounting['limitsHit'] {
  const { io, ...rest } = counters;
  const known = Object.entries({
    ...rest,
    ...(io === undefined || io === null ? {} : { io: io ? 1 : 0 }),
  }).filter(([, count]) => count !== null);
  if (known.length === 0) return null;
  return known.filter(([, count]) => (count as number) > 0).map(([name]) => name as LimitName);
}

/** Sums `MAJ:MIN key=value …` (io.stat) or `MAJ:MIN Key value` (blkio) lines for one key across devices. */
export function sumPerDevice(text: string | undefined, key: string): number | null {
  if (text === undefined) return null;
  let total = 0;
  for (const match of text.matchAll(new RegExp(`^\\d+:\\d+\\b.*?\\b${key}[ =](\\d+)`, 'gm')))
    total += Number(match[1]);
  return total;
}

// ---------------------------------------------------------------------------------------------------- v1 ----
