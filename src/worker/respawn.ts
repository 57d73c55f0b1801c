import { spawn } from 'node:child_process';
import { ExitCode } from '../shared/errors.js';
import type { Logger } from '../shared/log.js';

// --respawn: one long-lived process that runs each job in a fresh worker process, one after another. A container
// or a unit never exits between jobs, so restart policies (Docker's doubling delay, systemd's start limit,
// Kubernetes' CrashLoopBackOff) never throttle a slot that is merely doing its work.

export interface RespawnInput {
  /** The worker's command line: node, the bin, its arguments (without --respawn). */
  readonly command: string;
  readonly args: readonly string[];
  readonly env: NodeJS.ProcessEnv;
  readonly log: Logger;
  /** Aborted on SIGTERM/SIGINT: the signal goes to the running worker, and the loop ends once it has exited. */
  readonly signal: AbortSignal;
  /** Which signal to forward when `signal` aborts. */
  readonly received: () => NodeJS.Signals | undefined;
  /** Longest wait between two workers after failures; the wait doubles from 100 ms up to it. */
  readonly maxDelayMs?: number;
}

/** Exit codes after which starting again cannot help: the settings, or the broker's grants, must change. */
const FINAL = new Set<number>([ExitCode.USAGE, ExitCode.ID_IN_USE, ExitCode.BROKER_UNSUITABLE]);
const FIRST_DELAY_MS = 100;

/** Runs workers until told to stop (resolves with the last worker's exit code) or one fails for good. */
export async function respawn(input: RespawnInput): Promise<number> {
  const maxDelay = input.maxDelayMs ?? 30_000;
  let delay = 0;
  for (;;) {
    if (input.signal.aborted) return ExitCode.OK;
    const code = await runOne(input);
    if (input.signal.aborted) return code;
    if (FINAL.has(code)) {
      input.log.error(`the worker exited ${code}: starting it again cannot help; stopping`);
      return code;
    }
    // A job handled (or none within --idle-timeout): the next worker at once. Anything else: back off.
    delay = code === ExitCode.OK ? 0 : Math.min(maxDelay, Math.max(FIRST_DELAY_MS, delay * 2));
    if (delay > 0) {
      input.log.warn(`the worker exited ${code}; starting the next one in ${delay} ms`);
      if (!(await pause(delay, input.signal))) return code;
    }
  }
}

function runOne(input: RespawnInput): Promise<number> {
  return new Promise((resolve) => {
    let settled = false;
    const settle = (code: number): void => {
      if (settled) return;
      settled = true;
      input.signal.removeEventListener('abort', forward);
      resolve(code);
    };
    const child = spawn(input.command, [...input.args], { env: input.env, stdio: 'inherit' });
    input.log.info(`started worker process ${child.pid}`);
    const forward = (): void => {
      child.kill(input.received() ?? 'SIGTERM');
    };
    input.signal.addEventListener('abort', forward, { once: true });
    child.once('error', (error) => {
      input.log.error(`cannot start the worker: ${error.message}`);
      settle(ExitCode.INTERNAL);
    });
    child.once('close', (code, signal) => {
      // Killed by the signal it was forwarded before it could handle one: it had not connected, so had no job.
      if (code === null && input.signal.aborted) settle(ExitCode.OK);
      else settle(code ?? ExitCode.SIGNAL_BASE + (signal === 'SIGKILL' ? 9 : 15));
    });
  });
}

/** Waits `ms`, or less when `signal` aborts first: true when the wait ran out. */
function pause(ms: number, signal: AbortSignal): Promise<boolean> {
  return new Promise((resolve) => {
    const onAbort = (): void => {
      clearTimeout(timer);
      resolve(false);
    };
    const timer = setTimeout(() => {
      signal.removeEventListener('abort', onAbort);
      resolve(true);
    }, ms);
    signal.addEventListener('abort', onAbort, { once: true });
  });
}
