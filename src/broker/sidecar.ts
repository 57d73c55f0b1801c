import type { MqttClient } from 'mqtt';
import type { Logger } from '../shared/log.js';
import { type BrokerSettings, connectBroker, disconnect, publish } from './client.js';

/** What the sidecar needs: the broker, the slot's id (its client id is `{id}.control`), the cancel root, a log. */
export interface SidecarInput {
  readonly options: BrokerSettings & { readonly id: string; readonly cancelTopic: string };
  readonly log: Logger;
}

/**
 * A second, clean connection, opened when first needed: it listens for cancel requests while the job connection
 * holds its delivery, and publishes every result. While a delivery is held, MQTT.js reads nothing on the job
 * connection, not even a PUBACK.
 */
export class Sidecar {
  readonly #input: SidecarInput;
  #client: Promise<MqttClient> | undefined;

  constructor(input: SidecarInput) {
    this.#input = input;
  }

  #connect(): Promise<MqttClient> {
    this.#client ??= connectBroker({
      settings: this.#input.options,
      clientId: `${this.#input.options.id}.control`,
      clean: true,
    });
    return this.#client;
  }

  /** Publishes at QoS 1 and resolves with the PUBACK reason code, or -1 when it could not be sent. */
  async publish(topic: string, payload: string, properties?: Record<string, unknown>): Promise<number> {
    try {
      const client = await this.#connect();
      const closed = new Promise<number>((resolve) => client.once('close', () => resolve(-1)));
      const sent = publish(client, topic, payload, { qos: 1, ...(properties ? { properties } : {}) });
      return await Promise.race([sent, closed]);
    } catch {
      return -1;
    }
  }

  /** Calls `onCancel` when a message arrives on `{cancel-topic}/{id}`. */
  async watchCancel(id: string, onCancel: () => void): Promise<void> {
    const topic = `${this.#input.options.cancelTopic}/${id}`;
    try {
      const client = await this.#connect();
      client.on('message', (received) => {
        if (received === topic) onCancel();
      });
      await new Promise<void>((resolve, reject) =>
        client.subscribe(topic, { qos: 1 }, (error) => (error ? reject(error) : resolve())),
      );
    } catch (error) {
      this.#input.log.warn(`cannot listen for cancel requests on ${topic}: ${(error as Error).message}`);
    }
  }

  async close(): Promise<void> {
    const client = await this.#client?.catch(() => undefined);
    if (client) await disconnect(client, { force: true });
  }
}
