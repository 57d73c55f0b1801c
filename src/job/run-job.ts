import { readdir, rm } from 'node:fs/promises';
import path from 'node:path';
import {
  type EffectiveLimits,
  effectiveLimits,
  ioDevices,
  type JobLimits,
  type LimitSettings,
  limitsIo,
  openJobLimits,
  requireDevices,
} from '../limits/index.js';
import { ErrorCode, toErrorInfo, WorkerError } from '../shared/errors.js';
import type { Logger } from '../shared/log.js';
import { formatBytes, formatDuration } from '../shared/units.js';
import type { RunAsUser } from '../step/run-as.js';
import { JobInterrupted } from './interrupted.js';
import { loadSpec } from './job-file.js';
import { type HeldDir, heldDirGone, holdResults, type JobPaths, resolveJobPaths } from './paths.js';
import type { JobStatus, StepStatus } from './report.js';
import { type Manifest, newManifest, writeManifest } from './report.js';
import { survivesReset } from './results-layout.js';
import type { JobRequest, JobSpec } from './spec.js';
import { pendingStep, runSteps } from './steps.js';
import type { StageMode } from './workspace/overlay.js';
import { createWorkspace, purgeWorkspace, type SkippedEntry, type StageResult } from './workspace/stage.js';
import { stage } from './workspace/staging.js';
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
  /** How a job's folder reaches its workspace (see workspace/overlay.ts); absent: copy. */
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
      readonly status: StepStatus;
      readonly exitCode: number | null;
    }
  | { readonly type: 'syncing' }
  | { readonly type: 'done'; readonly status: JobStatus; readonly exitCode: number };

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
   * Settles once the caller listens for whatever stops the job (the broker worker's cancel subscription): the
   * first step waits for it, so that a cancel sent as soon as a step is announced is never missed. It settles
   * while the job stages, so it costs nothing.
   */
  readonly listening?: Promise<void>;
  /** Clock, for tests. */
  readonly now?: () => number;
}

export interface JobOutcome {
  readonly manifest: Manifest;
  /** False when the manifest could not be written (no usable job folder, or the write failed). */
  readonly manifestWritten: boolean;
}

/** A finished job whose workspace and cgroups are still there: `release` removes them (once). */
export interface HeldJob extends JobOutcome {
  readonly release: () => Promise<void>;
}

const LIMITS_OFF: LimitSettings = { policy: 'off', defaults: {}, ceilings: {} };

// The sync stage's code (picomatch, its pattern compiler, ~1 ms to load) loads while the first step runs.
const loadSync = () => import('./workspace/sync.js');

export { JobInterrupted } from './interrupted.js';

/** What a run holds while it goes. */
interface RunState {
  readonly config: EngineConfig;
  readonly run: JobRun;
  readonly now: () => number;
  readonly started: number;
  readonly manifest: Manifest;
  paths?: JobPaths;
  /** Every write to results/ goes through it held open (see holdResults); one held here is closed here. */
  results?: HeldDir;
  /** What the run made that must be undone, whatever happened: each undo is added as the thing is made. */
  readonly undo: Undo;
}

/** Undoes, all at once (they are independent of each other), and only once. */
class Undo {
  readonly #steps: (() => Promise<unknown>)[] = [];

  add(step: () => Promise<unknown>): void {
    this.#steps.push(step);
  }

