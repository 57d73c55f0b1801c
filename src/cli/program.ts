import { Command, Option } from 'commander';
import { OPTION_DEFS } from '../config/option-table.js';
import type { OptionFlags, Options } from '../config/options.js';
import { ErrorCode, WorkerError } from '../shared/errors.js';
import { VERSION } from './context.js';
import type { MainHooks } from './main.js';
import { writeStdio } from './stdio.js';

// The command line: the root command (the worker, or --dry-run) and one subcommand each for validate, submit,
// doctor, status, workers and drain. Each command's module is loaded when it runs, so `--version` and `--help`
// initialise almost nothing.

/** The broker connection: what every command that connects takes. */
const BROKER: readonly (keyof Options)[] = [
  'url',
  'username',
  'password',
  'passwordFile',
  'caFile',
  'certFile',
  'keyFile',
  'protocol',
  'keepaliveMs',
  'connectTimeoutMs',
  'logFormat',
];

/** Each subcommand's own options (the root command, the worker, takes them all; doctor checks them all). */
const COMMAND_OPTIONS: Record<string, readonly (keyof Options)[] | 'all'> = {
  submit: [
    ...BROKER,
    'topic',
    'resultsTopic',
    'statusTopic',
    'rejectedTopic',
    'presenceTopic',
    'logsTopic',
    'jobsDir',
    'secret',
    'secretFile',
  ],
  status: ['jobsDir', 'claimLeaseMs', 'id', 'logFormat'],
  workers: [...BROKER, 'presenceTopic', 'jobsDir'],
  drain: [...BROKER, 'id', 'topic', 'presenceTopic', 'jobsDir'],
  logs: [...BROKER, 'jobsDir', 'logsTopic', 'statusTopic', 'resultsTopic'],
  jobs: ['jobsDir', 'claimLeaseMs', 'logFormat'],
  dashboard: [
    ...BROKER,
    'jobsDir',
    'claimLeaseMs',
    'presenceTopic',
    'statusTopic',
    'resultsTopic',
    'logsTopic',
    'cancelTopic',
  ],
  doctor: 'all',
};

function addWorkerOptions(
  command: Command,
  keyOf: Map<string, keyof Options>,
  only: readonly (keyof Options)[] | 'all' = 'all',
): Command {
  for (const def of OPTION_DEFS) {
    if (only !== 'all' && !only.includes(def.key)) continue;
    const defaultText = def.defaultText ?? ('fallback' in def.kind ? def.kind.fallback : undefined);
    const option = new Option(
      def.flags,
      `${def.description} [env: ${def.env}]${defaultText ? ` (default: ${defaultText})` : ''}`,
    );
    if (def.repeatable)
      option.argParser((value: string, earlier?: string) => (earlier ? `${earlier},${value}` : value));
    keyOf.set(option.attributeName(), def.key);
    command.addOption(option);
  }
  return command;
}

/** What each command's definition needs: the command line, how to run an action, and the option mapping. */
interface Wiring {
  readonly argv: readonly string[];
  readonly run: (action: () => Promise<number>) => void;
  readonly hooks: MainHooks;
  /** commander names attributes after the flags (--kill-grace → killGrace): the option key of each. */
  readonly keyOf: Map<string, keyof Options>;
  readonly flagsOf: (parsed: Record<string, unknown>) => OptionFlags;
}

export function buildProgram(
  argv: readonly string[],
  run: (action: () => Promise<number>) => void,
  hooks: MainHooks,
): Command {
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
    // `help [command]` is defined below: commander's own prints the whole help for a command it does not know.
    .helpCommand(false)
    // commander's own errors (an unknown option, a missing argument) in the style of every other error: one line.
    .configureOutput({
      writeOut: (text) => writeStdio(1, text),
      writeErr: (text) => writeStdio(2, text),
      outputError: (text, write) =>
        write(`mqtt-fs-worker: INVALID_OPTION: ${text.replace(/^error: /, '').trimEnd()} (see --help)\n`),
    })
    .enablePositionalOptions()
    .exitOverride();
  const wiring: Wiring = { argv, run, hooks, keyOf, flagsOf };
  defineRoot(program, wiring);
  defineJobCommands(program, wiring);
  defineViewCommands(program, wiring);
  defineDriveCommands(program, wiring);
  defineFleetCommands(program, wiring);
  program
    .command('help')
    .description('display help for a command')
    .argument('[command]', 'the command')
    .action((name: string | undefined) => {
      const target = name === undefined ? program : program.commands.find((c) => c.name() === name);
      if (target) target.help();
      run(async () => {
        throw new WorkerError(ErrorCode.INVALID_OPTION, unknownCommand(name as string));
      });
    });
  return program;
}

function unknownCommand(word: string): string {
  return `unknown command '${word}' (commands: validate, submit, status, logs, jobs, workers, dashboard, doctor, drain, help; see --help)`;
}

