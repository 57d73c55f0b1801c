import type { IClientOptions, IPublishPacket, MqttClient } from 'mqtt';
import { ErrorCode, WorkerError } from '../shared/errors.js';
import type { Logger } from '../shared/log.js';
import { isShared } from '../shared/topics.js';
import { type BrokerSettings, type Connack, connackOf, connectBroker, disconnect } from './client.js';

/** One message as delivered, with the means to acknowledge it (which is what removes it from the session). */
export interface Delivery {
  readonly topic: string;
  readonly payload: Buffer;
  readonly packet: IPublishPacket;
  readonly ack: () => void;
}

export interface ConsumerInput {
  readonly settings: BrokerSettings;
  readonly clientId: string;
  readonly clean: boolean;
  readonly sessionExpirySeconds: number | undefined;
  /** The subscriptions to make (one SUBSCRIBE); none: take only what the session already holds (drain). */
  readonly topics: readonly string[];
  readonly will?: IClientOptions['will'];
  readonly log: Logger;
  /** Called once the connection is under way: work to overlap with the broker's answer. */
  readonly onConnecting?: () => void;
}

/**
 * A connection that hands out deliveries one at a time and acknowledges each only when told to. The broker may
 * send at most one unacknowledged message (receiveMaximum 1): a delivery the worker does not run is acknowledged
 * and the next one comes into the same process. Once the worker has taken a job (`take`), every later message is
 * held and never acknowledged, so it stays in this client id's session for the slot's next process. While a
 * message is held, MQTT.js reads no incoming packet (no PINGRESP either), so `holdOpen` keeps the connection alive
 * by sending pings of its own and resetting MQTT.js's keepalive clock.
 */
export class JobConsumer {
  readonly client: MqttClient;
  readonly sessionPresent: boolean;
  readonly #closed: Promise<void>;
  readonly #inbox: Inbox;
  #keepalive: NodeJS.Timeout | undefined;

  private constructor(client: MqttClient, sessionPresent: boolean, inbox: Inbox, closed: Promise<void>) {
    this.client = client;
    this.sessionPresent = sessionPresent;
    this.#inbox = inbox;
    this.#closed = closed;
  }

  static async connect(input: ConsumerInput): Promise<JobConsumer> {
    const inbox = new Inbox(input.log);
    const client = await connectBroker({
      settings: input.settings,
      clientId: input.clientId,
      clean: input.clean,
      sessionExpirySeconds: input.sessionExpirySeconds,
      receiveMaximum: 1,
      ...(input.will ? { will: input.will } : {}),
      ...(input.onConnecting ? { onClient: input.onConnecting } : {}),
      customHandleAcks: (topic, payload, packet, done) =>
        inbox.receive({ topic, payload: Buffer.from(payload), packet, ack: () => done(0) }),
    });
    const closed = new Promise<void>((resolve) => client.once('close', () => resolve()));
    const connack = connackOf(client);
    const sessionPresent = Boolean(connack.sessionPresent);
    const consumer = new JobConsumer(client, sessionPresent, inbox, closed);
    try {
      checkGrants(connack, input);
      const { topics } = input;
      if (topics.length === 0) return consumer;
      // A present session still holds the subscription (and may already be delivering): do not wait for a SUBACK
      // that MQTT.js cannot read while a delivered job is held.
      const subscribed = new Promise<void>((resolve, reject) => {
        client.subscribe([...topics], { qos: 1 }, (error, granted) => {
          if (error) return reject(error);
          for (const [i, topic] of topics.entries()) {
            const code = granted?.[i]?.qos;
            if (code !== undefined && code >= 0x80)
              return reject(unsuitable(`the broker refused the subscription to ${topic} (code ${code})`));
            if (code === 0)
              return reject(
                unsuitable(
                  `the broker granted the subscription to ${topic} at QoS 0 only: jobs could be lost`,
                ),
              );
          }
          resolve();
        });
      });
      // A broker may send the first PUBLISH before the SUBACK (MQTT 5 §3.8.4 allows it; Artemis does with a group
      // queue that holds jobs): MQTT.js then reads nothing more while the delivery is held, SUBACK included. A
      // delivery proves the subscription; a refusal that comes later is still reported.
      const first = await Promise.race([
        subscribed.then(() => 'suback' as const),
        inbox.firstArrival.then(() => 'publish' as const),
      ]);
      if (sessionPresent || first === 'publish')
        subscribed.catch((error: Error) => input.log.warn(`subscription not confirmed: ${error.message}`));
    } catch (error) {
      await consumer.close({ force: true });
      throw error;
    }
    return consumer;
  }

  /** From now on every delivery is held for the slot's next process: this one has taken its job. */
  take(): void {
    this.#inbox.take();
  }

  get connected(): boolean {
    return this.client.connected;
  }

  /** Bytes handed to the connection but not yet sent: what a publisher of best-effort messages checks first. */
  get backlog(): number {
    return this.client.stream?.writableLength ?? 0;
  }

