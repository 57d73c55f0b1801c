import { existsSync } from 'node:fs';
import path from 'node:path';
import type { OptionFlags } from '../../config/options.js';
import type { JobEvent } from '../../job/run-job.js';
import { ErrorCode, ExitCode, WorkerError } from '../../shared/errors.js';
import { assertJobId } from '../../shared/ids.js';
import { parseDuration } from '../../shared/units.js';
import { resolve } from '../context.js';
import { backlog, writeStdio } from '../stdio.js';

export interface LogsFlags {
  readonly follow?: boolean;
  readonly timeout?: string;
}

/** `logs <id> [--follow]`: the job's output on stdout, each line prefixed with its step (as a dry run shows it). */
export async function runLogs(id: string, logsFlags: LogsFlags, flags: OptionFlags): Promise<number> {
  assertJobId(id);
  const options = await resolve(flags);
  const timeoutMs = parseDuration(logsFlags.timeout ?? '1h');
  if (timeoutMs === undefined)
    throw new WorkerError(
      ErrorCode.INVALID_OPTION,
      `--timeout: expected a duration like "10m", got ${logsFlags.timeout}`,
    );
  const jobDir = path.resolve(options.jobsDir, id);
  const reachable = existsSync(jobDir) ? jobDir : undefined;
  if (!reachable && !logsFlags.follow) {
    writeStdio(
      2,
      `mqtt-fs-worker: no job folder ${jobDir} here; --follow reads the job's output live over MQTT\n`,
    );
    return ExitCode.JOB_NOT_SUCCESSFUL;
  }
  if (logsFlags.follow && options.logsTopic === undefined)
    throw new WorkerError(ErrorCode.INVALID_OPTION, '--follow reads the logs topic, and --logs-topic is off');
  const [{ jobLogs }, { LiveView }, tty] = await Promise.all([
    import('../../control/job-logs.js'),
    import('../live-view.js'),
    import('node:tty'),
  ]);
  const view = new LiveView({
    write: (text) => writeStdio(1, text),
    backlog: () => backlog(1),
    color: tty.isatty(1) && !process.env.NO_COLOR,
  });
  const outcome = await jobLogs({
    settings: options,
    id,
    jobDir: reachable,
    logsTopic: options.logsTopic ?? '',
    statusTopic: options.statusTopic,
    resultsTopic: options.resultsTopic,
    follow: logsFlags.follow === true,
    timeoutMs,
    sink: {
      stepStarted: (step, name) => view.event({ type: 'step-started', step, name }),
      output: (step, bytes) => view.output(step, bytes),
      note: (text) => view.note(text),
      stepEnded: () => view.event({ type: 'step-ended' } as JobEvent),
    },
  });
  if (outcome.kind === 'timeout') {
    writeStdio(2, `mqtt-fs-worker: no result for ${id} within ${logsFlags.timeout ?? '1h'} (--timeout)\n`);
    return ExitCode.TIMEOUT;
  }
  if (outcome.kind === 'result') writeStdio(2, `${id}: ${outcome.status}\n`);
  return outcome.kind === 'result' && outcome.status !== 'success'
    ? ExitCode.JOB_NOT_SUCCESSFUL
    : ExitCode.OK;
}
