import { hostname } from 'node:os';
import path from 'node:path';
import { Command, Option } from 'commander';
import { OPTION_DEFS, type OptionFlags, type Options, resolveOptions } from '../config/options.js';
import type { EngineConfig } from '../job/run-job.js';
import type { LimitSettings } from '../limits/index.js';
import { ErrorCode, ExitCode, isWorkerError, WorkerError } from '../shared/errors.js';
import { createLogger, type Logger } from '../shared/log.js';
import { parseDuration } from '../shared/units.js';
import { maskText } from '../step/mask.js';
import { stdioFlushed, writeStdio } from './stdio.js';

// The only module that touches the process: argv, env, stdout/stderr, signals and exit codes. Each command's
// modules are imported when that command runs, so `--version` and `--help` initialise almost nothing.

// Built in by scripts/bundle.mjs: the CLI runs from the bundle only (bin/ → dist/bundle/cli.cjs).
declare const __MFW_VERSION__: string;
const VERSION = __MFW_VERSION__;

/** Variables of the worker's own configuration; steps never see them (the broker password among them). */
const WORKER_ONLY_ENV = /^(MQTT_|WORKER_ID$)/;

function stepBaseEnv(env: NodeJS.ProcessEnv): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [name, value] of Object.entries(env)) {
    if (value !== undefined && !WORKER_ONLY_ENV.test(name)) out[name] = value;
  }
  return out;
}

async function engineConfig(options: Options, env: NodeJS.ProcessEnv): Promise<EngineConfig> {
  const runAs = options.runAs
    ? await (await import('../step/run-as.js')).resolveRunAs(options.runAs, process.getuid?.() === 0)
    : undefined;
  return {
    ...(runAs ? { runAs } : {}),
    jobsDir: options.jobsDir,
    workspacesDir: options.workspacesDir,
    workerId: options.id,
    hostname: hostname(),
    version: VERSION,
    killGraceMs: options.killGraceMs,
    maxLogBytes: options.maxLogBytes,
    stage: options.stage,
    baseEnv: stepBaseEnv(env),
    mask: maskedValues(options),
    limits: {
      policy: options.limits,
      defaults: { cpus: options.cpus, memoryBytes: options.memoryBytes, pids: options.pids },
      ceilings: { cpus: options.maxCpus, memoryBytes: options.maxMemoryBytes, pids: options.maxPids },
    },
  };
}

/** The options, with the secrets kept in files read (once, here): they must be masked from the first line on. */
async function resolve(flags: OptionFlags): Promise<Options> {
  const options = resolveOptions(flags, process.env, { cwd: process.cwd(), hostname: hostname() });
  if (!options.secretFile && !options.passwordFile) return options;
  return Object.freeze({
    ...options,
    secret: options.secretFile ? await readSecret(options.secretFile, '--secret-file') : options.secret,
    password: options.passwordFile
      ? await readSecret(options.passwordFile, '--password-file')
      : options.password,
    passwordFile: undefined,
  });
}

/** Values never to print: the broker password (also one inside --url), the shared secret, `--mask`. */
function maskedValues(options: Pick<Options, 'password' | 'secret' | 'mask' | 'url'>): string[] {
  return [options.password, urlPassword(options.url), options.secret, ...options.mask].filter(
    (v): v is string => v !== undefined && v !== '',
  );
}

function urlPassword(url: string): string | undefined {
  try {
    const { password } = new URL(url);
    return password ? decodeURIComponent(password) : undefined;
  } catch {
    return undefined;
  }
}

function logger(options: Pick<Options, 'logFormat' | 'password' | 'secret' | 'mask' | 'url'>): Logger {
  const secrets = maskedValues(options).sort((a, b) => b.length - a.length);
  return createLogger({
    format: options.logFormat,
    level: 'info',
    write: (line) => writeStdio(2, line),
    ...(secrets.length > 0 ? { redact: (line: string) => maskText(line, secrets) } : {}),
  });
}

/** A secret kept in a file (Docker secrets): its content without one trailing newline. */
async function readSecret(file: string, option: string): Promise<string> {
  try {
    const { readFile } = await import('node:fs/promises');
    return (await readFile(file, 'utf8')).replace(/\r?\n$/, '');
  } catch (error) {
    throw new WorkerError(
      ErrorCode.INVALID_OPTION,
      `${option}: cannot read ${file}: ${(error as NodeJS.ErrnoException).code ?? error}`,
    );
  }
}

