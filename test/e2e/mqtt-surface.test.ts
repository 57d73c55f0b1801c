import { createConnection } from 'node:net';
import type { IClientOptions, IPublishPacket, MqttClient } from 'mqtt';
import { describe, expect, it } from 'vitest';
import { type BrokerSettings, connectBroker } from '../../src/broker/client.js';
import { freshBrokerPerTest } from '../helpers/mosquitto.js';
import { testClient } from '../helpers/worker.js';

// The parts of MQTT.js the worker relies on beyond its documented API, each pinned against a real broker: a minor
// upgrade that changes one of them fails here, not silently in a fleet. package.json pins mqtt to the minor
// version this file was written for.

const { broker } = freshBrokerPerTest();

const settings = (url: string, protocol: '5' | '3.1.1'): BrokerSettings => ({
  url,
  protocol,
  username: undefined,
  password: undefined,
  passwordFile: undefined,
  caFile: undefined,
  certFile: undefined,
  keyFile: undefined,
  keepaliveMs: 30_000,
  connectTimeoutMs: 5_000,
});

type ClientClass = new (builder: (client: MqttClient) => unknown, options: IClientOptions) => MqttClient;

async function clientClass(): Promise<ClientClass> {
  const module = (await import('mqtt/lib/client')) as unknown as { default?: ClientClass } & ClientClass;
  return module.default ?? module;
}

describe('the MQTT.js surface the worker uses', () => {
  it('mqtt/lib/client is a class that connects over a stream the caller builds (broker.ts builds TCP/TLS itself)', async () => {
    const Client = await clientClass();
    const port = Number(new URL(broker().url).port);
    const client = new Client(() => createConnection({ host: '127.0.0.1', port }), {
      protocolVersion: 5,
      clientId: `surface-${process.pid}`,
      reconnectPeriod: 0,
    });
    await new Promise<void>((resolve, reject) => {
      client.once('connect', () => resolve());
      client.once('error', reject);
    });
    // consume.ts reads the CONNACK (session present, granted properties) from this field.
    const connack = (client as unknown as { connackPacket?: { cmd: string; sessionPresent: boolean } })
      .connackPacket;
    expect(connack).toMatchObject({ cmd: 'connack', sessionPresent: false });
    await client.endAsync();
  });

  it('drops customHandleAcks given to a 3.1.1 client, and honours it when set on client.options afterwards', async () => {
    const Client = await clientClass();
    const port = Number(new URL(broker().url).port);
    const handler: IClientOptions['customHandleAcks'] = (_t, _p, _packet, done) => done(0);
    const dropped = new Client(() => createConnection({ host: '127.0.0.1', port }), {
      protocolVersion: 4,
      customHandleAcks: handler,
      reconnectPeriod: 0,
    });
    // The fact broker.ts works around: set at construction, MQTT.js keeps the option for MQTT 5 only.
    expect(dropped.options.customHandleAcks).not.toBe(handler);
    dropped.end(true);

    // Set afterwards (as connectBroker does), it is read at each message, for 3.1.1 too: the ack waits for `done`.
    const seen: IPublishPacket[] = [];
    let release: (() => void) | undefined;
    const client = await connectBroker({
      settings: settings(broker().url, '3.1.1'),
      clientId: `surface-acks-${process.pid}`,
      clean: false,
      customHandleAcks: (_topic, _payload, packet, done) => {
        seen.push(packet);
        release = () => done(0);
      },
    });
    await client.subscribeAsync('surface/acks', { qos: 1 });
    const sender = await testClient(broker().url);
    await sender.publishAsync('surface/acks', 'one', { qos: 1 });
    await expect.poll(() => seen.length).toBe(1);
    // Not acknowledged: a new connection of the same session gets the message again.
    client.end(true);
    const again: string[] = [];
    const second = await connectBroker({
      settings: settings(broker().url, '3.1.1'),
      clientId: `surface-acks-${process.pid}`,
      clean: false,
      customHandleAcks: (_topic, payload, _packet, done) => {
        again.push(payload.toString());
        done(0);
      },
    });
    await expect.poll(() => again).toEqual(['one']);
    expect(release).toBeTypeOf('function');
    await second.endAsync();
    await sender.endAsync();
  });

  it("emits 'packetreceive' with each PUBACK's reason code, and gives a publish callback the packet with its id", async () => {
    const client = await connectBroker({
      settings: settings(broker().url, '5'),
      clientId: `surface-puback-${process.pid}`,
      clean: true,
    });
    const pubacks: { messageId?: number; reasonCode?: number }[] = [];
    client.on('packetreceive', (packet) => {
      if (packet.cmd === 'puback') pubacks.push(packet as { messageId?: number; reasonCode?: number });
    });
    // Nobody subscribes: Mosquitto answers 0x10 "no matching subscribers", which MQTT.js counts as success.
    const packet = await new Promise<{ messageId?: number } | undefined>((resolve, reject) =>
      client.publish('surface/nobody', 'x', { qos: 1 }, (error, sent) =>
        error ? reject(error) : resolve(sent),
      ),
    );
    expect(packet?.messageId).toEqual(expect.any(Number));
    expect(pubacks).toContainEqual(
      expect.objectContaining({ messageId: packet?.messageId, reasonCode: 0x10 }),
    );
    await client.endAsync();
  });
});
