import { hostname } from 'node:os';
import type { OptionFlags } from '../../config/options.js';
import { ErrorCode, ExitCode, isWorkerError, WorkerError } from '../../shared/errors.js';
import { resolve } from '../context.js';
import { writeStdio } from '../stdio.js';

export interface StatusFlags {
  json?: boolean;
  lines?: string;
}

export async function runStatus(id: string, statusFlags: StatusFlags, flags: OptionFlags): Promise<number> {
  const options = await resolve(flags);
  const lines = Number(statusFlags.lines ?? '10');
  if (!Number.isInteger(lines) || lines < 0)
    throw new WorkerError(
      ErrorCode.INVALID_OPTION,
      `--lines: expected a whole number, got ${statusFlags.lines}`,
    );
  const { jobStatus, formatStatus } = await import('../../control/job-status.js');
  let report: Awaited<ReturnType<typeof jobStatus>>;
  try {
    report = await jobStatus({
      jobsDir: options.jobsDir,
      id,
      workerIdForLiveness: `status-${process.pid}`,
      host: hostname(),
      leaseMs: options.claimLeaseMs,
      tailLines: lines,
    });
  } catch (error) {
    // No such job (or an id that can be no job's): an answer, not a failure of the command.
    if (!isWorkerError(error) || error.exitCode !== ExitCode.INTERNAL) throw error;
    writeStdio(2, `mqtt-fs-worker: ${error.code}: ${error.message}\n`);
    return ExitCode.JOB_NOT_SUCCESSFUL;
  }
  writeStdio(1, statusFlags.json ? `${JSON.stringify(report, null, 2)}\n` : formatStatus(report, Date.now()));
  return ExitCode.OK;
}
