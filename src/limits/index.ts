import { ErrorCode, WorkerError } from '../shared/errors.js';
import { formatBytes } from '../shared/units.js';
import { type EffectiveLimits, type JobCgroups, limitsIo } from './cgroupfs.js';
import { type CgroupLayout, detectLayout, readKernelFile } from './detect.js';
import { openCgroupV1 } from './v1.js';
import { openCgroupV2 } from './v2.js';

export type { EffectiveLimits, JobCgroups } from './cgroupfs.js';
export { limitsIo } from './cgroupfs.js';
export { ioDevices, requireDevices } from './io.js';

/** Limits as a job asks for them (or as the worker's defaults and ceilings give them): absent means none. */
export interface RequestedLimits {
  readonly cpus?: number;
  readonly memoryBytes?: number;
  readonly pids?: number;
  /** Bytes per second read from, and written to, the devices under the workspace. */
  readonly ioReadBps?: number;
  readonly ioWriteBps?: number;
}

export type LimitsPolicy = 'auto' | 'required' | 'optional' | 'off';

/** The worker's limit settings: defaults for every job and ceilings no job may exceed. */
export interface LimitSettings {
  readonly policy: LimitsPolicy;
  readonly defaults: RequestedLimits;
  readonly ceilings: RequestedLimits;
}

/**
 * The limits a job gets: what it asks for, else the worker's default. A request above a ceiling is refused
 * (LIMIT_ABOVE_CEILING), never silently lowered.
 */
export function effectiveLimits(requested: RequestedLimits, settings: LimitSettings): EffectiveLimits {
  const problems: string[] = [];
  const pick = (key: keyof RequestedLimits, show: (n: number) => string): number | null => {
    const value = requested[key] ?? settings.defaults[key];
    const ceiling = settings.ceilings[key];
    if (value !== undefined && ceiling !== undefined && value > ceiling) {
      const what = requested[key] !== undefined ? 'asks for' : 'defaults to';
      const name = key === 'memoryBytes' ? 'memory' : key;
      problems.push(`limits.${name} ${what} ${show(value)}, above the worker's ceiling of ${show(ceiling)}`);
    }
    return value ?? null;
  };
  const rate = (n: number) => `${formatBytes(n)}/s`;
  const io = { ioReadBps: pick('ioReadBps', rate), ioWriteBps: pick('ioWriteBps', rate) };
  const limits = {
    cpus: pick('cpus', String),
    memoryBytes: pick('memoryBytes', formatBytes),
    pids: pick('pids', String),
    // Only where one is in play: a manifest without I/O limits reads as before.
    ...(io.ioReadBps !== null || io.ioWriteBps !== null ? io : {}),
  };
  if (problems.length > 0) {
    throw new WorkerError(
      ErrorCode.LIMIT_ABOVE_CEILING,
      `The job's limits are refused: ${problems.join('; ')}`,
      { problems },
    );
  }
  return limits;
}

export interface JobLimits {
  readonly mode: 'cgroup1' | 'cgroup2' | 'none';
  readonly limits: EffectiveLimits;
  /** Why no cgroup applies, where none does. */
  readonly reason?: string;
  readonly cgroups?: JobCgroups;
}

const NONE: EffectiveLimits = { cpus: null, memoryBytes: null, pids: null };
// What a job without a cgroup must know: what a step leaves behind is found by an environment tag (step/leftovers.ts),
// which a process can drop.
const UNCONTAINED =
  '; without a cgroup, processes a step leaves behind (setsid, daemons) are found by an environment tag and killed when it ends, except any that cleared their environment';

/**
 * Sets up the cgroups of a job (with the limits `effectiveLimits` gave): cgroup v2 where the worker's own cgroup
 * is on a unified hierarchy with controllers, else v1. With policy `required` (or `auto` with any limit in play) a
 * host where cgroups cannot be used refuses the job (LIMITS_UNAVAILABLE, naming the fix); otherwise the job runs
 * without, and says why.
 */
export async function openJobLimits(
  limits: EffectiveLimits,
  policy: LimitsPolicy,
  name: string,
  layout?: CgroupLayout,
): Promise<JobLimits> {
  if (policy === 'off')
    return { mode: 'none', limits: NONE, reason: `limits are off (--limits off)${UNCONTAINED}` };
  const anyLimit =
    limits.cpus !== null || limits.memoryBytes !== null || limits.pids !== null || limitsIo(limits);
  const required = policy === 'required' || (policy === 'auto' && anyLimit);
  try {
    const found = layout ?? detectLayout();
    const cgroups = await open(found, name, limits);
    return { mode: cgroups.mode, limits, cgroups };
  } catch (error) {
    if (required) throw error;
    const reason = error instanceof WorkerError ? error.message : String(error);
    return { mode: 'none', limits: NONE, reason: `${reason}${UNCONTAINED}` };
  }
}

async function open(layout: CgroupLayout, name: string, limits: EffectiveLimits): Promise<JobCgroups> {
  if (layout.unified) {
    const controllers = readKernelFile(`${layout.unified}/cgroup.controllers`) ?? '';
    // Hybrid hosts mount a cgroup2 next to v1 with few or no controllers: use it only if it has ours.
    const usable = /\b(memory|cpu|pids)\b/.test(controllers);
    if (usable || Object.keys(layout.v1).length === 0) return openCgroupV2(layout.unified, name, limits);
  }
  if (Object.keys(layout.v1).length > 0) return openCgroupV1(layout, name, limits);
  throw new WorkerError(
    ErrorCode.LIMITS_UNAVAILABLE,
    'no cgroup hierarchy is mounted (none in /proc/self/mountinfo)',
  );
}
