import { randomBytes } from 'node:crypto';
import type { MqttClient } from 'mqtt';
import type { Logger } from '../shared/log.js';
import { isShared } from '../shared/topics.js';
import { type BrokerSettings, connectBroker, disconnect, publish } from './client.js';
import { type Delivery, JobConsumer } from './consumer.js';

export interface DrainInput {
  readonly settings: BrokerSettings;
  /** The retired slot's client id. */
  readonly slot: string;
  /** The subscription the slot had, e.g. `$share/workers/jobs/pending`: drain removes it. */
  readonly topic: string;
  /** Stop when no message came for this long. */
  readonly quietMs: number;
  /** The slot's retained presence topic, cleared at the end so that `workers` no longer lists it. */
  readonly presenceTopic?: string;
  readonly log: Logger;
}

export interface DrainOutcome {
  readonly moved: number;
}

/**
 * Takes over a retired slot's session and moves the jobs queued in it back to the group. The slot's
 * subscription is removed first (so the broker deals it no new jobs), each message is re-published on a second
 * connection and acknowledged only once the broker accepted the re-publish, and at the end the session is
 * ended (expiry 0). A job is never in neither place; at worst, if drain dies in between, it is in both, and
 * the job's claim makes the second delivery harmless.
 */
export async function drain(input: DrainInput): Promise<DrainOutcome> {
  // The retired slot's own session, without a subscription of its own: drain takes only what the session holds.
  const asSlot = () =>
    JobConsumer.connect({
      settings: input.settings,
      clientId: input.slot,
      clean: false,
      sessionExpirySeconds: undefined,
      topic: undefined,
      log: input.log,
    });
  if (!isShared(input.topic)) {
    // Pull dispatch: every slot had its own copy of each request, so there is nothing to move; ending the
    // retired slot's session stops it from piling up copies until it expires.
    const consumer = await asSlot();
    await clearPresence(consumer.client, input);
    await endSession(consumer.client);
    input.log.info(`ended slot ${input.slot}'s session (pull dispatch: its requests are every slot's too)`);
    return { moved: 0 };
  }
  const publisher = await connectBroker({
    settings: input.settings,
    clientId: `drain-${randomBytes(6).toString('hex')}`,
    clean: true,
  });
  let moved = 0;
  try {
    for (;;) {
      // One connection per message: a held message blocks MQTT.js's reading, and the next one is delivered
      // only to the session's next connection.
      // The slot's subscription goes on the first connection, so that the broker deals it no new jobs meanwhile.
      const consumer = await asSlot();
      if (moved === 0) consumer.client.unsubscribe(input.topic);
      const delivery = await Promise.race([
        consumer.next(),
        new Promise<undefined>((resolve) => setTimeout(() => resolve(undefined), input.quietMs)),
      ]);
      if (!delivery) {
        await clearPresence(consumer.client, input);
        await endSession(consumer.client);
        break;
      }
      await move(publisher, delivery, input);
      delivery.ack();
      moved++;
      await consumer.close();
    }
  } finally {
    await disconnect(publisher);
  }
  input.log.info(`drained slot ${input.slot}: moved ${moved} job${moved === 1 ? '' : 's'} back to the group`);
  return { moved };
}

async function move(publisher: MqttClient, delivery: Delivery, input: DrainInput): Promise<void> {
  const { responseTopic, correlationData, userProperties, contentType } = delivery.packet.properties ?? {};
  const properties = {
    ...(responseTopic ? { responseTopic } : {}),
    ...(correlationData ? { correlationData } : {}),
    ...(userProperties ? { userProperties } : {}),
    ...(contentType ? { contentType } : {}),
  };
  for (let delay = 200; ; delay = Math.min(delay * 2, 5000)) {
    const code = await publish(publisher, delivery.topic, delivery.payload, { qos: 1, properties });
    if (code === 0) return;
    input.log.warn(`the broker did not take the re-published job (code ${code}); retrying in ${delay} ms`);
    await new Promise((resolve) => setTimeout(resolve, delay));
  }
}

/** Ends the slot's session: a DISCONNECT with session expiry 0 has the broker discard it. */
async function endSession(client: MqttClient): Promise<void> {
  await disconnect(client, { sessionExpiry: 0 });
}

/** An empty retained message removes the slot's presence. */
async function clearPresence(client: MqttClient, input: DrainInput): Promise<void> {
  if (input.presenceTopic === undefined) return;
  await publish(client, input.presenceTopic, '', { qos: 1, retain: true }).catch(() => {});
}
