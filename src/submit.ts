import { randomBytes } from 'node:crypto';
import { type BrokerSettings, connectBroker, disconnect, publish } from './broker.js';
import { ErrorCode, WorkerError } from './errors.js';
import { parseRequest, type RawStep } from './job-spec.js';
import type { Logger } from './log.js';
import type { ResultPayload } from './report.js';
import { signRequest } from './signing.js';

export interface SubmitInput {
  readonly settings: BrokerSettings;
  readonly id: string;
  readonly steps: readonly RawStep[] | undefined;
  /** The topic workers subscribe to, e.g. `jobs/pending` (a `$share/group/` prefix is dropped). */
  readonly topic: string;
  readonly resultsTopic: string;
  /** Where workers refuse requests; with `wait`, a refusal of this very request ends the wait. */
  readonly rejectedTopic: string;
  readonly wait: boolean;
  /** How long to wait: for a subscriber to take the request, and with `wait` for the result. */
  readonly timeoutMs: number;
  readonly log: Logger;
  /** Sign the request with this shared secret (workers started with --secret require it). */
  readonly secret?: string;
  /** Ask for a re-run of a finished job: a token new to this request. */
  readonly rerun?: string;
}

export type SubmitOutcome =
  | { readonly kind: 'published' }
  | { readonly kind: 'result'; readonly result: ResultPayload }
  /** A worker refused the request itself (invalid, unsigned, too large): its rejection message. */
  | { readonly kind: 'rejected'; readonly rejection: Record<string, unknown> }
  | { readonly kind: 'timeout'; readonly waitedFor: 'subscriber' | 'result' };

const NO_MATCHING_SUBSCRIBERS = 0x10;

/** `$share/group/jobs/pending` → `jobs/pending`: requests are published to the plain topic. */
export function publishTopic(subscription: string): string {
  const match = /^\$share\/[^/]+\/(.+)$/.exec(subscription);
  return match ? (match[1] as string) : subscription;
}

/**
 * Publishes a job request, retrying while the broker answers that nobody is subscribed (it would drop the
 * message), and with `wait` returns the job's result. The result subscription is made before the request is
 * published, so a fast job's result cannot be missed.
 */
export async function submit(input: SubmitInput): Promise<SubmitOutcome> {
  const request: Record<string, unknown> = {
    id: input.id,
    ...(input.steps ? { steps: input.steps } : {}),
    ...(input.rerun ? { rerun: input.rerun } : {}),
  };
  const body = JSON.stringify(input.secret ? signRequest(request, input.secret, Date.now()) : request);
  const check = parseRequest(body, input.secret ? { secret: input.secret } : {});
  if (!check.ok)
    throw new WorkerError(ErrorCode.INVALID_OPTION, `submit: ${check.error.message}`, {
      problems: check.error.problems,
    });
  const deadline = Date.now() + input.timeoutMs;
  const client = await connectBroker({
    settings: input.settings,
    clientId: `submit-${randomBytes(6).toString('hex')}`,
    clean: true,
  });
  try {
    let resolveResult: (outcome: SubmitOutcome) => void = () => {};
    const result = new Promise<SubmitOutcome>((resolve) => {
      resolveResult = resolve;
    });
    const resultTopic = `${input.resultsTopic}/${input.id}`;
    const rejectedTopic = `${input.rejectedTopic}/${input.id}`;
    const sha256 = (await import('node:crypto')).createHash('sha256').update(body).digest('hex');
    if (input.wait) {
      client.on('message', (topic, payload) => {
        if (topic === rejectedTopic) {
          // Only a refusal of these very bytes: anyone who may publish requests can have another one refused.
          const rejection = parseObject(payload);
          if (rejection?.payloadSha256 === sha256) resolveResult({ kind: 'rejected', rejection });
          return;
        }
        if (topic !== resultTopic) return;
        let result: ResultPayload;
        try {
          result = JSON.parse(payload.toString('utf8')) as ResultPayload;
        } catch {
          input.log.warn(`ignoring a result message that is not JSON on ${topic}`);
          return;
        }
        // Anyone who may publish on the results topic could answer for another job: only this id counts.
        if (result?.id === input.id) resolveResult({ kind: 'result', result });
        else input.log.warn(`ignoring a result on ${topic} for another id (${JSON.stringify(result?.id)})`);
      });
      await new Promise<void>((resolve, reject) =>
        client.subscribe([resultTopic, rejectedTopic], { qos: 1 }, (error) =>
          error ? reject(error) : resolve(),
        ),
      );
    }
    const topic = publishTopic(input.topic);
    for (let delay = 200; ; delay = Math.min(delay * 2, 5000)) {
      const code = await publish(client, topic, body, { qos: 1 });
      if (code !== NO_MATCHING_SUBSCRIBERS && code < 0x80) break;
      if (code >= 0x80)
        throw new WorkerError(
          ErrorCode.BROKER_REFUSED,
          `The broker refused the request on ${topic} (code ${code})`,
        );
      if (Date.now() + delay > deadline) return { kind: 'timeout', waitedFor: 'subscriber' };
      input.log.info(`nobody is subscribed to ${topic} yet; retrying in ${delay} ms`);
      await new Promise((resolve) => setTimeout(resolve, delay));
    }
    input.log.info(`published job ${input.id} to ${topic}`);
    if (!input.wait) return { kind: 'published' };
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<undefined>((resolve) => {
      timer = setTimeout(() => resolve(undefined), Math.max(0, deadline - Date.now()));
    });
    const received = await Promise.race([result, timedOut]);
    clearTimeout(timer);
    return received ?? { kind: 'timeout', waitedFor: 'result' };
  } finally {
    await disconnect(client);
  }
}

function parseObject(payload: Buffer): Record<string, unknown> | undefined {
  try {
    const value = JSON.parse(payload.toString('utf8')) as unknown;
    return value && typeof value === 'object' ? (value as Record<string, unknown>) : undefined;
  } catch {
    return undefined;
  }
}
