import * as v from 'valibot';
import { describeValue, ErrorCode, WorkerError } from '../shared/errors.js';
import { idProblem } from '../shared/ids.js';
import { signatureProblem } from '../shared/signing.js';
import { formatIssues, type JobRequest, type RawStep, stepList } from './spec.js';

// A job request as it arrives on the jobs topic: parsed, bounded, checked against the slot's policy (signature,
// age, steps allowed), and never thrown out of: every refusal is a typed error with the request's id if it has one.

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
