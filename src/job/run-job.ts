import { constants } from 'node:fs';
import { open, readdir, rm } from 'node:fs/promises';
import path from 'node:path';
import { effectiveLimits, type JobLimits, type LimitSettings, openJobLimits } from '../limits/index.js';
import { ErrorCode, toErrorInfo, WorkerError } from '../shared/errors.js';
import type { Logger } from '../shared/log.js';
import { formatBytes, formatDuration } from '../shared/units.js';
import { secretValues } from '../step/mask.js';
import { type RunAsUser, setprivArgs } from '../step/run-as.js';
import { runStep, type StepOutcome, type StopReason } from '../step/run-step.js';
import { type HeldDir, holdResults, type JobPaths, resolveJobPaths } from './paths.js';
import { type Manifest, type StepRecord, writeManifest } from './report.js';
import {
  type JobRequest,
  type JobSpec,
  MAX_JOB_FILE_BYTES,
  parseJobFile,
  type StepSpec,
  specFromSteps,
} from './spec.js';
import type { StageMode } from './workspace/overlay.js';
import {
  createWorkspace,
  purgeWorkspace,
  type SkippedEntry,
  type StageResult,
  stageJob,
} from './workspace/stage.js';
import type { Artifact } from './workspace/sync.js';

/** What the engine needs from the worker's configuration. */
export interface EngineConfig {
  readonly jobsDir: string;
  readonly workspacesDir: string;
  readonly workerId: string;
  readonly hostname: string;
  readonly version: string;
  readonly killGraceMs: number;
  readonly maxLogBytes: number;
  /** How a job's folder reaches its workspace (see overlay.ts); absent: copy. */
  readonly stage?: StageMode;
  /** The environment steps inherit (the worker's own, without its broker settings). */
  readonly baseEnv: Readonly<Record<string, string>>;
  /** Create a missing jobs directory (dry runs); a worker treats it as an unmounted shared drive. */
  readonly createJobsDir?: boolean;
  /** Limit defaults, ceilings and policy; absent: no cgroups at all (limits off). */
  readonly limits?: LimitSettings;
  /** Run steps as this user (the workspace is handed to it); absent: as the worker. */
  readonly runAs?: RunAsUser;
  /** Values masked in step logs besides those of secret-looking variables (the broker password, `--mask`). */
  readonly mask?: readonly string[];
}

export type JobEvent =
  | { readonly type: 'staging' }
  | { readonly type: 'step-started'; readonly step: number; readonly name: string }
  | {
      readonly type: 'step-ended';
      readonly step: number;
      readonly name: string;
      readonly status: string;
      readonly exitCode: number | null;
    }
  | { readonly type: 'syncing' }
  | { readonly type: 'done'; readonly status: string; readonly exitCode: number };

export interface JobRun {
  readonly request: JobRequest;
  readonly attempt: number;
  readonly log: Logger;
  /** Aborting stops the running step; its reason (a StopReason) decides the outcome. */
  readonly signal?: AbortSignal;
  readonly onEvent?: (event: JobEvent) => void;
  /** Each step's output as its log gets it (a dry run's live view). */
  readonly onOutput?: (step: number, chunk: Buffer) => void;
  /** The job's folder, when the caller resolved it already (the broker worker does, to claim it first). */
  readonly paths?: JobPaths;
  /** Its results/, held open by the caller (see holdResults); the caller closes it. */
  readonly results?: HeldDir;
  /**
   * Called once the job's outcome is final and result.json written, before its workspace and cgroups are removed:
   * the broker worker publishes the result here, so that removing a large workspace does not delay it.
   */
  readonly onResult?: (manifest: Manifest) => Promise<void>;
  /** Clock, for tests. */
  readonly now?: () => number;
}

export interface JobOutcome {
  readonly manifest: Manifest;
  /** False when the manifest could not be written (no usable job folder, or the write failed). */
  readonly manifestWritten: boolean;
}

