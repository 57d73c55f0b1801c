import path from 'node:path';
import * as v from 'valibot';
import { describeValue, ErrorCode, WorkerError } from '../shared/errors.js';
import { idProblem } from '../shared/ids.js';
import { signatureProblem } from '../shared/signing.js';
import { parseDuration, parseSizeValue } from '../shared/units.js';

/** A step as the engine runs it: every default applied. */
export interface StepSpec {
  readonly index: number;
  readonly name: string;
  readonly run: string;
  readonly timeoutMs: number | undefined;
  readonly env: Readonly<Record<string, string>>;
  readonly continueOnError: boolean;
}

/** Limits a job asks for; each may be absent (then the worker's default applies). */
export type { RequestedLimits } from '../limits/index.js';

export interface JobSpec {
  readonly steps: readonly StepSpec[];
  readonly env: Readonly<Record<string, string>>;
  readonly timeoutMs: number | undefined;
  readonly limits: import('../limits/index.js').RequestedLimits;
  readonly artifacts: { readonly include: readonly string[]; readonly exclude: readonly string[] };
}

/** A request message after validation. */
export interface JobRequest {
  readonly id: string;
  /** Steps that override `job.json`'s; a request with steps needs no job folder. */
  readonly steps: readonly RawStep[] | undefined;
  /** A re-run token: a finished job runs again once for each distinct token (see the README's "Re-runs"). */
  readonly rerun?: string;
  /**
   * The MQTT 5 response topic the request's body names: with signed requests, the response topic property is
   * honoured only when the signed body names the same topic (properties are not signed).
   */
  readonly responseTopic?: string;
}

export const MAX_STEPS = 1000;
export const MAX_JOB_FILE_BYTES = 1024 * 1024;

const ENV_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;

// Valibot rather than a larger schema library: the worker starts once per job, and this module is on that path.
// Every problem is collected (no early abort) and reported at its path.

/** A value parsed by `parse`, or an issue with `message` (the value is described in it). */
const parsedWith = <T>(parse: (value: unknown) => T | undefined, expected: string) =>
  v.pipe(
    v.unknown(),
    v.rawTransform<unknown, T>(({ dataset, addIssue, NEVER }) => {
      const parsed = parse(dataset.value);
      if (parsed !== undefined) return parsed;
      addIssue({ message: `Expected ${expected}, got ${describeValue(dataset.value)}` });
      return NEVER;
    }),
  );

const duration = parsedWith(parseDuration, 'a duration like "90s", "10m" or "1h" (or a number of seconds)');
const size = parsedWith(parseSizeValue, 'a size like "512M" or "2G" (or a number of bytes)');

const nonEmptyCommand = v.pipe(
  v.string((issue) => `Expected a command string, got ${describeValue(issue.input)}`),
  v.check((value) => value.trim().length > 0, 'Expected a non-empty command'),
  v.check((value) => !value.includes('\0'), 'A command cannot contain a NUL character'),
);

const envMap = v.pipe(
  v.record(
    v.pipe(v.string(), v.regex(ENV_NAME, 'Expected environment variable names like NODE_ENV')),
    v.pipe(
      v.union(
        [v.string(), v.number(), v.boolean()],
        (issue) => `Expected a string, number or boolean, got ${describeValue(issue.input)}`,
      ),
      v.transform(String),
      v.check((value) => !value.includes('\0'), 'Contains a NUL character'),
    ),
    (issue) => `Expected an object of variables, got ${describeValue(issue.input)}`,
  ),
);

// Messages of object schemas: an unknown key, a missing one, or not an object at all.
const objectIssue = (issue: v.BaseIssue<unknown>): string => {
  if (issue.expected === 'never') return 'Unknown key';
  if (issue.input === undefined && issue.path?.length) return 'Required, but missing';
  return `Expected an object, got ${describeValue(issue.input)}`;
};

const stepObject = v.strictObject(
  {
    name: v.optional(v.pipe(v.string(), v.minLength(1), v.maxLength(200))),
    run: nonEmptyCommand,
    timeout: v.optional(duration),
    env: v.optional(envMap),
    continueOnError: v.optional(
      v.boolean((issue) => `Expected true or false, got ${describeValue(issue.input)}`),
    ),
  },
  objectIssue,
);

