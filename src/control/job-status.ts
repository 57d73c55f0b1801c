import { constants } from 'node:fs';
import { open, readdir } from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { resolveJobPaths } from '../job/paths.js';
import type { Manifest } from '../job/report.js';
import { parseRequest } from '../job/request.js';
import { stepLogIndex, stepLogName } from '../job/results-layout.js';
import { validateJobDefinition } from '../job/validate.js';
import { formatDuration } from '../shared/units.js';
import { type ClaimRecord, inspectClaim, selfIdentity } from '../worker/claim.js';

// `status <id>` and `submit --follow`: one job as the shared drive shows it. Everything here only reads, and
// every read of a job-folder file refuses anything but a regular file (a FIFO must not hang a status query).

export type JobState = 'queued' | 'running' | 'finished' | 'orphaned';

export interface JobStatusReport {
  readonly id: string;
  readonly folder: string;
  /** queued: nobody claimed it; orphaned: its claimant died (the next slot that meets it takes it over). */
  readonly state: JobState;
  readonly claim: {
    readonly workerId: string;
    readonly host: string;
    readonly attempt: number;
    readonly claimedAt: string;
  } | null;
  /** The step running (or the last one that ran), with the last lines of its log. */
  readonly step: {
    readonly index: number;
    readonly name: string | null;
    readonly log: string;
    readonly tail: readonly string[];
  } | null;
  readonly result:
    | (Pick<Manifest, 'status' | 'exitCode' | 'error' | 'durationMs' | 'endedAt'> & {
        readonly artifacts: number;
        /** Whether the result message reached the broker. */
        readonly published: boolean;
      })
    | null;
}

export interface JobStatusInput {
  readonly jobsDir: string;
  readonly id: string;
  readonly workerIdForLiveness: string;
  readonly host: string;
  readonly leaseMs: number;
  readonly tailLines: number;
  readonly now?: number;
}

const TAIL_BYTES = 16 * 1024;

export async function jobStatus(input: JobStatusInput): Promise<JobStatusReport> {
  const paths = await resolveJobPaths(input.jobsDir, input.id, false);
  const base = { id: input.id, folder: paths.jobDir };
  const names = await readdir(paths.resultsDir).catch(() => undefined);
  if (names === undefined) return { ...base, state: 'queued', claim: null, step: null, result: null };
  const self = selfIdentity(input.workerIdForLiveness, input.host, process.pid);
  const found = await inspectClaim(paths.resultsDir, self, input.leaseMs, input.now ?? Date.now());
  const record: ClaimRecord | undefined = found.kind === 'free' ? found.previous : found.claim;
  const claim = record
    ? { workerId: record.workerId, host: record.host, attempt: record.attempt, claimedAt: record.claimedAt }
    : null;
  const step = await currentStep(paths, names, record, input.tailLines);
  if (found.kind === 'finished') {
    const { manifest } = found;
    return {
      ...base,
      state: 'finished',
      claim,
      step,
      result: {
        status: manifest.status,
        exitCode: manifest.exitCode,
        error: manifest.error,
        durationMs: manifest.durationMs,
        endedAt: manifest.endedAt,
        artifacts: manifest.artifacts.length,
        published: found.published,
      },
    };
  }
  const state: JobState = found.kind === 'live' ? 'running' : record ? 'orphaned' : 'queued';
  return { ...base, state, claim, step, result: null };
}

async function currentStep(
  paths: { jobDir: string; resultsDir: string },
  names: readonly string[],
  record: ClaimRecord | undefined,
  tailLines: number,
): Promise<JobStatusReport['step']> {
  const indexes = names.flatMap((name) => {
    const index = stepLogIndex(name);
    return index === undefined ? [] : [index];
  });
  if (indexes.length === 0) return null;
  const index = Math.max(...indexes);
  const log = stepLogName(index);
  return {
    index,
    name: await stepName(paths.jobDir, record, index),
    log,
    tail: await tail(path.join(paths.resultsDir, log), tailLines),
  };
}

/** The step's name: from the steps the claim's request carried, else from job.json. */
async function stepName(
  jobDir: string,
  record: ClaimRecord | undefined,
  index: number,
): Promise<string | null> {
  const carried = record?.request ? parseRequest(Buffer.from(record.request)) : undefined;
  if (carried?.ok && carried.request.steps) {
    const step = carried.request.steps[index] as unknown;
    if (typeof step === 'string') return step;
    if (step && typeof step === 'object' && 'name' in step) return String((step as { name: unknown }).name);
  }
  const report = await validateJobDefinition(jobDir).catch(() => undefined);
  return report?.ok ? (report.spec.steps[index]?.name ?? null) : null;
}

