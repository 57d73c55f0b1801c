import { close, existsSync, openSync, write } from 'node:fs';
import { mkdir, readdir, rmdir } from 'node:fs/promises';
import path from 'node:path';
import { ErrorCode, WorkerError } from '../shared/errors.js';
import type { StepAccounting, StepSandbox } from '../step/run-step.js';
import { type CgroupLayout, readKernelFile } from './detect.js';

export interface EffectiveLimits {
  readonly cpus: number | null;
  readonly memoryBytes: number | null;
  readonly pids: number | null;
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
class Removals {
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

const CPU_PERIOD_US = 100_000;

const DOCKER_FIX =
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
async function writeControl(file: string, value: string): Promise<void> {
  const fd = openSync(file, 'w');
  await new Promise<void>((resolve, reject) => {
    write(fd, value, (error) => {
      close(fd, () => {}); // nothing waits for it
      if (error) reject(error);
      else resolve();
    });
  });
}

function readNumber(file: string): number | null {
  const text = readKernelFile(file);
  const value = text === undefined ? Number.NaN : Number(text.trim());
  return Number.isFinite(value) ? value : null;
}

/** `key value` lines (memory.events, cpu.stat, memory.oom_control). */
function readKeyed(file: string, key: string): number | null {
  const text = readKernelFile(file);
  const match = text ? new RegExp(`^${key} (\\d+)$`, 'm').exec(text) : null;
  return match ? Number(match[1]) : null;
}

function procsOf(dir: string): number[] {
  const text = readKernelFile(path.join(dir, 'cgroup.procs')) ?? '';
  return text.split('\n').filter(Boolean).map(Number);
}

/** Waits (up to a second) until the killed processes of a cgroup have left it. */
async function waitEmpty(dir: string): Promise<void> {
  for (let i = 0; i < 100 && procsOf(dir).length > 0; i++) {
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

function signalAll(pids: number[], signal: NodeJS.Signals): void {
  for (const pid of pids) {
    try {
      process.kill(pid, signal);
    } catch {
      // Gone already.
    }
  }
}

// rmdir of a cgroup fails with EBUSY while a killed process is still exiting; give it a moment.
async function removeCgroup(dir: string): Promise<void> {
  for (let attempt = 0; attempt < 50; attempt++) {
    try {
      await rmdir(dir);
      return;
    } catch (error) {
      const code = (error as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') return;
      if (code !== 'EBUSY' || attempt === 49) throw error;
      await new Promise((resolve) => setTimeout(resolve, 2 + attempt));
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

/**
 * cgroup v2: the worker's own cgroup becomes the parent of one leaf per step. The "no internal processes" rule
 * means the processes already in it (the worker itself) first move to a `supervisor` child, then the cpu, memory
 * and pids controllers are enabled for the children.
 */
export async function openCgroupV2(
  own: string,
  name: string,
  limits: EffectiveLimits,
  remove: (dir: string) => Promise<void> = removeCgroup,
): Promise<JobCgroups> {
  if (/\/user\.slice\/.*\.scope$|\/session-\d+\.scope$/.test(own)) {
    throw new WorkerError(
      ErrorCode.LIMITS_UNAVAILABLE,
      `the worker runs in a login session's cgroup (${own}), which it must not reorganise. Fix: run it as a systemd service with Delegate=yes, or in a container (${DOCKER_FIX})`,
    );
  }
  const wanted = ['cpu', 'memory', 'pids'];
  const available = (readKernelFile(path.join(own, 'cgroup.controllers')) ?? '').split(/\s+/);
  const missing = wanted.filter((c) => !available.includes(c));
  const needed = [
    limits.cpus !== null ? 'cpu' : '',
    limits.memoryBytes !== null ? 'memory' : '',
    limits.pids !== null ? 'pids' : '',
  ];
  const lacking = needed.filter((c) => c && missing.includes(c));
  if (lacking.length > 0) {
    throw new WorkerError(
      ErrorCode.LIMITS_UNAVAILABLE,
      `the cgroup v2 controllers ${lacking.join(', ')} are not delegated to ${own}. Fix: ${DOCKER_FIX}`,
    );
  }
  const supervisor = path.join(own, 'supervisor');
  try {
    await mkdir(supervisor, { recursive: true });
    // Move every process of our own cgroup (the worker, an init, siblings of the unit) into supervisor/.
    for (const pid of procsOf(own))
      await writeControl(path.join(supervisor, 'cgroup.procs'), String(pid)).catch(() => {});
    const enable = wanted.filter((c) => available.includes(c)).map((c) => `+${c}`);
    if (enable.length > 0) await writeControl(path.join(own, 'cgroup.subtree_control'), enable.join(' '));
  } catch (error) {
    throw unavailable(own, error);
  }
  // Moving the worker into supervisor/ above waited out the kernel's RCU grace period once (moving another process
  // does; see StepSandbox): the steps' moves soon after it are quick.
  const prefix = `${name}-step-`;
  const removals = new Removals();
  // Stale step cgroups of this worker's earlier (crashed) run.
  for (const entry of await readdir(own).catch(() => [] as string[])) {
    if (entry.startsWith(prefix)) await sweep(path.join(own, entry), killV2, remove);
  }
  return {
    mode: 'cgroup2',
    step: async (index) => {
      const dir = path.join(own, `${prefix}${index}`);
      try {
        await mkdir(dir, { recursive: true });
        if (limits.memoryBytes !== null) {
          await writeControl(path.join(dir, 'memory.max'), String(limits.memoryBytes));
          if (existsSync(path.join(dir, 'memory.swap.max')))
            await writeControl(path.join(dir, 'memory.swap.max'), '0');
        }
        if (limits.cpus !== null)
          await writeControl(
            path.join(dir, 'cpu.max'),
            `${Math.round(limits.cpus * CPU_PERIOD_US)} ${CPU_PERIOD_US}`,
          );
        if (limits.pids !== null) await writeControl(path.join(dir, 'pids.max'), String(limits.pids));
      } catch (error) {
        throw unavailable(dir, error);
      }
      return v2Sandbox(dir, () => removals.start(remove(dir)));
    },
    close: async () => {
      const failure = await removals.done();
      if (failure !== undefined) throw failure;
    },
  };
}

async function killV2(dir: string): Promise<void> {
  if (procsOf(dir).length === 0) return;
  if (existsSync(path.join(dir, 'cgroup.kill'))) {
    await writeControl(path.join(dir, 'cgroup.kill'), '1').catch(() => {});
  } else {
    // Kernels before 5.14: freeze, kill, thaw (a frozen process cannot fork away from the kill).
    await writeControl(path.join(dir, 'cgroup.freeze'), '1').catch(() => {});
    signalAll(procsOf(dir), 'SIGKILL');
    await writeControl(path.join(dir, 'cgroup.freeze'), '0').catch(() => {});
  }
  await waitEmpty(dir);
}

function v2Sandbox(dir: string, remove: () => void): StepSandbox {
  return {
    join: async (pid) => writeControl(path.join(dir, 'cgroup.procs'), String(pid)),
    signal: async (signal) => (signal === 'SIGKILL' ? killV2(dir) : signalAll(procsOf(dir), signal)),
    close: async () => {
      await killV2(dir);
      const peak = readNumber(path.join(dir, 'memory.peak'));
      const oomKills = readKeyed(path.join(dir, 'memory.events'), 'oom_kill');
      const usageUsec = readKeyed(path.join(dir, 'cpu.stat'), 'usage_usec');
      const hit = limitsHit({
        cpus: readKeyed(path.join(dir, 'cpu.stat'), 'nr_throttled'),
        memory: readKeyed(path.join(dir, 'memory.events'), 'max'),
        pids: readKeyed(path.join(dir, 'pids.events'), 'max'),
      });
      remove();
      return accounting(peak, oomKills, usageUsec === null ? null : usageUsec / 1000, hit);
    },
  };
}

function accounting(
  peak: number | null,
  oomKills: number | null,
  cpuMs: number | null,
  hit: StepAccounting['limitsHit'],
): StepAccounting {
  return {
    peakMemoryBytes: peak,
    cpuMs: cpuMs === null ? null : Math.round(cpuMs),
    oomKilled: oomKills === null ? null : oomKills > 0,
    limitsHit: hit,
  };
}

/** The limits a step ran into, from the kernel's own counters (null where none could be read). */
function limitsHit(counters: Record<'cpus' | 'memory' | 'pids', number | null>): StepAccounting['limitsHit'] {
  const known = Object.entries(counters).filter(([, count]) => count !== null);
  if (known.length === 0) return null;
  return known
    .filter(([, count]) => (count as number) > 0)
    .map(([name]) => name as 'cpus' | 'memory' | 'pids');
}

// ---------------------------------------------------------------------------------------------------- v1 ----

/** cgroup v1: one child per hierarchy the job uses (see below), below the worker's own cgroups. */
export async function openCgroupV1(
  layout: CgroupLayout,
  name: string,
  limits: EffectiveLimits,
): Promise<JobCgroups> {
  const { memory, cpu, cpuacct, pids, freezer } = layout.v1;
  const lacking = [
    limits.memoryBytes !== null && !memory ? 'memory' : '',
    limits.cpus !== null && !cpu ? 'cpu' : '',
    limits.pids !== null && !pids ? 'pids' : '',
  ].filter(Boolean);
  if (lacking.length > 0) {
    throw new WorkerError(
      ErrorCode.LIMITS_UNAVAILABLE,
      `the cgroup v1 controllers ${lacking.join(', ')} are not mounted. Fix: ${DOCKER_FIX}`,
    );
  }
  const rootsIn = (dirs: Record<string, string | undefined>): Map<string, string> => {
    const found = new Map<string, string>();
    for (const [controller, dir] of Object.entries(dirs))
      if (dir) found.set(controller, path.join(dir, name));
    return found;
  };
  // A job uses the hierarchies that limit, account or kill: memory and cpuacct (accounting), freezer (killing),
  // cpu and pids under a limit only. Each one more costs every step a move and the job two folders.
  const roots = rootsIn({
    memory,
    cpuacct,
    freezer,
    cpu: limits.cpus !== null ? cpu : undefined,
    pids: limits.pids !== null ? pids : undefined,
  });
  const rootDirs = [...new Set(roots.values())];
  const removeRoots = () => Promise.all(rootDirs.map((root) => sweep(root, async () => {})));
  const removals = new Removals();
  // Stale cgroups of this worker's earlier (crashed) run, in every hierarchy, then the job's own folders.
  const freezerRoot = roots.get('freezer');
  const everyRoot = new Set(rootsIn({ memory, cpu, cpuacct, pids, freezer }).values());
  await Promise.all(
    [...everyRoot].map((root) =>
      sweep(root, async (leaf) => {
        if (freezerRoot && leaf.startsWith(freezerRoot)) await killV1(leaf);
        else signalAll(procsOf(leaf), 'SIGKILL');
      }),
    ),
  );
  try {
    await Promise.all(rootDirs.map((root) => mkdir(root, { recursive: true })));
  } catch (error) {
    throw unavailable(rootDirs[0] ?? 'the cgroup v1 hierarchies', error);
  }
  const makeStep = async (index: number): Promise<StepSandbox> => {
    const dirs = new Map<string, string>();
    for (const [controller, root] of roots) dirs.set(controller, path.join(root, `step-${index}`));
    try {
      // The hierarchies are independent: create and configure them all at once.
      await Promise.all([...new Set(dirs.values())].map((dir) => mkdir(dir, { recursive: true })));
      const memoryDir = dirs.get('memory');
      const cpuDir = dirs.get('cpu');
      const pidsDir = dirs.get('pids');
      await Promise.all([
        memoryDir && limits.memoryBytes !== null && limitMemoryV1(memoryDir, limits.memoryBytes),
        cpuDir && limits.cpus !== null && limitCpuV1(cpuDir, limits.cpus),
        pidsDir && limits.pids !== null && writeControl(path.join(pidsDir, 'pids.max'), String(limits.pids)),
      ]);
    } catch (error) {
      throw unavailable([...dirs.values()][0] ?? 'cgroup v1', error);
    }
    return v1Sandbox(dirs, (unique) => removals.start(Promise.all(unique.map(removeCgroup))));
  };
  // The first step's cgroups are made with the job's (while the job is staged).
  const first = await makeStep(0).catch(async (error) => {
    await removeRoots();
    throw error;
  });
  return {
    mode: 'cgroup1',
    step: async (index) => (index === 0 ? first : makeStep(index)),
    close: async () => {
      // The roots are removed even after a step's removal failed (their sweep retries it); it is still reported.
      const failure = await removals.done();
      await removeRoots();
      if (failure !== undefined) throw failure;
    },
  };
}

async function limitMemoryV1(dir: string, bytes: number): Promise<void> {
  await writeControl(path.join(dir, 'memory.limit_in_bytes'), String(bytes));
  const memsw = path.join(dir, 'memory.memsw.limit_in_bytes');
  if (existsSync(memsw)) await writeControl(memsw, String(bytes));
}

async function limitCpuV1(dir: string, cpus: number): Promise<void> {
  await writeControl(path.join(dir, 'cpu.cfs_period_us'), String(CPU_PERIOD_US));
  await writeControl(path.join(dir, 'cpu.cfs_quota_us'), String(Math.round(cpus * CPU_PERIOD_US)));
}

async function killV1(freezerDir: string): Promise<void> {
  await writeControl(path.join(freezerDir, 'freezer.state'), 'FROZEN').catch(() => {});
  for (let i = 0; i < 500; i++) {
    const state = readKernelFile(path.join(freezerDir, 'freezer.state')) ?? 'FROZEN';
    if (state.trim() === 'FROZEN') break;
    await new Promise((resolve) => setTimeout(resolve, 1));
  }
  signalAll(procsOf(freezerDir), 'SIGKILL');
  await writeControl(path.join(freezerDir, 'freezer.state'), 'THAWED').catch(() => {});
}

function v1Sandbox(dirs: Map<string, string>, remove: (unique: string[]) => void): StepSandbox {
  const unique = [...new Set(dirs.values())];
  const any = dirs.get('freezer') ?? dirs.get('memory') ?? (unique[0] as string);
  const killAll = async (): Promise<void> => {
    // The common case: the step left nothing behind.
    if (procsOf(any).length === 0) return;
    const freezer = dirs.get('freezer');
    if (freezer) await killV1(freezer);
    else signalAll(procsOf(any), 'SIGKILL');
    await waitEmpty(any);
  };
  return {
    // v1 lets a single thread move itself through `tasks`: the step's gate (a single-threaded shell) does.
    selfJoin: unique.map((dir) => path.join(dir, 'tasks')),
    signal: async (signal) => (signal === 'SIGKILL' ? killAll() : signalAll(procsOf(any), signal)),
    close: async () => {
      await killAll();
      const memory = dirs.get('memory');
      const cpuacct = dirs.get('cpuacct');
      const peak = memory ? readNumber(path.join(memory, 'memory.max_usage_in_bytes')) : null;
      const oomKills = memory ? readKeyed(path.join(memory, 'memory.oom_control'), 'oom_kill') : null;
      const usageNs = cpuacct ? readNumber(path.join(cpuacct, 'cpuacct.usage')) : null;
      const cpu = dirs.get('cpu');
      const pids = dirs.get('pids');
      const hit = limitsHit({
        cpus: cpu ? readKeyed(path.join(cpu, 'cpu.stat'), 'nr_throttled') : null,
        // failcnt counts charges refused at the limit; an OOM kill is one too, whatever failcnt shows.
        memory: memory ? (readNumber(path.join(memory, 'memory.failcnt')) ?? 0) + (oomKills ?? 0) : null,
        pids: pids ? readKeyed(path.join(pids, 'pids.events'), 'max') : null,
      });
      remove(unique);
      return accounting(peak, oomKills, usageNs === null ? null : usageNs / 1e6, hit);
    },
  };
}
