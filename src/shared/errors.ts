/**
 * Exit codes of the worker process. One table, documented in the README; `cli/` is the only place that maps
 * errors onto them.
 */
export const ExitCode = {
  /** A job was handled and its result published (whatever its status), or a command succeeded. */
  OK: 0,
  /**
   * `--dry-run` or `submit --wait`: the job ran but did not succeed; `validate`: problems were found; `drain`:
   * refused (the slot is online) or not done.
   */
  JOB_NOT_SUCCESSFUL: 1,
  /** Invalid option, environment variable or arguments. */
  USAGE: 2,
  /** The broker could not be reached (or the connection was lost) within the connect timeout. */
  BROKER_UNREACHABLE: 3,
  /** The broker refused the connection: bad credentials, not authorised, client id rejected. */
  BROKER_REFUSED: 4,
  /** `submit`: no worker took the request, or no result came, within `--timeout`. */
  TIMEOUT: 5,
  /** The worker id is held by another process on this host (one id, one process). */
  ID_IN_USE: 6,
  /** The broker grants less than loss-free delivery needs (QoS 0 only, no shared subscriptions, …). */
  BROKER_UNSUITABLE: 7,
  /** The machine cannot run jobs (the jobs directory is missing, a workspace cannot be written): nothing was taken. */
  NOT_READY: 8,
  /** A bug or an unexpected failure of the worker itself. */
  INTERNAL: 70,
  /** Interrupted by a signal before the job could finish: 128 + the signal number (130 SIGINT, 143 SIGTERM). */
  SIGNAL_BASE: 128,
} as const;

/**
 * Stable error codes. They appear in `result.json` (`error.code`), in result messages and in the worker's log;
 * users match on them, so a code never changes meaning once released.
 */
export const ErrorCode = {
  INVALID_OPTION: 'INVALID_OPTION',
  INVALID_PAYLOAD: 'INVALID_PAYLOAD',
  INVALID_ID: 'INVALID_ID',
  INVALID_SIGNATURE: 'INVALID_SIGNATURE',
  JOB_NOT_FOUND: 'JOB_NOT_FOUND',
  JOB_OUTSIDE_ROOT: 'JOB_OUTSIDE_ROOT',
  JOB_FOLDER_GONE: 'JOB_FOLDER_GONE',
  INVALID_JOB_FILE: 'INVALID_JOB_FILE',
  RESULTS_NOT_DIRECTORY: 'RESULTS_NOT_DIRECTORY',
  CLAIM_FAILED: 'CLAIM_FAILED',
  LIMIT_ABOVE_CEILING: 'LIMIT_ABOVE_CEILING',
  LIMITS_UNAVAILABLE: 'LIMITS_UNAVAILABLE',
  STAGING_FAILED: 'STAGING_FAILED',
  STEP_SPAWN_FAILED: 'STEP_SPAWN_FAILED',
  SYNC_FAILED: 'SYNC_FAILED',
  REPORT_FAILED: 'REPORT_FAILED',
  BROKER_UNREACHABLE: 'BROKER_UNREACHABLE',
  BROKER_REFUSED: 'BROKER_REFUSED',
  INTERRUPTED: 'INTERRUPTED',
  ID_IN_USE: 'ID_IN_USE',
  NO_SPACE: 'NO_SPACE',
  BROKER_UNSUITABLE: 'BROKER_UNSUITABLE',
  NOT_READY: 'NOT_READY',
  SLOT_ONLINE: 'SLOT_ONLINE',
  DRAIN_FAILED: 'DRAIN_FAILED',
  GROUP_UNATTENDED: 'GROUP_UNATTENDED',
  INTERNAL: 'INTERNAL',
} as const;

export type ErrorCode = (typeof ErrorCode)[keyof typeof ErrorCode];

const exitCodeOf: Partial<Record<ErrorCode, number>> = {
  INVALID_OPTION: ExitCode.USAGE,
  BROKER_UNREACHABLE: ExitCode.BROKER_UNREACHABLE,
  BROKER_REFUSED: ExitCode.BROKER_REFUSED,
  ID_IN_USE: ExitCode.ID_IN_USE,
  BROKER_UNSUITABLE: ExitCode.BROKER_UNSUITABLE,
  NOT_READY: ExitCode.NOT_READY,
  SLOT_ONLINE: ExitCode.JOB_NOT_SUCCESSFUL,
  DRAIN_FAILED: ExitCode.JOB_NOT_SUCCESSFUL,
  GROUP_UNATTENDED: ExitCode.JOB_NOT_SUCCESSFUL,
  INTERNAL: ExitCode.INTERNAL,
};

/** The one error type library code throws on purpose: a stable code, a message for humans, an optional cause. */
export class WorkerError extends Error {
  override readonly name = 'WorkerError';
  readonly code: ErrorCode;
  /** Every problem found, for errors that collect several (options, job definitions). */
  readonly problems: readonly string[];

  constructor(
    code: ErrorCode,
    message: string,
    options: { cause?: unknown; problems?: readonly string[] } = {},
  ) {
    super(message, { cause: options.cause });
    this.code = code;
    this.problems = options.problems ?? [message];
  }

  get exitCode(): number {
    return exitCodeOf[this.code] ?? ExitCode.INTERNAL;
  }
}

export function isWorkerError(error: unknown, code?: ErrorCode): error is WorkerError {
  return error instanceof WorkerError && (code === undefined || error.code === code);
}

/** `{code, message}` for the manifest and result messages; anything that is not a WorkerError is INTERNAL. */
export function toErrorInfo(error: unknown): { code: ErrorCode; message: string } {
  // A full drive is the drive's problem, whichever stage met it: say so precisely, never INTERNAL.
  const errno = (error as { code?: unknown; cause?: { code?: unknown } } | undefined) ?? {};
  if ([errno.code, errno.cause?.code].some((code) => code === 'ENOSPC' || code === 'EDQUOT')) {
    return { code: ErrorCode.NO_SPACE, message: `No space left on the drive: ${(error as Error).message}` };
  }
  if (error instanceof WorkerError) return { code: error.code, message: error.message };
  const message = error instanceof Error ? error.message : String(error);
  return { code: ErrorCode.INTERNAL, message: `Internal error: ${message}` };
}

// Errors of the drive itself, not of what is on it: a network filesystem gone away, timing out or handing back a
// stale handle. They decide nothing about a job: the request is left for a slot (or a moment) that can read it.
const DRIVE_FAILURES = new Set([
  'EIO',
  'ENOTCONN',
  'ESTALE',
  'ETIMEDOUT',
  'EHOSTDOWN',
  'EHOSTUNREACH',
  'ENETDOWN',
  'ENETUNREACH',
  'ECONNABORTED',
  'ECONNRESET',
  'ECONNREFUSED',
  'EREMOTEIO',
]);

/** Whether `error` (or its cause) is a failure of the drive itself (see DRIVE_FAILURES). */
export function isDriveFailure(error: unknown): boolean {
  for (let e = error as { code?: unknown; cause?: unknown } | undefined, depth = 0; e && depth < 4; depth++) {
    if (typeof e.code === 'string' && DRIVE_FAILURES.has(e.code)) return true;
    e = e.cause as typeof e;
  }
  return false;
}

/** A short description of an unexpected value for messages: `"ten" (string)`, `[…] (array)`. */
export function describeValue(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return `an array of ${value.length}`;
  if (typeof value === 'string') {
    const shown = value.length > 60 ? `${value.slice(0, 57)}...` : value;
    return `${JSON.stringify(shown)} (string)`;
  }
  if (typeof value === 'object') return 'an object';
  return `${String(value)} (${typeof value})`;
}
