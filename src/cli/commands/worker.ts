import { hostname } from 'node:os';
import { engineConfig } from '../../config/engine-config.js';
import type { OptionFlags, Options } from '../../config/options.js';
import type { LimitSettings } from '../../limits/index.js';
import { ExitCode } from '../../shared/errors.js';
import type { Logger } from '../../shared/log.js';
import type { WorkerOutcome } from '../../worker/serve.js';
import { interruptOnSignals, logger, resolve, signalExitCode, VERSION } from '../context.js';
import type { MainHooks } from '../main.js';

/** --respawn: this process stays up and runs each job in a fresh worker process (see respawn.ts). */
export async function runRespawn(options: Options, argv: readonly string[]): Promise<number> {
  const { respawn } = await import('../../worker/respawn.js');
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

export async function runBrokerWorker(
  flags: OptionFlags,
  hooks: MainHooks,
  argv: readonly string[],
): Promise<number> {
  const options = await resolve(flags);
  if (options.respawn) return runRespawn(options, argv);
  const [{ runWorker }, { selfIdentity }, { constants }, { lockWorkerId }] = await Promise.all([
    import('../../worker/serve.js'),
    import('../../worker/claim.js'),
    import('node:os'),
    import('../../worker/slot-lock.js'),
  ]);
  // Before anything else: a second process with this id must not sweep, kill or delete what the holder owns.
  const lock = await lockWorkerId(options.id);
  const config = await engineConfig(options, process.env, VERSION);
  // What would fail every job: checked before connecting, so the requests stay for slots that can run them.
  const warnings = await (await import('../../worker/preflight.js')).preflight({
    jobsDir: options.jobsDir,
    workspacesDir: options.workspacesDir,
    limits: config.limits as LimitSettings,
    cgroupName: `mqtt-fs-worker-${options.id}`,
    stage: options.stage,
    runAs: config.runAs !== undefined,
    claimLeaseMs: options.claimLeaseMs,
  });
  const log = logger(options).child({ worker: options.id });
  for (const warning of warnings) log.warn(warning);
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
    return exitCodeOf(outcome, log, () => interrupt.received() ?? 'SIGTERM', constants.signals);
  } finally {
    interrupt.dispose();
    lock.release();
  }
}

/** The process's exit code for how the worker ended (see the README's exit codes). */
function exitCodeOf(
  outcome: WorkerOutcome,
  log: Logger,
  signalName: () => NodeJS.Signals,
  signals: Record<string, number>,
): number {
  switch (outcome.kind) {
    case 'no-job':
    case 'ran':
      return ExitCode.OK;
    case 'connection-lost':
      return ExitCode.BROKER_UNREACHABLE;
    case 'not-ready':
      log.error(`NOT_READY: ${outcome.why}; job ${outcome.id} stays queued for a slot that can run it`);
      return ExitCode.NOT_READY;
    case 'fenced':
      log.error(
        `NOT_READY: ${outcome.why}; job ${outcome.id} was not published from here: a slot takes it over`,
      );
      return ExitCode.NOT_READY;
    case 'interrupted': {
      const name = signalName();
      log.warn(
        `interrupted by ${name}: job ${outcome.id} was stopped and stays queued for this slot's next run`,
      );
      return signalExitCode(name, signals);
    }
  }
}
