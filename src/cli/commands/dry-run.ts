import path from 'node:path';
import { engineConfig } from '../../config/engine-config.js';
import type { OptionFlags } from '../../config/options.js';
import { RESULTS_DIR } from '../../job/results-layout.js';
import { ExitCode, isWorkerError } from '../../shared/errors.js';
import { interruptOnSignals, logger, resolve, signalExitCode, VERSION } from '../context.js';
import type { MainHooks } from '../main.js';
import { writeStdio } from '../stdio.js';

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
  const [{ dryRun }, { toResultPayload }, { JobInterrupted }, { constants }, { lockDryRunIdentity }, tty] =
    await Promise.all([
      import('../../job/dry-run.js'),
      import('../../job/report.js'),
      import('../../job/run-job.js'),
      import('node:os'),
      import('../../worker/slot-lock.js'),
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
      ...(await engineConfig(options, process.env, VERSION)),
      workerId: identity.id,
      createJobsDir: true,
    };
    const once = async (signal: AbortSignal): Promise<number | 'interrupted'> => {
      const view = dry.quiet
        ? undefined
        : new (await import('../live-view.js')).LiveView({ write: (text) => writeStdio(2, text), color });
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
          path.relative(process.cwd(), path.join(config.jobsDir, manifest.id, RESULTS_DIR)),
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