// Dispatch on the shape first, so that a step object's own problems are reported at their path
// (`steps[1].timeout: …`) rather than as one vague "matches neither" union error.
const rawStep = v.pipe(
  v.unknown(),
  v.rawTransform<unknown, string | v.InferOutput<typeof stepObject>>(({ dataset, addIssue, NEVER }) => {
    const value = dataset.value;
    const schema =
      typeof value === 'string'
        ? nonEmptyCommand
        : value !== null && typeof value === 'object' && !Array.isArray(value)
          ? stepObject
          : undefined;
    if (!schema) {
      addIssue({
        message: `Expected a command string or a step object like {"run": "npm test"}, got ${describeValue(value)}`,
      });
      return NEVER;
    }
    const parsed = v.safeParse(schema, value);
    if (parsed.success) return parsed.output;
    for (const issue of parsed.issues) addIssue({ message: issue.message, path: issue.path as never });
    return NEVER;
  }),
);
export type RawStep = string | v.InferInput<typeof stepObject>;

const stepList = v.pipe(
  v.array(rawStep, (issue) => `Expected an array of steps, got ${describeValue(issue.input)}`),
  v.minLength(1, 'Expected at least one step'),
  v.maxLength(MAX_STEPS, `Expected at most ${MAX_STEPS} steps`),
);

const globPattern = v.pipe(
  v.string(),
  v.minLength(1),
  v.check(
    (pattern) => !path.isAbsolute(pattern) && !pattern.split('/').includes('..'),
    'Expected a relative glob without ".." segments',
  ),
);

const jobFile = v.strictObject(
  {
    steps: stepList,
    env: v.optional(envMap),
    timeout: v.optional(duration),
    limits: v.optional(
      v.strictObject(
        {
          cpus: v.optional(
            v.pipe(
              v.number((issue) => `Expected a number of CPUs like 1.5, got ${describeValue(issue.input)}`),
              v.gtValue(0, 'Expected more than 0 CPUs'),
              v.maxValue(4096, 'Expected at most 4096 CPUs'),
            ),
          ),
          memory: v.optional(size),
          ioBps: v.optional(size),
          ioReadBps: v.optional(size),
          ioWriteBps: v.optional(size),
          pids: v.optional(
            v.pipe(
              v.number((issue) => `Expected a whole number of processes, got ${describeValue(issue.input)}`),
              v.integer('Expected a whole number of processes'),
              v.minValue(1, 'Expected at least 1 process'),
              v.maxValue(4_194_304, 'Expected at most 4194304 processes'),
            ),
          ),
        },
        objectIssue,
      ),
    ),
    artifacts: v.optional(
      v.strictObject(
        {
          include: v.optional(v.pipe(v.array(globPattern), v.minLength(1, 'Expected at least one pattern'))),
          exclude: v.optional(v.array(globPattern)),
        },
        objectIssue,
      ),
    ),
  },
  objectIssue,
);

type ParsedStep = v.InferOutput<typeof stepObject> | string;

/** `steps[1].timeout: Expected …` for every issue. */
function formatIssues(issues: readonly v.BaseIssue<unknown>[], prefix = ''): string[] {
  return issues.map((issue) => {
    const where = (issue.path ?? []).reduce<string>((acc, item) => {
      const key = item.key;
      return typeof key === 'number' ? `${acc}[${key}]` : acc ? `${acc}.${String(key)}` : String(key);
    }, prefix);
    return where ? `${where}: ${issue.message}` : issue.message;
  });
}

function toStepSpecs(steps: readonly ParsedStep[]): StepSpec[] {
  return steps.map((step, index) =>
    typeof step === 'string'
      ? { index, name: `step ${index}`, run: step, timeoutMs: undefined, env: {}, continueOnError: false }
      : {
          index,
          name: step.name ?? `step ${index}`,
          run: step.run,
          timeoutMs: step.timeout,
          env: step.env ?? {},
          continueOnError: step.continueOnError ?? false,
        },
  );
}

/**
 * Parses and validates a `job.json` text; every problem is reported at once (INVALID_JOB_FILE). When
 * `stepsOverride` is given (a request's own steps), they replace the file's.
 */
