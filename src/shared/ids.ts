import { describeValue, ErrorCode, WorkerError } from './errors.js';

// Job and worker ids. Kept apart from paths.ts, which needs node:fs/promises: options use these checks, and
// `--version` and `--help` should not load the file system's promise API to print a line.

export const MAX_ID_LENGTH = 128;
// One path segment that is also a valid MQTT topic level and client id: no `/`, `+`, `#`, NUL, spaces or dots
// at the start (so never `.` or `..` or a hidden file).
const ID_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_.-]*$/;

/** Why `value` is not a usable job or worker id, or undefined when it is one. */
export function idProblem(value: unknown, what = 'id'): string | undefined {
  if (typeof value !== 'string') return `Expected \`${what}\` to be a string, got ${describeValue(value)}`;
  if (value.length === 0) return `Expected \`${what}\` to be a non-empty string`;
  if (value.length > MAX_ID_LENGTH) {
    return `Expected \`${what}\` to be at most ${MAX_ID_LENGTH} characters, got ${value.length}`;
  }
  if (!ID_PATTERN.test(value)) {
    return `Expected \`${what}\` to be letters, digits, '.', '_' or '-' (starting with a letter or digit), got ${describeValue(value)}`;
  }
  return undefined;
}

export function assertJobId(value: unknown): asserts value is string {
  const problem = idProblem(value);
  if (problem) throw new WorkerError(ErrorCode.INVALID_ID, problem);
}

/** The identity of the Nth dry run on a host; a worker id may not look like one (config/resolve.ts refuses it). */
export function dryRunId(n: number): string {
  return `dry-run-${n}`;
}

export function isDryRunId(id: string): boolean {
  return /^dry-run-\d+$/.test(id);
}
