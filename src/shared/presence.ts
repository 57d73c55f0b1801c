// A slot's retained presence message (`{presence-topic}/{worker id}`): what `workers` lists. Written by the worker
// when it connects (idle), when it takes a job and at each step (busy), and by the broker as the last will
// (offline), which is composed at connect time: its `at` is when the slot's last process connected.

export type PresenceState = 'idle' | 'busy' | 'offline';

export interface Presence {
  readonly id: string;
  readonly state: PresenceState;
  readonly host?: string;
  readonly version?: string;
  readonly pid?: number;
  /** When the process that wrote this connected. */
  readonly connectedAt?: string;
  /** When this message was written. */
  readonly at: string;
  readonly job?: string;
  readonly attempt?: number;
  readonly jobStartedAt?: string;
  readonly step?: number;
  readonly stepName?: string;
  readonly stepStartedAt?: string;
  /** The subscriptions the slot takes jobs from (`drain` reads whether they were shared). */
  readonly topics?: readonly string[];
}

export interface PresenceSource {
  readonly id: string;
  readonly host: string;
  readonly version: string;
  readonly connectedAt: Date;
  readonly topics: readonly string[];
}

export interface BusyWith {
  readonly job: string;
  readonly attempt: number;
  readonly jobStartedAt: Date;
  readonly step?: { readonly index: number; readonly name: string; readonly startedAt: Date };
}

export function presenceMessage(source: PresenceSource, state: PresenceState, busy?: BusyWith): string {
  const message: Presence = {
    id: source.id,
    state,
    host: source.host,
    version: source.version,
    pid: process.pid,
    connectedAt: source.connectedAt.toISOString(),
    topics: source.topics,
    at: new Date().toISOString(),
    ...(busy
      ? {
          job: busy.job,
          attempt: busy.attempt,
          jobStartedAt: busy.jobStartedAt.toISOString(),
          ...(busy.step
            ? {
                step: busy.step.index,
                stepName: busy.step.name,
                stepStartedAt: busy.step.startedAt.toISOString(),
              }
            : {}),
        }
      : {}),
  };
  return JSON.stringify(message);
}

/** A presence message as received; undefined for anything else (an empty retained message clears a slot). */
export function parsePresence(payload: Buffer): Presence | undefined {
  try {
    const value = JSON.parse(payload.toString('utf8')) as Partial<Presence> | null;
    if (!value || typeof value.id !== 'string' || typeof value.at !== 'string') return undefined;
    if (value.state !== 'idle' && value.state !== 'busy' && value.state !== 'offline') return undefined;
    return value as Presence;
  } catch {
    return undefined;
  }
}
