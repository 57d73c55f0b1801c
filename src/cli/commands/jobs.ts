import type { OptionFlags } from '../../config/options.js';
import type { JobsFilter } from '../../control/jobs-list.js';
import { ErrorCode, ExitCode, WorkerError } from '../../shared/errors.js';
import { resolve } from '../context.js';
import { writeStdio } from '../stdio.js';

export interface JobsFlags {
  readonly json?: boolean;
  readonly state?: string;
}

const STATES: readonly JobsFilter[] = ['queued', 'running', 'orphaned', 'finished', 'failed'];

/** `jobs [--json] [--state …]`: the jobs under --jobs-dir. */
export async function runJobs(jobsFlags: JobsFlags, flags: OptionFlags): Promise<number> {
  const options = await resolve(flags);
  const state = jobsFlags.state as JobsFilter | undefined;
  if (state !== undefined && !STATES.includes(state))
    throw new WorkerError(
      ErrorCode.INVALID_OPTION,
      `--state: expected one of ${STATES.join(', ')}, got ${JSON.stringify(jobsFlags.state)}`,
    );
  const { listJobs, formatJobs } = await import('../../control/jobs-list.js');
  const rows = await listJobs({
    jobsDir: options.jobsDir,
    leaseMs: options.claimLeaseMs,
    ...(state ? { state } : {}),
  });
  writeStdio(1, jobsFlags.json ? `${JSON.stringify(rows, null, 2)}\n` : formatJobs(rows));
  return ExitCode.OK;
}
