import path from 'node:path';
import * as v from 'valibot';
import { describeValue, ErrorCode, WorkerError } from '../shared/errors.js';
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

export const stepList = v.pipe(
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
export function formatIssues(issues: readonly v.BaseIssue<unknown>[], prefix = ''): string[] {
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
