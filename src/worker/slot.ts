import type { JobConsumer } from '../broker/consumer.js';
import type { Sidecar } from '../broker/sidecar.js';
import type { Options } from '../config/options.js';
import type { RequestPolicy } from '../job/request.js';
import type { EngineConfig } from '../job/run-job.js';
import type { Logger } from '../shared/log.js';
import type { Identity } from './claim.js';
import type { PresenceBoard } from './presence-board.js';

// What every part of a slot's run shares: its input, how a run can end, its two connections, the engine's loader
// and its presence topic. serve.ts (the loop) sits on top of the modules that use these: none imports it back.

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
  | { readonly kind: 'not-ready'; readonly id: string; readonly why: string }
  /**
   * The claimed job lost its claim (its heartbeat stopped reaching the drive, or a slot took it over): the job was
   * stopped or its result held back, nothing was published, and a slot takes it over.
   */
  | { readonly kind: 'fenced'; readonly id: string; readonly why: string };

/** What became of a delivery the process did not run: it was answered or left, and acknowledged. */
export type Skipped = { readonly kind: 'skipped'; readonly id: string | undefined; readonly action: string };

// The job engine (step processes, cgroups, file walking: ~7 ms of module loading) starts loading once the
// connection is under way, while the broker answers, rather than before it; a job awaits what is loaded by then.
export const loadEngine = () => import('../job/run-job.js');

/** The job connection, and the second one opened when needed (see Sidecar). */
export interface Links {
  readonly consumer: JobConsumer;
  readonly sidecar: Sidecar;
  /** The slot's presence, on the broker and on the drive. */
  readonly presence: PresenceBoard;
}

/** One slot's run: its input and its connections, what every worker function takes first. */
export type Slot = WorkerInput & Links;

export function presenceTopic(options: Options): string {
  return `${options.presenceTopic}/${options.id}`;
}
