import path from 'node:path';
import { describeValue, ErrorCode, WorkerError } from '../shared/errors.js';
import { idProblem, isDryRunId, MAX_ID_LENGTH } from '../shared/ids.js';
import { isShared, plainTopic, topicMatches } from '../shared/topics.js';
import { parseDuration, parseSizeValue } from '../shared/units.js';
import { OPTION_DEFS } from './option-table.js';
import type { Kind, OptionDef, OptionFlags, Options } from './options.js';

// Options from flags, then environment variables, then defaults: every problem found at once (INVALID_OPTION).

export interface ResolveContext {
  /** Directory that relative paths are resolved against. */
  readonly cwd: string;
  /** The host name, for the default worker id. */
  readonly hostname: string;
}

const TRUE = new Set(['1', 'true', 'yes', 'on']);

const FALSE = new Set(['0', 'false', 'no', 'off', '']);

const URL_PROTOCOLS = new Set(['mqtt:', 'mqtts:', 'ws:', 'wss:', 'tcp:', 'ssl:', 'tls:']);

const OFF = new Set(['off', 'never', 'none', '0']);

/** A worker id from a host name: its safe characters, never empty, within the id length limit. */
export function defaultWorkerId(hostname: string): string {
  const safe = hostname
    .replace(/[^A-Za-z0-9_.-]+/g, '-')
    .replace(/^[^A-Za-z0-9]+/, '')
    .slice(0, MAX_ID_LENGTH);
  return safe || 'worker';
}

/** The long flag of a definition, for messages (`--kill-grace`). */
export function longFlag(def: OptionDef): string {
  return def.flags.split(/[ ,]+/).find((part) => part.startsWith('--')) ?? def.flags;
}

/**
 * Merges command-line flags over environment variables over defaults, validates every value and returns a frozen
 * options object. Pure: the environment, working directory and host name come in as arguments. Every invalid
 * value is reported at once (INVALID_OPTION), each naming the option, what was expected and what was given.
 */
/**
 * Pull dispatch (a plain topic): every slot's session holds a copy of every request, and the claims on the shared
 * drive (with the index of running jobs) keep each job safe, so the session of a slot that never returns can
 * expire: a day outlasts any restart or maintenance, and bounds what an abandoned session piles up. A shared
 * subscription's session holds the only copy of each job dealt to it: it never expires (retire it with drain).
 */
/**
 * The share group of a slot in a fan-out of `k`: its id's last number (slots named by ordinal, `slot-1`, a
 * StatefulSet's `worker-0`, `node12-slot3`, `jobs2-worker-1`: spread evenly over the groups), else a hash of its
 * id. The last number, not the first: a host or project number before the ordinal would put every slot of a host
 * in one group, and a fan-out of K would be one share group.
 */
export function fanoutGroup(id: string, k: number): number {
  const ordinal = id.match(/\d+/g)?.at(-1);
  if (ordinal !== undefined) return Number(BigInt(ordinal) % BigInt(k));
  let hash = 0x811c9dc5;
  for (const char of id) hash = Math.imul(hash ^ (char.codePointAt(0) ?? 0), 0x01000193) >>> 0;
  return hash % k;
}

export function resolveOptions(
  flags: OptionFlags,
  env: Readonly<Record<string, string | undefined>>,
  context: ResolveContext,
): Options {
  const problems: string[] = [];
  const values: Record<string, unknown> = {};
  for (const def of OPTION_DEFS) {
    const fromFlag = flags[def.key];
    const given = fromFlag ?? env[def.env];
    const from = fromFlag !== undefined || env[def.env] === undefined ? longFlag(def) : def.env;
    const problem = (expected: string): void => {
      problems.push(`${from}: expected ${expected}, got ${describeValue(given)}`);
    };
    if (def.repeatable) {
      // Each of several values (`--topic a --topic b`, or `MQTT_TOPIC=a,b`) is checked on its own.
      const parts =
        typeof given === 'string'
          ? given
              .split(',')
              .map((part) => part.trim())
              .filter(Boolean)
          : [];
      const all =
        parts.length > 0
          ? parts.map((part) => resolveOne(def.kind, part, problem, context))
          : [resolveOne(def.kind, given, problem, context)];
      values[def.key] = all[0];
      values[`${def.key}s`] = [...new Set(all)];
    } else values[def.key] = resolveOne(def.kind, given, problem, context);
  }

  const options = values as unknown as Options & { id: string };
  if (options.id === '') (options as { id: string }).id = defaultWorkerId(context.hostname);
  problems.push(...checkTogether(options, flags, env));
  if (problems.length > 0) {
    throw new WorkerError(ErrorCode.INVALID_OPTION, problems.join('\n'), { problems });
  }
  return Object.freeze(options);
}

