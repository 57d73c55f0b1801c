import { readFileSync } from 'node:fs';
import { ErrorCode, WorkerError } from '../shared/errors.js';
import type { Logger } from '../shared/log.js';
import { type EngineConfig, type JobEvent, type JobOutcome, runJob } from './run-job.js';
import { parseRequest } from './spec.js';

export interface DryRunInput {
  readonly payloadFile: string;
  readonly config: EngineConfig;
  readonly log: Logger;
  readonly signal?: AbortSignal;
  readonly onEvent?: (event: JobEvent) => void;
  readonly onOutput?: (step: number, chunk: Buffer) => void;
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