function signalExitCode(name: NodeJS.Signals, signals: Record<string, number>): number {
  return ExitCode.SIGNAL_BASE + (signals[name] ?? 15);
}

/** An AbortSignal fired by SIGINT/SIGTERM with reason 'interrupted'; `received` tells which arrived. */
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

interface DryRunFlags {
  readonly quiet: boolean;
  readonly watch: boolean;
}

async function runDry(
  payloadFile: string,
  flags: OptionFlags,
  dry: DryRunFlags,
  hooks: MainHooks,
): Promise<number> {
  const options = await resolve(flags);
  const [{ dryRun }, { toResultPayload }, { JobInterrupted }, { constants }, { lockDryRunIdentity }, tty] =
    await Promise.all([
      import('../job/dry-run.js'),
      import('../job/report.js'),
      import('../job/run-job.js'),
      import('node:os'),
      import('../worker/slot-lock.js'),
      import('node:tty'),
    ]);
  // A dry run has an identity of its own (dry-run-N), so it never touches a worker's workspace or cgroups.
  const identity = await lockDryRunIdentity();
  const log = logger(options).child({ worker: identity.id });
  const interrupt = interruptOnSignals();
  const payload = path.resolve(payloadFile);
  const color = tty.isatty(2) && !process.env.NO_COLOR;
  try {
    const config = {
      ...(await engineConfig(options, process.env)),
      workerId: identity.id,
      createJobsDir: true,
    };
    const once = async (signal: AbortSignal): Promise<number | 'interrupted'> => {
      const view = dry.quiet
        ? undefined
        : new (await import('./live-view.js')).LiveView({ write: (text) => writeStdio(2, text), color });
      try {
        const { manifest } = await dryRun({
          payloadFile: payload,
          config,
          log,
          signal,
          ...(view
            ? { onEvent: (event) => view.event(event), onOutput: (step, chunk) => view.output(step, chunk) }
            : {}),
        });
        if (manifest.error) log.error(`${manifest.error.code}: ${manifest.error.message}`);
        log.info(`job ${manifest.id} ${manifest.status} (exit code ${manifest.exitCode})`);
        view?.summary(
          manifest,
          path.relative(process.cwd(), path.join(config.jobsDir, manifest.id, 'results')),
        );
        writeStdio(1, `${JSON.stringify(toResultPayload(manifest))}\n`);
        hooks.jobDone?.();
        return manifest.status === 'success' ? ExitCode.OK : ExitCode.JOB_NOT_SUCCESSFUL;
      } catch (error) {
        if (error instanceof JobInterrupted) return 'interrupted';
        // Watching, a payload being edited is no reason to stop: say what is wrong and wait for the next change.
        if (!dry.watch || !isWorkerError(error)) throw error;
        for (const problem of error.problems) log.error(`${error.code}: ${problem}`);
        return error.exitCode;
      }
    };
    if (dry.watch) {
      const { watchDryRun } = await import('./watch.js');
      return await watchDryRun({
        payloadFile: payload,
        jobDir: () => jobDirOfPayload(payload, config.jobsDir),
        ignored: [path.resolve(config.workspacesDir)],
        run: once,
        signal: interrupt.signal,
        log,
      });
    }
    const code = await once(interrupt.signal);
    if (code !== 'interrupted') return code;
    const name = interrupt.received() ?? 'SIGTERM';
    log.warn(`interrupted by ${name}; the job was stopped and its workspace removed`);
    return signalExitCode(name, constants.signals);
  } finally {
    interrupt.dispose();
    identity.release();
  }
}

/** The folder of the job a payload file names now (read again before each watched run), if it names one. */
function jobDirOfPayload(payloadFile: string, jobsDir: string): string | undefined {
  try {
    const { readFileSync } = process.getBuiltinModule('node:fs');
    const id = (JSON.parse(readFileSync(payloadFile, 'utf8')) as { id?: unknown }).id;
    return typeof id === 'string' && id !== '' && !id.includes('/') && id !== '..' && id !== '.'
      ? path.resolve(jobsDir, id)
      : undefined;
  } catch {
    return undefined;
  }
}

/** --respawn: this process stays up and runs each job in a fresh worker process (see respawn.ts). */
async function runRespawn(options: Options, argv: readonly string[]): Promise<number> {
  const { respawn } = await import('../worker/respawn.js');
  const log = logger(options).child({ worker: options.id });
  const interrupt = interruptOnSignals();
  try {
    return await respawn({
      command: process.execPath,
      args: argv.slice(1).filter((arg) => arg !== '--respawn'),
      env: { ...process.env, MQTT_RESPAWN: 'false' },
      log,
      signal: interrupt.signal,
      received: interrupt.received,
    });
  } finally {
    interrupt.dispose();
  }
}