/**
 * What only the options together can tell: ids, URLs, topics that would catch the worker's own messages, pairs that
 * go together. Fills in what depends on others (the response-topic prefix, the session expiry in seconds).
 */
function checkTogether(
  options: Options & { id: string },
  flags: OptionFlags,
  env: Readonly<Record<string, string | undefined>>,
): string[] {
  const problems: string[] = [];
  const idIssue = idProblem(options.id, 'worker id');
  if (idIssue) problems.push(`--id: ${idIssue}`);
  if (isDryRunId(options.id))
    problems.push(`--id: dry-run-N names are kept for dry runs, got ${describeValue(options.id)}`);
  try {
    if (!URL_PROTOCOLS.has(new URL(options.url).protocol)) {
      problems.push(
        `--url: expected an mqtt://, mqtts://, ws:// or wss:// URL, got ${describeValue(options.url)}`,
      );
    }
  } catch {
    problems.push(`--url: expected a URL like mqtt://broker:1883, got ${describeValue(options.url)}`);
  }
  problems.push(...resolveTopics(options));
  const expiryGiven = flags.sessionExpirySeconds !== undefined || env.MQTT_SESSION_EXPIRY !== undefined;
  // Several copies of each request (pull, or a fan-out of 2 or more): a session may expire; the only copy may not.
  const onlyCopy = options.fanout === 1 || (options.fanout === undefined && options.topics.some(isShared));
  const expiryMs = expiryGiven ? options.sessionExpirySeconds : onlyCopy ? undefined : 24 * 60 * 60 * 1000;
  (options as { sessionExpirySeconds: number | undefined }).sessionExpirySeconds =
    expiryMs === undefined ? undefined : Math.ceil(expiryMs / 1000);
  if (options.keepaliveMs !== undefined && options.keepaliveMs < 1000) {
    problems.push(`--keepalive: expected at least 1s, got ${options.keepaliveMs}ms`);
  }
  if ((options.certFile === undefined) !== (options.keyFile === undefined)) {
    problems.push('--cert and --key: expected both or neither');
  }
  return problems;
}

/**
 * The topics as subscribed and published: the fan-out groups, the logs topic and the response-topic prefix ("off"
 * turns them off), and a jobs topic that would also take the worker's own messages (refused).
 */
