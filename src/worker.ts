import type { MqttClient } from 'mqtt';
import { connectBroker, disconnect } from './broker.js';
import { acquireClaim, type Claim, type ClaimState, type Identity, inspectClaim } from './claim.js';
import { type Delivery, OneShotConsumer } from './consume.js';
import { type ErrorCode, toErrorInfo } from './errors.js';
import type { EngineConfig, JobEvent } from './job.js';
import { parseRequest, type RequestPolicy } from './job-spec.js';
import type { Logger } from './log.js';
import type { Options } from './options.js';
import { resolveJobPaths } from './paths.js';
import { type ResultPayload, toResultPayload } from './report.js';

export interface WorkerInput {
  readonly options: Options;
  readonly config: EngineConfig;
  readonly identity: Identity;
  readonly log: Logger;
  /** Aborted (reason 'interrupted') when the process is told to stop. */
  readonly signal: AbortSignal;
  /** Signature, age and payload-steps rules for requests. */
  readonly requestPolicy?: Omit<RequestPolicy, 'nowMs'>;
  readonly now?: () => number;
}

export type WorkerOutcome =
  /** No job came (idle timeout, or told to stop while waiting): exit 0. */
  | { readonly kind: 'no-job'; readonly why: 'idle-timeout' | 'stopped' }
  /** A delivery was handled and acknowledged (a result published where one was due): exit 0. */
  | {
      readonly kind: 'handled';
      readonly id: string | undefined;
      readonly action: string;
      readonly status?: string;
    }
  /** The job ran but the connection was lost before its result could be published: its next delivery will. */
  | { readonly kind: 'connection-lost'; readonly id: string | undefined }
  /** Told to stop during a job: the job was stopped, not acknowledged, and runs again on the slot's next run. */
  | { readonly kind: 'interrupted'; readonly id: string };

const WILL_DELAY_SECONDS = 10;

// The job engine (step processes, cgroups, file walking: ~7 ms of module loading) starts loading once the
// connection is under way, while the broker answers, rather than before it; a job awaits what is loaded by then.
const loadEngine = () => import('./job.js');

/**
 * The broker worker: connect under the slot's persistent session, take one delivery, let the job's claim decide
 * what it means, run it if it is ours, publish its result, acknowledge, disconnect. See the README's "Delivery".
 */
export async function runWorker(input: WorkerInput): Promise<WorkerOutcome> {
  const { options, log } = input;
  const presenceTopic = `${options.presenceTopic}/${options.id}`;
  if (options.clean) {
    log.warn(
      '--clean: the broker keeps nothing for this worker while it is away; jobs queued for it are lost when it exits',
    );
  }
  if (options.protocol === '3.1.1') {
    log.warn(
      'MQTT 3.1.1 cannot ask the broker for one message in flight: set max_inflight_messages 1 on the broker',
    );
  }
  const consumer = await OneShotConsumer.connect({
    settings: options,
    clientId: options.id,
    clean: options.clean,
    sessionExpirySeconds: options.sessionExpirySeconds,
    topic: options.topic,
    will: {
      topic: presenceTopic,
      payload: Buffer.from(presence(options.id, 'offline')),
      qos: 1,
      retain: true,
      ...(options.protocol === '5' ? { properties: { willDelayInterval: WILL_DELAY_SECONDS } } : {}),
    },
    log,
    onConnecting: () => {
      loadEngine().catch(() => {}); // a failure shows where a job awaits the engine
    },
  });
  log.info(`connected to the broker as ${options.id}; waiting for one job on ${options.topic}`, {
    session: consumer.sessionPresent ? 'resumed' : 'new',
  });
  consumer.fireAndForget(presenceTopic, presence(options.id, 'idle'), true);

  const waited = await waitForDelivery(consumer, input);
  if (!('delivery' in waited)) {
    if (waited.why === 'closed') {
      log.error('the connection to the broker was lost while waiting for a job');
      return { kind: 'connection-lost', id: undefined };
    }
    if (waited.why === 'idle-timeout') log.info('no job within the idle timeout; exiting');
    await consumer.close({ withWill: true });
    return { kind: 'no-job', why: waited.why };
  }

  consumer.holdOpen(options.keepaliveMs);
  const outcome = await handleSafely(consumer, waited.delivery, input);
  // Interrupted: close without a DISCONNECT's ceremony; the job stays unacknowledged in the session.
  await consumer.close(outcome.kind === 'interrupted' ? { force: true } : { withWill: true });
  return outcome;
}

type Waited = { readonly delivery: Delivery } | { readonly why: 'idle-timeout' | 'stopped' | 'closed' };

async function waitForDelivery(consumer: OneShotConsumer, input: WorkerInput): Promise<Waited> {
  const waits: Promise<Waited>[] = [
    consumer.next().then((delivery): Waited => (delivery ? { delivery } : { why: 'closed' })),
  ];
  let timer: NodeJS.Timeout | undefined;
  const idle = input.options.idleTimeoutMs;
  if (idle !== undefined) {
    waits.push(new Promise((resolve) => (timer = setTimeout(() => resolve({ why: 'idle-timeout' }), idle))));
  }
  let onAbort: (() => void) | undefined;
  waits.push(
    new Promise((resolve) => {
      onAbort = () => resolve({ why: 'stopped' });
      if (input.signal.aborted) onAbort();
      else input.signal.addEventListener('abort', onAbort, { once: true });
    }),
  );
  try {
    return await Promise.race(waits);
  } finally {
    clearTimeout(timer);
    if (onAbort) input.signal.removeEventListener('abort', onAbort);
  }
}

