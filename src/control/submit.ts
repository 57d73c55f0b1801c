import { createHash, randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import {
  type BrokerClient,
  type BrokerSettings,
  connectBroker,
  disconnect,
  publish,
} from '../broker/client.js';
import type { ResultPayload } from '../job/report.js';
import { parseRequest } from '../job/request.js';
import type { RawStep } from '../job/spec.js';
import { ErrorCode, WorkerError } from '../shared/errors.js';
import { jsonObject } from '../shared/json.js';
import type { Logger } from '../shared/log.js';
import { parsePresence } from '../shared/presence.js';
import { signRequest } from '../shared/signing.js';
import { plainTopic } from '../shared/topics.js';

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
  /** Where workers publish progress: their `claimed` event confirms that one took the request. */
  readonly statusTopic: string;
  /** The slots' retained presence root: a waiting submit says when no slot is online to take the request. */
  readonly presenceTopic?: string;
  /** The slots' presence on the drive, by id (brokers that send no retained message to a wildcard show none). */
  readonly slotsOnDrive?: () => Promise<ReadonlyMap<string, string>>;
  /** Publish again when no worker took the request within this (doubling, up to 5 minutes); undefined: never. */
  readonly confirmMs?: number;
  /** Each status event of the job (`submit --follow`). */
  readonly onStatus?: (event: Record<string, unknown>) => void;
  /** Each batch of the job's step output (`submit --follow`), from `{logsTopic}/{id}`. */
  readonly onLog?: (chunk: Record<string, unknown>) => void;
  readonly logsTopic?: string;
}

export type SubmitOutcome =
  | { readonly kind: 'published' }
  | { readonly kind: 'result'; readonly result: ResultPayload }
  /** A worker refused the request itself (invalid, unsigned, too large): its rejection message. */
  | { readonly kind: 'rejected'; readonly rejection: Record<string, unknown> }
  | { readonly kind: 'timeout'; readonly waitedFor: 'subscriber' | 'result' };

const NO_MATCHING_SUBSCRIBERS = 0x10;

/**
 * Publishes a job request, retrying while the broker answers that nobody is subscribed (it would drop the
 * message), and with `wait` returns the job's result. The result subscription is made before the request is
 * published, so a fast job's result cannot be missed. With `confirmMs`, the request is published again (backing
 * off) until a worker says it took it (its `claimed` status event, or the result): a broker that crashed before
 * saving the request loses nothing, and a lost connection is made again.
 */
export async function submit(input: SubmitInput): Promise<SubmitOutcome> {
  // A waiting submit asks for the answer on a topic of its own under the results root: a slot that meets the job
  // finished answers there, so a result published while this submit was away is not missed.
  const reply = input.wait
    ? { topic: `${input.resultsTopic}/${input.id}/reply-${randomBytes(6).toString('hex')}` }
    : undefined;
  const request: Record<string, unknown> = {
    id: input.id,
    ...(input.steps ? { steps: input.steps } : {}),
    ...(input.rerun ? { rerun: input.rerun } : {}),
    // The body names the reply topic where a property cannot carry it: MQTT 3.1.1 has no properties, and
    // properties are not signed.
    ...(reply && (input.secret || input.settings.protocol === '3.1.1') ? { responseTopic: reply.topic } : {}),
  };
  // Signed requests are signed again for each publication: a copy re-published minutes later must not be stale.
  const sign = () => JSON.stringify(input.secret ? signRequest(request, input.secret, Date.now()) : request);
  const check = parseRequest(sign(), input.secret ? { secret: input.secret } : {});
  if (!check.ok)
    throw new WorkerError(ErrorCode.INVALID_OPTION, `submit: ${check.error.message}`, {
      problems: check.error.problems,
    });
  const run = new Submission(input, sign, reply?.topic);
  try {
    return await run.until(Date.now() + input.timeoutMs);
  } finally {
    await run.close();
  }
}

const sha256 = (text: string): string => createHash('sha256').update(text).digest('hex');

/** One request on its way: its connection (made again when lost, with `confirmMs`), what came back, what was sent. */
class Submission {
  readonly #input: SubmitInput;
  readonly #sign: () => string;
  /** The SHA-256 of every body published: a refusal counts only for one of them. */
  readonly #sent = new Set<string>();
  #client: BrokerClient | undefined;
  #settle: (outcome: SubmitOutcome) => void = () => {};
  readonly #settled: Promise<SubmitOutcome>;
  #confirmed = false;
  #published = false;
  /** Each slot's presence state, by id (`submit --wait` says when none is online). */
  readonly #slots = new Map<string, string>();
  #slotWatch: NodeJS.Timeout[] | undefined;
  readonly #reply: string | undefined;