async function runBrokerWorker(
  flags: OptionFlags,
  hooks: MainHooks,
  argv: readonly string[],
): Promise<number> {
  const options = await resolve(flags);
  if (options.respawn) return runRespawn(options, argv);
  const [{ runWorker }, { selfIdentity }, { constants }, { lockWorkerId }] = await Promise.all([
    import('../worker/serve.js'),
    import('../worker/claim.js'),
    import('node:os'),
    import('../worker/slot-lock.js'),
  ]);
  // Before anything else: a second process with this id must not sweep, kill or delete what the holder owns.
  const lock = await lockWorkerId(options.id);
  const config = await engineConfig(options, process.env);
  // What would fail every job: checked before connecting, so the requests stay for slots that can run them.
  await (await import('../worker/preflight.js')).preflight({
    jobsDir: options.jobsDir,
    workspacesDir: options.workspacesDir,
    limits: config.limits as LimitSettings,
    cgroupName: `mqtt-fs-worker-${options.id}`,
    stage: options.stage,
    runAs: config.runAs !== undefined,
  });
  const log = logger(options).child({ worker: options.id });
  if (flags.password !== undefined) {
    log.warn(
      '--password on the command line is visible to every user of this host (ps); use --password-file or MQTT_PASSWORD',
    );
  }
  const interrupt = interruptOnSignals();
  try {
    const outcome = await runWorker({
      options,
      config,
      identity: selfIdentity(options.id, hostname(), process.pid),
      requestPolicy: {
        ...(options.secret ? { secret: options.secret } : {}),
        maxAgeMs: options.maxAgeMs,
        allowSteps: !options.noPayloadSteps,
      },
      log,
      signal: interrupt.signal,
    });
    if (outcome.kind === 'ran') hooks.jobDone?.();
    switch (outcome.kind) {
      case 'no-job':
      case 'ran':
        return ExitCode.OK;
      case 'connection-lost':
        return ExitCode.BROKER_UNREACHABLE;
      case 'not-ready':
        log.error(`NOT_READY: ${outcome.why}; job ${outcome.id} stays queued for a slot that can run it`);
        return ExitCode.NOT_READY;
      case 'interrupted': {
        const name = interrupt.received() ?? 'SIGTERM';
        log.warn(
          `interrupted by ${name}: job ${outcome.id} was stopped and stays queued for this slot's next run`,
        );
        return signalExitCode(name, constants.signals);
      }
    }
  } finally {
    interrupt.dispose();
    lock.release();
  }
}

async function runDoctor(flags: OptionFlags): Promise<number> {
  const options = await resolve(flags);
  const { doctor } = await import('../worker/doctor.js');
  const checks = await doctor(options, await engineConfig(options, process.env));
  for (const check of checks)
    writeStdio(1, `${check.ok ? 'ok  ' : 'FAIL'}  ${check.name.padEnd(20)} ${check.detail}\n`);
  return checks.every((check) => check.ok) ? ExitCode.OK : ExitCode.JOB_NOT_SUCCESSFUL;
}

async function runValidate(target: string): Promise<number> {
  const { validateJobDefinition } = await import('../job/validate.js');
  const report = await validateJobDefinition(path.resolve(target));
  if (report.ok) {
    writeStdio(
      1,
      `${report.file}: valid (${report.spec.steps.length} step${report.spec.steps.length === 1 ? '' : 's'})\n`,
    );
    return ExitCode.OK;
  }
  writeStdio(
    1,
    `${report.file}: ${report.problems.length} problem${report.problems.length === 1 ? '' : 's'}\n`,
  );
  for (const problem of report.problems) writeStdio(1, `  - ${problem}\n`);
  return ExitCode.JOB_NOT_SUCCESSFUL;
}

