import type { Delivery, JobConsumer } from '../broker/consumer.js';
import { type Manifest, toResultPayload } from '../job/report.js';
import type { JobEvent } from '../job/run-job.js';
import type { JobRequest } from '../job/spec.js';
import type { Logger } from '../shared/log.js';
import { presenceMessage } from '../shared/presence.js';
import type { Claim, StoredRequest } from './claim.js';
import type { JobFolder } from './claiming.js';
import { publishResult } from './publish.js';
import { removeRunning } from './running-index.js';
import { type Links, loadEngine, presenceTopic, type WorkerInput, type WorkerOutcome } from './serve.js';

// A claimed job, run: heartbeat, presence, status events and cancel around the engine, then its result.

export interface ClaimedJob {
  readonly request: JobRequest;
  readonly folder: JobFolder;
  readonly claim: Claim;
  readonly stored: StoredRequest;
  /** The delivery that brought it; none for a job taken over from the index. */
  readonly delivery?: Delivery;
}

/** Runs the job this process claimed, publishes its result and acknowledges its delivery. */
export async function runClaimed(links: Links, input: WorkerInput, job: ClaimedJob): Promise<WorkerOutcome> {
  const { request, claim } = job;
  const jobLog = input.log.child({ job: request.id });
  const now = input.now ?? Date.now;
  const { consumer } = links;
  consumer.take();
  consumer.holdOpen(input.options.keepaliveMs);
  claim.startHeartbeat(Math.max(1000, Math.floor(input.options.claimLeaseMs / 4)), (error) =>
    jobLog.warn(`claim heartbeat failed: ${error.message}`),
  );
  const { announce, event } = progress(links, input, job, now);
  const { runJob, JobInterrupted } = await loadEngine();
  const stopping = stopOnInterruptOrCancel(links, input, request.id, jobLog);
  try {
    let published = false;
    const outcome = await runJob(input.config, {
      request,
      attempt: claim.attempt,
      paths: job.folder.paths,
      results: job.folder.results,
      log: jobLog,
      signal: stopping.signal,
      listening: stopping.listening,
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
          consumer.fireAndForget(presenceTopic(input.options), presenceMessage(links.source, 'idle'), true);
      },
    });
    if (!published) return { kind: 'connection-lost', id: request.id };
    return { kind: 'ran', id: request.id, status: outcome.manifest.status };
  } catch (error) {
    claim.stopHeartbeat();
    if (error instanceof JobInterrupted) return { kind: 'interrupted', id: request.id };
    throw error;
  } finally {
    await stopping.dispose();
    await job.folder.results.close();
  }
}

/** The slot's busy presence (again at each step) and the job's status events, starting with `claimed`. */
function progress(links: Links, input: WorkerInput, job: ClaimedJob, now: () => number) {
  const { request, claim } = job;
  const busy = { job: request.id, attempt: claim.attempt, jobStartedAt: new Date(now()) };
  const announce = (step?: { index: number; name: string }): void =>
    links.consumer.fireAndForget(
      presenceTopic(input.options),
      presenceMessage(
        links.source,
        'busy',
        step ? { ...busy, step: { ...step, startedAt: new Date(now()) } } : busy,
      ),
      true,
    );
  announce();
  const event = statusEvents(links.consumer, input, request.id);
  event('claimed', { attempt: claim.attempt });
  return { announce, event };
}

/**
 * A signal that stops the job when the worker is told to stop (reason `interrupted`) or a cancel request comes
 * (`cancelled`). Listening for cancels starts alongside the job's staging, and its first step waits for the
 * subscription (`listening`): a cancel sent when the step is announced is heard.
 */
function stopOnInterruptOrCancel(links: Links, input: WorkerInput, id: string, jobLog: Logger) {
  const stop = new AbortController();
  const onInterrupt = (): void => stop.abort('interrupted');
  if (input.signal.aborted) onInterrupt();
  else input.signal.addEventListener('abort', onInterrupt, { once: true });
  const control = links.sidecar.watchCancel(id, () => {
    jobLog.warn('cancel request received; stopping the job');
    stop.abort('cancelled');
  });
  return {
    signal: stop.signal,
    listening: control,
    dispose: async (): Promise<void> => {
      input.signal.removeEventListener('abort', onInterrupt);
      await control;
    },
  };
}

/** Publishes a finished job's result, acknowledges its delivery and records both; false when it could not. */
export async function completeJob(
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
  // The marker first: a death between the broker's PUBACK and the marker is the one window in which another
  // slot publishes the same result again (README, "Delivery").
  await job.claim.markPublished();
  job.delivery?.ack();
  await removeRunning(job.folder.paths.root, manifest.id, log);
  return true;
}

export function statusEvents(
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

export function eventFields(event: JobEvent): Record<string, unknown> {
  const { type: _type, ...fields } = event;
  return fields;
}
