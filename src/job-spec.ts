import path from 'node:path';
import { z } from 'zod';
import { describeValue, ErrorCode, WorkerError } from './errors.js';
import { idProblem } from './paths.js';
import { signatureProblem } from './signing.js';
import { parseDuration, parseSizeValue } from './units.js';

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
export interface RequestedLimits {
  readonly cpus?: number;
  readonly memoryBytes?: number;
  readonly pids?: number;
}

export interface JobSpec {
  readonly steps: readonly StepSpec[];
  readonly env: Readonly<Record<string, string>>;
  readonly timeoutMs: number | undefined;
  readonly limits: RequestedLimits;
  readonly artifacts: { readonly include: readonly string[]; readonly exclude: readonly string[] };
}

/** A request message after validation. */
export interface JobRequest {
  readonly id: string;
  /** Steps that override `job.json`'s; a request with steps needs no job folder. */
  readonly steps: readonly RawStep[] | undefined;
}

export const MAX_STEPS = 1000;
export const MAX_JOB_FILE_BYTES = 1024 * 1024;

const ENV_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;

const duration = z.unknown().transform((value, ctx) => {
  const parsed = parseDuration(value);
  if (parsed === undefined) {
    ctx.addIssue({
      code: 'custom',
      message: `Expected a duration like "90s", "10m" or "1h" (or a number of seconds), got ${describeValue(value)}`,
    });
    return z.NEVER;
  }
  return parsed;
});

const size = z.unknown().transform((value, ctx) => {
  const parsed = parseSizeValue(value);
  if (parsed === undefined) {
    ctx.addIssue({
      code: 'custom',
      message: `Expected a size like "512M" or "2G" (or a number of bytes), got ${describeValue(value)}`,
    });
    return z.NEVER;
  }
  return parsed;
});

const nonEmptyCommand = z
  .string({ error: (issue) => `Expected a command string, got ${describeValue(issue.input)}` })
  .refine((value) => value.trim().length > 0, 'Expected a non-empty command')
  .refine((value) => !value.includes('\0'), 'A command cannot contain a NUL character');

const envMap = z
  .record(
    z.string().regex(ENV_NAME, 'Expected environment variable names like NODE_ENV'),
    z.union([z.string(), z.number(), z.boolean()], {
      error: (issue) => `Expected a string, number or boolean, got ${describeValue(issue.input)}`,
    }),
  )
  .transform((env, ctx) => {
    const out: Record<string, string> = {};
    for (const [name, value] of Object.entries(env)) {
      const text = String(value);
      if (text.includes('\0'))
        ctx.addIssue({ code: 'custom', path: [name], message: 'Contains a NUL character' });
      out[name] = text;
    }
    return out;
  });

const stepObject = z.strictObject({
  name: z.string().min(1).max(200).optional(),
  run: nonEmptyCommand,
  timeout: duration.optional(),
  env: envMap.optional(),
  continueOnError: z.boolean().optional(),
});

// Dispatch on the shape first, so that a step object's own problems are reported at their path
// (`steps[1].timeout: …`) rather than as one vague "matches neither" union error.
const rawStep = z.unknown().transform((value, ctx): string | z.output<typeof stepObject> => {
  const schema =
    typeof value === 'string'
      ? nonEmptyCommand
      : value !== null && typeof value === 'object' && !Array.isArray(value)
        ? stepObject
        : undefined;
  if (!schema) {
    ctx.addIssue({
      code: 'custom',
      message: `Expected a command string or a step object like {"run": "npm test"}, got ${describeValue(value)}`,
    });
    return z.NEVER;
  }
  const parsed = schema.safeParse(value);
  if (parsed.success) return parsed.data;
  for (const issue of parsed.error.issues)
    ctx.addIssue({ code: 'custom', message: issue.message, path: issue.path });
  return z.NEVER;
});
export type RawStep = string | z.input<typeof stepObject>;

const stepList = z
  .array(rawStep, { error: (issue) => `Expected an array of steps, got ${describeValue(issue.input)}` })
  .min(1, 'Expected at least one step')
  .max(MAX_STEPS, `Expected at most ${MAX_STEPS} steps`);

const globPattern = z
  .string()
  .min(1)
  .refine(
    (pattern) => !path.isAbsolute(pattern) && !pattern.split('/').includes('..'),
    'Expected a relative glob without ".." segments',
  );

