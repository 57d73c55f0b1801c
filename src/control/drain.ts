import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import {
  type BrokerClient,
  type BrokerSettings,
  connectBroker,
  disconnect,
  publish,
} from '../broker/client.js';
import { type Delivery, JobConsumer } from '../broker/consumer.js';
import { ErrorCode, WorkerError } from '../shared/errors.js';
import type { Logger } from '../shared/log.js';
import { type Presence, parsePresence } from '../shared/presence.js';
import { isShared } from '../shared/topics.js';
import { forgetDrivePresence } from '../worker/presence-board.js';
import { listWorkers } from './workers.js';

export interface DrainInput {
  readonly settings: BrokerSettings;
  /** The retired slot's client id. */
  readonly slot: string;
  /** `--topic` when given: the subscription the slot had. Otherwise the slot's presence says, or the default. */
  readonly topic: string | undefined;
  /** The topic assumed when neither `--topic` nor the slot's presence names one. */
  readonly defaultTopic: string;
  /** Stop moving when no message came for this long. */
  readonly quietMs: number;
  /** The slot's retained presence topic: read first (an online slot is refused), cleared at the end. */
  readonly presenceTopic: string;
  /** Drain even a slot whose presence says it is online (its process is known to be gone). */
  readonly force: boolean;
  /** Where the slot also kept its presence (a file removed with the session). */
  readonly jobsDir?: string;
  readonly log: Logger;
}

export interface DrainOutcome {
  readonly slot: string;
  readonly mode: 'pull' | 'shared';
  /** The first of the slot's subscriptions (all of them in `topics`). */
  readonly topic: string;
  readonly topics: readonly string[];
  readonly moved: number;
  /** How the session was ended, for the protocol in use. */
  readonly ended: string;
}

/**
 * Retires a slot's session. An online slot is refused (its presence says idle or busy): taking its client id
 * would knock it off the broker. In pull dispatch every request in the session is every slot's too, so the
 * session is simply ended: a connect with a clean session under the slot's id discards it on MQTT 3.1.1 and 5
 * alike. In shared dispatch the session holds the only copy of what was dealt to the slot: each message is
 * re-published on a second connection and acknowledged only once the broker took it, then the session is ended.
 */
export async function drain(input: DrainInput): Promise<DrainOutcome> {
  const presence = await readPresence(input);
  if (presence && presence.state !== 'offline' && !input.force) {
    throw new WorkerError(
      ErrorCode.SLOT_ONLINE,
      `slot ${input.slot} is online (${presence.state}${presence.host ? ` on ${presence.host}` : ''}, pid ${presence.pid ?? '?'}): ` +
        'drain retires only a slot that is gone; stop it first (its presence turns offline when its will is sent, ' +
        'up to 10 s after it exits), or add --force if its process is known to be gone',
    );
  }
  const named = presence?.topics?.length ? presence.topics : undefined;
  const topics = input.topic !== undefined ? [input.topic] : (named ?? [input.defaultTopic]);
  const topic = topics[0] as string;
  if (input.topic === undefined)
    input.log.info(
      named
        ? `slot ${input.slot} subscribed ${topics.join(', ')} (from its presence)`
        : `slot ${input.slot} left no presence naming its subscription; assuming ${topic} (say --topic otherwise)`,
    );
  const v5 = input.settings.protocol === '5';
  const ended = v5 ? 'MQTT 5: clean start, session expiry 0' : 'MQTT 3.1.1: clean session';
  if (!topics.some(isShared)) {
    await endSession(input);
    input.log.info(
      `ended slot ${input.slot}'s session (${ended}); pull dispatch: its requests are every slot's too`,
    );
    return { slot: input.slot, mode: 'pull', topic, topics, moved: 0, ended };
  }
  if (!input.force && !(await otherMemberOnline(input, topics))) {
    // With no member online there is nobody to hand the jobs to (Mosquitto drops a message no session
    // subscribes), and Artemis keeps a group's jobs in one queue that the last member's unsubscribe deletes.
    throw new WorkerError(
      ErrorCode.GROUP_UNATTENDED,
      `no other member of ${topic}'s group is online: slot ${input.slot}'s session is left as it is, since ` +
        "moving its jobs would hand them to nobody, and on a broker that keeps a group's jobs in one queue " +
        "(Artemis) ending the group's last subscription deletes that queue and its jobs; start another member " +
        'first, or add --force',
    );
  }
  const moved = await moveAll(input, topics);
  await endSession(input);
  input.log.info(
    `drained slot ${input.slot}: moved ${moved} job${moved === 1 ? '' : 's'} back to the group; ended its session (${ended})`,
  );
  return { slot: input.slot, mode: 'shared', topic, topics, moved, ended };
}

