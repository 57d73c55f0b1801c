import type { MqttClient } from 'mqtt';
import { connectBroker, disconnect, publish } from '../broker/client.js';
import { type Delivery, JobConsumer } from '../broker/consumer.js';
import { isShared } from '../broker/topics.js';
import type { Options } from '../config/options.js';
import {
  type HeldDir,
  holdResults,
  type JobPaths,
  jobsDirProblem,
  resolveJobPaths,
  resolveJobsRoot,
} from '../job/paths.js';
import { type Manifest, type ResultPayload, toResultPayload } from '../job/report.js';
import type { EngineConfig, JobEvent } from '../job/run-job.js';
import { type JobRequest, parseRequest, type RequestPolicy } from '../job/spec.js';
import { ErrorCode, isWorkerError, toErrorInfo } from '../shared/errors.js';
import type { Logger } from '../shared/log.js';
import {
  acquireClaim,
  acquirePublisher,
  type Claim,
  type ClaimRecord,
  type ClaimState,
  type Identity,
  inspectClaim,
  markPublished,
  type StoredRequest,
} from './claim.js';
import { type PresenceSource, presenceMessage } from './presence.js';
import { addRunning, listRunning, removeRunning } from './running-index.js';

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
  /** The process ran its one job and published its result: exit 0. */
  | { readonly kind: 'ran'; readonly id: string; readonly status: string }
  /** The connection was lost (while waiting, or before a job's result could be published): exit 3. */
  | { readonly kind: 'connection-lost'; readonly id: string | undefined }
  /** Told to stop during a job: the job was stopped, not acknowledged, and runs again on the slot's next run. */
  | { readonly kind: 'interrupted'; readonly id: string }
  /** The jobs directory went away (an NFS mount gone): the request was left unacknowledged for a slot that can. */
  | { readonly kind: 'not-ready'; readonly id: string; readonly why: string };

/** What became of a delivery the process did not run: it was answered or left, and acknowledged. */
type Skipped = { readonly kind: 'skipped'; readonly id: string | undefined; readonly action: string };

const WILL_DELAY_SECONDS = 10;

// The job engine (step processes, cgroups, file walking: ~7 ms of module loading) starts loading once the
// connection is under way, while the broker answers, rather than before it; a job awaits what is loaded by then.
const loadEngine = () => import('../job/run-job.js');

/**
 * The broker worker: connect under the slot's session, let each job's claim decide what a delivery means (run
 * it, or acknowledge it and wait for the next one), take over jobs whose worker died, run at most one job,
 * publish its result, acknowledge, disconnect. See the README's "Delivery".
 */
export async function runWorker(input: WorkerInput): Promise<WorkerOutcome> {
  const { options, log } = input;
  warnAboutSettings(options, log);
  const source: PresenceSource = {
    id: options.id,
    host: input.config.hostname,
    version: input.config.version,
    connectedAt: new Date(),
  };
  const consumer = await JobConsumer.connect({
    settings: options,
    clientId: options.id,
    clean: options.clean,
    sessionExpirySeconds: options.sessionExpirySeconds,
    topic: options.topic,
    will: {
      topic: presenceTopic(options),
      payload: Buffer.from(presenceMessage(source, 'offline')),
      qos: 1,
      retain: true,
      // A delayed will keeps a clean session (and its place in a share group) alive until it fires: the broker
      // would deal jobs to a ghost. Only a persistent session, which outlives the process anyway, gets a delay.
      ...(options.protocol === '5' && !options.clean
        ? { properties: { willDelayInterval: WILL_DELAY_SECONDS } }
        : {}),
    },
    log,
    onConnecting: () => {
      loadEngine().catch(() => {}); // a failure shows where a job awaits the engine
    },
  });
  log.info(`connected to the broker as ${options.id}; waiting for one job on ${options.topic}`, {
    session: consumer.sessionPresent ? 'resumed' : 'new',
  });
  consumer.fireAndForget(presenceTopic(options), presenceMessage(source, 'idle'), true);
  const sidecar = new Sidecar(input);
  try {
    return await serve({ consumer, sidecar, source }, input);
  } finally {
    await sidecar.close();
  }
}

