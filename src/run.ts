import { spawn } from 'node:child_process';
import { constants as osConstants } from 'node:os';
import { pipeline } from 'node:stream/promises';
import { LogSink } from './log-sink.js';
import { StreamMasker } from './mask.js';

/** What a step's cgroup measured; all null where no cgroup applied. */
export interface StepAccounting {
  readonly peakMemoryBytes: number | null;
  readonly cpuMs: number | null;
  readonly oomKilled: boolean | null;
}

export const NO_ACCOUNTING: StepAccounting = Object.freeze({
  peakMemoryBytes: null,
  cpuMs: null,
  oomKilled: null,
});

/**
 * Where a step's processes live (a cgroup, in `limits/`). The step is held at a gate until `join` has moved it
 * in, so that every process it forks is inside from the start.
 */
export interface StepSandbox {
  join(pid: number): Promise<void>;
  /** Sends `signal` to every process in the sandbox (SIGKILL kills the whole tree, wherever it moved). */
  signal(signal: NodeJS.Signals): Promise<void>;
  /** Kills whatever is left, reads the accounting and removes the sandbox. */
  close(): Promise<StepAccounting>;
}

export type StopReason = 'timeout' | 'cancelled' | 'interrupted';

export interface RunStepInput {
  readonly command: string;
  readonly cwd: string;
  readonly env: Readonly<Record<string, string>>;
  readonly logFile: string;
  readonly maxLogBytes: number;
  /** Undefined: no time limit. */
  readonly timeoutMs: number | undefined;
  readonly killGraceMs: number;
  /** Aborting stops the step; the abort reason (a StopReason) becomes the outcome. */
  readonly signal?: AbortSignal;
  readonly sandbox?: StepSandbox;
  /** Values replaced by `***` in the log, also when split across writes. */
  readonly secrets?: readonly string[];
  /** setpriv arguments: the gate drops to this user (after joining the sandbox, which needs root). */
  readonly setpriv?: readonly string[];
}

export interface StepOutcome {
  /** The exit code, or 128 + signal number when a signal ended the step. */
  readonly exitCode: number;
  readonly signal: NodeJS.Signals | null;
  /** Set when the worker stopped the step. */
  readonly stoppedFor: StopReason | null;
  readonly logBytes: number;
  readonly logTruncated: boolean;
  readonly accounting: StepAccounting;
  /** The step could not be started at all (shell missing, workspace gone). */
  readonly spawnError: string | null;
}

// The gate: wait for one line on stdin (sent once the step is inside its cgroup), then give the step an empty
// stdin, merge stderr into stdout (one pipe keeps the two in order) and exec the command, keeping the same pid.
const GATE = 'IFS= read -r _ || exit 125; exec </dev/null 2>&1; exec /bin/sh -c "$1"';
const GATE_AS =
  'IFS= read -r _ || exit 125; exec </dev/null 2>&1; cmd=$1; shift; exec setpriv "$@" -- /bin/sh -c "$cmd"';
// After the step's main process exits and its tree is killed, how long to wait for the output pipe to drain.
const DRAIN_AFTER_EXIT_MS = 2000;

function signalNumber(signal: NodeJS.Signals): number {
  return osConstants.signals[signal] ?? 0;
}

function killGroup(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(-pid, signal);
  } catch {
    // ESRCH: the group is already gone.
  }
}

/**
 * Runs one step through `sh -c` in its own process group (and sandbox, when given), streaming its combined
 * output to `logFile`. When the main process exits, everything it left running is killed. A timeout or abort
 * sends SIGTERM to the whole step, then SIGKILL after the grace period.
 */
