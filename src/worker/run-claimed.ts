import type { Delivery, JobConsumer } from '../broker/consumer.js';
import { type Manifest, toResultPayload } from '../job/report.js';
import type { JobEvent } from '../job/run-job.js';
import type { JobRequest } from '../job/spec.js';
import type { Logger } from '../shared/log.js';
import { formatDuration } from '../shared/units.js';
import type { Claim, Standing, StoredRequest } from './claim.js';
import type { JobFolder } from './claiming.js';
import { LogStream } from './log-stream.js';
import { publishResult } from './publish.js';
import { removeRunning } from './running-index.js';
import { loadEngine, type Slot, type WorkerOutcome } from './slot.js';

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
export async function runClaimed(slot: Slot, job: ClaimedJob): Promise<WorkerOutcome> {
  const { request, claim } = job;
  const jobLog = slot.log.child({ job: request.id });
  const now = slot.now ?? Date.now;
  const { consumer } = slot;
  consumer.take();
  consumer.holdOpen(slot.options.keepaliveMs);
  const stopping = stopOnInterruptOrCancel(slot, request.id, jobLog);
  const fencing = heartbeat(claim, slot.options.claimLeaseMs, jobLog, () => stopping.fence());
  const { announce, event } = progress(slot, job, now);
  const logs = logStreamFor(slot, job);
  const { runJobHeld, JobInterrupted } = await loadEngine();
  try {
    const held = await runJobHeld(slot.config, {
      request,
      attempt: claim.attempt,
      paths: job.folder.paths,
      results: job.folder.results,
      log: jobLog,
      signal: stopping.signal,
      listening: stopping.listening,
      onEvent: (e: JobEvent) => {
        if (e.type === 'step-started') logs?.stepStarted(e.step, e.name);
        // A step's last output goes out before its end is announced.
        if (e.type === 'step-ended') logs?.flush();
        event(e.type, eventFields(e));
        if (e.type === 'step-started') announce({ index: e.step, name: e.name });
      },
      ...(logs ? { onOutput: (step: number, chunk: Buffer) => logs.output(step, chunk) } : {}),
      now,
    });
    // The result goes out as soon as result.json is written; the workspace and cgroups are removed after.
    try {
      claim.stopHeartbeat();
      if (logs?.dropped)
        jobLog.warn(`${logs.dropped} batches of step output were not published: the connection was behind`);
      const completion = await completeJob(slot, job, held.manifest, jobLog);
      // Between jobs the slot is idle: its next process says so again, or its will says offline.
      if (completion === 'published') slot.presence.say('idle');
      return outcomeOf(completion, request.id, held.manifest.status);
    } finally {
      await held.release();
    }
  } catch (error) {
    claim.stopHeartbeat();
    if (error instanceof JobInterrupted)
      return fencing.why
        ? { kind: 'fenced', id: request.id, why: fencing.why }
        : { kind: 'interrupted', id: request.id };
    throw error;
  } finally {
    await stopping.dispose();
    await job.folder.results.close();
  }
}

/**
 * The claim's heartbeat while the job runs. Another host takes the job over once the heartbeat is a lease old:
 * after half a lease without one reaching the drive, the job is stopped and this process publishes nothing.
 */
function heartbeat(claim: ClaimedJob['claim'], lease: number, jobLog: Logger, fence: () => void) {
  const fencing: { why: string | undefined } = { why: undefined };
  claim.startHeartbeat(
    Math.max(250, Math.floor(lease / 4)),
    Math.floor(lease / 2),
    (error) => jobLog.warn(`claim heartbeat failed: ${error.message}`),
    (silentMs) => {
      fencing.why = `no claim heartbeat reached the shared drive for ${formatDuration(silentMs)} (half the ${formatDuration(lease)} lease)`;
      jobLog.error(
        `${fencing.why}: stopping the job; this process publishes nothing, and a slot takes it over`,
      );
      fence();
    },
  );
  return fencing;
}

function outcomeOf(completion: Completion, id: string, status: string): WorkerOutcome {
  switch (completion) {
    case 'published':
      return { kind: 'ran', id, status };
    case 'connection-lost':
      return { kind: 'connection-lost', id };
    case 'taken-over':
      return { kind: 'fenced', id, why: 'another slot took the job over while it ran' };
    case 'unreachable':
      return { kind: 'fenced', id, why: 'the shared drive did not answer when the result was due' };
  }
}