/** The root command: the worker itself, or `--dry-run`. */
function defineRoot(program: Command, { argv, run, hooks, keyOf, flagsOf }: Wiring): void {
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
      // `--dry-run --watch file.json`: the payload file may stand anywhere on the line.
      if (parsed.dryRun === true && command.args.length === 1) parsed.dryRun = command.args.shift();
      const [word] = command.args;
      if (word !== undefined) {
        run(async () => {
          throw new WorkerError(ErrorCode.INVALID_OPTION, unknownCommand(word));
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
        run(async () =>
          (await import('./commands/dry-run.js')).runDry(
            typeof dryRun === 'string' ? dryRun : 'test-payload.json',
            flagsOf(parsed),
            dry,
            hooks,
          ),
        );
      else
        run(async () => (await import('./commands/worker.js')).runBrokerWorker(flagsOf(parsed), hooks, argv));
    });
}

// A subcommand takes the worker options it uses (COMMAND_OPTIONS); building them costs a job ~1 ms, so a
// subcommand gets them only when the command line names it (to run it or to show its help).
function withWorkerOptions({ argv, keyOf }: Wiring, command: Command): Command {
  return argv.includes(command.name())
    ? addWorkerOptions(command, keyOf, COMMAND_OPTIONS[command.name()] ?? 'all')
    : command;
}

/** validate, submit, status: one job. */
function defineJobCommands(program: Command, wiring: Wiring): void {
  const { run, flagsOf } = wiring;
  program
    .command('validate')
    .description('check a job definition (a job folder or a job.json) and print every problem found')
    .argument('<path>', 'job folder or job.json')
    .action((target: string) =>
      run(async () => (await import('./commands/validate.js')).runValidate(target)),
    );
  withWorkerOptions(
    wiring,
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
    run(async () =>
      (await import('./commands/submit.js')).runSubmit(
        id,
        parsed as import('./commands/submit.js').SubmitFlags,
        flagsOf(parsed),
      ),
    ),
  );
}

/** doctor, status, dashboard: the machine, a job, the fleet at a glance. */
function defineViewCommands(program: Command, wiring: Wiring): void {
  const { run, flagsOf } = wiring;
  withWorkerOptions(
    wiring,
    program
      .command('doctor')
      .description(
        'check what a worker needs here (folders, limits, cgroups, the broker) and print each check',
      ),
  ).action((parsed: Record<string, unknown>) =>
    run(async () => (await import('./commands/doctor.js')).runDoctor(flagsOf(parsed))),
  );
  withWorkerOptions(
    wiring,
    program
      .command('status')
      .description(
        'one job as the shared drive shows it: claimed by which slot, attempt, step, log tail, result',
      )
      .argument('<id>', 'job id')
      .option('--json', 'print JSON')
      .option('--lines <n>', 'how many lines of the current step log to show', '10'),
  ).action((id: string, parsed: Record<string, unknown>) =>
    run(async () =>
      (await import('./commands/status.js')).runStatus(
        id,
        parsed as import('./commands/status.js').StatusFlags,
        flagsOf(parsed),
      ),
    ),
  );
  withWorkerOptions(
    wiring,
    program
      .command('dashboard')
      .description("a local web page of the fleet: slots, jobs, a job's live output (Ctrl-C to stop)")
      .option('--port <port>', 'port to listen on (0: any free one)', '8080')
      .option(
        '--host <address>',
        'address to listen on (loopback by default: the page has no login)',
        '127.0.0.1',
      )
      .option('--allow-cancel', 'show a Cancel button that publishes on the cancel topic'),
  ).action((parsed: Record<string, unknown>) =>
    run(async () =>
      (await import('./commands/dashboard.js')).runDashboard(
        parsed as import('./commands/dashboard.js').DashboardFlags,
        flagsOf(parsed),
      ),
    ),
  );
}

/** jobs, logs: the jobs on the drive, one job's output. */
function defineDriveCommands(program: Command, wiring: Wiring): void {
  const { run, flagsOf } = wiring;
  withWorkerOptions(
    wiring,
    program
      .command('jobs')
      .description('the jobs under --jobs-dir: state, status, slot, attempt, times')
      .option('--json', 'print JSON')
      .option('--state <state>', 'only jobs in this state: queued, running, orphaned, finished, failed'),
  ).action((parsed: Record<string, unknown>) =>
    run(async () =>
      (await import('./commands/jobs.js')).runJobs(
        parsed as import('./commands/jobs.js').JobsFlags,
        flagsOf(parsed),
      ),
    ),
  );
  withWorkerOptions(
    wiring,
    program
      .command('logs')
      .description(
        "a job's step output: from the shared drive where it is reachable, live over MQTT with --follow",
      )
      .argument('<id>', 'job id')
      .option(
        '--follow',
        "keep printing the job's output as it comes, until its result (exit 0 on success, 1 otherwise)",
      )
      .option('--timeout <duration>', 'with --follow: give up after this (exit 5)', '1h'),
  ).action((id: string, parsed: Record<string, unknown>) =>
    run(async () =>
      (await import('./commands/logs.js')).runLogs(
        id,
        parsed as import('./commands/logs.js').LogsFlags,
        flagsOf(parsed),
      ),
    ),
  );
}

/** workers, drain: the slots, and retiring one. */
function defineFleetCommands(program: Command, wiring: Wiring): void {
  const { run, flagsOf } = wiring;
  withWorkerOptions(
    wiring,
    program
      .command('workers')
      .description(
        'list the slots from their presence (on the broker, and in --jobs-dir): state, job, step, version, host',
      )
      .option('--json', 'print JSON (with --watch: one line per change)')
      .option('--watch', 'follow changes until Ctrl-C')
      .option('--abandoned-after <duration>', 'call a slot offline for longer than this abandoned', '1h'),
  ).action((parsed: Record<string, unknown>) =>
    run(async () =>
      (await import('./commands/workers.js')).runWorkers(
        parsed as import('./commands/workers.js').WorkersFlags,
        flagsOf(parsed),
      ),
    ),
  );
  withWorkerOptions(
    wiring,
    program
      .command('drain')
      .description(
        'retire a slot that is gone (--id, required): end its session, moving what a shared slot held back to the group',
      )
      .option('--quiet <duration>', 'stop when no job came for this long', '3s')
      .option(
        '--force',
        'drain even a slot whose presence says it is online (its process is known to be gone)',
      ),
  ).action((parsed: Record<string, unknown>) =>
    run(async () =>
      (await import('./commands/drain.js')).runDrain(
        parsed as import('./commands/drain.js').DrainFlags,
        flagsOf(parsed),
      ),
    ),
  );
}
