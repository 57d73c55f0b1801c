import { ExitCode, isWorkerError } from '../shared/errors.js';
import { buildProgram } from './program.js';
import { readableStack } from './stack.js';
import { stdioFlushed, writeStdio } from './stdio.js';

// The CLI's entry (bin/ → dist/bundle/cli.cjs): runs the program and turns every outcome into an exit code.

export interface MainHooks {
  /** A job ran to its end: the code a job needs has run (the launcher caches it then, see launch.ts). */
  readonly jobDone?: () => void;
}

/** Runs the CLI with `argv` (as process.argv) and resolves to the process exit code; never throws. */
export async function main(argv: readonly string[] = process.argv, hooks: MainHooks = {}): Promise<number> {
  let pending: Promise<number> | undefined;
  const program = buildProgram(
    argv,
    (action) => {
      pending = action();
    },
    hooks,
  );
  let code: number;
  try {
    await program.parseAsync([...argv]);
    code = pending ? await pending : ExitCode.OK;
  } catch (error) {
    code = reportError(error, jsonLog(argv, process.env));
  }
  await stdioFlushed();
  return code;
}

/** Whether fatal errors are to be JSON lines: `--log-format json` or MQTT_LOG_FORMAT=json (read without options). */
function jsonLog(argv: readonly string[], env: NodeJS.ProcessEnv): boolean {
  const at = argv.lastIndexOf('--log-format');
  const given = at >= 0 ? argv[at + 1] : argv.find((a) => a.startsWith('--log-format='))?.slice(13);
  return (given ?? env.MQTT_LOG_FORMAT) === 'json';
}

function reportError(error: unknown, json: boolean): number {
  const line = (code: string, message: string, extra: Record<string, unknown> = {}): string =>
    json
      ? `${JSON.stringify({ time: new Date().toISOString(), level: 'error', msg: message, code, ...extra })}\n`
      : `mqtt-fs-worker: ${code}: ${message}\n`;
  const commanderCode = (error as { code?: string }).code;
  if (typeof commanderCode === 'string' && commanderCode.startsWith('commander.')) {
    // commander already printed its message (or the help/version text).
    const exitCode = (error as { exitCode?: number }).exitCode ?? ExitCode.USAGE;
    return exitCode === 0 ? ExitCode.OK : ExitCode.USAGE;
  }
  if (isWorkerError(error)) {
    for (const problem of error.problems) writeStdio(2, line(error.code, problem));
    return error.exitCode;
  }
  const stack = readableStack((error as Error)?.stack ?? String(error));
  writeStdio(
    2,
    json
      ? line('INTERNAL', 'unexpected error', { stack })
      : `mqtt-fs-worker: INTERNAL: unexpected error\n${stack}\n`,
  );
  return ExitCode.INTERNAL;
}
