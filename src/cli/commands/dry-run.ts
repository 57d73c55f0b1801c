import path from 'node:path';
import { engineConfig } from '../../config/engine-config.js';
import type { OptionFlags } from '../../config/options.js';
import { RESULTS_DIR } from '../../job/results-layout.js';
import type { EngineConfig } from '../../job/run-job.js';
import { ExitCode, isWorkerError } from '../../shared/errors.js';
import { idProblem } from '../../shared/ids.js';
import type { Logger } from '../../shared/log.js';
import { interruptOnSignals, logger, resolve, signalExitCode, VERSION } from '../context.js';
import type { MainHooks } from '../main.js';
import { backlog, writeStdio } from '../stdio.js';

export interface DryRunFlags {
  readonly quiet: boolean;
  readonly watch: boolean;
}

export async function runDry(
  payloadFile: string,
  flags: OptionFlags,
  dry: DryRunFlags,
  hooks: MainHooks,
): Promise<number> {
  const options = await resolve(flags);
  const [{ constants }, { lockDryRunIdentity }] = await Promise.all([
    import('node:os'),
    import('../../worker/slot-lock.js'),
  ]);
  // A dry run has an identity of its own (dry-run-N), so it never touches a worker's workspace or cgroups.
  const identity = await lockDryRunIdentity();
  const log = logger(options).child({ worker: identity.id });
  const interrupt = interruptOnSignals();
  const payload = path.resolve(payloadFile);
  try {
    const config = {
      ...(await engineConfig(options, process.env, VERSION)),
      workerId: identity.id,
      createJobsDir: true,
    };
    const once = await oneRun({ payload, config, log, dry, hooks });
    if (dry.watch) {
      const { watchDryRun } = await import('../watch.js');
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

interface OneRunInput {
  readonly payload: string;
  readonly config: EngineConfig;
  readonly log: Logger;
  readonly dry: DryRunFlags;
  readonly hooks: MainHooks;
}

/**
 * One dry run as the terminal shows it (live view, summary, the result message on stdout), to its exit code, or
 * 'interrupted' when its signal stopped it.
 */
async function oneRun(input: OneRunInput): Promise<(signal: AbortSignal) => Promise<number | 'interrupted'>> {
  const { config, log, dry } = input;
  const [{ dryRun }, { toResultPayload }, { JobInterrupted }, tty] = await Promise.all([
    import('../../job/dry-run.js'),
    import('../../job/report.js'),
    import('../../job/run-job.js'),
    import('node:tty'),
  ]);
  const color = tty.isatty(2) && !process.env.NO_COLOR;
  return async (signal) => {
    const view = dry.quiet
      ? undefined
      : new (await import('../live-view.js')).LiveView({
          write: (text) => writeStdio(2, text),
          backlog: () => backlog(2),
          color,
        });
    try {
      const { manifest } = await dryRun({
        payloadFile: input.payload,
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
        path.relative(process.cwd(), path.join(config.jobsDir, manifest.id, RESULTS_DIR)),
      );
      writeStdio(1, `${JSON.stringify(toResultPayload(manifest))}\n`);
      input.hooks.jobDone?.();
      return manifest.status === 'success' ? ExitCode.OK : ExitCode.JOB_NOT_SUCCESSFUL;
    } catch (error) {
      if (error instanceof JobInterrupted) return 'interrupted';
      // Watching, a payload being edited is no reason to stop: say what is wrong and wait for the next change.
      if (!dry.watch || !isWorkerError(error)) throw error;
      for (const problem of error.problems) log.error(`${error.code}: ${problem}`);
      return error.exitCode;
    }
  };
}

/** The folder of the job a payload file names now (read again before each watched run), if it names one. */
function jobDirOfPayload(payloadFile: string, jobsDir: string): string | undefined {
  try {
    const { readFileSync } = process.getBuiltinModule('node:fs');
    const id = (JSON.parse(readFileSync(payloadFile, 'utf8')) as { id?: unknown }).id;
    return idProblem(id) === undefined ? path.resolve(jobsDir, id as string) : undefined;
  } catch {
    return undefined;
  }
}
