import { readFileSync } from 'node:fs';
import { readdir } from 'node:fs/promises';
import path from 'node:path';
import { ErrorCode, WorkerError } from '../shared/errors.js';
import type { Logger } from '../shared/log.js';
import { readSmallFile } from './job-file.js';
import { parseRequest } from './request.js';
import { CLAIM_PREFIX, RESULTS_DIR } from './results-layout.js';
import { type EngineConfig, type JobEvent, type JobOutcome, runJob } from './run-job.js';

export interface DryRunInput {
  readonly payloadFile: string;
  readonly config: EngineConfig;
  readonly log: Logger;
  readonly signal?: AbortSignal;
  readonly onEvent?: (event: JobEvent) => void;
  readonly onOutput?: (step: number, chunk: Buffer) => void;
}

/**
 * What a fleet left in a job's results/ (its claims: a run going on, or finished with its result and markers), or
 * undefined. A dry run never touches it.
 */
async function fleetRecord(resultsDir: string): Promise<string | undefined> {
  const claims = (await readdir(resultsDir).catch(() => [] as string[])).filter((name) =>
    name.startsWith(CLAIM_PREFIX),
  );
  if (claims.length === 0) return undefined;
  const newest = claims.sort(
    (a, b) => Number(b.slice(CLAIM_PREFIX.length)) - Number(a.slice(CLAIM_PREFIX.length)),
  )[0] as string;
  // Opened as job.json is (never through a link, never blocking on a FIFO planted there).
  const worker = await readSmallFile(path.join(resultsDir, newest), 1024 * 1024)
    .then((text) => (JSON.parse(text) as { workerId?: unknown }).workerId)
    .catch(() => undefined);
  return `attempt ${newest.slice(CLAIM_PREFIX.length)} claimed${typeof worker === 'string' ? ` by ${worker}` : ''}`;
}

/**
 * Runs the job described by a local payload file exactly as a delivered job runs (staging, logs, sync,
 * result.json), without a broker. A payload that is not a valid request is a usage problem here (INVALID_OPTION),
 * since no job id may be known to report it under.
 */
export async function dryRun(input: DryRunInput): Promise<JobOutcome> {
  let payload: Buffer;
  try {
    // A small local file, read before anything else runs: at once (fs.promises takes four thread-pool trips).
    payload = readFileSync(input.payloadFile);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    const hint = code === 'ENOENT' ? ` (create it, e.g. {"id": "dry-run-test", "steps": ["echo hi"]})` : '';
    throw new WorkerError(
      ErrorCode.INVALID_OPTION,
      `--dry-run: cannot read ${input.payloadFile}: ${code ?? error}${hint}`,
      {
        cause: error,
      },
    );
  }
  const parsed = parseRequest(payload);
  if (!parsed.ok) {
    throw new WorkerError(
      ErrorCode.INVALID_OPTION,
      `--dry-run: ${input.payloadFile}: ${parsed.error.message}`,
      {
        problems: parsed.error.problems,
      },
    );
  }
  const record = await fleetRecord(path.join(input.config.jobsDir, parsed.request.id, RESULTS_DIR));
  if (record) {
    throw new WorkerError(
      ErrorCode.INVALID_OPTION,
      `--dry-run: job ${parsed.request.id} has a fleet's record (${record}); a dry run would replace its results/ and a later request would run it again. Try it on a copy of the folder (another id), or remove its results/ to start afresh`,
    );
  }
  const log = input.log.child({ job: parsed.request.id });
  return runJob(input.config, {
    request: parsed.request,
    attempt: 1,
    log,
    ...(input.signal ? { signal: input.signal } : {}),
    ...(input.onEvent ? { onEvent: input.onEvent } : {}),
    ...(input.onOutput ? { onOutput: input.onOutput } : {}),
  });
}