  constructor(input: SubmitInput, sign: () => string, reply: string | undefined) {
    this.#input = input;
    this.#sign = sign;
    this.#reply = reply;
    this.#settled = new Promise((resolve) => {
      this.#settle = resolve;
    });
  }

  get #topics() {
    const { resultsTopic, rejectedTopic, statusTopic, id } = this.#input;
    return {
      result: `${resultsTopic}/${id}`,
      rejected: `${rejectedTopic}/${id}`,
      status: `${statusTopic}/${id}`,
    };
  }

  async until(deadline: number): Promise<SubmitOutcome> {
    const { confirmMs, log, id } = this.#input;
    let every = confirmMs;
    for (;;) {
      const connected = await this.#connect(deadline);
      if (!connected) return { kind: 'timeout', waitedFor: 'subscriber' };
      const { closed } = connected;
      const sent = await this.#publish(deadline, closed);
      if (sent === 'timeout') return { kind: 'timeout', waitedFor: 'subscriber' };
      if (sent === 'published' && !this.#input.wait && confirmMs === undefined) return { kind: 'published' };
      for (;;) {
        const waitMs = Math.max(0, Math.min(deadline - Date.now(), every ?? Number.POSITIVE_INFINITY));
        const woken = await race(this.#settled, closed, waitMs);
        if (woken !== 'timer' && woken !== 'closed') return woken;
        if (!this.#input.wait && this.#confirmed) return { kind: 'published' };
        if (Date.now() >= deadline)
          return { kind: 'timeout', waitedFor: this.#published ? 'result' : 'subscriber' };
        if (woken === 'closed') {
          if (confirmMs === undefined) {
            throw new WorkerError(ErrorCode.BROKER_UNREACHABLE, 'the connection to the broker was lost');
          }
          log.warn(`the connection to the broker was lost; connecting again to make sure ${id} is taken`);
          break;
        }
        if (!this.#confirmed && every !== undefined) {
          log.warn(`no worker took ${id} within ${Math.round(every / 1000)}s; publishing it again`);
          if ((await this.#publish(deadline, closed)) === 'closed') break;
          every = Math.min(every * 2, 5 * 60_000);
        }
      }
    }
  }

  /** Connects and subscribes; resolves with the connection's close, or undefined when the deadline passed. */
  async #connect(deadline: number): Promise<{ closed: Promise<'closed'> } | undefined> {
    for (;;) {
      try {
        const client = await connectBroker({
          settings: this.#input.settings,
          clientId: `submit-${randomBytes(6).toString('hex')}`,
          clean: true,
        });
        this.#client = client;
        const closed = new Promise<'closed'>((resolve) => client.once('close', () => resolve('closed')));
        client.on('message', (topic, payload) => this.#receive(topic, payload));
        const { result, rejected, status } = this.#topics;
        const presence = this.#input.presenceTopic;
        const topics = [
          ...(this.#input.wait ? [result, rejected, status] : []),
          ...(this.#input.wait && presence ? [`${presence}/+`] : []),
          ...(this.#reply ? [this.#reply] : []),
          ...(this.#input.confirmMs !== undefined ? [status, result] : []),
          ...(this.#input.onStatus ? [status] : []),
          ...(this.#input.onLog && this.#input.logsTopic
            ? [`${this.#input.logsTopic}/${this.#input.id}`]
            : []),
        ];
        if (topics.length > 0) await client.subscribeAsync([...new Set(topics)], { qos: 1 });
        return { closed };
      } catch (error) {
        // Without confirmation a broker that is not there is the caller's answer; with it, wait for the broker.
        if (this.#input.confirmMs === undefined) throw error;
        if (Date.now() + 1000 > deadline) return undefined;
        await sleep(1000);
      }
    }
  }

  async #publish(deadline: number, closed: Promise<'closed'>): Promise<'published' | 'timeout' | 'closed'> {
    const client = this.#client as BrokerClient;
    const topic = plainTopic(this.#input.topic);
    for (let delay = 200; ; delay = Math.min(delay * 2, 5000)) {
      const body = this.#sign();
      this.#sent.add(sha256(body));
      const options =
        this.#reply && this.#input.settings.protocol === '5'
          ? { qos: 1 as const, properties: { responseTopic: this.#reply } }
          : { qos: 1 as const };
      const code = await Promise.race([publish(client, topic, body, options).catch(() => -1), closed]);
      if (code === 'closed' || code === -1) return 'closed';
      if (code !== NO_MATCHING_SUBSCRIBERS && code < 0x80) break;
      if (code >= 0x80)
        throw new WorkerError(
          ErrorCode.BROKER_REFUSED,
          `The broker refused the request on ${topic} (code ${code})`,
        );
      if (Date.now() + delay > deadline) return 'timeout';
      const left = Math.max(0, Math.round((deadline - Date.now()) / 1000));
      this.#input.log.info(
        `nobody is subscribed to ${topic} yet (the broker would drop the request); retrying in ${delay} ms, giving up in ${left}s (--timeout)`,
      );
      await sleep(delay);
    }
    this.#published = true;
    this.#input.log.info(`published job ${this.#input.id} to ${topic}`);
    if (this.#input.wait) this.#watchSlots();
    return 'published';
  }

  /**
   * While nobody took the request, says so when no slot is online (from their retained presence): at once (once
   * the retained burst is in), then every 30 s. The request is not lost: it waits in the offline slots' sessions.
   */
  #watchSlots(): void {
    if (this.#slotWatch || !this.#input.presenceTopic) return;
    const say = async (): Promise<void> => {
      const onDrive =
        (await this.#input.slotsOnDrive?.().catch(() => undefined)) ?? new Map<string, string>();
      if (this.#confirmed) return;
      const states = [...new Map([...onDrive, ...this.#slots]).values()];
      if (states.some((state) => state !== 'offline')) return;
      const offline = states.length;
      this.#input.log.warn(
        offline > 0
          ? `no slot is online: the request waits in ${offline} offline session${offline === 1 ? '' : 's'} until a slot starts`
          : `no slot is online (none has a presence on ${this.#input.presenceTopic}/+ or in the jobs directory): the request waits for a slot to start`,
      );
    };
    this.#slotWatch = [setTimeout(() => void say(), 500), setInterval(() => void say(), 30_000)];
    for (const timer of this.#slotWatch) timer.unref();
  }

  #receive(topic: string, payload: Buffer): void {
    const { result, rejected, status } = this.#topics;
    if (this.#input.logsTopic && topic === `${this.#input.logsTopic}/${this.#input.id}`) {
      const chunk = jsonObject(payload);
      if (chunk?.id === this.#input.id) this.#input.onLog?.(chunk);
      return;
    }
    const presence = this.#input.presenceTopic;
    if (presence && topic.startsWith(`${presence}/`)) {
      const slot = parsePresence(payload);
      const id = topic.slice(presence.length + 1);
      if (slot) this.#slots.set(id, slot.state);
      else this.#slots.delete(id);
      return;
    }
    if (topic === status) {
      const event = jsonObject(payload);
      if (event?.id !== this.#input.id) return;
      if (event.event === 'claimed') this.#confirmed = true;
      this.#input.onStatus?.(event);
      return;
    }
    if (topic === rejected) {
      // Only a refusal of bytes this submit sent: anyone who may publish requests can have another one refused.
      const rejection = jsonObject(payload);
      if (this.#input.wait && rejection && this.#sent.has(String(rejection.payloadSha256)))
        this.#settle({ kind: 'rejected', rejection });
      return;
    }
    if (topic !== result && topic !== this.#reply) return;
    const body = jsonObject(payload) as ResultPayload | undefined;
    // Anyone who may publish on the results topic could answer for another job: only this id counts.
    if (body?.id !== this.#input.id) {
      this.#input.log.warn(`ignoring a result on ${topic} that is not for ${this.#input.id}`);
      return;
    }
    this.#confirmed = true;
    if (this.#input.wait) this.#settle({ kind: 'result', result: body });
  }

  async close(): Promise<void> {
    for (const timer of this.#slotWatch ?? []) clearTimeout(timer);
    if (this.#client) await disconnect(this.#client);
  }
}

async function race(
  settled: Promise<SubmitOutcome>,
  closed: Promise<'closed'>,
  ms: number,
): Promise<SubmitOutcome | 'closed' | 'timer'> {
  let timer: NodeJS.Timeout | undefined;
  const timed = new Promise<'timer'>((resolve) => {
    timer = setTimeout(() => resolve('timer'), ms);
  });
  try {
    return await Promise.race([settled, closed, timed]);
  } finally {
    clearTimeout(timer);
  }
}
