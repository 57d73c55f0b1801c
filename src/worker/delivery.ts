import type { Delivery, JobConsumer } from '../broker/consumer.js';
import { jobsDirProblem } from '../job/paths.js';
import { newManifest, toResultPayload } from '../job/report.js';
import { parseRequest } from '../job/request.js';
import type { JobRequest } from '../job/spec.js';
import { ErrorCode, isWorkerError, toErrorInfo } from '../shared/errors.js';
import type { Logger } from '../shared/log.js';
import type { Claim, StoredRequest } from './claim.js';
import { claimOrSettle, inspectFolder, type JobFolder, openJobFolder } from './claiming.js';
import { publishResult } from './publish.js';
import { runClaimed } from './run-claimed.js';
import type { Skipped, Slot, WorkerOutcome } from './slot.js';

// One delivery: parse and check the request, answer what cannot run (rejected, refused) and let the claim decide
// the rest (claiming.ts).

/**
 * Refuses a request, and acknowledges it: on `{rejected}/{id}` when it names a usable id, else on `{rejected}`.
 * Never a result: whoever may publish requests could otherwise fake another job's failure. The rejection carries
 * the SHA-256 of the request's bytes, so that its sender (`submit --wait`) knows it is about its own request.
 */
export function reject(
  consumer: JobConsumer,
  delivery: Delivery,
  slot: Slot,
  id: string | undefined,
  info: { code: ErrorCode; message: string },
): void {
  const topic = id ? `${slot.options.rejectedTopic}/${id}` : slot.options.rejectedTopic;
  consumer.fireAndForget(topic, rejection(delivery, slot.options.id, id, info.code, info.message));
  delivery.ack();
}

/**
 * Answers a delivery whose job cannot run, and acknowledges it: an `error` result for a usable id, otherwise a
 * rejection on the rejected topic.
 */
export async function answerFailure(
  slot: Slot,
  delivery: Delivery,
  id: string | undefined,
  info: { code: ErrorCode; message: string },
): Promise<void> {
  if (id) {
    const manifest = newManifest(slot.config, id, 1, (slot.now ?? Date.now)());
    manifest.error = info;
    await publishResult(slot.sidecar, slot, toResultPayload(manifest), responseOf(delivery, slot));
    delivery.ack(); // whatever the broker said: this delivery must not come back
  } else {
    reject(slot.consumer, delivery, slot, undefined, info);
  }
}

/**
 * Why a request's MQTT 5 response topic is ignored (with a warning), if it is: a response topic with wildcards
 * or under `$` (`$SYS/…`, `$share/…`: the broker would drop the connection); one outside
 * `--response-topic-prefix` (a request could otherwise have the worker publish on `jobs/cancel/{other}`); with
 * signed requests, one the signed body does not name (properties are not signed).
 */
export function responseProblem(
  topic: string,
  slot: Slot,
  request: JobRequest | undefined,
): string | undefined {
  const prefix = slot.options.responseTopicPrefix;
  if (/[+#\0]/.test(topic) || topic.startsWith('$')) return 'not a topic to publish to';
  if (prefix === undefined || !topic.startsWith(prefix))
    return `not under --response-topic-prefix (${prefix ?? 'off'})`;
  if (slot.requestPolicy?.secret !== undefined && request?.responseTopic !== topic)
    return 'the signed request does not name it (responseTopic)';
  return undefined;
}

export function responseOf(
  delivery: Delivery,
  slot: Slot,
  request?: JobRequest,
  log?: Logger,
): Omit<StoredRequest, 'request'> {
  const { correlationData } = delivery.packet.properties ?? {};
  // The MQTT 5 property, or the one the body names (MQTT 3.1.1 has no properties).
  let responseTopic = delivery.packet.properties?.responseTopic ?? request?.responseTopic;
  const problem = responseTopic === undefined ? undefined : responseProblem(responseTopic, slot, request);
  if (problem) {
    log?.warn(`ignoring the request's response topic ${JSON.stringify(responseTopic)}: ${problem}`);
    responseTopic = undefined;
  }
  return {
    ...(responseTopic ? { responseTopic } : {}),
    ...(correlationData ? { correlationData: Buffer.from(correlationData).toString('base64') } : {}),
  };
}

/** Every delivery ends here: skipped (acknowledged), run, or (interrupted) left for the next run. */
export async function handleDelivery(slot: Slot, delivery: Delivery): Promise<WorkerOutcome | Skipped> {
  const { options, log } = slot;
  const now = slot.now ?? Date.now;
  const parsed = parseRequest(delivery.payload, { ...slot.requestPolicy, nowMs: now() });
  if (!parsed.ok) {
    const { error, id } = parsed;
    log.error(`rejected a request: ${error.code}: ${error.message}`, { ...(id ? { job: id } : {}) });
    reject(slot.consumer, delivery, slot, id, { code: error.code, message: error.message });
    return { kind: 'skipped', id, action: 'rejected' };
  }
  const { request } = parsed;
  const jobLog = log.child({ job: request.id });
  let folder: JobFolder;
  try {
    folder = await openJobFolder(options.jobsDir, request.id, request.steps !== undefined);
  } catch (error) {
    // Not this job's problem but the machine's: leave the request for a slot that can run it.
    const gone = isWorkerError(error, ErrorCode.JOB_NOT_FOUND)
      ? await jobsDirProblem(options.jobsDir)
      : undefined;
    if (gone) return { kind: 'not-ready', id: request.id, why: gone };
    const info = toErrorInfo(error);
    jobLog.error(`${info.code}: ${info.message}`);
    await answerFailure(slot, delivery, request.id, info);
    return { kind: 'skipped', id: request.id, action: 'error' };
  }
  let claim: Claim | undefined;
  try {
    const state = await inspectFolder(folder, slot);
    const stored: StoredRequest = {
      request: JSON.stringify(request),
      ...responseOf(delivery, slot, request, jobLog),
    };
    claim = await claimOrSettle(slot, folder, state, request, stored, jobLog);
    if (claim) return await runClaimed(slot, { request, folder, claim, stored, delivery });
  } finally {
    if (!claim) await folder.results.close();
  }
  delivery.ack();
  return { kind: 'skipped', id: request.id, action: 'left' };
}

export function rejection(
  delivery: Delivery,
  workerId: string,
  id: string | undefined,
  code: ErrorCode,
  message: string,
): string {
  return JSON.stringify({
    ...(id ? { id } : {}),
    workerId,
    topic: delivery.topic,
    payloadBytes: delivery.payload.length,
    payloadSha256: process
      .getBuiltinModule('node:crypto')
      .createHash('sha256')
      .update(delivery.payload)
      .digest('hex'),
    error: { code, message },
    at: new Date().toISOString(),
  });
}
