import path from 'node:path';
import type { OptionFlags } from '../../config/options.js';
import { ErrorCode, ExitCode, WorkerError } from '../../shared/errors.js';
import { parseDuration } from '../../shared/units.js';
import { logger, resolve } from '../context.js';
import { writeStdio } from '../stdio.js';

export interface SubmitFlags {
  steps?: string[];
  wait?: boolean;
  follow?: boolean;
  timeout?: string;
  rerun?: boolean;
  confirm?: string;
}

function parseStepsFlag(steps: string[] | undefined): unknown[] | undefined {
  if (!steps) return undefined;
  // One JSON array, or each value a step command.
  if (steps.length === 1 && steps[0]?.trim().startsWith('[')) {
    try {
      return JSON.parse(steps[0]) as unknown[];
    } catch (error) {
      throw new WorkerError(
        ErrorCode.INVALID_OPTION,
        `--steps: expected a JSON array or commands, got invalid JSON: ${(error as Error).message}`,
      );
    }
  }
  return steps;
}

export async function runSubmit(id: string, submitFlags: SubmitFlags, flags: OptionFlags): Promise<number> {
  const options = await resolve(flags);
  const { timeoutMs, confirmMs } = durations(submitFlags);
  const { submit } = await import('../../control/submit.js');
  const log = logger(options);
  const follower = submitFlags.follow ? await followerFor(options.jobsDir, id) : undefined;
  const outcome = await submit({
    settings: options,
    ...(options.secret ? { secret: options.secret } : {}),
    id,
    steps: parseStepsFlag(submitFlags.steps) as never,
    topic: options.topic,
    resultsTopic: options.resultsTopic,
    rejectedTopic: options.rejectedTopic,
    statusTopic: options.statusTopic,
    presenceTopic: options.presenceTopic,
    slotsOnDrive: () => slotsOnDrive(options.jobsDir),
    ...(confirmMs !== undefined ? { confirmMs } : {}),
    ...(submitFlags.rerun ? { rerun: (await import('node:crypto')).randomUUID() } : {}),
    wait: (submitFlags.wait || submitFlags.follow) ?? false,
    timeoutMs,
    log,
    ...(follower
      ? {
          onStatus: (event: Record<string, unknown>) => follower.event(event),
          onLog: (chunk: Record<string, unknown>) => follower.chunk(chunk),
          ...(options.logsTopic ? { logsTopic: options.logsTopic } : {}),
        }
      : {}),
  });
  await follower?.close();
  if (outcome.kind === 'timeout') {
    log.error(
      outcome.waitedFor === 'subscriber'
        ? 'no worker is subscribed to take the job'
        : `no result for ${id} within --timeout`,
    );
    return ExitCode.TIMEOUT;
  }
  if (outcome.kind === 'published') return ExitCode.OK;
  if (outcome.kind === 'rejected') {
    writeStdio(1, `${JSON.stringify(outcome.rejection)}\n`);
    return ExitCode.JOB_NOT_SUCCESSFUL;
  }
  writeStdio(1, `${JSON.stringify(outcome.result)}\n`);
  return outcome.result.status === 'success' ? ExitCode.OK : ExitCode.JOB_NOT_SUCCESSFUL;
}

/** What `submit --follow` shows: status events, and the step logs where the job's folder is readable here. */
async function followerFor(jobsDir: string, id: string) {
  const [{ Follower }, { existsSync }] = await Promise.all([import('../follow.js'), import('node:fs')]);
  const jobDir = path.resolve(jobsDir, id);
  return new Follower({
    // Asked at each step: a request that carries its own steps creates the folder when a slot claims it.
    jobDir: () => (existsSync(jobDir) ? jobDir : undefined),
    write: (text) => writeStdio(2, text),
  });
}

/** `--timeout` and `--confirm`, checked. */
function durations(submitFlags: SubmitFlags): { timeoutMs: number; confirmMs: number | undefined } {
  // Waiting for a result can take as long as a job; only getting the request to a subscriber is bounded tighter.
  const timeoutMs = parseDuration(
    submitFlags.timeout ?? (submitFlags.wait || submitFlags.follow ? '1h' : '5m'),
  );
  if (timeoutMs === undefined) {
    throw new WorkerError(
      ErrorCode.INVALID_OPTION,
      `--timeout: expected a duration like "10m", got ${JSON.stringify(submitFlags.timeout)}`,
    );
  }
  const confirmMs = submitFlags.confirm === undefined ? undefined : parseDuration(submitFlags.confirm);
  if (submitFlags.confirm !== undefined && confirmMs === undefined) {
    throw new WorkerError(
      ErrorCode.INVALID_OPTION,
      `--confirm: expected a duration like "30s", got ${JSON.stringify(submitFlags.confirm)}`,
    );
  }
  return { timeoutMs, confirmMs };
}

/** The slots' presence files on the drive, by id (what `submit --wait` reads where the broker shows none). */
async function slotsOnDrive(jobsDir: string): Promise<Map<string, string>> {
  const { drivePresence } = await import('../../worker/presence-board.js');
  const slots = await drivePresence(jobsDir, Date.now());
  return new Map(slots.map((slot) => [slot.id, slot.state]));
}
