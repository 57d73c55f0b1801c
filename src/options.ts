import path from 'node:path';
import { describeValue, ErrorCode, WorkerError } from './errors.js';
import { idProblem, MAX_ID_LENGTH } from './paths.js';
import { parseDuration, parseSizeValue } from './units.js';

/** Everything the worker can be told, after defaults and validation. Frozen. */
export interface Options {
  readonly url: string;
  readonly username: string | undefined;
  readonly password: string | undefined;
  readonly id: string;
  readonly jobsDir: string;
  readonly workspacesDir: string;
  readonly topic: string;
  readonly clean: boolean;
  /** Grace between SIGTERM and SIGKILL when a step is stopped. */
  readonly killGraceMs: number;
  /** Per-step log cap; past it the step keeps running and its log ends with a marker line. */
  readonly maxLogBytes: number;
}

/** What the command line gave (commander's parsed flags): strings and booleans, all optional. */
export type OptionFlags = Partial<Record<keyof Options, string | boolean>>;

interface OptionDef<K extends keyof Options> {
  readonly key: K;
  readonly flags: string;
  readonly env: string;
  readonly description: string;
  readonly defaultText?: string;
  readonly boolean?: boolean;
}

/** The option table: commander's help and `resolveOptions` both read it, so names and variables never drift. */
export const OPTION_DEFS: readonly OptionDef<keyof Options>[] = [
  {
    key: 'url',
    flags: '-u, --url <url>',
    env: 'MQTT_URL',
    description: 'broker URL (mqtt, mqtts, ws, wss)',
    defaultText: 'mqtt://localhost:1883',
  },
  { key: 'username', flags: '-n, --username <user>', env: 'MQTT_USERNAME', description: 'broker user' },
  {
    key: 'password',
    flags: '-p, --password <password>',
    env: 'MQTT_PASSWORD',
    description: 'broker password',
  },
  {
    key: 'id',
    flags: '-i, --id <id>',
    env: 'WORKER_ID',
    description: 'worker id, also the MQTT client id',
    defaultText: 'the host name',
  },
  {
    key: 'jobsDir',
    flags: '-j, --jobs-dir <dir>',
    env: 'MQTT_JOBS_DIR',
    description: 'root of job folders (shared drive)',
    defaultText: './jobs',
  },
  {
    key: 'workspacesDir',
    flags: '-w, --workspaces-dir <dir>',
    env: 'MQTT_WORKSPACES_DIR',
    description: 'root of local workspaces',
    defaultText: './workspaces',
  },
  {
    key: 'topic',
    flags: '-t, --topic <topic>',
    env: 'MQTT_TOPIC',
    description: 'subscription, e.g. $share/workers/jobs/pending',
    defaultText: 'jobs/pending',
  },
  {
    key: 'clean',
    flags: '--clean',
    env: 'MQTT_CLEAN',
    description: 'clean MQTT session (loses the jobs queued for this worker)',
    defaultText: 'false',
    boolean: true,
  },
  {
    key: 'killGraceMs',
    flags: '--kill-grace <duration>',
    env: 'MQTT_KILL_GRACE',
    description: 'time between SIGTERM and SIGKILL when a step is stopped',
    defaultText: '10s',
  },
  {
    key: 'maxLogBytes',
    flags: '--max-log-size <size>',
    env: 'MQTT_MAX_LOG_SIZE',
    description: 'per-step log cap; the step keeps running past it',
    defaultText: '100M',
  },
];

export interface ResolveContext {
  /** Directory that relative paths are resolved against. */
  readonly cwd: string;
  /** The host name, for the default worker id. */
  readonly hostname: string;
}

const TRUE = new Set(['1', 'true', 'yes', 'on']);
const FALSE = new Set(['0', 'false', 'no', 'off', '']);
const URL_PROTOCOLS = new Set(['mqtt:', 'mqtts:', 'ws:', 'wss:', 'tcp:', 'ssl:', 'tls:']);

