import { type ChildProcess, spawn } from 'node:child_process';
import { constants as osConstants } from 'node:os';
import type { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { killTagged, newStepTag, TAG_VARIABLE } from './leftovers.js';
import { LogSink } from './log-sink.js';
import { StreamMasker } from './mask.js';

/** What a step's cgroup measured; all null where no cgroup applied. */
/** A limit a step can run into. */
export type LimitName = 'cpus' | 'memory' | 'pids' | 'io';

export interface StepAccounting {
  readonly peakMemoryBytes: number | null;
  readonly cpuMs: number | null;
  readonly oomKilled: boolean | null;
  /**
   * The limits the step ran into (`cpus` throttled, `memory` at its maximum, `pids` refused a fork, `io` held to its
   * bandwidth); null: unknown.
   */
  readonly limitsHit: readonly LimitName[] | null;
  /** Bytes the step read from and wrote to block devices (where I/O is accounted: an I/O limit in play). */
  readonly ioReadBytes: number | null;
  readonly ioWriteBytes: number | null;
}

export const NO_ACCOUNTING: StepAccounting = Object.freeze({
  peakMemoryBytes: null,
  cpuMs: null,
  oomKilled: null,
  limitsHit: null,
  ioReadBytes: null,
  ioWriteBytes: null,
});

/**
 * Where a step's processes live (a cgroup, in `limits/`). The step gets in before its command runs, so that every
 * process it forks is inside from the start: the worker moves it (`join`) while it is held at its gate, or the
 * gate moves itself by writing `0` into each of the `selfJoin` files (cgroup v1 `tasks`). A single-threaded
 * process moving itself is the one move the kernel does without waiting for an RCU grace period (~10 ms, holding
 * the lock every cgroup operation on the host needs).
 */
export type StepSandbox = SandboxControl &
  ({ join(pid: number): Promise<void> } | { readonly selfJoin: readonly string[] });

interface SandboxControl {
  /** Sends `signal` to every process in the sandbox (SIGKILL kills the whole tree, wherever it moved). */
  signal(signal: NodeJS.Signals): Promise<void>;
  /** Kills whatever is left, reads the accounting and removes the sandbox. */
  close(): Promise<StepAccounting>;
}

const STOP_REASONS = ['timeout', 'cancelled', 'interrupted'] as const;
/** Why the worker stopped a step; an AbortSignal's reason carries it (any other reason counts as a cancel). */
export type StopReason = (typeof STOP_REASONS)[number];

function stopReasonOf(reason: unknown): StopReason {
  return STOP_REASONS.find((known) => known === reason) ?? 'cancelled';
}

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
  /** Sees the output as the log gets it (masked, up to the cap). */
  readonly onOutput?: (chunk: Buffer) => void;
  /** Called once the command is released to run: work to overlap with the step. */
  readonly onStarted?: () => void;
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
  /** Without a sandbox: how many processes the step left behind outside its process group, killed by their tag. */
  readonly leftoversKilled: number;
}

// The gate, `sh -c GATE name command n file… [setpriv argument…]`: wait for one line on stdin (sent once the log is
// ready and the worker moved the step into its sandbox), move itself into the n files' cgroups where it does that
// itself (a failure is told on descriptor 3, and the command never runs), give the step an empty stdin, merge
// stderr into stdout (one pipe keeps the two in order) and exec the command, as another user through setpriv
// when there are setpriv arguments, keeping the same pid.
const GATE = [
  'IFS= read -r _ || exit 125',
  'cmd=$1; n=$2; shift 2',
  'while [ "$n" -gt 0 ]; do echo 0 2>&3 >"$1" || exit 125; n=$((n - 1)); shift; done',
  'exec </dev/null 2>&1 3>&-',
  'if [ $# -gt 0 ]; then exec setpriv "$@" -- /bin/sh -c "$cmd"; fi',
  'exec /bin/sh -c "$cmd"',
].join('\n');
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

