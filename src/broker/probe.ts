import { randomBytes } from 'node:crypto';
import { type BrokerSettings, connectBroker, disconnect, publish } from './client.js';

// MQTT 3.1.1 has no way to say "shared subscriptions: not supported" (MQTT 5 says it in the CONNACK): a broker
// without them takes `$share/group/jobs/pending` as a plain topic filter that nothing is ever published to, and a
// slot would wait forever while its requests pile up elsewhere. So on 3.1.1 it is proved, not assumed: a message
// published to a probe topic must come back through a `$share/` subscription to it.

const PROBE_ROOT = 'mqtt-fs-worker/probe';

/** Why `$share/` subscriptions do not work on this broker, or undefined when the probe came through. */
export async function sharedSubscriptionProblem(
  settings: BrokerSettings,
  clientId: string,
  waitMs = 3000,
): Promise<string | undefined> {
  const client = await connectBroker({ settings, clientId: `${clientId}.probe`, clean: true });
  const nonce = randomBytes(8).toString('hex');
  const topic = `${PROBE_ROOT}/${nonce}`;
  try {
    const arrived = new Promise<boolean>((resolve) => {
      const timer = setTimeout(() => resolve(false), waitMs);
      client.on('message', (received, payload) => {
        if (received === topic && payload.toString() === nonce) {
          clearTimeout(timer);
          resolve(true);
        }
      });
    });
    const granted = await client
      .subscribeAsync(`$share/mqtt-fs-worker-probe-${nonce}/${topic}`, { qos: 1 })
      .catch((error: Error) => error);
    if (granted instanceof Error) return `the broker refused a $share/ subscription (${granted.message})`;
    const code = granted[0]?.qos;
    if (code === undefined || code >= 0x80) return `the broker refused a $share/ subscription (code ${code})`;
    await publish(client, topic, nonce, { qos: 1 });
    return (await arrived)
      ? undefined
      : `a message published to ${topic} never came through $share/…/${topic} within ${waitMs} ms: the broker takes $share/ as a plain topic (no shared subscriptions)`;
  } finally {
    await disconnect(client);
  }
}
