import { once } from 'node:events';
import { createServer, type Server, type Socket } from 'node:net';
import mqttPacket from 'mqtt-packet';

// A protocol-level broker for one behaviour real brokers have and Mosquitto does not show: it answers a SUBSCRIBE
// from the slot with a queued PUBLISH first and the SUBACK only once that PUBLISH is acknowledged (Artemis with a
// group queue that holds jobs; MQTT 5 §3.8.4 allows it). Everything else a worker sends is answered minimally;
// what it publishes is recorded.

export interface EagerBroker {
  readonly url: string;
  /** Every PUBLISH the clients sent: topic and payload. */
  readonly published: { topic: string; payload: string }[];
  close(): Promise<void>;
}

export async function startEagerBroker(
  slotId: string,
  job: { topic: string; payload: string },
): Promise<EagerBroker> {
  const published: { topic: string; payload: string }[] = [];
  const sockets = new Set<Socket>();
  const server: Server = createServer((socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => {});
    const parser = mqttPacket.parser({ protocolVersion: 5 });
    let version = 5;
    let clientId = '';
    let pendingSuback: { messageId: number; granted: number[] } | undefined;
    const send = (packet: Record<string, unknown>): void => {
      socket.write(mqttPacket.generate(packet as never, { protocolVersion: version }));
    };
    parser.on('packet', (parsed) => {
      const packet = parsed as unknown as Record<string, unknown>;
      switch (packet.cmd) {
        case 'connect':
          version = Number(packet.protocolVersion);
          clientId = String(packet.clientId);
          send({ cmd: 'connack', returnCode: 0, reasonCode: 0, sessionPresent: false });
          break;
        case 'subscribe': {
          const subscriptions = packet.subscriptions as { topic: string; qos: number }[];
          const suback = { messageId: Number(packet.messageId), granted: subscriptions.map((s) => s.qos) };
          if (clientId === slotId && subscriptions.some((s) => s.topic === job.topic)) {
            pendingSuback = suback;
            send({
              cmd: 'publish',
              topic: job.topic,
              payload: Buffer.from(job.payload),
              qos: 1,
              messageId: 1,
            });
          } else send({ cmd: 'suback', ...suback });
          break;
        }
        case 'puback':
          if (pendingSuback) {
            send({ cmd: 'suback', ...pendingSuback });
            pendingSuback = undefined;
          }
          break;
        case 'publish':
          published.push({ topic: String(packet.topic), payload: String(packet.payload) });
          if (Number(packet.qos) === 1) send({ cmd: 'puback', messageId: packet.messageId, reasonCode: 0 });
          break;
        case 'pingreq':
          send({ cmd: 'pingresp' });
          break;
        case 'unsubscribe':
          send({ cmd: 'unsuback', messageId: packet.messageId });
          break;
        case 'disconnect':
          socket.end();
          break;
      }
    });
    socket.on('data', (chunk: Buffer) => parser.parse(chunk));
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address() as { port: number };
  return {
    url: `mqtt://127.0.0.1:${port}`,
    published,
    close: async () => {
      for (const socket of sockets) socket.destroy();
      server.close();
    },
  };
}