/** Step output over MQTT (`--logs-topic`), on the job connection: QoS 0 needs no acknowledgement to read. */
function logStreamFor(slot: Slot, job: ClaimedJob): LogStream | undefined {
  const root = slot.options.logsTopic;
  if (root === undefined) return undefined;
  const topic = `${root}/${job.request.id}`;
  return new LogStream({
    id: job.request.id,
    workerId: slot.options.id,
    attempt: job.claim.attempt,
    send: (payload) => slot.consumer.fireAndForget(topic, payload),
    backlog: () => slot.consumer.backlog,
  });
}

/** The slot's busy presence (again at each step) and the job's status events, starting with `claimed`. */
function progress(slot: Slot, job: ClaimedJob, now: () => number) {
  const { request, claim } = job;
  const busy = { job: request.id, attempt: claim.attempt, jobStartedAt: new Date(now()) };
  const announce = (step?: { index: number; name: string }): void =>
    slot.presence.say('busy', step ? { ...busy, step: { ...step, startedAt: new Date(now()) } } : busy);
  announce();
  const event = statusEvents(slot.consumer, slot, request.id);
  event('claimed', { attempt: claim.attempt });
  return { announce, event };
}

/**
 * A signal that stops the job when the worker is told to stop (reason `interrupted`) or a cancel request comes
 * (`cancelled`). Listening for cancels starts alongside the job's staging, and its first step waits for the
 * subscription (`listening`): a cancel sent when the step is announced is heard.
 */
function stopOnInterruptOrCancel(slot: Slot, id: string, jobLog: Logger) {
  const stop = new AbortController();
  const onInterrupt = (): void => stop.abort('interrupted');
  if (slot.signal.aborted) onInterrupt();
  else slot.signal.addEventListener('abort', onInterrupt, { once: true });
  const control = slot.sidecar.watchCancel(id, () => {
    jobLog.warn('cancel request received; stopping the job');
    stop.abort('cancelled');
  });
  return {
    signal: stop.signal,
    listening: control,
    /** The claim is lost (self-fencing): stop the steps as an interruption does, with nothing written. */
    fence: (): void => stop.abort('interrupted'),
    dispose: async (): Promise<void> => {
      slot.signal.removeEventListener('abort', onInterrupt);
      await control;
    },
  };
}

/** How a finished job's hand-over ended: its result published, or why not. */
type Completion = 'published' | 'connection-lost' | Exclude<Standing, 'ours'>;

/**
 * Publishes a finished job's result, acknowledges its delivery and records both. Nothing goes out unless the
 * claim is still this run's (read back from the drive): a runner cut off from the drive, or taken over meanwhile,
 * never publishes a result beside the take-over's.
 */
export async function completeJob(
  slot: Slot,
  job: ClaimedJob,
  manifest: Manifest,
  log: Logger,
): Promise<Completion> {
  log.info(`job ${manifest.status} (exit code ${manifest.exitCode}) in ${manifest.durationMs} ms`, {
    attempt: manifest.attempt,
  });
  if (manifest.error) log.error(`${manifest.error.code}: ${manifest.error.message}`);
  const standing = await job.claim.standing();
  if (standing !== 'ours') {
    log.error(
      standing === 'taken-over'
        ? 'another slot took this job over while it ran: its result is not published from here'
        : 'the shared drive does not answer: the result is not published; a slot takes the job over',
    );
    return standing;
  }
  if (!slot.consumer.connected) {
    log.warn(
      'the connection to the broker was lost during the job; result.json is written and the next slot to see the job publishes it',
    );
    return 'connection-lost';
  }
  // The delivery is acknowledged only once the broker has accepted the result: a worker that dies in between
  // leaves it in the session (and the job in the index), and the next slot to see it publishes the stored result.
  if (!(await publishResult(slot.sidecar, slot, toResultPayload(manifest), job.stored)))
    return 'connection-lost';
  // The marker first: a death between the broker's PUBACK and the marker is the one window in which another
  // slot publishes the same result again (README, "Delivery").
  await job.claim.markPublished();
  job.delivery?.ack();
  await removeRunning(job.folder.paths.root, manifest.id, log);
  return 'published';
}

export function statusEvents(
  consumer: JobConsumer,
  slot: Slot,
  id: string,
): (type: string, fields?: Record<string, unknown>) => void {
  const now = slot.now ?? Date.now;
  return (type, fields = {}) =>
    consumer.fireAndForget(
      `${slot.options.statusTopic}/${id}`,
      JSON.stringify({
        id,
        workerId: slot.options.id,
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