/** Is another slot taking jobs from one of these shared subscriptions online (from the retained presence)? */
async function otherMemberOnline(input: DrainInput, topics: readonly string[]): Promise<boolean> {
  const root = input.presenceTopic.slice(0, input.presenceTopic.length - input.slot.length - 1);
  const slots = await listWorkers({ settings: input.settings, presenceTopic: root });
  return slots.some(
    (member) =>
      member.id !== input.slot &&
      member.state !== 'offline' &&
      member.topics?.some((t) => topics.includes(t)),
  );
}

/** The slot's retained presence (sent right after the SUBACK), or undefined when it has none. */
async function readPresence(input: DrainInput): Promise<Presence | undefined> {
  const client = await connectBroker({
    settings: input.settings,
    clientId: `drain-${randomBytes(6).toString('hex')}`,
    clean: true,
  });
  try {
    const retained = new Promise<Buffer | undefined>((resolve) => {
      client.on('message', (_topic, payload) => resolve(payload));
      setTimeout(() => resolve(undefined), 1000).unref();
    });
    await client.subscribeAsync(input.presenceTopic, { qos: 1 });
    const payload = await retained;
    return payload ? parsePresence(payload) : undefined;
  } finally {
    await disconnect(client);
  }
}

/**
 * Moves each message of the slot's session back to the group. One connection per message: while a message is
 * held, MQTT.js reads nothing else, and the next one is delivered only to the session's next connection.
 */
async function moveAll(input: DrainInput, topics: readonly string[]): Promise<number> {
  const publisher = await connectBroker({
    settings: input.settings,
    clientId: `drain-${randomBytes(6).toString('hex')}`,
    clean: true,
  });
  let moved = 0;
  try {
    for (;;) {
      const consumer = await JobConsumer.connect({
        settings: input.settings,
        clientId: input.slot,
        clean: false,
        sessionExpirySeconds: undefined,
        topics: [],
        log: input.log,
      });
      // The slot's subscription goes first, so that the broker deals it no new jobs meanwhile.
      if (moved === 0) consumer.client.unsubscribe([...topics]);
      const quiet = new AbortController();
      const delivery = await Promise.race([
        consumer.next(),
        sleep(input.quietMs, undefined, { signal: quiet.signal }).catch(() => undefined),
      ]);
      quiet.abort();
      if (!delivery) {
        await consumer.close();
        return moved;
      }
      await move(publisher, delivery, input);
      delivery.ack();
      moved++;
      await consumer.close();
    }
  } finally {
    await disconnect(publisher);
  }
}

async function move(publisher: BrokerClient, delivery: Delivery, input: DrainInput): Promise<void> {
  const { responseTopic, correlationData, userProperties, contentType } = delivery.packet.properties ?? {};
  const properties = {
    ...(responseTopic ? { responseTopic } : {}),
    ...(correlationData ? { correlationData } : {}),
    ...(userProperties ? { userProperties } : {}),
    ...(contentType ? { contentType } : {}),
  };
  for (let delay = 200, tries = 0; ; delay = Math.min(delay * 2, 5000), tries++) {
    const code = await publish(publisher, delivery.topic, delivery.payload, { qos: 1, properties });
    if (code === 0) return;
    if (tries >= 5)
      throw new WorkerError(
        ErrorCode.DRAIN_FAILED,
        `the broker refused the re-published job (code ${code}); it stays in slot ${input.slot}'s session`,
      );
    input.log.warn(`the broker did not take the re-published job (code ${code}); retrying in ${delay} ms`);
    await sleep(delay);
  }
}

/**
 * Ends the slot's session: a connect with a clean session under its id has the broker discard it (MQTT 3.1.1
 * and 5), and a clean session ends with the connection. The slot's retained presence is cleared on the way, and
 * its presence file on the drive removed.
 */
async function endSession(input: DrainInput): Promise<void> {
  const client = await connectBroker({ settings: input.settings, clientId: input.slot, clean: true });
  try {
    const code = await publish(client, input.presenceTopic, '', { qos: 1, retain: true });
    if (code >= 0x80) input.log.warn(`the broker refused to clear the slot's presence (code ${code})`);
  } finally {
    await disconnect(client);
  }
  if (input.jobsDir !== undefined) await forgetDrivePresence(input.jobsDir, input.slot, input.log);
}