function presence(id: string, state: 'idle' | 'busy' | 'offline', job?: string): string {
  return JSON.stringify({ id, state, ...(job ? { job } : {}), at: new Date().toISOString() });
}

/**
 * A failure nobody foresaw (a claim that cannot be written, a shared drive gone read-only) must not leave the
 * message unacknowledged: it would come back to this slot forever. It becomes an INTERNAL error result.
 */
async function handleSafely(
  consumer: OneShotConsumer,
  delivery: Delivery,
  input: WorkerInput,
): Promise<WorkerOutcome> {
  try {
    return await handleDelivery(consumer, delivery, input);
  } catch (error) {
    const info = toErrorInfo(error);
    const parsed = parseRequest(delivery.payload, {
      ...input.requestPolicy,
      nowMs: (input.now ?? Date.now)(),
    });
    const id = parsed.ok ? parsed.request.id : undefined;
    input.log.error(`${info.code}: ${info.message}`, {
      ...(id ? { job: id } : {}),
      stack: (error as Error).stack,
    });
    if (!consumer.connected) return { kind: 'connection-lost', id };
    await answerFailure(consumer, delivery, input, id, info);
    return { kind: 'handled', id, action: 'failed', status: 'error' };
  }
}

/**
 * Answers a delivery that cannot run, and acknowledges it: an `error` result for a usable id, otherwise a
 * rejection on the rejected topic.
 */
async function answerFailure(
  consumer: OneShotConsumer,
  delivery: Delivery,
  input: WorkerInput,
  id: string | undefined,
  info: { code: ErrorCode; message: string },
): Promise<void> {
  if (id) {
    const { newManifest } = await loadEngine();
    const manifest = newManifest(input.config, id, 1, (input.now ?? Date.now)());
    manifest.error = info;
    await finish(consumer, delivery, input, toResultPayload(manifest));
  } else {
    consumer.fireAndForget(
      input.options.rejectedTopic,
      rejection(delivery, input.options.id, info.code, info.message),
    );
    delivery.ack();
  }
}

