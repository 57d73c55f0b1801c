import { readFileSync } from 'node:fs';
import { hostname } from 'node:os';
import path from 'node:path';
import { Command, Option } from 'commander';
import { ErrorCode, ExitCode, isWorkerError, WorkerError } from './errors.js';
import type { EngineConfig } from './job.js';
import { createLogger, type Logger } from './log.js';
import { OPTION_DEFS, type OptionFlags, type Options, resolveOptions } from './options.js';

// The only module that touches the process: argv, env, stdout/stderr, signals and exit codes.

const VERSION: string = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')).version;

/** Variables of the worker's own configuration; steps never see them (the broker password among them). */
const WORKER_ONLY_ENV = /^(MQTT_|WORKER_ID$)/;

function stepBaseEnv(env: NodeJS.ProcessEnv): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [name, value] of Object.entries(env)) {
    if (value !== undefined && !WORKER_ONLY_ENV.test(name)) out[name] = value;
  }
  return out;
}

function engineConfig(options: Options, env: NodeJS.ProcessEnv): EngineConfig {
  return {
    jobsDir: options.jobsDir,
    workspacesDir: options.workspacesDir,
    workerId: options.id,
    hostname: hostname(),
    version: VERSION,
    killGraceMs: options.killGraceMs,
    maxLogBytes: options.maxLogBytes,
    baseEnv: stepBaseEnv(env),
  };
}

function logger(): Logger {
  return createLogger({ format: 'text', level: 'info', write: (line) => process.stderr.write(line) });
}

/** An AbortSignal fired by SIGINT/SIGTERM with reason 'interrupted'; `signalName` tells which arrived. */
function interruptOnSignals(): {
  signal: AbortSignal;
  received: () => NodeJS.Signals | undefined;
  dispose: () => void;
} {
  const controller = new AbortController();
  let received: NodeJS.Signals | undefined;
  const handler = (name: NodeJS.Signals): void => {
    received ??= name;
    controller.abort('interrupted');
  };
  process.on('SIGINT', handler);
  process.on('SIGTERM', handler);
  return {
    signal: controller.signal,
    received: () => received,
    dispose: () => {
      process.off('SIGINT', handler);
      process.off('SIGTERM', handler);
    },
  };
}

async function runDry(payloadFile: string, flags: OptionFlags): Promise<number> {
  const options = resolveOptions(flags, process.env, { cwd: process.cwd(), hostname: hostname() });
  const { dryRun } = await import('./dry-run.js');
  const { toResultPayload } = await import('./report.js');
  const { JobInterrupted } = await import('./job.js');
  const log = logger().child({ worker: options.id });
  const interrupt = interruptOnSignals();
  try {
    const outcome = await dryRun({
      payloadFile: path.resolve(payloadFile),
      config: { ...engineConfig(options, process.env), createJobsDir: true },
      log,
      signal: interrupt.signal,
    });
    const { manifest } = outcome;
    if (manifest.error) log.error(`${manifest.error.code}: ${manifest.error.message}`);
    log.info(`job ${manifest.id} ${manifest.status} (exit code ${manifest.exitCode})`);
    process.stdout.write(`${JSON.stringify(toResultPayload(manifest))}\n`);
    return manifest.status === 'success' ? ExitCode.OK : ExitCode.JOB_NOT_SUCCESSFUL;
  } catch (error) {
    if (error instanceof JobInterrupted) {
      const name = interrupt.received() ?? 'SIGTERM';
      log.warn(`interrupted by ${name}; the job was stopped and its workspace removed`);
      const { constants } = await import('node:os');
      return ExitCode.SIGNAL_BASE + (constants.signals[name] ?? 15);
    }
    throw error;
  } finally {
    interrupt.dispose();
  }
}

async function runValidate(target: string): Promise<number> {
  const { validateJobDefinition } = await import('./validate.js');
  const report = await validateJobDefinition(path.resolve(target));
  if (report.ok) {
    process.stdout.write(
      `${report.file}: valid (${report.spec.steps.length} step${report.spec.steps.length === 1 ? '' : 's'})\n`,
    );
    return ExitCode.OK;
  }
  process.stdout.write(
    `${report.file}: ${report.problems.length} problem${report.problems.length === 1 ? '' : 's'}\n`,
  );
  for (const problem of report.problems) process.stdout.write(`  - ${problem}\n`);
  return ExitCode.JOB_NOT_SUCCESSFUL;
}

function buildProgram(run: (action: () => Promise<number>) => void): Command {
  const program = new Command('mqtt-fs-worker')
    .description(
      'Take one job from an MQTT topic, run its steps from a shared drive, sync the results back, exit.',
    )
    .version(VERSION, '-V, --version')
    .showHelpAfterError('(run with --help for usage)')
    .configureOutput({ writeErr: (text) => process.stderr.write(text) })
    .exitOverride();
  // commander names attributes after the flags (--kill-grace → killGrace); map them onto the option keys.
  const keyOf = new Map<string, keyof Options>();
  for (const def of OPTION_DEFS) {
    const option = new Option(
      def.flags,
      `${def.description} [env: ${def.env}]${def.defaultText ? ` (default: ${def.defaultText})` : ''}`,
    );
    keyOf.set(option.attributeName(), def.key);
    program.addOption(option);
  }
  program
    .option(
      '--dry-run [payload-file]',
      'run the job in a local payload file, no broker (default: ./test-payload.json)',
    )
    .action((parsed: Record<string, string | boolean | undefined>) => {
      const flags: OptionFlags = {};
      for (const [attribute, value] of Object.entries(parsed)) {
        const key = keyOf.get(attribute);
        if (key && value !== undefined) flags[key] = value;
      }
      const dryRun = parsed.dryRun;
      if (dryRun !== undefined) {
        run(() => runDry(typeof dryRun === 'string' ? dryRun : 'test-payload.json', flags));
        return;
      }
      run(async () => {
        throw new WorkerError(
          ErrorCode.INVALID_OPTION,
          'broker mode is not available in this build; use --dry-run',
        );
      });
    });
  program
    .command('validate')
    .description('check a job definition (a job folder or a job.json) and print every problem found')
    .argument('<path>', 'job folder or job.json')
    .action((target: string) => run(() => runValidate(target)));
  return program;
}

/** Runs the CLI with `argv` (as process.argv) and resolves to the process exit code; never throws. */
export async function main(argv: readonly string[] = process.argv): Promise<number> {
  let pending: Promise<number> | undefined;
  const program = buildProgram((action) => {
    pending = action();
  });
  try {
    await program.parseAsync([...argv]);
    return pending ? await pending : ExitCode.OK;
  } catch (error) {
    return reportError(error);
  }
}

function reportError(error: unknown): number {
  const commanderCode = (error as { code?: string }).code;
  if (typeof commanderCode === 'string' && commanderCode.startsWith('commander.')) {
    // commander already printed its message (or the help/version text).
    const exitCode = (error as { exitCode?: number }).exitCode ?? ExitCode.USAGE;
    return exitCode === 0 ? ExitCode.OK : ExitCode.USAGE;
  }
  if (isWorkerError(error)) {
    for (const problem of error.problems) process.stderr.write(`mqtt-fs-worker: ${error.code}: ${problem}\n`);
    return error.exitCode;
  }
  process.stderr.write(
    `mqtt-fs-worker: INTERNAL: unexpected error\n${(error as Error)?.stack ?? String(error)}\n`,
  );
  return ExitCode.INTERNAL;
}
