import { readdir, unlink } from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { JobConsumer } from '../broker/consumer.js';
import type { Options } from '../config/options.js';
import { readSmallFile } from '../job/job-file.js';
import { writeFileAtomic } from '../shared/atomic-write.js';
import { idProblem } from '../shared/ids.js';
import type { Logger } from '../shared/log.js';
import {
  type BusyWith,
  type Presence,
  type PresenceSource,
  type PresenceState,
  parsePresence,
  presenceMessage,
} from '../shared/presence.js';
import { withIndexFolder } from './running-index.js';

// A slot's presence is said in two places. On the broker, a retained message per slot, which the broker's will
// turns offline when the process dies. On the drive, `{jobs-dir}/.mqtt-fs-worker/slots/{id}.json`: RabbitMQ hands
// no retained message to a wildcard subscription, so `workers` there sees nothing on the broker. A file has no will:
// it is written again every REFRESH_MS while the process lives, and one older than STALE_MS reads as offline.

const SLOTS_DIR = 'slots';
export const PRESENCE_REFRESH_MS = 30_000;
export const PRESENCE_STALE_MS = 3 * PRESENCE_REFRESH_MS;
const MAX_FILE_BYTES = 64 * 1024;
const CLOSE_WAIT_MS = 2000;

export class PresenceBoard {
  readonly source: PresenceSource;
  readonly #consumer: JobConsumer;
  readonly #topic: string;
  readonly #jobsDir: string;
  readonly #log: Logger;
  #last: { state: PresenceState; busy: BusyWith | undefined } = { state: 'idle', busy: undefined };
  #timer: NodeJS.Timeout | undefined;
  /** Drive writes, one after another: a slow drive never has two in flight, and the last one written is the last said. */
  #writing: Promise<void> = Promise.resolve();
  /** A write is queued and has not read the state yet. */
  #dirty = false;

  constructor(consumer: JobConsumer, options: Options, source: PresenceSource, log: Logger) {
    this.#consumer = consumer;
    this.#topic = `${options.presenceTopic}/${options.id}`;
    this.#jobsDir = options.jobsDir;
    this.#log = log;
    this.source = source;
  }

  /** Says the slot's state on the broker (at once) and on the drive (when the state or the job changed). */
  say(state: PresenceState, busy?: BusyWith): void {
    this.#consumer.fireAndForget(this.#topic, presenceMessage(this.source, state, busy), true);
    const changed = state !== this.#last.state || busy?.job !== this.#last.busy?.job || !this.#timer;
    this.#last = { state, busy };
    if (!changed) return;
    this.#write();
    if (!this.#timer) {
      this.#timer = setInterval(() => this.#write(), PRESENCE_REFRESH_MS);
      this.#timer.unref();
    }
  }

  /** The process ends: the drive says offline (the broker hears it from the will). */
  async close(): Promise<void> {
    clearInterval(this.#timer);
    if (this.#timer) {
      this.#last = { state: 'offline', busy: undefined };
      this.#write();
    }
    // A drive that stopped answering must not keep the process from exiting: its file then reads offline later.
    await Promise.race([this.#writing, sleep(CLOSE_WAIT_MS, undefined, { ref: false })]);
  }

  /** Writes the latest state; a write asked for while one is under way is made once, after it, with the latest. */
  #write(): void {
    if (this.#dirty) return;
    this.#dirty = true;
    this.#writing = this.#writing.then(() => {
      this.#dirty = false;
      const message = presenceMessage(this.source, this.#last.state, this.#last.busy);
      return withIndexFolder(
        this.#jobsDir,
        SLOTS_DIR,
        true,
        this.#log,
        (dir) => writeFileAtomic(dir, `${this.source.id}.json`, message, { durable: false }),
        undefined,
      ).catch((error: Error) => {
        this.#log.debug(`presence not written to the drive: ${error.message}`);
      });
    });
  }
}

/**
 * The job this slot's previous process said it was running and never said it finished: it died mid-job. Read
 * from the drive before this process writes there; undefined when there is no such file or it says otherwise.
 */
export async function unfinishedJob(jobsDir: string, id: string, log?: Logger): Promise<string | undefined> {
  const read = (dir: string) => readPresenceFile(dir, `${id}.json`);
  const said = await withIndexFolder(jobsDir, SLOTS_DIR, false, log, read, undefined).catch(() => undefined);
  return said?.id === id && said.state === 'busy' && said.pid !== process.pid ? said.job : undefined;
}

/** A slot's file: never through a link, never blocking on a FIFO, never past 64 KiB; anything else is none. */
async function readPresenceFile(dir: string, name: string): Promise<Presence | undefined> {
  const text = await readSmallFile(path.join(dir, name), MAX_FILE_BYTES).catch(() => undefined);
  return text === undefined ? undefined : parsePresence(Buffer.from(text));
}

/**
 * The slots' presence as written on the drive, for the brokers that do not show it. An entry not written again
 * within PRESENCE_STALE_MS is offline (its process died without saying so), last seen when it was written.
 */
export async function drivePresence(jobsDir: string, now: number, log?: Logger): Promise<Presence[]> {
  const read = async (dir: string): Promise<Presence[]> => {
    const found: Presence[] = [];
    for (const name of await readdir(dir)) {
      const id = name.endsWith('.json') ? name.slice(0, -5) : undefined;
      if (id === undefined || idProblem(id) !== undefined) continue;
      const presence = await readPresenceFile(dir, name);
      if (!presence || presence.id !== id) continue;
      const stale = presence.state !== 'offline' && now - Date.parse(presence.at) > PRESENCE_STALE_MS;
      found.push(stale ? { ...presence, state: 'offline' } : presence);
    }
    return found.sort(byId);
  };
  return withIndexFolder(jobsDir, SLOTS_DIR, false, log, read, [] as Presence[]).catch(() => []);
}

/** Removes a retired slot's presence file (`drain`); nothing to do where there is none. */
export async function forgetDrivePresence(jobsDir: string, id: string, log?: Logger): Promise<void> {
  const remove = (dir: string) => unlink(path.join(dir, `${id}.json`)).catch(() => {});
  await withIndexFolder(jobsDir, SLOTS_DIR, false, log, remove, undefined).catch(() => {});
}

/**
 * The broker's list completed from the drive's: a slot the broker shows is shown as the broker says (its will is
 * the better witness); one only on the drive is added.
 */
export function mergePresence(broker: readonly Presence[], drive: readonly Presence[]): Presence[] {
  const merged = new Map(drive.map((p) => [p.id, p]));
  for (const p of broker) merged.set(p.id, p);
  return [...merged.values()].sort(byId);
}

const byId = (a: Presence, b: Presence): number => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0);