/** Every delivery ends here: acknowledged with a published outcome, or (interrupted) left for the next run. */
async function handleDelivery(
  consumer: OneShotConsumer,
  delivery: Delivery,
  input: WorkerInput,
): Promise<WorkerOutcome> {
  const { options, log } = input;
  const now = input.now ?? Date.now;
  const parsed = parseRequest(delivery.payload, { ...input.requestPolicy, nowMs: now() });
  if (!parsed.ok) {
    const { error, id } = parsed;
    log.error(`rejected a request: ${error.code}: ${error.message}`, { ...(id ? { job: id } : {}) });
    await answerFailure(consumer, delivery, input, id, { code: error.code, message: error.message });
    return { kind: 'handled', id, action: 'rejected', status: 'error' };
  }

  const { request } = parsed;
  const jobLog = log.child({ job: request.id });
  const event = (type: string, fields: Record<string, unknown> = {}): void =>
    consumer.fireAndForget(
      `${options.statusTopic}/${request.id}`,
      JSON.stringify({
        id: request.id,
        workerId: options.id,
        event: type,
        at: new Date(now()).toISOString(),
        ...fields,
      }),
    );

  let state: ClaimState;
  let paths: Awaited<ReturnType<typeof resolveJobPaths>>;
  try {
    paths = await resolveJobPaths(options.jobsDir, request.id, request.steps !== undefined);
    state = await inspectClaim(paths.resultsDir, input.identity, options.claimLeaseMs, now());
  } catch (error) {
    const info = toErrorInfo(error);
    jobLog.error(`${info.code}: ${info.message}`);
    await answerFailure(consumer, delivery, input, request.id, info);
    return { kind: 'handled', id: request.id, action: 'error', status: 'error' };
  }

  let claim: Claim | undefined;
  for (let tries = 0; !claim && tries < 3; tries++) {
    if (state.kind === 'finished') {
      jobLog.info(
        `already finished (attempt ${state.manifest.attempt}, ${state.manifest.status}); publishing its result again`,
      );
      await finish(consumer, delivery, input, toResultPayload(state.manifest));
      return { kind: 'handled', id: request.id, action: 'republished', status: state.manifest.status };
    }
    if (state.kind === 'live') {
      jobLog.info(
        `already claimed by live worker ${state.claim.workerId} (attempt ${state.claim.attempt}); it will publish the result`,
      );
      delivery.ack();
      return { kind: 'handled', id: request.id, action: 'left-to-owner' };
    }
    if (state.why) jobLog.warn(`taking over: ${state.why}`, { attempt: state.attempt });
    claim = await acquireClaim(paths.resultsDir, input.identity, state.attempt, new Date(now()));
    if (!claim) state = await inspectClaim(paths.resultsDir, input.identity, options.claimLeaseMs, now());
  }
  if (!claim) {
    delivery.ack();
    return { kind: 'handled', id: request.id, action: 'left-to-owner' };
  }

  claim.startHeartbeat(Math.max(1000, Math.floor(options.claimLeaseMs / 4)), (error) =>
    jobLog.warn(`claim heartbeat failed: ${error.message}`),
  );
  consumer.fireAndForget(
    `${options.presenceTopic}/${options.id}`,
    presence(options.id, 'busy', request.id),
    true,
  );
  event('claimed', { attempt: claim.attempt });

  const { runJob, JobInterrupted } = await loadEngine();
  const stop = new AbortController();
  const onInterrupt = (): void => stop.abort('interrupted');
  if (input.signal.aborted) onInterrupt();
  else input.signal.addEventListener('abort', onInterrupt, { once: true });
  // Listening for cancel requests starts alongside the job, not before it: a job does not wait for a second
  // connection's round trips.
  const control = watchCancel(input, request.id, () => {
    jobLog.warn('cancel request received; stopping the job');
    stop.abort('cancelled');
  });
  try {
    let published = false;
    const outcome = await runJob(input.config, {
      request,
      attempt: claim.attempt,
      paths,
      log: jobLog,
      signal: stop.signal,
      onEvent: (e: JobEvent) => event(e.type, eventFields(e)),
      now,
      // The result goes out as soon as result.json is written; the workspace is removed after.
      onResult: async (manifest) => {
        claim.stopHeartbeat();
        jobLog.info(`job ${manifest.status} (exit code ${manifest.exitCode}) in ${manifest.durationMs} ms`, {
          attempt: manifest.attempt,
        });
        if (manifest.error) jobLog.error(`${manifest.error.code}: ${manifest.error.message}`);
        if (!consumer.connected) {
          jobLog.warn(
            'the connection to the broker was lost during the job; result.json is written and the next delivery publishes it',
          );
          return;
        }
        await finish(consumer, delivery, input, toResultPayload(manifest));
        published = true;
      },
    });
    if (!published) return { kind: 'connection-lost', id: request.id };
    return { kind: 'handled', id: request.id, action: 'ran', status: outcome.manifest.status };
  } catch (error) {
    claim.stopHeartbeat();
    if (error instanceof JobInterrupted) return { kind: 'interrupted', id: request.id };
    throw error;
  } finally {
    input.signal.removeEventListener('abort', onInterrupt);
    const client = await control;
    if (client) await disconnect(client, { force: true });
  }
}

function eventFields(event: JobEvent): Record<string, unknown> {
  const { type: _type, ...fields } = event;
  return fields;
}

function rejection(delivery: Delivery, workerId: string, code: ErrorCode, message: string): string {
  return JSON.stringify({
    workerId,
    topic: delivery.topic,
    payloadBytes: delivery.payload.length,
    error: { code, message },
    at: new Date().toISOString(),
  });
}

/**
 * Publishes the result (to the results topic, and to the request's MQTT 5 response topic with its correlation
 * data), then acknowledges the job, then waits for the broker to accept the result. The result goes out on the
 * wire before the acknowledgement, and the broker handles a connection's packets in order: it has the result
 * by the time the job leaves the session. MQTT.js can read the result's PUBACK only after the job's is sent.
 */
async function finish(
  consumer: OneShotConsumer,
  delivery: Delivery,
  input: WorkerInput,
  result: ResultPayload,
): Promise<void> {
  const body = JSON.stringify(result);
  const sent = [consumer.publishReliably(`${input.options.resultsTopic}/${result.id}`, body)];
  const { responseTopic, correlationData } = delivery.packet.properties ?? {};
  if (responseTopic) {
    sent.push(
      consumer.publishReliably(responseTopic, body, correlationData ? { correlationData } : undefined),
    );
  }
  delivery.ack();
  const codes = await Promise.all(sent.map((p) => p.catch(() => -1)));
  if (codes.some((code) => code >= 0x80 || code < 0)) {
    input.log.warn(
      `the broker did not accept the result of ${result.id} (codes ${codes.join(', ')}); result.json holds it`,
    );
  }
}

/** A second, clean connection that listens for `{cancel-topic}/{id}` while the job connection is held. */
async function watchCancel(
  input: WorkerInput,
  id: string,
  onCancel: () => void,
): Promise<MqttClient | undefined> {
  const topic = `${input.options.cancelTopic}/${id}`;
  try {
    const client = await connectBroker({
      settings: input.options,
      clientId: `${input.options.id}.control`,
      clean: true,
    });
    client.on('message', (received) => {
      if (received === topic) onCancel();
    });
    await new Promise<void>((resolve, reject) =>
      client.subscribe(topic, { qos: 1 }, (error) => (error ? reject(error) : resolve())),
    );
    return client;
  } catch (error) {
    input.log.warn(`cannot listen for cancel requests on ${topic}: ${(error as Error).message}`);
    return undefined;
  }
}