export function parseJobFile(text: string, source = 'job.json', stepsOverride?: readonly RawStep[]): JobSpec {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (error) {
    throw new WorkerError(
      ErrorCode.INVALID_JOB_FILE,
      `${source} is not valid JSON: ${(error as Error).message}`,
    );
  }
  if (json === null || typeof json !== 'object' || Array.isArray(json)) {
    const message = `${source} must be an object like {"steps": ["npm test"]}, got ${describeValue(json)}`;
    throw new WorkerError(ErrorCode.INVALID_JOB_FILE, message);
  }
  if (stepsOverride) {
    json = { ...json, steps: stepsOverride };
  }
  const parsed = v.safeParse(jobFile, json);
  if (!parsed.success) {
    const problems = formatIssues(parsed.issues);
    throw new WorkerError(ErrorCode.INVALID_JOB_FILE, `${source} is invalid: ${problems.join('; ')}`, {
      problems,
    });
  }
  const spec = parsed.output;
  return {
    steps: toStepSpecs(spec.steps),
    env: spec.env ?? {},
    timeoutMs: spec.timeout,
    limits: {
      cpus: spec.limits?.cpus,
      memoryBytes: spec.limits?.memory,
      pids: spec.limits?.pids,
      ioReadBps: spec.limits?.ioReadBps ?? spec.limits?.ioBps,
      ioWriteBps: spec.limits?.ioWriteBps ?? spec.limits?.ioBps,
    },
    artifacts: { include: spec.artifacts?.include ?? ['**'], exclude: spec.artifacts?.exclude ?? [] },
  };
}

/** The spec of a request that carries its own steps and has no `job.json`. */
export function specFromSteps(steps: readonly RawStep[]): JobSpec {
  return parseJobFile(JSON.stringify({ steps }), 'request');
}

export type RequestParse =
  | { readonly ok: true; readonly request: JobRequest }
  | { readonly ok: false; readonly id: string | undefined; readonly error: WorkerError };

const MAX_PAYLOAD_PROBLEMS = 20;
/** An oversized request is still read this far to name its id in the rejection. */
const MAX_READ_FOR_ID = 4 * 1024 * 1024;

function usableId(value: unknown): string | undefined {
  return idProblem(value) === undefined ? (value as string) : undefined;
}

function idOf(payload: Buffer | string): string | undefined {
  try {
    const json = JSON.parse(typeof payload === 'string' ? payload : payload.toString('utf8')) as unknown;
    return json && typeof json === 'object' ? usableId((json as { id?: unknown }).id) : undefined;
  } catch {
    return undefined;
  }
}
const MAX_DEPTH = 64;

/** How deeply arrays and objects nest in `value`, without recursion (the input decides the depth). */
function depthOf(value: unknown): number {
  let deepest = 0;
  const stack: [unknown, number][] = [[value, 1]];
  while (stack.length > 0) {
    const [item, depth] = stack.pop() as [unknown, number];
    if (item === null || typeof item !== 'object') continue;
    deepest = Math.max(deepest, depth);
    if (deepest > MAX_DEPTH) return deepest;
    for (const child of Object.values(item)) stack.push([child, depth + 1]);
  }
  return deepest;
}
const MAX_RERUN_LENGTH = 128;

export interface RequestPolicy {
  /** Largest accepted request. */
  readonly maxBytes?: number;
  /** Shared secret: every request must carry a valid signature (signing.ts). */
  readonly secret?: string;
  readonly maxAgeMs?: number;
  readonly nowMs?: number;
  /** False: a request may not carry its own steps (only `job.json`'s run). */
  readonly allowSteps?: boolean;
}

/**
 * Validates a request message. Never throws: a rejected request still says which id it named when that id is
 * usable, so that its rejection can be keyed by it (never a result: the request, not the job, was refused).
 */
export function parseRequest(payload: Buffer | string, policy: RequestPolicy = {}): RequestParse {
  const parsed = parseObject(payload, policy.maxBytes ?? 256 * 1024);
  if (!('record' in parsed)) return parsed;
  const { record } = parsed;
  if (depthOf(record) > MAX_DEPTH) {
    // Signing walks the request recursively: a deeply nested one would overflow the stack on every redelivery.
    const message = `Request is nested more than ${MAX_DEPTH} levels deep`;
    return refuse(ErrorCode.INVALID_PAYLOAD, message, usableId(record.id));
  }
  if (policy.secret !== undefined) {
    const now = policy.nowMs ?? Date.now();
    const problem = signatureProblem(record, policy.secret, policy.maxAgeMs ?? 300_000, now);
    // An unverified id is only a name for the rejection (never a result), so a forger cannot speak for a job.
    if (problem)
      return refuse(ErrorCode.INVALID_SIGNATURE, `Request rejected: ${problem}`, usableId(record.id));
  }
  const badId = idProblem(record.id);
  if (badId) return refuse(ErrorCode.INVALID_ID, `Request rejected: ${badId}`);
  return requestOf(record, record.id as string, policy);
}