export async function runStep(input: RunStepInput): Promise<StepOutcome> {
  // The log file is opened while the step is spawned and moved into its sandbox: it waits at its gate till then.
  const opening = LogSink.create(input.logFile, input.maxLogBytes, new StreamMasker(input.secrets ?? []));
  const gate = input.setpriv
    ? ['-c', GATE_AS, 'mqtt-fs-worker-step', input.command, ...input.setpriv]
    : ['-c', GATE, 'mqtt-fs-worker-step', input.command];
  // node:child_process rather than execa: the gate needs raw control of the child (its own process group, stdin
  // as the release, output streamed, the bare exit event) and execa's load time would be paid on every job.
  const subprocess = spawn('/bin/sh', gate, {
    cwd: input.cwd,
    env: input.env,
    stdio: ['pipe', 'pipe', 'ignore'],
    detached: true,
  });
  const failed = new Promise<Error>((resolve) => subprocess.once('error', resolve));
  // Listened to at once: the step can end while the log is being opened.
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    subprocess.once('exit', (code, signal) => resolve({ code, signal }));
  });
  subprocess.stdin?.on('error', () => {}); // EPIPE when the step is gone before its release
  const pid = subprocess.pid;
  let sink: LogSink;
  try {
    [sink] = await Promise.all([opening, pid !== undefined ? input.sandbox?.join(pid) : undefined]);
  } catch (error) {
    // Never released: the step must not outlive the failure.
    if (pid !== undefined) killGroup(pid, 'SIGKILL');
    (await opening.catch(() => undefined))?.destroy();
    throw error;
  }
  if (pid !== undefined) subprocess.stdin?.end('go\n');
  // Attached after the release (the pipe holds what comes first): the step starts while this is set up.
  const output = subprocess.stdout ? pipeline(subprocess.stdout, sink) : Promise.resolve();
  output.catch(() => {}); // awaited below; avoid an unhandled rejection while the step runs

  let stoppedFor: StopReason | null = null;
  let graceTimer: NodeJS.Timeout | undefined;
  const stop = (reason: StopReason): void => {
    if (stoppedFor || pid === undefined) return;
    stoppedFor = reason;
    killGroup(pid, 'SIGTERM');
    void input.sandbox?.signal('SIGTERM').catch(() => {});
    graceTimer = setTimeout(() => {
      killGroup(pid, 'SIGKILL');
      void input.sandbox?.signal('SIGKILL').catch(() => {});
    }, input.killGraceMs);
  };

  let spawnError: string | null = null;
  let timeoutTimer: NodeJS.Timeout | undefined;
  const onAbort = (): void => stop((input.signal?.reason as StopReason) ?? 'cancelled');
  try {
    if (pid === undefined) {
      const error = (await failed) as NodeJS.ErrnoException;
      spawnError = `cannot start the step in ${input.cwd}: ${error.code ?? error.message}`;
    } else {
      if (input.timeoutMs !== undefined) timeoutTimer = setTimeout(() => stop('timeout'), input.timeoutMs);
      if (input.signal?.aborted) onAbort();
      else input.signal?.addEventListener('abort', onAbort, { once: true });
    }
    const { code, signal } = pid === undefined ? { code: 127, signal: null } : await exited;
    clearTimeout(timeoutTimer);
    input.signal?.removeEventListener('abort', onAbort);
    // Whatever the step left behind (background jobs, daemons) dies with it.
    if (pid !== undefined) killGroup(pid, 'SIGKILL');
    const accounting = input.sandbox ? await input.sandbox.close() : NO_ACCOUNTING;
    clearTimeout(graceTimer);
    await drain(output, sink, subprocess.stdout);
    return {
      exitCode: code ?? (signal ? 128 + signalNumber(signal) : 1),
      signal,
      stoppedFor,
      logBytes: sink.written,
      logTruncated: sink.truncated,
      accounting,
      spawnError,
    };
  } finally {
    clearTimeout(timeoutTimer);
    clearTimeout(graceTimer);
    if (!sink.destroyed && !sink.writableFinished) sink.destroy();
  }
}

// A process that escaped the group (setsid) can hold the pipe open forever; without a sandbox to kill it, give
// the pipe a bounded time to drain, then close our end.
async function drain(
  output: Promise<void>,
  sink: LogSink,
  stdout: NodeJS.ReadableStream | null,
): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  const timedOut = new Promise<'timeout'>((resolve) => {
    timer = setTimeout(() => resolve('timeout'), DRAIN_AFTER_EXIT_MS);
  });
  const result = await Promise.race([output.then(() => 'done' as const), timedOut]).catch(
    () => 'error' as const,
  );
  clearTimeout(timer);
  if (result === 'timeout') {
    (stdout as { destroy?: () => void } | null)?.destroy?.();
    await output.catch(() => {});
  }
  if (!sink.destroyed && !sink.writableFinished) sink.destroy();
}