const LIMITS_OFF: LimitSettings = { policy: 'off', defaults: {}, ceilings: {} };

// The sync stage's code (picomatch, its pattern compiler, ~1 ms to load) loads while the first step runs.
const loadSync = () => import('./workspace/sync.js');

/** Names in `results/` that survive the reset at the start of a run (the claim, see claim.ts). */
const KEEP_IN_RESULTS = /^\.mqtt-fs-worker/;

/** The job was interrupted (the worker is shutting down): no result, the job stays claimable. */
export class JobInterrupted extends WorkerError {
  constructor() {
    super(ErrorCode.INTERRUPTED, 'The job was interrupted before it finished; it will run again');
  }
}

/**
 * Runs one job end to end: resolve its folder, read its definition, stage it into a fresh workspace, run its
 * steps, sync changed files back and write `results/result.json`. Failures of the job (and bad input) are
 * outcomes, not exceptions; only an interruption (the `signal` aborted with 'interrupted') throws.
 */
export async function runJob(config: EngineConfig, run: JobRun): Promise<JobOutcome> {
  const now = run.now ?? Date.now;
  const started = now();
  const { request, log } = run;
  const emit = run.onEvent ?? (() => {});
  const manifest = newManifest(config, request.id, run.attempt, started);
  let paths: JobPaths | undefined = run.paths;
  // Every write to results/ goes through it held open (see holdResults); one held here is closed here.
  let results: HeldDir | undefined = run.results;
  const ownResults = results === undefined;
  let workspace: string | undefined;
  let jobLimits: JobLimits | undefined;
  try {
    paths = await resolveJobPaths(
      config.jobsDir,
      request.id,
      request.steps !== undefined,
      config.createJobsDir,
    );
    // The definition is read while results/ is reset; a results/ that cannot be used is reported first.
    const resultsDir = paths.resultsDir;
    const [reset, loaded] = await Promise.allSettled([
      (async () => {
        results ??= await holdResults(resultsDir);
        await resetResults(results.path);
      })(),
      loadSpec(paths, request),
    ]);
    if (reset.status === 'rejected') throw reset.reason;
    if (loaded.status === 'rejected') throw loaded.reason;
    const spec = loaded.value;
    manifest.steps = spec.steps.map(pendingStep);
    const settings = config.limits ?? LIMITS_OFF;
    // Limits above a ceiling refuse the job before anything is copied.
    const limits = effectiveLimits(spec.limits, settings);
    // The cgroups and the workspace do not depend on each other, and cgroup writes mostly wait on the kernel:
    // set up both at once. Both settle before either failure is handled, so cleanUp knows all there is to undo.
    const opening = openJobLimits(limits, settings.policy, `mqtt-fs-worker-${config.workerId}`).then(
      (opened) => (jobLimits = opened),
    );
    emit({ type: 'staging' });
    const stagingStarted = now();
    const jobDir = paths.jobDir;
    const staging = (async () => {
      const dir = await createWorkspace(config.workspacesDir, config.workerId, request.id);
      workspace = dir; // for cleanUp, whatever happens next
      const staged = await stage(config, jobDir, dir, log);
      manifest.phases.stagingMs = now() - stagingStarted;
      return { dir, staged };
    })();
    const [opened, stagedOutcome] = await Promise.allSettled([opening, staging]);
    if (opened.status === 'rejected') throw opened.reason;
    if (stagedOutcome.status === 'rejected') throw stagedOutcome.reason;
    const { dir: workDir, staged } = stagedOutcome.value;
    manifest.limits = {
      mode: opened.value.mode,
      ...opened.value.limits,
      ...(opened.value.reason ? { reason: opened.value.reason } : {}),
    };
    if (opened.value.reason && settings.policy !== 'off')
      log.warn(`running without cgroups: ${opened.value.reason}`);
    log.info(
      staged.upper
        ? `staged ${staged.files} files as an overlay in ${formatDuration(manifest.phases.stagingMs)}`
        : `staged ${staged.files} files (${formatBytes(staged.bytes)}) in ${formatDuration(manifest.phases.stagingMs)}`,
    );

    const runningStarted = now();
    const where = { shown: paths.resultsDir, path: (results as HeldDir).path };
    const ran = await runSteps(config, run, spec, where, workDir, manifest.steps, now, opened.value);
    manifest.phases.runningMs = now() - runningStarted;
    manifest.status = ran.status;
    manifest.exitCode = ran.exitCode;
    manifest.error = ran.error;

    emit({ type: 'syncing' });
    const syncStarted = now();
    const { syncResults } = await loadSync();
    const synced = await syncResults({
      // From an overlay, what the job wrote is its upper layer: nothing else needs looking at.
      workspace: staged.upper ?? workDir,
      ...(staged.upper ? { overlayUpper: true } : {}),
      resultsDir: (results as HeldDir).path,
      snapshot: staged.snapshot,
      include: spec.artifacts.include,
      exclude: spec.artifacts.exclude,
    });
    manifest.phases.syncingMs = now() - syncStarted;
    manifest.artifacts = [...synced.artifacts] as Artifact[];
    manifest.skipped = [...staged.skipped, ...synced.skipped] as SkippedEntry[];
    log.info(
      `synced ${synced.artifacts.length} files (${formatBytes(synced.bytes)}) in ${formatDuration(manifest.phases.syncingMs)}`,
    );
  } catch (error) {
    if (error instanceof JobInterrupted) {
      await cleanUp(config, log, workspace, jobLimits);
      if (ownResults) await results?.close();
      throw error;
    }
    manifest.status = 'error';
    manifest.exitCode = 1;
    manifest.error = toErrorInfo(error);
    // A sync that failed half-way: the manifest lists exactly what it copied.
    const partial = (error as { partial?: { artifacts: Artifact[]; skipped: SkippedEntry[] } }).partial;
    if (partial) {
      manifest.artifacts = [...partial.artifacts];
      manifest.skipped = [...manifest.skipped, ...partial.skipped];
    }
    if (!(error instanceof WorkerError)) log.error('unexpected error', { stack: (error as Error).stack });
  }

  const ended = now();
  manifest.endedAt = new Date(ended).toISOString();
  manifest.durationMs = ended - started;
  let manifestWritten = false;
  if (results) {
    try {
      await writeManifest(results.path, manifest);
      manifestWritten = true;
    } catch (error) {
      log.error(`cannot write result.json: ${(error as Error).message}`);
      if (manifest.status !== 'error') {
        manifest.status = 'error';
        manifest.exitCode = 1;
        const info = toErrorInfo(error);
        manifest.error = {
          code: info.code === ErrorCode.NO_SPACE ? ErrorCode.NO_SPACE : ErrorCode.REPORT_FAILED,
          message: `Cannot write result.json: ${(error as Error).message}`,
        };
      }
    }
  }
  emit({ type: 'done', status: manifest.status, exitCode: manifest.exitCode });
  try {
    await run.onResult?.(manifest);
  } finally {
    await cleanUp(config, log, workspace, jobLimits);
    if (ownResults) await results?.close();
  }
  return { manifest, manifestWritten };
}