  async run(): Promise<void> {
    await Promise.all(this.#steps.splice(0).map((step) => step().catch(() => {})));
  }
}

/** The workspace and cgroups of a prepared job. */
interface Staged {
  readonly workspace: string;
  readonly staged: StageResult & { readonly upper?: string };
  readonly limits: JobLimits;
}

/**
 * Runs one job to its end and removes its workspace and cgroups: see runJobHeld, whose release it calls at once.
 * Only an interruption (the worker stopping) throws, JobInterrupted, with everything undone.
 */
export async function runJob(config: EngineConfig, run: JobRun): Promise<JobOutcome> {
  const { release, ...outcome } = await runJobHeld(config, run);
  await release();
  return outcome;
}

/**
 * Runs one job: prepare (folder, results/, definition) → stage (workspace and cgroups) → steps → sync →
 * result.json. A job that cannot run gets status `error` with its code. The workspace and cgroups stay until the
 * caller calls `release`: the broker worker publishes the result first, so that removing a large workspace does not
 * delay it. An interruption throws JobInterrupted, with everything undone.
 */
export async function runJobHeld(config: EngineConfig, run: JobRun): Promise<HeldJob> {
  const now = run.now ?? Date.now;
  const started = now();
  const state: RunState = {
    config,
    run,
    now,
    started,
    manifest: newManifest(config, run.request.id, run.attempt, started),
    ...(run.paths ? { paths: run.paths } : {}),
    ...(run.results ? { results: run.results } : {}),
    undo: new Undo(),
  };
  try {
    const spec = await prepare(state);
    const staged = await stageJobAndLimits(state, spec);
    await run.listening;
    await runAllSteps(state, spec, staged);
    await syncBack(state, spec, staged);
  } catch (error) {
    if (error instanceof JobInterrupted) {
      await state.undo.run();
      throw error;
    }
    await recordFailure(state, error);
  }
  const manifestWritten = await writeResult(state);
  run.onEvent?.({ type: 'done', status: state.manifest.status, exitCode: state.manifest.exitCode });
  return { manifest: state.manifest, manifestWritten, release: () => state.undo.run() };
}

/** The job's folder, an empty results/ (but the claim) and its definition, read while results/ is reset. */
async function prepare(state: RunState): Promise<JobSpec> {
  const { config, run } = state;
  const paths = await resolveJobPaths(
    config.jobsDir,
    run.request.id,
    run.request.steps !== undefined,
    config.createJobsDir,
  );
  state.paths = paths;
  const [reset, loaded] = await Promise.allSettled([
    (async () => {
      if (!state.results) {
        const held = await holdResults(paths.resultsDir);
        state.results = held;
        state.undo.add(() => held.close());
      }
      await resetResults(state.results.path);
    })(),
    loadSpec(paths, run.request),
  ]);
  // A results/ that cannot be used is reported first.
  if (reset.status === 'rejected') throw reset.reason;
  if (loaded.status === 'rejected') throw loaded.reason;
  state.manifest.steps = loaded.value.steps.map(pendingStep);
  return loaded.value;
}

/**
 * The workspace and the cgroups, at once: neither depends on the other, and cgroup writes mostly wait on the
 * kernel. Both settle before either failure is handled, so `release` knows all there is to undo. Limits above a
 * ceiling refuse the job before anything is staged.
 */
async function stageJobAndLimits(state: RunState, spec: JobSpec): Promise<Staged> {
  const { config, run, manifest, now } = state;
  const settings = config.limits ?? LIMITS_OFF;
  const limits = withIoDevices(
    effectiveLimits(spec.limits, settings),
    config,
    (state.paths as JobPaths).jobDir,
  );
  const opening = openJobLimits(limits, settings.policy, `mqtt-fs-worker-${config.workerId}`).then(
    (opened) => {
      state.undo.add(async () =>
        opened.cgroups
          ?.close()
          .catch((error: Error) => run.log.warn(`could not remove the job's cgroups: ${error.message}`)),
      );
      return opened;
    },
  );
  run.onEvent?.({ type: 'staging' });
  const stagingStarted = now();
  const staging = (async () => {
    const workspace = await createWorkspace(config.workspacesDir, config.workerId, run.request.id);
    state.undo.add(() =>
      purgeWorkspace(config.workspacesDir, config.workerId).then((failure) => {
        if (failure) run.log.warn(`could not remove workspace ${workspace}: ${failure.message}`);
      }),
    );
    const staged = await stage(config, (state.paths as JobPaths).jobDir, workspace, run.log);
    manifest.phases.stagingMs = now() - stagingStarted;
    return { workspace, staged };
  })();
  const [opened, stagedOutcome] = await Promise.allSettled([opening, staging]);
  if (opened.status === 'rejected') throw opened.reason;
  if (stagedOutcome.status === 'rejected') throw stagedOutcome.reason;
  const { mode, reason } = opened.value;
  manifest.limits = { mode, ...opened.value.limits, ...(reason ? { reason } : {}) };
  if (reason && settings.policy !== 'off') run.log.warn(`running without cgroups: ${reason}`);
  const { staged } = stagedOutcome.value;
  const took = formatDuration(manifest.phases.stagingMs);
  run.log.info(
    staged.upper
      ? `staged ${staged.files} files as an overlay in ${took}`
      : `staged ${staged.files} files (${formatBytes(staged.bytes)}) in ${took}`,
  );
  return { ...stagedOutcome.value, limits: opened.value };
}

/** I/O limits apply to the block devices under the workspace and the job's folder (see limits/io.ts). */
function withIoDevices(limits: EffectiveLimits, config: EngineConfig, jobDir: string): EffectiveLimits {
  if (!limitsIo(limits) || config.limits?.policy === 'off') return limits;
  const where = [config.workspacesDir, jobDir];
  const devices = ioDevices(where);
  requireDevices(devices, where);
  return { ...limits, ioDevices: devices };
}

async function runAllSteps(state: RunState, spec: JobSpec, staged: Staged): Promise<void> {
  const { manifest, now } = state;
  const started = now();
  const ran = await runSteps({
    config: state.config,
    run: state.run,
    spec,
    results: { shown: (state.paths as JobPaths).resultsDir, path: (state.results as HeldDir).path },
    workspace: staged.workspace,
    records: manifest.steps,
    now,
    limits: staged.limits,
    onStarted: () => {
      loadSync().catch(() => {}); // a failure shows where the sync awaits it
    },
  });
  manifest.phases.runningMs = now() - started;
  Object.assign(manifest, ran);
}

/** New and changed files back to results/, hashed as they are copied. */
async function syncBack(state: RunState, spec: JobSpec, { workspace, staged }: Staged): Promise<void> {
  const { manifest, now } = state;
  state.run.onEvent?.({ type: 'syncing' });
  const started = now();
  const { syncResults } = await loadSync();
  const synced = await syncResults({
    // From an overlay, what the job wrote is its upper layer: nothing else needs looking at.
    workspace: staged.upper ?? workspace,
    ...(staged.upper ? { overlayUpper: true } : {}),
    resultsDir: (state.results as HeldDir).path,
    snapshot: staged.snapshot,
    include: spec.artifacts.include,
    exclude: spec.artifacts.exclude,
  });
  manifest.phases.syncingMs = now() - started;
  manifest.artifacts = [...synced.artifacts] as Artifact[];
  manifest.skipped = [...staged.skipped, ...synced.skipped] as SkippedEntry[];
  state.run.log.info(
    `synced ${synced.artifacts.length} files (${formatBytes(synced.bytes)}) in ${formatDuration(manifest.phases.syncingMs)}`,
  );
}

/** The job could not run (or its sync failed half-way): status `error` with the cause's code. */
async function recordFailure(state: RunState, error: unknown): Promise<void> {
  const { manifest } = state;
  manifest.status = 'error';
  manifest.exitCode = 1;
  // Whatever failed first (a step's log, the sync, a claim file), a job folder deleted under the job is the cause.
  const gone = await folderGone(state);
  manifest.error = gone ?? toErrorInfo(error);
  if (gone) return;
  // A sync that failed half-way: the manifest lists exactly what it copied.
  const partial = (error as { partial?: { artifacts: Artifact[]; skipped: SkippedEntry[] } }).partial;
  if (partial) {
    manifest.artifacts = [...partial.artifacts];
    manifest.skipped = [...manifest.skipped, ...partial.skipped];
  }
  if (!(error instanceof WorkerError))
    state.run.log.error('unexpected error', { stack: (error as Error).stack });
}

function folderGone(state: RunState): Promise<{ code: ErrorCode; message: string } | undefined> {
  const { results, paths } = state;
  if (!results) return Promise.resolve(undefined);
  return heldDirGone(results).then((gone) =>
    gone
      ? {
          code: ErrorCode.JOB_FOLDER_GONE,
          message: `The job folder ${paths?.jobDir ?? state.run.request.id} was deleted while the job ran`,
        }
      : undefined,
  );
}

/** result.json, written atomically; a job whose manifest cannot be written ends in `error` (REPORT_FAILED). */
async function writeResult(state: RunState): Promise<boolean> {
  const { manifest } = state;
  const ended = state.now();
  manifest.endedAt = new Date(ended).toISOString();
  manifest.durationMs = ended - state.started;
  if (!state.results) return false;
  try {
    await writeManifest(state.results.path, manifest);
    return true;
  } catch (error) {
    const gone = await folderGone(state);
    state.run.log.error(
      gone
        ? `cannot write result.json: ${gone.message}`
        : `cannot write result.json: ${(error as Error).message}`,
    );
    if (manifest.status !== 'error' || (gone && manifest.error?.code !== gone.code)) {
      manifest.status = 'error';
      manifest.exitCode = 1;
      const info = toErrorInfo(error);
      manifest.error = gone ?? {
        code: info.code === ErrorCode.NO_SPACE ? ErrorCode.NO_SPACE : ErrorCode.REPORT_FAILED,
        message: `Cannot write result.json: ${(error as Error).message}`,
      };
    }
    return false;
  }
}

/** Empties `results/` (held: see holdResults) of an earlier attempt's output, but the claim. */
async function resetResults(resultsDir: string): Promise<void> {
  const stale = (await readdir(resultsDir)).filter((name) => !survivesReset(name));
  await Promise.all(stale.map((name) => rm(path.join(resultsDir, name), { recursive: true, force: true })));
}
