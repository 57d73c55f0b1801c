import { existsSync } from 'node:fs';
import { mkdir, readdir } from 'node:fs/promises';
import path from 'node:path';
import { ErrorCode, WorkerError } from '../shared/errors.js';
import type { StepSandbox } from '../step/run-step.js';
import {
  accounting,
  CPU_PERIOD_US,
  DOCKER_FIX,
  type EffectiveLimits,
  type JobCgroups,
  limitsHit,
  limitsIo,
  procsOf,
  Removals,
  readKeyed,
  readNumber,
  removeCgroup,
  signalAll,
  sumPerDevice,
  sweep,
  unavailable,
  waitEmpty,
  writeControl,
} from './cgroupfs.js';
import { readKernelFile } from './detect.js';
import { ioLimitHit } from './io.js';

// cgroup v2: one unified tree; the worker's own cgroup holds a supervisor/ leaf and one cgroup per step.

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
  const available = checkDelegation(own, limits);
  await enterSupervisor(own, available, limitsIo(limits));
  // Moving the worker into supervisor/ waited out the kernel's RCU grace period once (moving another process
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
      await makeStep(dir, limits);
      return v2Sandbox(dir, limits, () => removals.start(remove(dir)));
    },
    close: async () => {
      const failure = await removals.done();
      if (failure !== undefined) throw failure;
    },
  };
}

const WANTED = ['cpu', 'memory', 'pids'];

/** The controllers delegated to the worker's cgroup; throws naming the fix when a limit in play lacks one. */
function checkDelegation(own: string, limits: EffectiveLimits): string[] {
  if (/\/user\.slice\/.*\.scope$|\/session-\d+\.scope$/.test(own)) {
    throw new WorkerError(
      ErrorCode.LIMITS_UNAVAILABLE,
      `the worker runs in a login session's cgroup (${own}), which it must not reorganise. Fix: run it as a systemd service with Delegate=yes, or in a container (${DOCKER_FIX})`,
    );
  }
  const available = (readKernelFile(path.join(own, 'cgroup.controllers')) ?? '').split(/\s+/);
  const needed = [
    limits.cpus !== null ? 'cpu' : '',
    limits.memoryBytes !== null ? 'memory' : '',
    limits.pids !== null ? 'pids' : '',
    limitsIo(limits) ? 'io' : '',
  ];
  const lacking = needed.filter((c) => c && !available.includes(c));
  if (lacking.length > 0) {
    throw new WorkerError(
      ErrorCode.LIMITS_UNAVAILABLE,
      `the cgroup v2 controllers ${lacking.join(', ')} are not delegated to ${own}. Fix: ${DOCKER_FIX}`,
    );
  }
  return available;
}

/**
 * Processes may live only in leaves once controllers are enabled below: every process of the worker's own cgroup
 * (the worker, an init, siblings of the unit) moves into supervisor/, then the controllers are enabled.
 */
async function enterSupervisor(own: string, available: readonly string[], io: boolean): Promise<void> {
  const supervisor = path.join(own, 'supervisor');
  try {
    await mkdir(supervisor, { recursive: true });
    // Move every process of our own cgroup (the worker, an init, siblings of the unit) into supervisor/.
    for (const pid of procsOf(own))
      await writeControl(path.join(supervisor, 'cgroup.procs'), String(pid)).catch(() => {});
    // io only for a job that limits it: it is the one controller whose accounting costs every step's writes.
    const enable = [...WANTED, ...(io ? ['io'] : [])]
      .filter((c) => available.includes(c))
      .map((c) => `+${c}`);
    if (enable.length > 0) await writeControl(path.join(own, 'cgroup.subtree_control'), enable.join(' '));
  } catch (error) {
    throw unavailable(own, error);
  }
}

/** A step's cgroup with its limits (swap off with a memory limit). */
async function makeStep(dir: string, limits: EffectiveLimits): Promise<void> {
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
    // One device a write: `MAJ:MIN rbps=N wbps=N` ("max" for a direction without a limit).
    if (limitsIo(limits))
      for (const device of limits.ioDevices ?? [])
        await writeControl(
          path.join(dir, 'io.max'),
          `${device} rbps=${limits.ioReadBps ?? 'max'} wbps=${limits.ioWriteBps ?? 'max'}`,
        );
  } catch (error) {
    throw unavailable(dir, error);
  }
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

function v2Sandbox(dir: string, limits: EffectiveLimits, remove: () => void): StepSandbox {
  let joined = Date.now();
  return {
    join: async (pid) => {
      joined = Date.now();
      await writeControl(path.join(dir, 'cgroup.procs'), String(pid));
    },
    signal: async (signal) => (signal === 'SIGKILL' ? killV2(dir) : signalAll(procsOf(dir), signal)),
    close: async () => {
      await killV2(dir);
      const peak = readNumber(path.join(dir, 'memory.peak'));
      const oomKills = readKeyed(path.join(dir, 'memory.events'), 'oom_kill');
      const usageUsec = readKeyed(path.join(dir, 'cpu.stat'), 'usage_usec');
      const limited = limitsIo(limits);
      const ioStat = limited ? readKernelFile(path.join(dir, 'io.stat')) : undefined;
      const io = { read: sumPerDevice(ioStat, 'rbytes'), write: sumPerDevice(ioStat, 'wbytes') };
      const hit = limitsHit({
        io: limited ? ioLimitHit(io, limits, joined) : null,
        cpus: readKeyed(path.join(dir, 'cpu.stat'), 'nr_throttled'),
        memory: readKeyed(path.join(dir, 'memory.events'), 'max'),
        pids: readKeyed(path.join(dir, 'pids.events'), 'max'),
      });
      remove();
      return accounting(peak, oomKills, usageUsec === null ? null : usageUsec / 1000, hit, io);
    },
  };
}