function refuse(code: ErrorCode, message: string, id?: string, problems?: string[]): RequestParse {
  return { ok: false, id, error: new WorkerError(code, message, problems ? { problems } : {}) };
}

/** The payload as a JSON object, or its refusal (empty, too large, not JSON, not an object). */
function parseObject(
  payload: Buffer | string,
  maxBytes: number,
): RequestParse | { record: Record<string, unknown> } {
  const bytes = typeof payload === 'string' ? Buffer.byteLength(payload) : payload.length;
  if (bytes === 0) return refuse(ErrorCode.INVALID_PAYLOAD, 'Request is empty; expected {"id": "..."}');
  if (bytes > maxBytes) {
    const message = `Request is ${bytes} bytes, more than the ${maxBytes} allowed`;
    return refuse(ErrorCode.INVALID_PAYLOAD, message, bytes <= MAX_READ_FOR_ID ? idOf(payload) : undefined);
  }
  let json: unknown;
  try {
    json = JSON.parse(typeof payload === 'string' ? payload : payload.toString('utf8'));
  } catch {
    return refuse(ErrorCode.INVALID_PAYLOAD, 'Request is not JSON; expected {"id": "..."}');
  }
  if (json === null || typeof json !== 'object' || Array.isArray(json)) {
    return refuse(
      ErrorCode.INVALID_PAYLOAD,
      `Request must be a JSON object like {"id": "..."}, got ${describeValue(json)}`,
    );
  }
  return { record: json as Record<string, unknown> };
}

/** The keys a request may carry; `meta` holds a controller's own data, which the worker never reads. */
const REQUEST_KEYS = new Set(['id', 'steps', 'rerun', 'responseTopic', 'meta', 'timestamp', 'signature']);

/** The request of a verified object with a safe id: its re-run token, response topic and steps, checked. */
function requestOf(record: Record<string, unknown>, id: string, policy: RequestPolicy): RequestParse {
  // As strict as job.json: a misspelled key ("stpes") must not run job.json's steps instead of the request's.
  const unknown = Object.keys(record).filter((key) => !REQUEST_KEYS.has(key));
  if (unknown.length > 0) {
    const names = unknown.slice(0, 5).map((key) => JSON.stringify(key.slice(0, 40)));
    return refuse(
      ErrorCode.INVALID_PAYLOAD,
      `Request has unknown key${unknown.length > 1 ? 's' : ''} ${names.join(', ')}; a request takes id, steps, rerun, responseTopic, meta (a controller's own data), timestamp and signature`,
      id,
    );
  }
  const meta = record.meta;
  if (meta !== undefined && (meta === null || typeof meta !== 'object' || Array.isArray(meta)))
    return refuse(
      ErrorCode.INVALID_PAYLOAD,
      `Expected \`meta\` to be an object, got ${describeValue(meta)}`,
      id,
    );
  const rerun = record.rerun;
  if (
    rerun !== undefined &&
    (typeof rerun !== 'string' || rerun.length === 0 || rerun.length > MAX_RERUN_LENGTH)
  ) {
    return refuse(
      ErrorCode.INVALID_PAYLOAD,
      `Expected \`rerun\` to be a token of 1-${MAX_RERUN_LENGTH} characters that is new for each re-run, got ${describeValue(rerun)}`,
      id,
    );
  }
  const responseTopic = typeof record.responseTopic === 'string' ? record.responseTopic : undefined;
  const base = {
    id,
    ...(rerun === undefined ? {} : { rerun }),
    ...(responseTopic === undefined ? {} : { responseTopic }),
  };
  if (record.steps === undefined) return { ok: true, request: { ...base, steps: undefined } };
  if (policy.allowSteps === false) {
    return refuse(
      ErrorCode.INVALID_PAYLOAD,
      'Request rejected: it carries its own steps, and this worker runs only job.json (--no-payload-steps)',
      id,
    );
  }
  const steps = v.safeParse(stepList, record.steps);
  if (!steps.success) {
    const problems = formatIssues(steps.issues, 'steps').slice(0, MAX_PAYLOAD_PROBLEMS);
    return refuse(
      ErrorCode.INVALID_PAYLOAD,
      `Request has invalid steps: ${problems.join('; ')}`,
      id,
      problems,
    );
  }
  return { ok: true, request: { ...base, steps: record.steps as RawStep[] } };
}