/** The job connection, and the second one opened when needed (see Sidecar). */
interface Links {
  readonly consumer: JobConsumer;
  readonly sidecar: Sidecar;
  /** Who this slot says it is in its presence messages. */
  readonly source: PresenceSource;
}

function warnAboutSettings(options: Options, log: Logger): void {
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
  if (isShared(options.topic) && !options.clean && options.sessionExpirySeconds !== undefined) {
    log.warn(
      `--session-expiry ${options.sessionExpirySeconds}s with a shared subscription: the jobs dealt to this slot are lost if it stays away longer`,
    );
  }
}

function presenceTopic(options: Options): string {
  return `${options.presenceTopic}/${options.id}`;
}

/** How often an idle slot looks for jobs whose worker died: often enough to take them over "at once". */
function scanInterval(options: Options): number {
  return Math.min(5000, Math.max(500, Math.floor(options.claimLeaseMs / 4)));
}

type Woken =
  | { readonly kind: 'delivery'; readonly delivery: Delivery | undefined }
  | { readonly kind: 'scan' | 'idle-timeout' | 'stopped' };

/**
 * The idle loop: every delivery is handled in turn until one is run; between deliveries, the index of running
 * claims is scanned for orphans. A process runs at most one job.
 */
async function serve(links: Links, input: WorkerInput): Promise<WorkerOutcome> {
  const { options, log } = input;
  const { consumer } = links;
  let pending = consumer.next();
  let idleSince = Date.now();
  let scanAt = 0;
  for (;;) {
    if (Date.now() >= scanAt) {
      const orphan = await takeOverOrphan(links, input);
      if (orphan) return orphan;
      scanAt = Date.now() + scanInterval(options);
    }
    const idleLeft =
      options.idleTimeoutMs === undefined ? undefined : idleSince + options.idleTimeoutMs - Date.now();
    const woken = await wake(pending, input.signal, scanAt - Date.now(), idleLeft);
    if (woken.kind === 'scan') continue;
    if (woken.kind !== 'delivery') {
      if (woken.kind === 'idle-timeout') log.info('no job within the idle timeout; exiting');
      return { kind: 'no-job', why: woken.kind };
    }
    if (!woken.delivery) {
      log.error('the connection to the broker was lost while waiting for a job');
      return { kind: 'connection-lost', id: undefined };
    }
    pending = consumer.next();
    const handled = await handleSafely(links, woken.delivery, input);
    if (handled.kind !== 'skipped') return handled;
    if (!consumer.connected) return { kind: 'connection-lost', id: handled.id };
    idleSince = Date.now();
  }
}

async function wake(
  pending: Promise<Delivery | undefined>,
  signal: AbortSignal,
  scanInMs: number,
  idleLeftMs: number | undefined,
): Promise<Woken> {
  const timers: NodeJS.Timeout[] = [];
  const after = (ms: number, kind: 'scan' | 'idle-timeout') =>
    new Promise<Woken>((resolve) => timers.push(setTimeout(() => resolve({ kind }), Math.max(0, ms))));
  let onAbort: (() => void) | undefined;
  const stopped = new Promise<Woken>((resolve) => {
    onAbort = () => resolve({ kind: 'stopped' });
    if (signal.aborted) onAbort();
    else signal.addEventListener('abort', onAbort, { once: true });
  });
  try {
    return await Promise.race([
      pending.then((delivery): Woken => ({ kind: 'delivery', delivery })),
      stopped,
      after(scanInMs, 'scan'),
      ...(idleLeftMs === undefined ? [] : [after(idleLeftMs, 'idle-timeout')]),
    ]);
  } finally {
    for (const timer of timers) clearTimeout(timer);
    if (onAbort) signal.removeEventListener('abort', onAbort);
  }
}

/**
 * A failure nobody foresaw (a claim that cannot be written, a shared drive gone read-only) must not leave the
 * message unacknowledged: it would come back to this slot forever. It becomes an INTERNAL error result.
 */
