import { existsSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
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
import { type CgroupLayout, readKernelFile } from './detect.js';
import { ioLimitHit } from './io.js';

// cgroup v1: one hierarchy per controller; a job gets a folder in each it uses, and a step one below each.

/** cgroup v1: one child per hierarchy the job uses (see below), below the worker's own cgroups. */
export async function openCgroupV1(
  layout: CgroupLayout,
  name: string,
  limits: EffectiveLimits,
): Promise<JobCgroups> {
  const { memory, cpu, cpuacct, pids, freezer, blkio } = layout.v1;
  checkControllers(layout, limits);
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
    blkio: limitsIo(limits) ? blkio : undefined,
  });
  const rootDirs = [...new Set(roots.values())];
  const removeRoots = () => Promise.all(rootDirs.map((root) => sweep(root, async () => {})));
  const removals = new Removals();
  // Stale cgroups of this worker's earlier (crashed) run, in every hierarchy, then the job's own folders.
  await sweepEarlier(rootsIn({ memory, cpu, cpuacct, pids, freezer, blkio }), roots.get('freezer'));
  try {
    await Promise.all(rootDirs.map((root) => mkdir(root, { recursive: true })));
  } catch (error) {
    throw unavailable(rootDirs[0] ?? 'the cgroup v1 hierarchies', error);
  }
  const makeStep = async (index: number): Promise<StepSandbox> => {
    const dirs = await makeStepDirs(roots, index, limits);
    return v1Sandbox(dirs, limits, (unique) => removals.start(Promise.all(unique.map(removeCgroup))));
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

/** Throws naming the fix when a limit in play has no hierarchy mounted. */
function checkControllers(layout: CgroupLayout, limits: EffectiveLimits): void {
  const { memory, cpu, pids, blkio } = layout.v1;
  const lacking = [
    limits.memoryBytes !== null && !memory ? 'memory' : '',
    limits.cpus !== null && !cpu ? 'cpu' : '',
    limits.pids !== null && !pids ? 'pids' : '',
    limitsIo(limits) && !blkio ? 'blkio' : '',
  ].filter(Boolean);
  if (lacking.length > 0) {
    throw new WorkerError(
      ErrorCode.LIMITS_UNAVAILABLE,
      `the cgroup v1 controllers ${lacking.join(', ')} are not mounted. Fix: ${DOCKER_FIX}`,
    );
  }
}

/** Kills and removes what a crashed run of this worker left in every hierarchy (freezer: frozen first). */
async function sweepEarlier(everyRoot: Map<string, string>, freezerRoot: string | undefined): Promise<void> {
  await Promise.all(
    [...new Set(everyRoot.values())].map((root) =>
      sweep(root, async (leaf) => {
        if (freezerRoot && leaf.startsWith(freezerRoot)) await killV1(leaf);
        else signalAll(procsOf(leaf), 'SIGKILL');
      }),
    ),
  );
}

/** A step's folder in each of the job's hierarchies, with its limits; the hierarchies are set up at once. */
async function makeStepDirs(
  roots: Map<string, string>,
  index: number,
  limits: EffectiveLimits,
): Promise<Map<string, string>> {
  const dirs = new Map<string, string>();
  for (const [controller, root] of roots) dirs.set(controller, path.join(root, `step-${index}`));
  try {
    await Promise.all([...new Set(dirs.values())].map((dir) => mkdir(dir, { recursive: true })));
    const memoryDir = dirs.get('memory');
    const cpuDir = dirs.get('cpu');
    const pidsDir = dirs.get('pids');
    const blkioDir = dirs.get('blkio');
    await Promise.all([
      memoryDir && limits.memoryBytes !== null && limitMemoryV1(memoryDir, limits.memoryBytes),
      cpuDir && limits.cpus !== null && limitCpuV1(cpuDir, limits.cpus),
      pidsDir && limits.pids !== null && writeControl(path.join(pidsDir, 'pids.max'), String(limits.pids)),
      blkioDir && limitIoV1(blkioDir, limits),
    ]);
  } catch (error) {
    throw unavailable([...dirs.values()][0] ?? 'cgroup v1', error);
  }
  return dirs;
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

// One device a write: the kernel reads one `MAJ:MIN BYTES` rule from each.
async function limitIoV1(dir: string, limits: EffectiveLimits): Promise<void> {
  for (const device of limits.ioDevices ?? []) {
    if (limits.ioReadBps)
      await writeControl(path.join(dir, 'blkio.throttle.read_bps_device'), `${device} ${limits.ioReadBps}`);
    if (limits.ioWriteBps)
      await writeControl(path.join(dir, 'blkio.throttle.write_bps_device'), `${device} ${limits.ioWriteBps}`);
  }
}

async function killV1(freezerDir: string): Promise<void> {
  await writeControl(path.join(freezerDir, 'freezer.state'), 'FROZEN').catch(() => {});
  for (let i = 0; i < 500; i++) {
    const state = readKernelFile(path.join(freezerDir, 'freezer.state')) ?? 'FROZEN';
    if (state.trim() === 'FROZEN') break;
    await sleep(1);
  }
  signalAll(procsOf(freezerDir), 'SIGKILL');
  await writeControl(path.join(freezerDir, 'freezer.state'), 'THAWED').catch(() => {});
}

function v1Sandbox(
  dirs: Map<string, string>,
  limits: EffectiveLimits,
  remove: (unique: string[]) => void,
): StepSandbox {
  const unique = [...new Set(dirs.values())];
  const made = Date.now();
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
      const blkio = dirs.get('blkio');
      const ioStat = blkio
        ? readKernelFile(path.join(blkio, 'blkio.throttle.io_service_bytes_recursive'))
        : undefined;
      const io = { read: sumPerDevice(ioStat, 'Read'), write: sumPerDevice(ioStat, 'Write') };
      const hit = limitsHit({
        io: blkio ? ioLimitHit(io, limits, made) : null,
        cpus: cpu ? readKeyed(path.join(cpu, 'cpu.stat'), 'nr_throttled') : null,
        // failcnt counts charges refused at the limit; an OOM kill is one too, whatever failcnt shows.
        memory: memory ? (readNumber(path.join(memory, 'memory.failcnt')) ?? 0) + (oomKills ?? 0) : null,
        pids: pids ? readKeyed(path.join(pids, 'pids.events'), 'max') : null,
      });
      remove(unique);
      return accounting(peak, oomKills, usageNs === null ? null : usageNs / 1e6, hit, io);
    },
  };
}
