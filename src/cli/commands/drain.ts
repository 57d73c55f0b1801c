import type { OptionFlags } from '../../config/options.js';
import { ErrorCode, ExitCode, WorkerError } from '../../shared/errors.js';
import { parseDuration } from '../../shared/units.js';
import { logger, resolve } from '../context.js';
import { writeStdio } from '../stdio.js';

export interface DrainFlags {
  readonly quiet?: string;
  readonly force?: boolean;
}

export async function runDrain(drainFlags: DrainFlags, flags: OptionFlags): Promise<number> {
  // The default worker id is this host's name (every Docker slot's default): drain acts only on a slot named.
  if (flags.id === undefined)
    throw new WorkerError(
      ErrorCode.INVALID_OPTION,
      'drain needs --id SLOT: the slot to retire (`mqtt-fs-worker workers` lists them)',
    );
  const options = await resolve(flags);
  const quietMs = parseDuration(drainFlags.quiet ?? '3s');
  if (quietMs === undefined)
    throw new WorkerError(
      ErrorCode.INVALID_OPTION,
      `--quiet: expected a duration like "3s", got ${JSON.stringify(drainFlags.quiet)}`,
    );
  const { drain } = await import('../../control/drain.js');
  const outcome = await drain({
    settings: options,
    slot: options.id,
    topic: typeof flags.topic === 'string' ? flags.topic : undefined,
    defaultTopic: options.topic,
    quietMs,
    presenceTopic: `${options.presenceTopic}/${options.id}`,
    force: drainFlags.force === true,
    jobsDir: options.jobsDir,
    log: logger(options),
  });
  writeStdio(1, `${JSON.stringify(outcome)}\n`);
  return ExitCode.OK;
}