function resolveTopics(options: Options & { id: string }): string[] {
  const problems: string[] = [];
  if (options.fanout === 0) (options as { fanout: number | undefined }).fanout = undefined;
  if (options.fanout !== undefined) {
    const shared = options.topics.filter(isShared);
    if (shared.length > 0)
      problems.push(
        `--fanout: applies to plain topics, and ${describeValue(shared[0])} is a $share/ subscription already`,
      );
    const group = `mqtt-fs-worker-fanout-${fanoutGroup(options.id, options.fanout)}`;
    const topics = options.topics.map((topic) => `$share/${group}/${topic}`);
    Object.assign(options, { topics, topic: topics[0] });
  }
  if (options.logsTopic !== undefined && OFF.has(options.logsTopic.trim().toLowerCase()))
    (options as { logsTopic: string | undefined }).logsTopic = undefined;
  const prefix = options.responseTopicPrefix;
  const prefixOff = prefix !== undefined && OFF.has(prefix.trim().toLowerCase());
  (options as { responseTopicPrefix: string | undefined }).responseTopicPrefix =
    prefix === undefined ? `${options.resultsTopic}/` : prefixOff ? undefined : prefix;
  if (prefix !== undefined && !prefixOff && (/[+#\0]/.test(prefix) || prefix.startsWith('$'))) {
    problems.push(
      `--response-topic-prefix: expected a topic prefix without wildcards, not starting with $, got ${describeValue(prefix)}`,
    );
  }
  for (const topic of options.topics) {
    const filter = plainTopic(topic);
    const own = (
      ['resultsTopic', 'statusTopic', 'cancelTopic', 'presenceTopic', 'rejectedTopic', 'logsTopic'] as const
    ).find((key) => {
      const root = options[key];
      return root !== undefined && (topicMatches(filter, `${root}/x`) || topicMatches(filter, root));
    });
    // A jobs topic that also takes the worker's own messages would treat every result as a request.
    if (own)
      problems.push(
        `--topic: ${describeValue(topic)} also matches the worker's own messages on ${options[own]}/…; use a topic of its own, e.g. jobs/pending`,
      );
  }
  return problems;
}

function resolveOne(
  kind: Kind,
  given: string | boolean | undefined,
  problem: (expected: string) => void,
  context: ResolveContext,
): unknown {
  const textValue = typeof given === 'string' ? given : undefined;
  switch (kind.type) {
    case 'text':
      return textValue ?? kind.fallback;
    case 'optional':
      return textValue === '' ? undefined : textValue;
    case 'file':
      if (textValue === undefined || textValue === '') return undefined;
      if (textValue.includes('\0')) problem('a file path');
      return path.resolve(context.cwd, textValue);
    case 'boolean': {
      if (typeof given === 'boolean' || given === undefined) return given ?? false;
      const lower = given.trim().toLowerCase();
      if (TRUE.has(lower)) return true;
      if (!FALSE.has(lower)) problem('true or false');
      return false;
    }
    case 'duration': {
      const value = textValue ?? kind.fallback;
      if (kind.off && OFF.has(value.trim().toLowerCase())) return undefined;
      const parsed = parseDuration(value);
      if (parsed === undefined)
        problem(
          `a duration like "${kind.off ? '10m' : kind.fallback}"${kind.off ? ` or "${kind.fallback}"` : ''}`,
        );
      return parsed ?? 0;
    }
    case 'size': {
      const parsed = parseSizeValue(textValue ?? kind.fallback);
      if (parsed === undefined) problem(`a size like "${kind.fallback}"`);
      return parsed ?? 0;
    }
    case 'choice': {
      const value = textValue ?? kind.fallback;
      if (!kind.choices.includes(value)) problem(`one of ${kind.choices.join(', ')}`);
      return value;
    }
    case 'dir': {
      const value = textValue ?? kind.fallback;
      if (value === '' || value.includes('\0')) problem('a directory path');
      return path.resolve(context.cwd, value);
    }
    case 'list':
      return (textValue ?? '').split(',').filter((value) => value !== '');
    case 'limit': {
      if (textValue === undefined || textValue === '') return undefined;
      const parsed = kind.parse(textValue);
      if (parsed === undefined) problem(kind.expected);
      return parsed;
    }
    case 'topic':
      return resolveTopic(kind, textValue ?? kind.fallback, problem);
  }
}

// A topic the worker publishes to must not be a `$` topic: the broker drops the connection of a client that
// publishes to `$share/…` or `$SYS/…`, and the job would never be acknowledged.
function resolveTopic(
  kind: { readonly filter?: boolean },
  value: string,
  problem: (expected: string) => void,
): string {
  const bad =
    value === '' ||
    value.includes('\0') ||
    value.length > 65535 ||
    (!kind.filter && (/[+#]/.test(value) || value.startsWith('$')));
  if (bad)
    problem(kind.filter ? 'an MQTT topic filter' : 'an MQTT topic without wildcards, not starting with $');
  return value;
}