/** The last `lines` lines of a log (read from its last 16 KiB); empty for anything but a regular file. */
export async function tail(file: string, lines: number): Promise<string[]> {
  if (lines <= 0) return [];
  const handle = await open(file, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK).catch(
    () => undefined,
  );
  if (!handle) return [];
  try {
    const stats = await handle.stat();
    if (!stats.isFile()) return [];
    const length = Math.min(TAIL_BYTES, stats.size);
    const buffer = Buffer.alloc(length);
    await handle.read(buffer, 0, length, stats.size - length);
    const text = buffer.toString('utf8').replace(/\n$/, '');
    if (text === '') return [];
    const all = text.split('\n');
    // The first line may be cut by the 16 KiB window: drop it unless the window holds the whole file.
    const whole = length === stats.size ? all : all.slice(1);
    return whole.slice(-lines);
  } finally {
    await handle.close();
  }
}

/**
 * Follows a growing log: `onText` gets what is appended, polled every `everyMs` (the log is on a shared drive,
 * where change notifications do not cross hosts), until `stop` resolves; then what is left is read once more.
 */
export async function followLog(
  file: string,
  onText: (text: string) => void,
  stop: Promise<unknown>,
  everyMs = 250,
): Promise<void> {
  let offset = 0;
  let stopped = false;
  const pause = new AbortController();
  void stop.then(() => {
    stopped = true;
    pause.abort();
  });
  const { StringDecoder } = await import('node:string_decoder');
  const decoder = new StringDecoder('utf8');
  const buffer = Buffer.alloc(64 * 1024);
  const readMore = async (): Promise<void> => {
    const handle = await open(file, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK).catch(
      () => undefined,
    );
    if (!handle) return;
    try {
      if (!(await handle.stat()).isFile()) return;
      for (;;) {
        const { bytesRead } = await handle.read(buffer, 0, buffer.length, offset);
        if (bytesRead === 0) return;
        offset += bytesRead;
        onText(decoder.write(buffer.subarray(0, bytesRead)));
      }
    } finally {
      await handle.close();
    }
  };
  while (!stopped) {
    await readMore();
    await sleep(everyMs, undefined, { signal: pause.signal }).catch(() => {});
  }
  await readMore();
  const rest = decoder.end();
  if (rest) onText(rest);
}

/** The report as `status` prints it on a terminal. */
export function formatStatus(report: JobStatusReport, now: number): string {
  const lines: string[] = [];
  const by = report.claim
    ? ` (attempt ${report.claim.attempt}, slot ${report.claim.workerId} on ${report.claim.host}, claimed ${ago(report.claim.claimedAt, now)})`
    : '';
  if (report.result) {
    const { status, exitCode, durationMs, published, artifacts } = report.result;
    lines.push(
      `job ${report.id}: ${status} (exit code ${exitCode}) in ${formatDuration(durationMs)}${by}; ${artifacts} artifact${artifacts === 1 ? '' : 's'}; result ${published ? 'published' : 'not yet published'}`,
    );
    if (report.result.error) lines.push(`  ${report.result.error.code}: ${report.result.error.message}`);
  } else {
    const meaning: Record<JobState, string> = {
      queued:
        'no slot has claimed it: its request waits for a slot, or none was sent (the drive cannot tell)',
      running: 'running',
      finished: 'finished',
      orphaned: 'its slot died; the next slot that meets it takes it over',
    };
    lines.push(
      `job ${report.id}: ${report.state}${report.state === 'running' ? by : ` (${meaning[report.state]})${by}`}`,
    );
  }
  if (report.step) {
    const name = report.step.name ? ` ${report.step.name}` : '';
    lines.push(
      `step ${report.step.index}${name}: results/${report.step.log}, last ${report.step.tail.length} lines:`,
    );
    for (const line of report.step.tail) lines.push(`  | ${line}`);
  }
  lines.push(`folder: ${report.folder}`);
  return `${lines.join('\n')}\n`;
}

function ago(iso: string, now: number): string {
  return `${formatDuration(Math.max(0, now - Date.parse(iso)))} ago`;
}