/** A worker id from a host name: its safe characters, never empty, within the id length limit. */
export function defaultWorkerId(hostname: string): string {
  const safe = hostname
    .replace(/[^A-Za-z0-9_.-]+/g, '-')
    .replace(/^[^A-Za-z0-9]+/, '')
    .slice(0, MAX_ID_LENGTH);
  return safe || 'worker';
}

/**
 * Merges command-line flags over environment variables over defaults, validates every value and returns a frozen
 * options object. Pure: the environment, working directory and host name come in as arguments. Every invalid
 * value is reported at once (INVALID_OPTION), each naming the option, what was expected and what was given.
 */
export function resolveOptions(
  flags: OptionFlags,
  env: Readonly<Record<string, string | undefined>>,
  context: ResolveContext,
): Options {
  const problems: string[] = [];
  const raw = (key: keyof Options): { value: string | boolean | undefined; from: string } => {
    const def = OPTION_DEFS.find((d) => d.key === key);
    if (!def) throw new Error(`no option ${key}`);
    const longFlag = def.flags.split(/[ ,]+/).find((part) => part.startsWith('--')) ?? def.flags;
    if (flags[key] !== undefined) return { value: flags[key], from: longFlag };
    if (env[def.env] !== undefined) return { value: env[def.env], from: def.env };
    return { value: undefined, from: longFlag };
  };
  const text = (key: keyof Options, fallback: string): string => {
    const { value } = raw(key);
    return typeof value === 'string' ? value : fallback;
  };
  const optionalText = (key: keyof Options): string | undefined => {
    const { value } = raw(key);
    return typeof value === 'string' && value !== '' ? value : undefined;
  };
  const bool = (key: keyof Options): boolean => {
    const { value, from } = raw(key);
    if (typeof value === 'boolean' || value === undefined) return value ?? false;
    const lower = value.trim().toLowerCase();
    if (TRUE.has(lower)) return true;
    if (!FALSE.has(lower)) problems.push(`${from}: expected true or false, got ${describeValue(value)}`);
    return false;
  };
  const parsed = (
    key: keyof Options,
    fallback: string,
    parse: (v: string) => number | undefined,
    expected: string,
  ): number => {
    const { value, from } = raw(key);
    const given = typeof value === 'string' ? value : fallback;
    const result = parse(given);
    if (result === undefined) {
      problems.push(`${from}: expected ${expected}, got ${describeValue(given)}`);
      return 0;
    }
    return result;
  };

  const url = text('url', 'mqtt://localhost:1883');
  try {
    const protocol = new URL(url).protocol;
    if (!URL_PROTOCOLS.has(protocol))
      problems.push(`--url: expected an mqtt://, mqtts://, ws:// or wss:// URL, got ${describeValue(url)}`);
  } catch {
    problems.push(`--url: expected a URL like mqtt://broker:1883, got ${describeValue(url)}`);
  }

  const id = text('id', defaultWorkerId(context.hostname));
  const idIssue = idProblem(id, 'worker id');
  if (idIssue) problems.push(`--id: ${idIssue}`);

  const topic = text('topic', 'jobs/pending');
  if (topic === '' || topic.includes('\0'))
    problems.push(`--topic: expected an MQTT topic filter, got ${describeValue(topic)}`);

  const dir = (key: 'jobsDir' | 'workspacesDir', fallback: string): string => {
    const value = text(key, fallback);
    if (value === '' || value.includes('\0'))
      problems.push(`${raw(key).from}: expected a directory path, got ${describeValue(value)}`);
    return path.resolve(context.cwd, value);
  };

  const options: Options = {
    url,
    username: optionalText('username'),
    password: optionalText('password'),
    id,
    jobsDir: dir('jobsDir', './jobs'),
    workspacesDir: dir('workspacesDir', './workspaces'),
    topic,
    clean: bool('clean'),
    killGraceMs: parsed('killGraceMs', '10s', parseDuration, 'a duration like "10s"'),
    maxLogBytes: parsed('maxLogBytes', '100M', parseSizeValue, 'a size like "100M"'),
  };
  if (problems.length > 0) {
    throw new WorkerError(ErrorCode.INVALID_OPTION, problems.join('\n'), { problems });
  }
  return Object.freeze(options);
}
