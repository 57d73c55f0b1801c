import { constants } from 'node:fs';
import { access, mkdir } from 'node:fs/promises';
import { jobsDirProblem } from '../job/paths.js';
import {
  type EffectiveLimits,
  effectiveLimits,
  type LimitSettings,
  limitsIo,
  openJobLimits,
} from '../limits/index.js';
import { ErrorCode, WorkerError } from '../shared/errors.js';
import { inspectDrive } from './drive.js';

// What would make a worker fail every job it takes: checked before it connects, so that a misconfigured slot
// leaves the queue to the slots that can run it, instead of answering every request with an error.

export interface PreflightInput {
  readonly jobsDir: string;
  readonly workspacesDir: string;
  readonly limits: LimitSettings;
  /** The job cgroups' name (`mqtt-fs-worker-{id}`): probed when limits are required. */
  readonly cgroupName: string;
  /** `--stage`: with `overlay`, every job needs one, so it is probed. */
  readonly stage?: 'auto' | 'copy' | 'overlay';
  readonly runAs?: boolean;
  /** `--claim-lease`: whether the jobs directory's drive can honour it (see drive.ts). */
  readonly claimLeaseMs?: number;
}

/** The worker option behind each limit (a default above its own ceiling is a settings problem). */
const OPTION_OF: Record<string, string> = { ioReadBps: 'io-bps', ioWriteBps: 'io-bps' };

/**
 * Throws NOT_READY (the machine: directories, a drive that cannot honour the lease) or INVALID_OPTION (the
 * settings) naming every problem found; returns what is worth a warning.
 */
export async function preflight(input: PreflightInput): Promise<string[]> {
  const settings: string[] = [];
  let defaults: EffectiveLimits | undefined;
  try {
    // The worker's own defaults must fit its own ceilings, or every job that asks for nothing is refused.
    defaults = effectiveLimits({}, input.limits);
  } catch (error) {
    settings.push(
      ...(error as WorkerError).problems.map((p) =>
        p.replace(/^limits\.(\w+) defaults to/, (_, key: string) => `--${OPTION_OF[key] ?? key} is`),
      ),
    );
  }
  if (settings.length > 0) {
    throw new WorkerError(ErrorCode.INVALID_OPTION, settings.join('\n'), { problems: settings });
  }
  const jobsDir = await jobsDirProblem(input.jobsDir);
  const drive =
    jobsDir === undefined && input.claimLeaseMs !== undefined
      ? (await inspectDrive(input.jobsDir, input.claimLeaseMs)).findings
      : [];
  const machine = [
    jobsDir,
    await workspacesProblem(input.workspacesDir),
    defaults && (await cgroupsProblem(input, defaults)),
    input.stage === 'overlay' ? await stagingProblem(input) : undefined,
    ...drive.filter((f) => f.level === 'fail').map((f) => f.text),
  ].filter((p): p is string => p !== undefined);
  if (machine.length > 0)
    throw new WorkerError(ErrorCode.NOT_READY, machine.join('\n'), { problems: machine });
  return drive.filter((f) => f.level === 'warn').map((f) => f.text);
}

/**
 * Where every job needs cgroups (`--limits required`, or a default limit with `auto`), whether they can be made
 * here: the job's own set-up is tried once and undone (a few milliseconds, and only when limits are in play).
 */
async function cgroupsProblem(input: PreflightInput, defaults: EffectiveLimits): Promise<string | undefined> {
  const { policy } = input.limits;
  const anyDefault =
    defaults.cpus !== null || defaults.memoryBytes !== null || defaults.pids !== null || limitsIo(defaults);
  if (policy !== 'required' && !(policy === 'auto' && anyDefault)) return undefined;
  try {
    const opened = await openJobLimits(defaults, policy, input.cgroupName);
    await opened.cgroups?.close();
    return undefined;
  } catch (error) {
    return `limits are required but cgroups cannot be used: ${(error as Error).message}`;
  }
}

/** With `--stage overlay`, whether one can be mounted here (`auto` copies where it cannot: nothing to check). */
async function stagingProblem(input: PreflightInput): Promise<string | undefined> {
  const { overlayProblem } = await import('../job/workspace/overlay.js');
  const problem = await overlayProblem(input.workspacesDir, input.runAs ?? false);
  return problem && `--stage overlay, but an overlay cannot be mounted here: ${problem}`;
}

/** Why the workspaces directory cannot be used (it is created when missing), or undefined. */
export async function workspacesProblem(dir: string): Promise<string | undefined> {
  try {
    await mkdir(dir, { recursive: true });
    await access(dir, constants.W_OK | constants.X_OK);
    return undefined;
  } catch (error) {
    return `the workspaces directory ${dir} cannot be written: ${(error as NodeJS.ErrnoException).code}`;
  }
}