async function handleSafely(
  links: Links,
  delivery: Delivery,
  input: WorkerInput,
): Promise<WorkerOutcome | Skipped> {
  try {
    return await handleDelivery(links, delivery, input);
  } catch (error) {
    const info = toErrorInfo(error);
    const parsed = parseRequest(delivery.payload, {
      ...input.requestPolicy,
      nowMs: (input.now ?? Date.now)(),
    });
    const id = parsed.ok ? parsed.request.id : undefined;
    input.log.error(`${info.code}: ${info.message}`, {
      ...(id ? { job: id } : {}),
      // A stack trace is for a bug, not for a full drive.
      ...(info.code === ErrorCode.INTERNAL ? { stack: (error as Error).stack } : {}),
    });
    if (!links.consumer.connected) return { kind: 'connection-lost', id };
    await answerFailure(links, delivery, input, id, info);
    return { kind: 'skipped', id, action: 'failed' };
  }
}

/**
 * Refuses a request, and acknowledges it: on `{rejected}/{id}` when it names a usable id, else on `{rejected}`.
 * Never a result: whoever may publish requests could otherwise fake another job's failure. The rejection carries
 * the SHA-256 of the request's bytes, so that its sender (`submit --wait`) knows it is about its own request.
 */
function reject(
  consumer: JobConsumer,
  delivery: Delivery,
  input: WorkerInput,
  id: string | undefined,
  info: { code: ErrorCode; message: string },
): void {
  const topic = id ? `${input.options.rejectedTopic}/${id}` : input.options.rejectedTopic;
  consumer.fireAndForget(topic, rejection(delivery, input.options.id, id, info.code, info.message));
  delivery.ack();
}

/**
 * Answers a delivery whose job cannot run, and acknowledges it: an `error` result for a usable id, otherwise a
 * rejection on the rejected topic.
 */
async function answerFailure(
  links: Links,
  delivery: Delivery,
  input: WorkerInput,
  id: string | undefined,
  info: { code: ErrorCode; message: string },
): Promise<void> {
  if (id) {
    const { newManifest } = await loadEngine();
    const manifest = newManifest(input.config, id, 1, (input.now ?? Date.now)());
    manifest.error = info;
    await publishResult(links.sidecar, input, toResultPayload(manifest), responseOf(delivery, input));
    delivery.ack(); // whatever the broker said: this delivery must not come back
  } else {
    reject(links.consumer, delivery, input, undefined, info);
  }
}

/**
 * Why a request's MQTT 5 response topic is ignored (with a warning), if it is: a response topic with wildcards
 * or under `$` (`$SYS/…`, `$share/…`: the broker would drop the connection); one outside
 * `--response-topic-prefix` (a request could otherwise have the worker publish on `jobs/cancel/{other}`); with
 * signed requests, one the signed body does not name (properties are not signed).
 */