/** The step's process, held at its gate: spawned, and what will tell how it went. */
interface Gated {
  readonly subprocess: ChildProcess;
  readonly pid: number | undefined;
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  readonly failed: Promise<Error>;
  /** What the gate said went wrong moving itself into the sandbox ('' when nothing did). */
  readonly joinProblem: Promise<string>;
  /** Without a sandbox: the environment tag that finds what the step leaves behind (see leftovers.ts). */
  readonly tag: string | undefined;
}

/**
 * Runs one step through `sh -c` in its own process group (and sandbox, when given), streaming its combined
 * output to `logFile`. When the main process exits, everything it left running is killed. A timeout or abort
 * sends SIGTERM to the whole step, then SIGKILL after the grace period.
 */
export async function runStep(input: RunStepInput): Promise<StepOutcome> {
  // The log file is opened while the step is spawned and moved into its sandbox: it waits at its gate till then.
  const opening = LogSink.create(
    input.logFile,
    input.maxLogBytes,
    new StreamMasker(input.secrets ?? []),
    input.onOutput,
  );
  const gated = spawnGated(input);
  const sink = await release(gated, opening, input);
  // Attached after the release (the pipe holds what comes first): the step starts while this is set up.
  const output = gated.subprocess.stdout ? pipeline(gated.subprocess.stdout, sink) : Promise.resolve();
  output.catch(() => {}); // awaited below; avoid an unhandled rejection while the step runs
  const stopper = new Stopper(gated.pid, input.sandbox, input.killGraceMs);
  try {
    const { code, signal, spawnError } = await waitForEnd(gated, stopper, input);
    // Whatever the step left behind (background jobs, daemons) dies with it.
    if (gated.pid !== undefined) killGroup(gated.pid, 'SIGKILL');
    const leftoversKilled = gated.tag && gated.pid !== undefined ? killTagged(gated.tag, gated.pid) : 0;
    const accounting = input.sandbox ? await input.sandbox.close() : NO_ACCOUNTING;
    stopper.dispose();
    await drain(output, sink, gated.subprocess.stdout);
    return {
      exitCode: code ?? (signal ? 128 + signalNumber(signal) : 1),
      signal,
      stoppedFor: stopper.reason,
      logBytes: sink.written,
      logTruncated: sink.truncated,
      accounting,
      spawnError,
      leftoversKilled,
    };
  } finally {
    stopper.dispose();
    if (!sink.destroyed && !sink.writableFinished) sink.destroy();
  }
}

/** Spawns the step's gate in a process group of its own; the command waits there for its release. */
function spawnGated(input: RunStepInput): Gated {
  const sandbox = input.sandbox;
  const selfJoin = sandbox && 'selfJoin' in sandbox ? sandbox.selfJoin : [];
  const gate = ['-c', GATE, 'mqtt-fs-worker-step', input.command, String(selfJoin.length), ...selfJoin];
  // Without a sandbox, the environment tag is what finds the processes that left the step's group (leftovers.ts).
  const tag = sandbox ? undefined : newStepTag();
  // node:child_process rather than execa: the gate needs raw control of the child (its own process group, stdin
  // as the release, output streamed, the bare exit event) and execa's load time would be paid on every job.
  const subprocess = spawn('/bin/sh', [...gate, ...(input.setpriv ?? [])], {
    cwd: input.cwd,
    env: tag ? { ...input.env, [TAG_VARIABLE]: tag } : input.env,
    // Descriptor 3 carries what went wrong if the gate could not move itself into the sandbox.
    stdio: ['pipe', 'pipe', 'ignore', ...(selfJoin.length > 0 ? (['pipe'] as const) : [])],
    detached: true,
  });
  const control = subprocess.stdio[3] as Readable | undefined;
  subprocess.stdin?.on('error', () => {}); // EPIPE when the step is gone before its release
  return {
    subprocess,
    pid: subprocess.pid,
    // Listened to at once: the step can end while the log is being opened.
    exited: new Promise((resolve) => subprocess.once('exit', (code, signal) => resolve({ code, signal }))),
    failed: new Promise((resolve) => subprocess.once('error', resolve)),
    joinProblem: control ? readAll(control) : Promise.resolve(''),
    tag,
  };
}