  /** The next delivery; undefined when the connection closed first. */
  async next(): Promise<Delivery | undefined> {
    return Promise.race([this.#inbox.next(), this.#closed.then(() => undefined)]);
  }

  /** Resolves when the connection is gone (broker restart, network). */
  get closed(): Promise<void> {
    return this.#closed;
  }

  /** Keeps the connection alive while a delivered message is held (see the class comment). */
  holdOpen(keepaliveMs: number): void {
    this.#keepalive = setInterval(
      () => {
        if (!this.client.connected) return;
        this.client.sendPing();
        this.client.reschedulePing(true);
      },
      Math.max(500, Math.floor(keepaliveMs / 3)),
    );
  }

  release(): void {
    clearInterval(this.#keepalive);
  }

  /** Publishes at QoS 0 without waiting (progress events, presence): never blocks on a held delivery. */
  fireAndForget(topic: string, payload: string, retain = false): void {
    if (this.client.connected) this.client.publish(topic, payload, { qos: 0, retain }, () => {});
  }

  async close(options: { force?: boolean; withWill?: boolean } = {}): Promise<void> {
    this.release();
    // Reason 0x04 "disconnect with will": presence turns offline after the will delay unless the slot is back.
    await disconnect(this.client, { force: options.force ?? false, reasonCode: options.withWill ? 0x04 : 0 });
  }
}

/** Deliveries waiting to be handed out, until the worker takes a job; after that, the ones held back. */
class Inbox {
  readonly #log: Logger;
  readonly #queue: Delivery[] = [];
  #waiting: ((delivery: Delivery) => void) | undefined;
  #taken = false;
  #held = 0;
  #arrived: () => void = () => {};
  /** Resolves at the first delivery (whether or not anyone took it yet). */
  readonly firstArrival = new Promise<void>((resolve) => {
    this.#arrived = resolve;
  });

  constructor(log: Logger) {
    this.#log = log;
  }

  receive(delivery: Delivery): void {
    this.#arrived();
    if (this.#taken) {
      this.#hold(delivery);
      return;
    }
    const waiting = this.#waiting;
    this.#waiting = undefined;
    if (waiting) waiting(delivery);
    else this.#queue.push(delivery);
  }

  next(): Promise<Delivery> {
    const queued = this.#queue.shift();
    if (queued) return Promise.resolve(queued);
    return new Promise((resolve) => {
      this.#waiting = resolve;
    });
  }

  take(): void {
    this.#taken = true;
    this.#waiting = undefined;
    for (const delivery of this.#queue.splice(0)) this.#hold(delivery);
  }

  // Never acknowledged: the broker delivers it again to this client id's next connection.
  #hold(delivery: Delivery): void {
    this.#held++;
    this.#log.info(
      `another job arrived (message ${delivery.packet.messageId}); it stays queued in this slot's session for the next run`,
      { held: this.#held },
    );
  }
}

/** What the grants are checked against: the slot's client id, session and jobs topic. */
export type GrantsInput = Pick<
  ConsumerInput,
  'clientId' | 'clean' | 'sessionExpirySeconds' | 'topics' | 'log'
>;

function unsuitable(message: string): WorkerError {
  return new WorkerError(ErrorCode.BROKER_UNSUITABLE, message);
}

/**
 * Reads what the broker granted on CONNACK: what breaks loss-free delivery stops the worker before it takes a job
 * (BROKER_UNSUITABLE, its own exit code, so a supervisor does not spin on it); what weakens it is a warning.
 */
export function checkGrants(connack: Connack, input: GrantsInput): void {
  const granted = connack.properties ?? {};
  if (granted.maximumQoS === 0)
    throw unsuitable('the broker allows QoS 0 only: jobs could be lost (maximum QoS 0)');
  for (const topic of input.topics) {
    if (isShared(topic) && granted.sharedSubscriptionAvailable === false) {
      throw unsuitable(
        `the broker has no shared subscriptions, so ${topic} would never deliver a job; use the plain topic (pull dispatch)`,
      );
    }
    if (/[+#]/.test(topic) && granted.wildcardSubscriptionAvailable === false)
      throw unsuitable(`the broker allows no wildcard subscriptions, and ${topic} has one`);
  }
  if (granted.assignedClientIdentifier !== undefined && granted.assignedClientIdentifier !== input.clientId) {
    throw unsuitable(
      `the broker assigned the client id ${granted.assignedClientIdentifier} instead of ${input.clientId}: the slot's session would not be its own`,
    );
  }
  const asked = input.clean ? 0 : (input.sessionExpirySeconds ?? 0xffffffff);
  const cap = granted.sessionExpiryInterval;
  if (cap !== undefined && cap < asked) {
    input.log.warn(
      `the broker keeps this slot's session for ${cap}s only (asked for ${asked === 0xffffffff ? 'never expiring' : `${asked}s`}): requests queued for it are lost if it stays away longer`,
    );
  }
}