function responseProblem(
  topic: string,
  input: WorkerInput,
  request: JobRequest | undefined,
): string | undefined {
  const prefix = input.options.responseTopicPrefix;
  if (/[+#\0]/.test(topic) || topic.startsWith('$')) return 'not a topic to publish to';
  if (prefix === undefined || !topic.startsWith(prefix))
    return `not under --response-topic-prefix (${prefix ?? 'off'})`;
  if (input.requestPolicy?.secret !== undefined && request?.responseTopic !== topic)
    return 'the signed request does not name it (responseTopic)';
  return undefined;
}

function responseOf(
  delivery: Delivery,
  input: WorkerInput,
  request?: JobRequest,
  log?: Logger,
): Omit<StoredRequest, 'request'> {
  const { correlationData } = delivery.packet.properties ?? {};
  let { responseTopic } = delivery.packet.properties ?? {};
  const problem = responseTopic === undefined ? undefined : responseProblem(responseTopic, input, request);
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
async function handleDelivery(
  links: Links,
  delivery: Delivery,
  input: WorkerInput,
): Promise<WorkerOutcome | Skipped> {
  const { options, log } = input;
  const now = input.now ?? Date.now;
  const parsed = parseRequest(delivery.payload, { ...input.requestPolicy, nowMs: now() });
  if (!parsed.ok) {
    const { error, id } = parsed;
    log.error(`rejected a request: ${error.code}: ${error.message}`, { ...(id ? { job: id } : {}) });
    reject(links.consumer, delivery, input, id, { code: error.code, message: error.message });
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
    await answerFailure(links, delivery, input, request.id, info);
    return { kind: 'skipped', id: request.id, action: 'error' };
  }
  let claim: Claim | undefined;
  try {
    const state = await inspectFolder(folder, input);
    const stored: StoredRequest = {
      request: JSON.stringify(request),
      ...responseOf(delivery, input, request, jobLog),
    };
    claim = await claimOrSettle(links, input, folder, state, request, stored, jobLog);
    if (claim) return await runClaimed(links, input, { request, folder, claim, stored, delivery });
  } finally {
    if (!claim) await folder.results.close();
  }
  delivery.ack();
  return { kind: 'skipped', id: request.id, action: 'left' };
}

/** A job's folder, and its results/ held open for every write the worker makes there. */
interface JobFolder {
  readonly paths: JobPaths;
  readonly results: HeldDir;
}

async function openJobFolder(jobsDir: string, id: string, create: boolean): Promise<JobFolder> {
  const paths = await resolveJobPaths(jobsDir, id, create);
  return { paths, results: await holdResults(paths.resultsDir) };
}

function inspectFolder(folder: JobFolder, input: WorkerInput): Promise<ClaimState> {
  const now = (input.now ?? Date.now)();
  return inspectClaim(folder.results.path, input.identity, input.options.claimLeaseMs, now);
}

/** Claims `attempt` of the job in `folder` for this process, keeping the request that asked for it. */
function claimAttempt(
  folder: JobFolder,
  input: WorkerInput,
  attempt: number,
  stored: StoredRequest,
  request: JobRequest,
): Promise<Claim | undefined> {
  const now = new Date((input.now ?? Date.now)());
  return acquireClaim(folder.results.path, input.identity, attempt, now, { ...stored, rerun: request.rerun });
}

/**
 * Takes the job's next attempt when it is free (or finished, for a new re-run token); otherwise settles what the
 * claim says (a finished result its dead runner never published is published by exactly one slot) and returns
 * undefined: the request is not this process's to run.
 */
async function claimOrSettle(
  links: Links,
  input: WorkerInput,
  folder: JobFolder,
  first: ClaimState,
  request: JobRequest,
  stored: StoredRequest,
  log: Logger,
): Promise<Claim | undefined> {
  let state = first;
  for (let tries = 0; tries < 3; tries++) {
    if (state.kind === 'finished' && request.rerun !== undefined && request.rerun !== state.claim.rerun) {
      log.info(`re-run ${request.rerun} of a finished job (attempt ${state.manifest.attempt})`);
      state = { kind: 'free', attempt: state.claim.attempt + 1 };
    }
    if (state.kind === 'finished') {
      await settleFinished(links, input, folder, state, log, stored);
      return undefined;
    }
    if (state.kind === 'live') {
      log.info(
        `already claimed by live worker ${state.claim.workerId} (attempt ${state.claim.attempt}); it will publish the result`,
      );
      return undefined;
    }
    if (state.why) log.warn(`taking over: ${state.why}`, { attempt: state.attempt });
    await addRunning(folder.paths.root, request.id);
    const claim = await claimAttempt(folder, input, state.attempt, stored, request);
    if (claim) return claim;
    state = await inspectFolder(folder, input);
  }
  return undefined;
}

/**
 * A finished attempt: nothing to publish on the results topic, unless its result never reached the broker and its
 * runner is gone. A request that asks for an answer on its own response topic gets the stored result there (a
 * controller that missed the result, or asks about a finished job, learns it; the results topic stays one message
 * per run).
 */
async function settleFinished(
  links: Links,
  input: WorkerInput,
  folder: JobFolder,
  state: Extract<ClaimState, { kind: 'finished' }>,
  log: Logger,
  asking?: Omit<StoredRequest, 'request'>,
): Promise<void> {
  const { manifest, claim } = state;
  const what = `attempt ${manifest.attempt}, ${manifest.status}`;
  if (state.published) {
    if (asking?.responseTopic) {
      log.info(`already finished (${what}); answering on the request's response topic`);
      await publishResult(links.sidecar, input, toResultPayload(manifest), asking, { responseOnly: true });
    } else log.info(`already finished (${what}); its result was published`);
    await removeRunning(folder.paths.root, manifest.id);
    return;
  }
  if (state.ownerAlive) {
    log.info(`already finished (${what}); its worker ${claim.workerId} publishes the result`);
    return;
  }
  const now = (input.now ?? Date.now)();
  const lease = input.options.claimLeaseMs;
  if (!(await acquirePublisher(folder.results.path, manifest.attempt, input.identity, lease, now))) {
    log.info(`already finished (${what}); another slot publishes its result`);
    return;
  }
  log.info(`already finished (${what}), but its result never reached the broker; publishing it`);
  if (await publishResult(links.sidecar, input, toResultPayload(manifest), claim)) {
    await markPublished(folder.results.path, manifest.attempt);
    await removeRunning(folder.paths.root, manifest.id);
  }
}

/**
 * Looks through the index of running claims for a job whose worker died: its result is published if it finished,
 * or the job is taken over (attempt + 1) and run here from the request stored in its claim.
 */
async function takeOverOrphan(links: Links, input: WorkerInput): Promise<WorkerOutcome | undefined> {
  const root = await resolveJobsRoot(input.options.jobsDir).catch(() => undefined);
  if (root === undefined) return undefined;
  for (const id of await listRunning(root)) {
    const jobLog = input.log.child({ job: id });
    try {
      const ran = await lookAtRunning(links, input, root, id, jobLog);
      if (ran) return ran;
    } catch (error) {
      // A job folder removed meanwhile has nothing left to run or publish.
      if (isWorkerError(error, ErrorCode.JOB_NOT_FOUND)) await removeRunning(root, id);
      else jobLog.warn(`cannot look at the running job ${id}: ${(error as Error).message}`);
    }
  }
  return undefined;
}

/** One entry of the index: left alone (live), settled (finished), or taken over and run here. */
async function lookAtRunning(
  links: Links,
  input: WorkerInput,
  root: string,
  id: string,
  log: Logger,
): Promise<WorkerOutcome | undefined> {
  const folder = await openJobFolder(input.options.jobsDir, id, false);
  let claim: Claim | undefined;
  try {
    const state = await inspectFolder(folder, input);
    if (state.kind === 'live') return undefined;
    if (state.kind === 'finished') {
      await settleFinished(links, input, folder, state, log);
      return undefined;
    }
    const stored = state.previous ? storedRequestOf(state.previous, input) : undefined;
    if (!stored) {
      await removeRunning(root, id); // nothing was claimed, or by a version that kept no request
      return undefined;
    }
    log.warn(`taking over from the index of running jobs: ${state.why}`, { attempt: state.attempt });
    claim = await claimAttempt(folder, input, state.attempt, stored.stored, stored.request);
    return claim ? await runClaimed(links, input, { ...stored, folder, claim }) : undefined;
  } finally {
    if (!claim) await folder.results.close();
  }
}

/** The request a dead worker's claim holds, checked against this worker's rules (signatures aside: it was). */
function storedRequestOf(
  record: ClaimRecord,
  input: WorkerInput,
): { request: JobRequest; stored: StoredRequest } | undefined {
  if (record.request === undefined) return undefined;
  const { secret: _verifiedWhenClaimed, ...policy } = input.requestPolicy ?? {};
  const parsed = parseRequest(record.request, policy);
  if (!parsed.ok) return undefined;
  const { request, responseTopic, correlationData } = record;
  return {
    request: parsed.request,
    stored: {
      request,
      ...(responseTopic ? { responseTopic } : {}),
      ...(correlationData ? { correlationData } : {}),
    },
  };
}

interface ClaimedJob {
  readonly request: JobRequest;
  readonly folder: JobFolder;
  readonly claim: Claim;
  readonly stored: StoredRequest;
  /** The delivery that brought it; none for a job taken over from the index. */
  readonly delivery?: Delivery;
}

/** Runs the job this process claimed, publishes its result and acknowledges its delivery. */
async function runClaimed(links: Links, input: WorkerInput, job: ClaimedJob): Promise<WorkerOutcome> {
  const { options, log } = input;
  const { request, claim } = job;
  const jobLog = log.child({ job: request.id });
  const now = input.now ?? Date.now;
  const { consumer, sidecar } = links;
  consumer.take();
  consumer.holdOpen(options.keepaliveMs);
  claim.startHeartbeat(Math.max(1000, Math.floor(options.claimLeaseMs / 4)), (error) =>
    jobLog.warn(`claim heartbeat failed: ${error.message}`),
  );
  const busy = { job: request.id, attempt: claim.attempt, jobStartedAt: new Date(now()) };
  const announce = (step?: { index: number; name: string }): void =>
    consumer.fireAndForget(
      presenceTopic(options),
      presenceMessage(
        links.source,
        'busy',
        step ? { ...busy, step: { ...step, startedAt: new Date(now()) } } : busy,
      ),
      true,
    );
  announce();
  const event = statusEvents(consumer, input, request.id);
  event('claimed', { attempt: claim.attempt });

  const { runJob, JobInterrupted } = await loadEngine();
  const stop = new AbortController();
  const onInterrupt = (): void => stop.abort('interrupted');
  if (input.signal.aborted) onInterrupt();
  else input.signal.addEventListener('abort', onInterrupt, { once: true });
  // Listening for cancel requests starts alongside the job, not before it: a job does not wait for a second
  // connection's round trips.
  const control = sidecar.watchCancel(request.id, () => {
    jobLog.warn('cancel request received; stopping the job');
    stop.abort('cancelled');
  });
  try {
    let published = false;
    const outcome = await runJob(input.config, {
      request,
      attempt: claim.attempt,
      paths: job.folder.paths,
      results: job.folder.results,
      log: jobLog,
      signal: stop.signal,
      onEvent: (e: JobEvent) => {
        event(e.type, eventFields(e));
        if (e.type === 'step-started') announce({ index: e.step, name: e.name });
      },
      now,
      // The result goes out as soon as result.json is written; the workspace is removed after.
      onResult: async (manifest) => {
        claim.stopHeartbeat();
        published = await completeJob(links, input, job, manifest, jobLog);
        // Between jobs the slot is idle: its next process says so again, or its will says offline.
        if (published)
          consumer.fireAndForget(presenceTopic(options), presenceMessage(links.source, 'idle'), true);
      },
    });
    if (!published) return { kind: 'connection-lost', id: request.id };
    return { kind: 'ran', id: request.id, status: outcome.manifest.status };
  } catch (error) {
    claim.stopHeartbeat();
    if (error instanceof JobInterrupted) return { kind: 'interrupted', id: request.id };
    throw error;
  } finally {
    input.signal.removeEventListener('abort', onInterrupt);
    await control;
    await job.folder.results.close();
  }
}

/** Publishes a finished job's result, acknowledges its delivery and records both; false when it could not. */
async function completeJob(
  links: Links,
  input: WorkerInput,
  job: ClaimedJob,
  manifest: Manifest,
  log: Logger,
): Promise<boolean> {
  log.info(`job ${manifest.status} (exit code ${manifest.exitCode}) in ${manifest.durationMs} ms`, {
    attempt: manifest.attempt,
  });
  if (manifest.error) log.error(`${manifest.error.code}: ${manifest.error.message}`);
  if (!links.consumer.connected) {
    log.warn(
      'the connection to the broker was lost during the job; result.json is written and the next slot to see the job publishes it',
    );
    return false;
  }
  // The delivery is acknowledged only once the broker has accepted the result: a worker that dies in between
  // leaves it in the session (and the job in the index), and the next slot to see it publishes the stored result.
  if (!(await publishResult(links.sidecar, input, toResultPayload(manifest), job.stored))) return false;
  job.delivery?.ack();
  await job.claim.markPublished();
  await removeRunning(job.folder.paths.root, manifest.id);
  return true;
}

function statusEvents(
  consumer: JobConsumer,
  input: WorkerInput,
  id: string,
): (type: string, fields?: Record<string, unknown>) => void {
  const now = input.now ?? Date.now;
  return (type, fields = {}) =>
    consumer.fireAndForget(
      `${input.options.statusTopic}/${id}`,
      JSON.stringify({
        id,
        workerId: input.options.id,
        event: type,
        at: new Date(now()).toISOString(),
        ...fields,
      }),
    );
}

function eventFields(event: JobEvent): Record<string, unknown> {
  const { type: _type, ...fields } = event;
  return fields;
}

function rejection(
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

/**
 * Publishes a result (to the results topic, and to the request's MQTT 5 response topic with its correlation
 * data) on the sidecar and waits for the broker to accept it: true when it did. Never on the job connection: once
 * its delivery is acknowledged, a broker may send the next request before the result's PUBACK (Aedes does), and
 * MQTT.js reads nothing behind a request held for the slot's next run.
 */
async function publishResult(
  via: Sidecar,
  input: WorkerInput,
  result: ResultPayload,
  response: Omit<StoredRequest, 'request'>,
  { responseOnly = false } = {},
): Promise<boolean> {
  const body = JSON.stringify(result);
  const sent = responseOnly ? [] : [via.publish(`${input.options.resultsTopic}/${result.id}`, body)];
  if (response.responseTopic) {
    const correlationData = response.correlationData
      ? Buffer.from(response.correlationData, 'base64')
      : undefined;
    sent.push(via.publish(response.responseTopic, body, correlationData ? { correlationData } : undefined));
  }
  const codes = await Promise.all(sent.map((p) => p.catch(() => -1)));
  if (codes.some((code) => code >= 0x80 || code < 0)) {
    input.log.warn(
      `the broker did not accept the result of ${result.id} (codes ${codes.join(', ')}); result.json holds it`,
    );
  }
  // What counts is the results topic: a response topic the broker refuses must not keep the job from settling.
  const main = codes[0] ?? -1;
  return responseOnly || (main >= 0 && main < 0x80);
}

/**
 * A second, clean connection, opened when first needed: it listens for cancel requests while the job connection
 * holds its delivery, and publishes every result. While a delivery is held, MQTT.js reads nothing on the job
 * connection, not even a PUBACK.
 */
class Sidecar {
  readonly #input: WorkerInput;
  #client: Promise<MqttClient> | undefined;

  constructor(input: WorkerInput) {
    this.#input = input;
  }

  #connect(): Promise<MqttClient> {
    this.#client ??= connectBroker({
      settings: this.#input.options,
      clientId: `${this.#input.options.id}.control`,
      clean: true,
    });
    return this.#client;
  }

  /** Publishes at QoS 1 and resolves with the PUBACK reason code, or -1 when it could not be sent. */
  async publish(topic: string, payload: string, properties?: Record<string, unknown>): Promise<number> {
    try {
      const client = await this.#connect();
      const closed = new Promise<number>((resolve) => client.once('close', () => resolve(-1)));
      const sent = publish(client, topic, payload, { qos: 1, ...(properties ? { properties } : {}) });
      return await Promise.race([sent, closed]);
    } catch {
      return -1;
    }
  }

  /** Calls `onCancel` when a message arrives on `{cancel-topic}/{id}`. */
  async watchCancel(id: string, onCancel: () => void): Promise<void> {
    const topic = `${this.#input.options.cancelTopic}/${id}`;
    try {
      const client = await this.#connect();
      client.on('message', (received) => {
        if (received === topic) onCancel();
      });
      await new Promise<void>((resolve, reject) =>
        client.subscribe(topic, { qos: 1 }, (error) => (error ? reject(error) : resolve())),
      );
    } catch (error) {
      this.#input.log.warn(`cannot listen for cancel requests on ${topic}: ${(error as Error).message}`);
    }
  }

  async close(): Promise<void> {
    const client = await this.#client?.catch(() => undefined);
    if (client) await disconnect(client, { force: true });
  }
}