interface SubmitFlags {
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

async function runSubmit(id: string, submitFlags: SubmitFlags, flags: OptionFlags): Promise<number> {
  const options = await resolve(flags);
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
  const { submit } = await import('../broker/submit.js');
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
    ...(confirmMs !== undefined ? { confirmMs } : {}),
    ...(submitFlags.rerun ? { rerun: (await import('node:crypto')).randomUUID() } : {}),
    wait: (submitFlags.wait || submitFlags.follow) ?? false,
    timeoutMs,
    log,
    ...(follower ? { onStatus: (event: Record<string, unknown>) => follower.event(event) } : {}),
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
  const [{ Follower }, { existsSync }] = await Promise.all([import('./follow.js'), import('node:fs')]);
  const jobDir = path.resolve(jobsDir, id);
  return new Follower({
    jobDir: existsSync(jobDir) ? jobDir : undefined,
    write: (text) => writeStdio(2, text),
  });
}

async function runDrain(quiet: string | undefined, flags: OptionFlags): Promise<number> {
  const options = await resolve(flags);
  const quietMs = parseDuration(quiet ?? '3s');
  if (quietMs === undefined)
    throw new WorkerError(
      ErrorCode.INVALID_OPTION,
      `--quiet: expected a duration like "3s", got ${JSON.stringify(quiet)}`,
    );
  const { drain } = await import('../broker/drain.js');
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

interface StatusFlags {
  json?: boolean;
  lines?: string;
}

async function runStatus(id: string, statusFlags: StatusFlags, flags: OptionFlags): Promise<number> {
  const options = await resolve(flags);
  const lines = Number(statusFlags.lines ?? '10');
  if (!Number.isInteger(lines) || lines < 0)
    throw new WorkerError(
      ErrorCode.INVALID_OPTION,
      `--lines: expected a whole number, got ${statusFlags.lines}`,
    );
  const { jobStatus, formatStatus } = await import('../job/status.js');
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

interface WorkersFlags {
  json?: boolean;
  watch?: boolean;
  abandonedAfter?: string;
}

async function runWorkers(workersFlags: WorkersFlags, flags: OptionFlags): Promise<number> {
  const options = await resolve(flags);
  const abandonedAfterMs = parseDuration(workersFlags.abandonedAfter ?? '1h');
  if (abandonedAfterMs === undefined)
    throw new WorkerError(
      ErrorCode.INVALID_OPTION,
      `--abandoned-after: expected a duration like "1h", got ${JSON.stringify(workersFlags.abandonedAfter)}`,
    );
  const [{ listWorkers, slotRows, formatWorkers }, tty] = await Promise.all([
    import('../broker/workers.js'),
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
    show(await listWorkers({ settings: options, presenceTopic: options.presenceTopic }), false);
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

function addWorkerOptions(command: Command, keyOf: Map<string, keyof Options>): Command {
  for (const def of OPTION_DEFS) {
    const defaultText = def.defaultText ?? ('fallback' in def.kind ? def.kind.fallback : undefined);
    const option = new Option(
      def.flags,
      `${def.description} [env: ${def.env}]${defaultText ? ` (default: ${defaultText})` : ''}`,
    );
    keyOf.set(option.attributeName(), def.key);
    command.addOption(option);
  }
  return command;
}

function buildProgram(
  argv: readonly string[],
  run: (action: () => Promise<number>) => void,
  hooks: MainHooks,
): Command {
  // commander names attributes after the flags (--kill-grace → killGrace); map them onto the option keys.
  const keyOf = new Map<string, keyof Options>();
  const flagsOf = (parsed: Record<string, unknown>): OptionFlags => {
    const flags: OptionFlags = {};
    for (const [attribute, value] of Object.entries(parsed)) {
      // commander turns --no-payload-steps into payloadSteps (default true): only an explicit flag counts.
      if (attribute === 'payloadSteps') {
        if (value === false) flags.noPayloadSteps = true;
        continue;
      }
      const key = keyOf.get(attribute);
      if (key && (typeof value === 'string' || typeof value === 'boolean')) flags[key] = value;
    }
    return flags;
  };
  const program = new Command('mqtt-fs-worker')
    .description(
      'Take one job from an MQTT topic, run its steps from a shared drive, sync the results back, exit.',
    )
    .version(VERSION, '-V, --version')
    // commander adds `help [command]` by itself only to programs without an action of their own.
    .helpCommand(true)
    .showHelpAfterError('(run with --help for usage)')
    .configureOutput({ writeOut: (text) => writeStdio(1, text), writeErr: (text) => writeStdio(2, text) })
    .enablePositionalOptions()
    .exitOverride();
  addWorkerOptions(program, keyOf)
    .option(
      '--dry-run [payload-file]',
      'run the job in a local payload file, no broker (default: ./test-payload.json)',
    )
    .option('--watch', 'with --dry-run: run again whenever job.json, the payload or an input changes')
    .option('-q, --quiet', "with --dry-run: do not show the steps' output and the summary (the log stays)")
    // A word that is no command reaches the action (not commander's "too many arguments"): say what it is.
    .allowExcessArguments(true)
    .action((parsed: Record<string, unknown>, command: Command) => {
      const [word] = command.args;
      if (word !== undefined) {
        run(async () => {
          throw new WorkerError(
            ErrorCode.INVALID_OPTION,
            `unknown command '${word}' (commands: validate, submit, status, workers, doctor, drain, help; see --help)`,
          );
        });
        return;
      }
      const dryRun = parsed.dryRun as string | boolean | undefined;
      const dry = { quiet: parsed.quiet === true, watch: parsed.watch === true };
      if (dryRun === undefined && (dry.quiet || dry.watch)) {
        run(async () => {
          throw new WorkerError(ErrorCode.INVALID_OPTION, '--watch and --quiet go with --dry-run');
        });
        return;
      }
      if (dryRun !== undefined)
        run(() =>
          runDry(typeof dryRun === 'string' ? dryRun : 'test-payload.json', flagsOf(parsed), dry, hooks),
        );
      else run(() => runBrokerWorker(flagsOf(parsed), hooks, argv));
    });
  program
    .command('validate')
    .description('check a job definition (a job folder or a job.json) and print every problem found')
    .argument('<path>', 'job folder or job.json')
    .action((target: string) => run(() => runValidate(target)));
  // Each subcommand repeats the ~40 worker options; building them costs a job ~1 ms, so a subcommand gets them only
  // when the command line names it (to run it or to show its help).
  const withWorkerOptions = (command: Command): Command =>
    argv.includes(command.name()) ? addWorkerOptions(command, keyOf) : command;
  withWorkerOptions(
    program
      .command('submit')
      .description('publish a job request; with --wait, print its result and exit with its outcome')
      .argument('<id>', 'job id')
      .option('--steps <steps...>', 'steps to run instead of job.json (commands, or one JSON array)')
      .option('--wait', 'wait for the result and exit 0 on success, 1 otherwise')
      .option(
        '--follow',
        "with --wait's outcome: show the job's progress and its step logs (from --jobs-dir) on stderr",
      )
      .option('--rerun', 'run the job again even if it finished (each --rerun request runs once)')
      .option(
        '--confirm <duration>',
        'publish again (backing off) until a worker took the request; connect again after a broker crash',
      )
      .option('--timeout <duration>', 'give up after this (default: 1h with --wait, else 5m)'),
  ).action((id: string, parsed: Record<string, unknown>) =>
    run(() => runSubmit(id, parsed as SubmitFlags, flagsOf(parsed))),
  );
  withWorkerOptions(
    program
      .command('doctor')
      .description(
        'check what a worker needs here (folders, limits, cgroups, the broker) and print each check',
      ),
  ).action((parsed: Record<string, unknown>) => run(() => runDoctor(flagsOf(parsed))));
  withWorkerOptions(
    program
      .command('status')
      .description(
        'one job as the shared drive shows it: claimed by which slot, attempt, step, log tail, result',
      )
      .argument('<id>', 'job id')
      .option('--json', 'print JSON')
      .option('--lines <n>', 'how many lines of the current step log to show', '10'),
  ).action((id: string, parsed: Record<string, unknown>) =>
    run(() => runStatus(id, parsed as StatusFlags, flagsOf(parsed))),
  );
  withWorkerOptions(
    program
      .command('workers')
      .description('list the slots from their retained presence: state, job, step, version, host')
      .option('--json', 'print JSON (with --watch: one line per change)')
      .option('--watch', 'follow changes until Ctrl-C')
      .option('--abandoned-after <duration>', 'call a slot offline for longer than this abandoned', '1h'),
  ).action((parsed: Record<string, unknown>) =>
    run(() => runWorkers(parsed as WorkersFlags, flagsOf(parsed))),
  );
  withWorkerOptions(
    program
      .command('drain')
      .description("move the jobs queued in a retired slot's session (--id) back to the group")
      .option('--quiet <duration>', 'stop when no job came for this long', '3s'),
  ).action((parsed: Record<string, unknown>) =>
    run(() => runDrain(parsed.quiet as string | undefined, flagsOf(parsed))),
  );
  return program;
}

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
  const stack = (error as Error)?.stack ?? String(error);
  writeStdio(
    2,
    json
      ? line('INTERNAL', 'unexpected error', { stack })
      : `mqtt-fs-worker: INTERNAL: unexpected error\n${stack}\n`,
  );
  return ExitCode.INTERNAL;
}
