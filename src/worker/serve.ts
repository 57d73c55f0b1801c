import { type Delivery, JobConsumer } from '../broker/consumer.js';
import { sharedSubscriptionProblem } from '../broker/probe.js';
import { Sidecar } from '../broker/sidecar.js';
import type { Options } from '../config/options.js';
import { parseRequest } from '../job/request.js';
import { ErrorCode, isDriveFailure, toErrorInfo, WorkerError } from '../shared/errors.js';
import type { Logger } from '../shared/log.js';
import { type PresenceSource, presenceMessage } from '../shared/presence.js';
import { isShared } from '../shared/topics.js';
import { takeOverOrphan } from './claiming.js';
import {
  loadEngine,
  presenceTopic,
  type Skipped,
  type Slot,
  type WorkerInput,
  type WorkerOutcome,
} from './slot.js';

export type { Links, Skipped, WorkerInput, WorkerOutcome } from './slot.js';

import { answerFailure, handleDelivery } from './delivery.js';
import { PresenceBoard, unfinishedJob } from './presence-board.js';
import { IndexRound, LOOK_SIZE } from './running-index.js';
import { sessionLost } from './session-memory.js';

// The broker worker's loop: connect under the slot's session, hand each delivery to delivery.ts, look for jobs
// whose worker died while idle (claiming.ts), run at most one job (run-claimed.ts), disconnect.

export const WILL_DELAY_SECONDS = 10;

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
    topics: options.topics,
  };
  // Read while the broker answers, and before this process says idle there: a job the last process of this slot
  // died in is looked at first.
  const unfinished = unfinishedJob(options.jobsDir, options.id, log);
  if (options.protocol === '3.1.1' && options.topics.some(isShared)) {
    // MQTT 3.1.1 cannot say it lacks shared subscriptions: proved before a job is taken (broker/probe.ts).
    const problem = await sharedSubscriptionProblem(options, options.id);
    if (problem)
      throw new WorkerError(
        ErrorCode.BROKER_UNSUITABLE,
        `${problem}; use the plain topic (pull dispatch, the default) on this broker`,
      );
  }
  const consumer = await JobConsumer.connect({
    settings: options,
    clientId: options.id,
    clean: options.clean,
    sessionExpirySeconds: options.sessionExpirySeconds,
    topics: options.topics,
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
  log.info(`connected to the broker as ${options.id}; waiting for one job on ${options.topics.join(', ')}`, {
    session: consumer.sessionPresent ? 'resumed' : 'new',
  });
  if (sessionLost(options.workspacesDir, options.id, consumer.sessionPresent, !options.clean)) {
    log.warn(
      'SESSION LOST: this slot had a session on the broker and the broker has none now: the requests queued for it are gone (a broker that keeps sessions in memory restarted, or the session expired). Controllers that must not lose a request use `submit --confirm`',
    );
  }
  const presence = new PresenceBoard(consumer, options, source, log);
  const lastJob = await unfinished;
  presence.say('idle');
  const sidecar = new Sidecar(input);
  try {
    return await serve(
      { ...input, consumer, sidecar, presence },
      new IndexRound(LOOK_SIZE, Math.random, lastJob),
    );
  } finally {
    await Promise.all([sidecar.close(), presence.close()]);
  }
}

export function warnAboutSettings(options: Options, log: Logger): void {
  if (options.clean) {
    log.warn(
      '--clean: the broker keeps nothing for this worker while it is away; jobs queued for it are lost when it exits',
    );
  }
  if (options.protocol === '3.1.1') {
    log.warn(
      "MQTT 3.1.1 cannot ask the broker for one message in flight: limit it on the broker (Mosquitto: max_inflight_messages 1; RabbitMQ: mqtt.prefetch = 1; Aedes and ejabberd have no such setting); otherwise the requests sent ahead wait unacknowledged and come back to the slot's next run",
    );
  }
  if (options.topics.some(isShared) && !options.clean && options.sessionExpirySeconds !== undefined) {
    log.warn(
      `--session-expiry ${options.sessionExpirySeconds}s with a shared subscription: the jobs dealt to this slot are lost if it stays away longer`,
    );
  }
}

/** How often an idle slot looks for jobs whose worker died: often enough to take them over "at once". */
export function scanInterval(options: Options): number {
  return Math.min(5000, Math.max(500, Math.floor(options.claimLeaseMs / 4)));
}

export type Woken =
  | { readonly kind: 'delivery'; readonly delivery: Delivery | undefined }
  | { readonly kind: 'scan' | 'idle-timeout' | 'stopped' };

/**
 * The idle loop: every delivery is handled in turn until one is run; between deliveries, the index of running
 * claims is scanned for orphans. A process runs at most one job.
 */
export async function serve(slot: Slot, round = new IndexRound()): Promise<WorkerOutcome> {
  const { options, log } = slot;
  const { consumer } = slot;
  let pending = consumer.next();
  let idleSince = Date.now();
  let scanAt = 0;
  for (;;) {
    if (Date.now() >= scanAt) {
      const orphan = await takeOverOrphan(slot, round);
      if (orphan) return orphan;
      scanAt = Date.now() + scanInterval(options);
    }
    const idleLeft =
      options.idleTimeoutMs === undefined ? undefined : idleSince + options.idleTimeoutMs - Date.now();
    const woken = await wake(pending, slot.signal, scanAt - Date.now(), idleLeft);
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
    const handled = await handleSafely(slot, woken.delivery);
    if (handled.kind !== 'skipped') return handled;
    if (!consumer.connected) return { kind: 'connection-lost', id: handled.id };
    idleSince = Date.now();
  }
}

export async function wake(
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
export async function handleSafely(slot: Slot, delivery: Delivery): Promise<WorkerOutcome | Skipped> {
  try {
    return await handleDelivery(slot, delivery);
  } catch (error) {
    const info = toErrorInfo(error);
    const parsed = parseRequest(delivery.payload, {
      ...slot.requestPolicy,
      nowMs: (slot.now ?? Date.now)(),
    });
    const id = parsed.ok ? parsed.request.id : undefined;
    // The drive itself failed (a network mount gone, timing out): that says nothing about the job. Never a
    // result: the request stays unacknowledged for this slot's next run or another slot.
    if (id !== undefined && isDriveFailure(error))
      return { kind: 'not-ready', id, why: `the shared drive failed: ${(error as Error).message}` };
    slot.log.error(`${info.code}: ${info.message}`, {
      ...(id ? { job: id } : {}),
      // A stack trace is for a bug, not for a full drive.
      ...(info.code === ErrorCode.INTERNAL ? { stack: (error as Error).stack } : {}),
    });
    if (!slot.consumer.connected) return { kind: 'connection-lost', id };
    await answerFailure(slot, delivery, id, info);
    return { kind: 'skipped', id, action: 'failed' };
  }
}