/** A manifest in its initial state (status `error` until the job ran), also used for jobs that never start. */
export function newManifest(config: EngineConfig, id: string, attempt: number, startedMs: number): Manifest {
  return {
    schemaVersion: 1,
    id,
    status: 'error',
    exitCode: 1,
    error: null,
    attempt,
    worker: { id: config.workerId, host: config.hostname, version: config.version },
    startedAt: new Date(startedMs).toISOString(),
    endedAt: new Date(startedMs).toISOString(),
    durationMs: 0,
    phases: { stagingMs: 0, runningMs: 0, syncingMs: 0 },
    limits: { mode: 'none', cpus: null, memoryBytes: null, pids: null },
    steps: [],
    artifacts: [],
    skipped: [],
  };
}

/** Stages the job folder into `workspace`: an overlay where --stage allows one and it mounts, else a copy. */
async function stage(
  config: EngineConfig,
  jobDir: string,
  workspace: string,
  log: Logger,
): Promise<StageResult & { readonly upper?: string }> {
  const mode = config.stage ?? 'copy';
  if (mode !== 'copy') {
    const overlay = await import('./workspace/overlay.js');
    let why = overlay.overlayRefusal({ jobDir, workspace, runAs: config.runAs !== undefined });
    if (why === undefined) {
      const surveyed = await overlay.survey(jobDir);
      // A small folder copies faster than an overlay mounts: `auto` copies it, silently.
      if (mode === 'auto' && !overlay.overlayPays(surveyed)) return stageJob(jobDir, workspace, config.runAs);
      try {
        const mask = await overlay.ensureMask(config.workspacesDir);
        const layers = overlay.overlayLayers(config.workspacesDir, config.workerId);
        return await overlay.stageOverlay(jobDir, workspace, layers, surveyed, mask);
      } catch (error) {
        if (mode === 'overlay') throw error;
        why = (error as Error).message;
        await overlay.unmountUnder(workspace); // never copy into a half-made mount
      }
    }
    if (mode === 'overlay')
      throw new WorkerError(
        ErrorCode.STAGING_FAILED,
        `--stage overlay: cannot stage by overlay here: ${why}`,
      );
    log.info(`staging by copy: ${why}`);
  }
  return stageJob(jobDir, workspace, config.runAs);
}

