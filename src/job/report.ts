import { writeFileAtomic } from '../shared/atomic-write.js';
import type { ErrorCode } from '../shared/errors.js';
import type { LimitName } from '../step/run-step.js';
import { MANIFEST_FILE, MANIFEST_NAME } from './results-layout.js';
import type { SkippedEntry } from './workspace/stage.js';
import type { Artifact } from './workspace/sync.js';

export type JobStatus = 'success' | 'failed' | 'timeout' | 'cancelled' | 'error';
export type StepStatus = 'success' | 'failed' | 'timeout' | 'cancelled' | 'skipped';
export type LimitsMode = 'cgroup2' | 'cgroup1' | 'none';

export interface StepRecord {
  index: number;
  name: string;
  command: string;
  status: StepStatus;
  exitCode: number | null;
  signal: string | null;
  startedAt: string | null;
  endedAt: string | null;
  durationMs: number | null;
  log: string | null;
  logBytes: number;
  logTruncated: boolean;
  peakMemoryBytes: number | null;
  cpuMs: number | null;
  oomKilled: boolean | null;
  limitsHit: readonly LimitName[] | null;
  ioReadBytes: number | null;
  ioWriteBytes: number | null;
  /** Without a cgroup: processes the step left behind outside its process group, found by their tag and killed. */
  leftoversKilled: number;
}

export interface ErrorInfo {
  code: ErrorCode;
  message: string;
}

/** `results/result.json`, schema version 1 (see the README); keys are never renamed, only added. */
export interface Manifest {
  schemaVersion: 1;
  id: string;
  status: JobStatus;
  exitCode: number;
  error: ErrorInfo | null;
  attempt: number;
  worker: { id: string; host: string; version: string };
  startedAt: string;
  endedAt: string;
  durationMs: number;
  phases: { stagingMs: number; runningMs: number; syncingMs: number };
  limits: {
    mode: LimitsMode;
    cpus: number | null;
    memoryBytes: number | null;
    pids: number | null;
    /** Bytes per second per direction, and the block devices they apply to: only where an I/O limit is in play. */
    ioReadBps?: number | null;
    ioWriteBps?: number | null;
    ioDevices?: readonly string[];
    reason?: string;
  };
  steps: StepRecord[];
  artifacts: Artifact[];
  skipped: SkippedEntry[];
}

/** The result message: the contract's four fields first, then additions that never change their meaning. */
export interface ResultPayload {
  id: string;
  status: JobStatus;
  exitCode: number;
  manifestFile: string;
  error: ErrorInfo | null;
  attempt: number;
  workerId: string;
  durationMs: number;
}

export function toResultPayload(manifest: Manifest): ResultPayload {
  return {
    id: manifest.id,
    status: manifest.status,
    exitCode: manifest.exitCode,
    manifestFile: MANIFEST_FILE,
    error: manifest.error,
    attempt: manifest.attempt,
    workerId: manifest.worker.id,
    durationMs: manifest.durationMs,
  };
}

export function writeManifest(resultsDir: string, manifest: Manifest): Promise<void> {
  return writeFileAtomic(resultsDir, MANIFEST_NAME, `${JSON.stringify(manifest, null, 2)}\n`);
}

/** A manifest in its initial state (status `error` until the job ran), also used for jobs that never start. */
export function newManifest(
  config: { readonly workerId: string; readonly hostname: string; readonly version: string },
  id: string,
  attempt: number,
  startedMs: number,
): Manifest {
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
