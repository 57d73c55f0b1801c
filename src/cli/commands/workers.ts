import type { OptionFlags } from '../../config/options.js';
import { ErrorCode, ExitCode, WorkerError } from '../../shared/errors.js';
import { parseDuration } from '../../shared/units.js';
import { interruptOnSignals, resolve } from '../context.js';
import { writeStdio } from '../stdio.js';

export interface WorkersFlags {
  json?: boolean;
  watch?: boolean;
  abandonedAfter?: string;
}

export async function runWorkers(workersFlags: WorkersFlags, flags: OptionFlags): Promise<number> {
  const options = await resolve(flags);
  const abandonedAfterMs = parseDuration(workersFlags.abandonedAfter ?? '1h');
  if (abandonedAfterMs === undefined)
    throw new WorkerError(
      ErrorCode.INVALID_OPTION,
      `--abandoned-after: expected a duration like "1h", got ${JSON.stringify(workersFlags.abandonedAfter)}`,
    );
  const [{ listWorkers, slotRows, formatWorkers }, tty] = await Promise.all([
    import('../../control/workers.js'),
    import('node:tty'),
  ]);
  const terminal = tty.isatty(1);
  const show = (slots: Parameters<typeof slotRows>[0], redraw: boolean): void => {
    const now = Date.now();
    const rows = slotRows(slots, now, abandonedAfterMs);
    if (workersFlags.json)
      writeStdio(1, `${JSON.stringify(rows, null, workersFlags.watch ? undefined : 2)}\n`);
    else
      writeStdio(
        1,
        `${redraw ? '\u001b[H\u001b[2J' : ''}${formatWorkers(rows, now, terminal && !process.env.NO_COLOR)}`,
      );
  };
  if (!workersFlags.watch) {
    show(
      await listWorkers({
        settings: options,
        presenceTopic: options.presenceTopic,
        jobsDir: options.jobsDir,
      }),
      false,
    );
    return ExitCode.OK;
  }
  // Followed until Ctrl-C: the whole list again at each change (redrawn in place on a terminal, one JSON line each
  // otherwise), and every 5 s on a terminal so that the durations move.
  const interrupt = interruptOnSignals();
  let latest: Parameters<typeof slotRows>[0] = [];
  const redraw = terminal && !workersFlags.json;
  const ticker = redraw ? setInterval(() => show(latest, true), 5000) : undefined;
  try {
    await listWorkers({
      settings: options,
      presenceTopic: options.presenceTopic,
      jobsDir: options.jobsDir,
      signal: interrupt.signal,
      onChange: (slots) => {
        latest = slots;
        show(slots, redraw);
      },
    });
    return ExitCode.OK;
  } finally {
    clearInterval(ticker);
    interrupt.dispose();
  }
}