async function cleanUp(
  config: EngineConfig,
  log: Logger,
  workspace: string | undefined,
  limits?: JobLimits,
): Promise<void> {
  // Independent of each other: both at once.
  await Promise.all([
    limits?.cgroups
      ?.close()
      .catch((error: Error) => log.warn(`could not remove the job's cgroups: ${error.message}`)),
    workspace !== undefined &&
      purgeWorkspace(config.workspacesDir, config.workerId).then((failure) => {
        if (failure) log.warn(`could not remove workspace ${workspace}: ${failure.message}`);
      }),
  ]);
}

/** Empties `results/` (held: see holdResults) of an earlier attempt's output, but the claim. */
async function resetResults(resultsDir: string): Promise<void> {
  const stale = (await readdir(resultsDir)).filter((name) => !KEEP_IN_RESULTS.test(name));
  await Promise.all(stale.map((name) => rm(path.join(resultsDir, name), { recursive: true, force: true })));
}

/** The job's definition: `job.json` (its steps replaced by the request's, if any), or the request's steps alone. */
async function loadSpec(paths: JobPaths, request: JobRequest): Promise<JobSpec> {
  const file = path.join(paths.jobDir, 'job.json');
  let text: string;
  try {
    text = await readSmallFile(file, MAX_JOB_FILE_BYTES);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' && request.steps) return specFromSteps(request.steps);
    if (code === 'ENOENT')
      throw new WorkerError(
        ErrorCode.INVALID_JOB_FILE,
        `${file} does not exist and the request carries no steps`,
      );
    if (code === 'ELOOP')
      throw new WorkerError(
        ErrorCode.INVALID_JOB_FILE,
        `${file} is a symlink; job.json must be a regular file`,
      );
    throw new WorkerError(ErrorCode.INVALID_JOB_FILE, `Cannot read ${file}: ${(error as Error).message}`, {
      cause: error,
    });
  }
  return parseJobFile(text, 'job.json', request.steps);
}