const jobFile = z.strictObject({
  steps: stepList,
  env: envMap.optional(),
  timeout: duration.optional(),
  limits: z
    .strictObject({
      cpus: z
        .number({ error: (issue) => `Expected a number of CPUs like 1.5, got ${describeValue(issue.input)}` })
        .positive()
        .max(4096)
        .optional(),
      memory: size.optional(),
      pids: z.number().int().positive().max(4_194_304).optional(),
    })
    .optional(),
  artifacts: z
    .strictObject({
      include: z.array(globPattern).min(1).optional(),
      exclude: z.array(globPattern).optional(),
    })
    .optional(),
});

type ParsedStep = z.output<typeof stepObject> | string;

/** `steps[1].timeout: Expected …` for every issue; zod's own wording where ours is not set. */
function formatIssues(error: z.ZodError, prefix = ''): string[] {
  return error.issues.map((issue) => {
    const where = issue.path.reduce<string>(
      (acc, key) =>
        typeof key === 'number' ? `${acc}[${key}]` : acc ? `${acc}.${String(key)}` : String(key),
      prefix,
    );
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
  if (stepsOverride && json !== null && typeof json === 'object' && !Array.isArray(json)) {
    json = { ...json, steps: stepsOverride };
  }
  const parsed = jobFile.safeParse(json);
  if (!parsed.success) {
    const problems = formatIssues(parsed.error);
    throw new WorkerError(ErrorCode.INVALID_JOB_FILE, `${source} is invalid: ${problems.join('; ')}`, {
      problems,
    });
  }
  const spec = parsed.data;
  return {
    steps: toStepSpecs(spec.steps),
    env: spec.env ?? {},
    timeoutMs: spec.timeout,
    limits: { cpus: spec.limits?.cpus, memoryBytes: spec.limits?.memory, pids: spec.limits?.pids },
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
 * usable (and, with a secret, signed), so that an `error` result can be published for it.
 */
export function parseRequest(payload: Buffer | string, policy: RequestPolicy = {}): RequestParse {
  const maxBytes = policy.maxBytes ?? 256 * 1024;
  const reject = (code: ErrorCode, message: string, id?: string, problems?: string[]): RequestParse => ({
    ok: false,
    id,
    error: new WorkerError(code, message, problems ? { problems } : {}),
  });
  const bytes = typeof payload === 'string' ? Buffer.byteLength(payload) : payload.length;
  if (bytes === 0) return reject(ErrorCode.INVALID_PAYLOAD, 'Request is empty; expected {"id": "..."}');
  if (bytes > maxBytes) {
    return reject(ErrorCode.INVALID_PAYLOAD, `Request is ${bytes} bytes, more than the ${maxBytes} allowed`);
  }
  let json: unknown;
  try {
    json = JSON.parse(typeof payload === 'string' ? payload : payload.toString('utf8'));
  } catch {
    return reject(ErrorCode.INVALID_PAYLOAD, 'Request is not JSON; expected {"id": "..."}');
  }
  if (json === null || typeof json !== 'object' || Array.isArray(json)) {
    return reject(
      ErrorCode.INVALID_PAYLOAD,
      `Request must be a JSON object like {"id": "..."}, got ${describeValue(json)}`,
    );
  }
  const record = json as Record<string, unknown>;
  if (policy.secret !== undefined) {
    const problem = signatureProblem(
      record,
      policy.secret,
      policy.maxAgeMs ?? 300_000,
      policy.nowMs ?? Date.now(),
    );
    // An unverified id is not used: no result is published for it, so a forger cannot speak for a real job.
    if (problem) return reject(ErrorCode.INVALID_SIGNATURE, `Request rejected: ${problem}`);
  }
  const badId = idProblem(record.id);
  if (badId) return reject(ErrorCode.INVALID_ID, `Request rejected: ${badId}`);
  const id = record.id as string;
  if (record.steps === undefined) return { ok: true, request: { id, steps: undefined } };
  if (policy.allowSteps === false) {
    return reject(
      ErrorCode.INVALID_PAYLOAD,
      'Request rejected: it carries its own steps, and this worker runs only job.json (--no-payload-steps)',
      id,
    );
  }
  const steps = stepList.safeParse(record.steps);
  if (!steps.success) {
    const problems = formatIssues(steps.error, 'steps').slice(0, MAX_PAYLOAD_PROBLEMS);
    return reject(
      ErrorCode.INVALID_PAYLOAD,
      `Request has invalid steps: ${problems.join('; ')}`,
      id,
      problems,
    );
  }
  return { ok: true, request: { id, steps: record.steps as RawStep[] } };
}
