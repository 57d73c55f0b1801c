import type { OptionFlags } from '../../config/options.js';
import { ErrorCode, ExitCode, WorkerError } from '../../shared/errors.js';
import { parseDuration } from '../../shared/units.js';
import { logger, resolve } from '../context.js';
import { writeStdio } from '../stdio.js';

export async function runDrain(quiet: string | undefined, flags: OptionFlags): Promise<number> {
  const options = await resolve(flags);
  const quietMs = parseDuration(quiet ?? '3s');
  if (quietMs === undefined)
    throw new WorkerError(
      ErrorCode.INVALID_OPTION,
      `--quiet: expected a duration like "3s", got ${JSON.stringify(quiet)}`,
    );
  const { drain } = await import('../../broker/drain.js');
  const outcome = await drain({
    settings: options,
    slot: options.id,
    topic: options.topic,
    quietMs,
    presenceTopic: `${options.presenceTopic}/${options.id}`,
    log: logger(options),
  });
  writeStdio(1, `${JSON.stringify({ slot: options.id, moved: outcome.moved })}\n`);
  return ExitCode.OK;
}