/** Reads a regular file of at most `maxBytes` without following a link. */
export async function readSmallFile(file: string, maxBytes: number): Promise<string> {
  // O_NONBLOCK: a FIFO planted as job.json must not hang the worker before fstat shows what it is.
  const handle = await open(file, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
  try {
    const stats = await handle.stat();
    if (!stats.isFile()) throw new WorkerError(ErrorCode.INVALID_JOB_FILE, `${file} is not a regular file`);
    if (stats.size > maxBytes) {
      throw new WorkerError(
        ErrorCode.INVALID_JOB_FILE,
        `${file} is ${formatBytes(stats.size)}, more than the ${formatBytes(maxBytes)} allowed`,
      );
    }
    return await handle.readFile('utf8');
  } finally {
    await handle.close();
  }
}

function pendingStep(step: StepSpec): StepRecord {
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

interface StepsOutcome {
  status: Manifest['status'];
  exitCode: number;
  error: Manifest['error'];
}

async function runSteps(
  config: EngineConfig,
  run: JobRun,
  spec: JobSpec,
  results: { readonly shown: string; readonly path: string },
  workspace: string,
  records: StepRecord[],
  now: () => number,
  limits: JobLimits,
): Promise<StepsOutcome> {
  const emit = run.onEvent ?? (() => {});
  const deadline = spec.timeoutMs === undefined ? undefined : now() + spec.timeoutMs;
  const outcome: StepsOutcome = { status: 'success', exitCode: 0, error: null };
  for (const step of spec.steps) {
    const record = records[step.index] as StepRecord;
    const remaining = deadline === undefined ? undefined : Math.max(0, deadline - now());
    const timeoutMs =
      remaining === undefined ? step.timeoutMs : Math.min(remaining, step.timeoutMs ?? remaining);
    const logName = `step_${step.index}.log`;
    const started = now();
    record.startedAt = new Date(started).toISOString();
    record.log = logName;
    emit({ type: 'step-started', step: step.index, name: step.name });
    run.log.info(`step ${step.index} started: ${step.name}`);
    const env = stepEnv(config, run, spec, step, workspace, results.shown);
    const result: StepOutcome = await runStep({
      command: step.run,
      cwd: workspace,
      env,
      secrets: secretValues(env, config.mask),
      logFile: path.join(results.path, logName),
      maxLogBytes: config.maxLogBytes,
      timeoutMs,
      killGraceMs: config.killGraceMs,
      ...(run.signal ? { signal: run.signal } : {}),
      ...(limits.cgroups ? { sandbox: await limits.cgroups.step(step.index) } : {}),
      ...(config.runAs ? { setpriv: setprivArgs(config.runAs) } : {}),
      ...(run.onOutput ? { onOutput: (chunk: Buffer) => run.onOutput?.(step.index, chunk) } : {}),
      onStarted: () => {
        loadSync().catch(() => {}); // a failure shows where the sync awaits it
      },
    });
    if (result.stoppedFor === 'interrupted') throw new JobInterrupted();
    const ended = now();
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
    emit({
      type: 'step-ended',
      step: step.index,
      name: step.name,
      status: record.status,
      exitCode: record.exitCode,
    });
    run.log.info(
      `step ${step.index} ${record.status} with exit code ${record.exitCode} after ${formatDuration(ended - started)}`,
      {
        ...(result.logTruncated ? { logTruncated: true } : {}),
        ...(result.accounting.oomKilled ? { oomKilled: true } : {}),
        ...(result.accounting.limitsHit?.length ? { limitsHit: result.accounting.limitsHit.join(',') } : {}),
        ...(result.leftoversKilled ? { leftoversKilled: result.leftoversKilled } : {}),
      },
    );
    if (record.status === 'success' || (record.status === 'failed' && step.continueOnError)) continue;
    outcome.status = record.status === 'skipped' ? 'failed' : record.status;
    outcome.exitCode = result.exitCode === 0 ? 1 : result.exitCode;
    if (result.spawnError) outcome.error = { code: ErrorCode.STEP_SPAWN_FAILED, message: result.spawnError };
    if (record.status === 'timeout') {
      const which =
        timeoutMs === step.timeoutMs
          ? `the step's timeout of ${formatDuration(timeoutMs ?? 0)}`
          : `the job's timeout`;
      run.log.warn(`step ${step.index} stopped: it ran past ${which}`);
    }
    break;
  }
  return outcome;
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
