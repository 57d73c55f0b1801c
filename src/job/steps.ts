import path from 'node:path';
import type { JobLimits } from '../limits/index.js';
import { ErrorCode } from '../shared/errors.js';
import { formatDuration } from '../shared/units.js';
import { secretValues } from '../step/mask.js';
import { setprivArgs } from '../step/run-as.js';
import { runStep, type StepOutcome, type StopReason } from '../step/run-step.js';
import { JobInterrupted } from './interrupted.js';
import type { ErrorInfo, Manifest, StepRecord } from './report.js';
import { stepLogName } from './results-layout.js';
import type { EngineConfig, JobRun } from './run-job.js';
import type { JobSpec, StepSpec } from './spec.js';

// A job's steps, one after another: each in its sandbox with its log, its record filled in as it ends; the first
// failure (but a `continueOnError` one) ends the job.

export interface StepsInput {
  readonly config: EngineConfig;
  readonly run: JobRun;
  readonly spec: JobSpec;
  /** results/ as steps are told it (`JOB_RESULTS_DIR`), and as the worker writes there (held, see holdResults). */
  readonly results: { readonly shown: string; readonly path: string };
  readonly workspace: string;
  /** The manifest's step records, filled in as each step ends. */
  readonly records: StepRecord[];
  readonly now: () => number;
  readonly limits: JobLimits;
  /** Called when the first step is released: work to overlap with it. */
  readonly onStarted?: () => void;
}

export type StepsOutcome = Pick<Manifest, 'status' | 'exitCode' | 'error'>;

export async function runSteps(input: StepsInput): Promise<StepsOutcome> {
  const { spec, now } = input;
  const deadline = spec.timeoutMs === undefined ? undefined : now() + spec.timeoutMs;
  for (const step of spec.steps) {
    const remaining = deadline === undefined ? undefined : Math.max(0, deadline - now());
    const timeoutMs =
      remaining === undefined ? step.timeoutMs : Math.min(remaining, step.timeoutMs ?? remaining);
    const { record, result } = await runOneStep(input, step, timeoutMs);
    if (record.status === 'success' || (record.status === 'failed' && step.continueOnError)) continue;
    if (record.status === 'timeout') {
      const which =
        timeoutMs === step.timeoutMs
          ? `the step's timeout of ${formatDuration(timeoutMs ?? 0)}`
          : `the job's timeout`;
      input.run.log.warn(`step ${step.index} stopped: it ran past ${which}`);
    }
    const error: ErrorInfo | null = result.spawnError
      ? { code: ErrorCode.STEP_SPAWN_FAILED, message: result.spawnError }
      : null;
    return {
      status: record.status === 'skipped' ? 'failed' : record.status,
      exitCode: result.exitCode === 0 ? 1 : result.exitCode,
      error,
    };
  }
  return { status: 'success', exitCode: 0, error: null };
}

/** Runs one step and fills in its record; a step stopped because the worker is stopping ends the job here. */
async function runOneStep(
  input: StepsInput,
  step: StepSpec,
  timeoutMs: number | undefined,
): Promise<{ record: StepRecord; result: StepOutcome }> {
  const { config, run, now } = input;
  const record = input.records[step.index] as StepRecord;
  const logName = stepLogName(step.index);
  const started = now();
  record.startedAt = new Date(started).toISOString();
  record.log = logName;
  run.onEvent?.({ type: 'step-started', step: step.index, name: step.name });
  run.log.info(`step ${step.index} started: ${step.name}`);
  const env = stepEnv(config, run, input.spec, step, input.workspace, input.results.shown);
  const result: StepOutcome = await runStep({
    command: step.run,
    cwd: input.workspace,
    env,
    secrets: secretValues(env, config.mask),
    logFile: path.join(input.results.path, logName),
    maxLogBytes: config.maxLogBytes,
    timeoutMs,
    killGraceMs: config.killGraceMs,
    ...(run.signal ? { signal: run.signal } : {}),
    ...(input.limits.cgroups ? { sandbox: await input.limits.cgroups.step(step.index) } : {}),
    ...(config.runAs ? { setpriv: setprivArgs(config.runAs) } : {}),
    ...(run.onOutput ? { onOutput: (chunk: Buffer) => run.onOutput?.(step.index, chunk) } : {}),
    ...(input.onStarted ? { onStarted: input.onStarted } : {}),
  });
  if (result.stoppedFor === 'interrupted') throw new JobInterrupted();
  recordStep(input, step, record, result, started);
  return { record, result };
}

function recordStep(
  input: StepsInput,
  step: StepSpec,
  record: StepRecord,
  result: StepOutcome,
  started: number,
): void {
  const ended = input.now();
  Object.assign(record, {
    status: stepStatus(result),
    exitCode: result.exitCode,
    signal: result.signal,
    endedAt: new Date(ended).toISOString(),
    durationMs: ended - started,
    logBytes: result.logBytes,
    logTruncated: result.logTruncated,
    ...result.accounting,
    leftoversKilled: result.leftoversKilled,
  });
  input.run.onEvent?.({
    type: 'step-ended',
    step: step.index,
    name: step.name,
    status: record.status,
    exitCode: record.exitCode,
  });
  input.run.log.info(
    `step ${step.index} ${record.status} with exit code ${record.exitCode} after ${formatDuration(ended - started)}`,
    {
      ...(result.logTruncated ? { logTruncated: true } : {}),
      ...(result.accounting.oomKilled ? { oomKilled: true } : {}),
      ...(result.accounting.limitsHit?.length ? { limitsHit: result.accounting.limitsHit.join(',') } : {}),
      ...(result.leftoversKilled ? { leftoversKilled: result.leftoversKilled } : {}),
    },
  );
}

function stepStatus(result: StepOutcome): StepRecord['status'] {
  const stopped: Record<StopReason, StepRecord['status']> = {
    timeout: 'timeout',
    cancelled: 'cancelled',
    interrupted: 'cancelled',
  };
  if (result.stoppedFor) return stopped[result.stoppedFor];
  return result.exitCode === 0 && !result.accounting.oomKilled && !result.spawnError ? 'success' : 'failed';
}

export function pendingStep(step: StepSpec): StepRecord {
  return {
    index: step.index,
    name: step.name,
    command: step.run,
    status: 'skipped',
    exitCode: null,
    signal: null,
    startedAt: null,
    endedAt: null,
    durationMs: null,
    log: null,
    logBytes: 0,
    logTruncated: false,
    peakMemoryBytes: null,
    cpuMs: null,
    oomKilled: null,
    limitsHit: null,
    ioReadBytes: null,
    ioWriteBytes: null,
    leftoversKilled: 0,
  };
}

/** The variables every step sees, documented in the README; they win over the job's own `env`. */
export function stepEnv(
  config: EngineConfig,
  run: JobRun,
  spec: JobSpec,
  step: StepSpec,
  workspace: string,
  resultsDir: string,
): Record<string, string> {
  return {
    ...config.baseEnv,
    ...spec.env,
    ...step.env,
    JOB_ID: run.request.id,
    JOB_ATTEMPT: String(run.attempt),
    JOB_WORKSPACE: workspace,
    JOB_RESULTS_DIR: resultsDir,
    JOB_WORKER_ID: config.workerId,
    JOB_STEP_INDEX: String(step.index),
    JOB_STEP_NAME: step.name,
    ...(config.runAs ? { HOME: config.runAs.home, USER: config.runAs.name, LOGNAME: config.runAs.name } : {}),
  };
}