/** Once the log is open and the step in its sandbox, lets the command run; a failure kills it unreleased. */
async function release(gated: Gated, opening: Promise<LogSink>, input: RunStepInput): Promise<LogSink> {
  const { pid, subprocess } = gated;
  const sandbox = input.sandbox;
  let sink: LogSink;
  try {
    const join = sandbox && 'join' in sandbox && pid !== undefined ? sandbox.join(pid) : undefined;
    [sink] = await Promise.all([opening, join]);
  } catch (error) {
    // Never released: the step must not outlive the failure.
    if (pid !== undefined) killGroup(pid, 'SIGKILL');
    (await opening.catch(() => undefined))?.destroy();
    throw error;
  }
  if (pid !== undefined) {
    subprocess.stdin?.end('go\n');
    input.onStarted?.();
  }
  return sink;
}

/** Waits for the step's main process, stopping it on a timeout or an abort (whose reason is the StopReason). */
async function waitForEnd(
  gated: Gated,
  stopper: Stopper,
  input: RunStepInput,
): Promise<{ code: number | null; signal: NodeJS.Signals | null; spawnError: string | null }> {
  if (gated.pid === undefined) {
    const error = (await gated.failed) as NodeJS.ErrnoException;
    return {
      code: 127,
      signal: null,
      spawnError: `cannot start the step in ${input.cwd}: ${error.code ?? error.message}`,
    };
  }
  const onAbort = (): void => stopper.stop(stopReasonOf(input.signal?.reason));
  const timer =
    input.timeoutMs === undefined ? undefined : setTimeout(() => stopper.stop('timeout'), input.timeoutMs);
  if (input.signal?.aborted) onAbort();
  else input.signal?.addEventListener('abort', onAbort, { once: true });
  try {
    const { code, signal } = await gated.exited;
    const problem = (await gated.joinProblem).trim();
    return { code, signal, spawnError: problem ? `cannot move the step into its cgroup: ${problem}` : null };
  } finally {
    clearTimeout(timer);
    input.signal?.removeEventListener('abort', onAbort);
  }
}

/** Stops a step once: SIGTERM to its group and sandbox, SIGKILL after the grace. Remembers why it stopped it. */
class Stopper {
  reason: StopReason | null = null;
  #grace: NodeJS.Timeout | undefined;
  readonly #pid: number | undefined;
  readonly #sandbox: StepSandbox | undefined;
  readonly #graceMs: number;

  constructor(pid: number | undefined, sandbox: StepSandbox | undefined, graceMs: number) {
    this.#pid = pid;
    this.#sandbox = sandbox;
    this.#graceMs = graceMs;
  }

  stop(reason: StopReason): void {
    const pid = this.#pid;
    if (this.reason || pid === undefined) return;
    this.reason = reason;
    killGroup(pid, 'SIGTERM');
    void this.#sandbox?.signal('SIGTERM').catch(() => {});
    this.#grace = setTimeout(() => {
      killGroup(pid, 'SIGKILL');
      void this.#sandbox?.signal('SIGKILL').catch(() => {});
    }, this.#graceMs);
  }

  dispose(): void {
    clearTimeout(this.#grace);
  }
}

/**
 * Everything a stream carries until it closes, as text (a few lines at most). Plain events: an async iterator
 * costs a job ~1 ms of stream machinery.
 */
function readAll(stream: Readable): Promise<string> {
  return new Promise((resolve) => {
    let text = '';
    stream.on('data', (chunk: Buffer) => {
      text += chunk.toString();
    });
    stream.on('error', () => {}); // 'close' follows
    stream.once('close', () => resolve(text));
  });
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
