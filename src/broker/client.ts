import type { IClientOptions, IClientPublishOptions, MqttClient } from 'mqtt';
import type { Options } from '../config/options.js';
import { readOptionFile, readSecret } from '../config/secrets.js';
import { ErrorCode, WorkerError } from '../shared/errors.js';

/** What a CONNACK says about the session and what the broker allows (MQTT 5 properties; absent on 3.1.1). */
export interface Connack {
  readonly sessionPresent?: boolean;
  readonly properties?: {
    readonly maximumQoS?: number;
    readonly sessionExpiryInterval?: number;
    readonly sharedSubscriptionAvailable?: boolean;
    readonly wildcardSubscriptionAvailable?: boolean;
    readonly assignedClientIdentifier?: string;
  };
}

/** The CONNACK the broker answered a connection with (MQTT.js keeps it, undocumented: mqtt-surface.test.ts). */
export function connackOf(client: MqttClient): Connack {
  return (client as unknown as { connackPacket?: Connack }).connackPacket ?? {};
}

/** A connection made by connectBroker, for the modules outside broker/ that hold one. */
export type BrokerClient = MqttClient;

export type BrokerSettings = Pick<
  Options,
  | 'url'
  | 'username'
  | 'password'
  | 'passwordFile'
  | 'caFile'
  | 'certFile'
  | 'keyFile'
  | 'protocol'
  | 'keepaliveMs'
  | 'connectTimeoutMs'
>;

export interface ConnectInput {
  readonly settings: BrokerSettings;
  readonly clientId: string;
  readonly clean: boolean;
  /** MQTT 5 session expiry in seconds; undefined: never (the maximum). */
  readonly sessionExpirySeconds?: number | undefined;
  /** How many unacknowledged QoS 1 messages the broker may send at once (MQTT 5). */
  readonly receiveMaximum?: number;
  readonly will?: IClientOptions['will'];
  readonly customHandleAcks?: IClientOptions['customHandleAcks'];
  /** Called once the client exists and its connection is under way, before the broker has answered. */
  readonly onClient?: (client: MqttClient) => void;
}

const NEVER_EXPIRES = 0xffffffff;
// CONNACK codes that mean "you may not connect like this" (credentials, authorisation, client id, ban) rather
// than "the broker is not there": MQTT 5 reason codes and MQTT 3.1.1 return codes.
// "Unsupported protocol version" (0x84; 1 in 3.1.1, which a 3.1.1-only broker answers an MQTT 5 client with) is
// a refusal too: retrying will never change it.
const REFUSED_V5 = new Set([1, 0x84, 0x85, 0x86, 0x87, 0x8a, 0x8c]);
const REFUSED_V3 = new Set([1, 2, 4, 5]);
// "Retain not supported" and "QoS not supported": the broker will not carry what loss-free delivery needs (the
// worker's QoS 1 will, retained presence), whatever the credentials.
const UNSUITABLE_V5 = new Set([0x9a, 0x9b]);
const V3_MESSAGES: Record<number, string> = {
  1: 'unacceptable protocol version',
  2: 'client id rejected',
  3: 'server unavailable',
  4: 'bad user name or password',
  5: 'not authorized',
};

/** MQTT.js options for the settings; files (password, certificates) are read here. */
export async function clientOptions(input: ConnectInput): Promise<IClientOptions> {
  const { settings } = input;
  const v5 = settings.protocol === '5';
  const password = settings.passwordFile
    ? await readSecret(settings.passwordFile, '--password-file')
    : settings.password;
  const tls = {
    ...(settings.caFile ? { ca: await readOptionFile(settings.caFile, '--ca') } : {}),
    ...(settings.certFile ? { cert: await readOptionFile(settings.certFile, '--cert') } : {}),
    ...(settings.keyFile ? { key: await readOptionFile(settings.keyFile, '--key') } : {}),
  };
  return {
    clientId: input.clientId,
    clean: input.clean,
    protocolVersion: v5 ? 5 : 4,
    keepalive: Math.round(settings.keepaliveMs / 1000),
    connectTimeout: settings.connectTimeoutMs,
    // Never reconnect on our own: a reconnect during a job would have the broker deliver the job again into this
    // process. A lost connection ends the process; the slot's next run picks up where the session stands.
    reconnectPeriod: 0,
    resubscribe: false,
    // MQTT.js otherwise fills a table of 65,536 two-byte buffers before its first packet (~50 ms and a GC storm
    // at every start); a worker sends a handful of packets in its life.
    writeCache: false,
    ...(settings.username !== undefined ? { username: settings.username } : {}),
    ...(password !== undefined ? { password } : {}),
    ...tls,
    ...(v5
      ? {
          properties: {
            sessionExpiryInterval: input.clean ? 0 : (input.sessionExpirySeconds ?? NEVER_EXPIRES),
            ...(input.receiveMaximum ? { receiveMaximum: input.receiveMaximum } : {}),
          },
        }
      : {}),
    ...(input.will ? { will: input.will } : {}),
    ...(input.customHandleAcks ? { customHandleAcks: input.customHandleAcks } : {}),
  };
}

const CLOSED_ON_V5 = 'CLOSED_ON_MQTT5_CONNECT';

function classify(error: Error & { code?: unknown }, settings: BrokerSettings): WorkerError {
  const where = redactUrl(settings.url);
  if (error.code === CLOSED_ON_V5) {
    return new WorkerError(
      ErrorCode.BROKER_REFUSED,
      `Broker ${where} closed the connection on an MQTT 5 CONNECT without answering, as brokers that speak only MQTT 3.1.1 do (RabbitMQ 3.x): try --protocol 3.1.1`,
      { cause: error },
    );
  }
  if (typeof error.code === 'number') {
    const code = error.code;
    const v5 = settings.protocol === '5';
    if (v5 && UNSUITABLE_V5.has(code)) {
      const reason = error.message.replace(/^Connection refused: /, '');
      return new WorkerError(
        ErrorCode.BROKER_UNSUITABLE,
        `Broker ${where} refused the connection: ${reason} (code ${code}); the worker needs QoS 1 and retained messages`,
        { cause: error },
      );
    }
    const refused = v5 ? REFUSED_V5.has(code) : REFUSED_V3.has(code);
    const reason = v5
      ? error.message.replace(/^Connection refused: /, '')
      : (V3_MESSAGES[code] ?? `return code ${code}`);
    const hint =
      code === 0x84 || (v5 && code === 1)
        ? '; the broker does not speak MQTT 5: try --protocol 3.1.1'
        : !v5 && code === 1
          ? '; the broker does not speak MQTT 3.1.1'
          : '';
    return new WorkerError(
      refused ? ErrorCode.BROKER_REFUSED : ErrorCode.BROKER_UNREACHABLE,
      `Broker ${where} refused the connection: ${reason} (code ${code})${hint}`,
      { cause: error },
    );
  }
  const detail = typeof error.code === 'string' ? `${error.code}: ${error.message}` : error.message;
  return new WorkerError(ErrorCode.BROKER_UNREACHABLE, `Cannot reach broker ${where}: ${detail}`, {
    cause: error,
  });
}

/** The URL without a password, for messages. */
export function redactUrl(url: string): string {
  try {
    const parsed = new URL(url);
    if (parsed.password) parsed.password = '***';
    return parsed.toString();
  } catch {
    return url;
  }
}

const TCP = new Set(['mqtt:', 'tcp:']);
const TLS = new Set(['mqtts:', 'ssl:', 'tls:']);

/**
 * An MQTT.js client. For TCP and TLS the worker builds the stream itself on MQTT.js's client class: `mqtt.connect`
 * loads every transport it knows (WebSockets, SOCKS proxies…) on the first connection, which costs each job's
 * start tens of milliseconds for code it never uses. `ws://` and `wss://` go through `mqtt.connect`.
 */
async function createClient(url: string, options: IClientOptions): Promise<MqttClient> {
  const parsed = new URL(url);
  const secure = TLS.has(parsed.protocol);
  if (!secure && !TCP.has(parsed.protocol)) {
    // CommonJS: a bundled ES module sees module.exports as `default`.
    const { default: mqtt } = await import('mqtt');
    return mqtt.connect(url, options);
  }
  // node:tls only for TLS: it loads the crypto stack (~3 ms of every plain job's start).
  const [{ default: clientModule }, net, tls] = await Promise.all([
    import('mqtt/lib/client'),
    import('node:net'),
    secure ? import('node:tls') : undefined,
  ]);
  const Client =
    (clientModule as unknown as { default?: typeof MqttClient }).default ??
    (clientModule as unknown as typeof MqttClient);
  const host = parsed.hostname.replace(/^\[(.*)\]$/, '$1') || 'localhost';
  const port = Number(parsed.port) || (secure ? 8883 : 1883);
  const username = options.username ?? (parsed.username ? decodeURIComponent(parsed.username) : undefined);
  const password = options.password ?? (parsed.password ? decodeURIComponent(parsed.password) : undefined);
  const build = (client: MqttClient) => {
    // No Nagle: MQTT sends small packets that each wait for an answer (a result's PUBLISH queued behind an
    // unacknowledged progress event waited for the broker's delayed ACK, up to 40 ms).
    if (!tls) return net.createConnection({ host, port, noDelay: true });
    const socket = tls.connect({
      host,
      port,
      ...(net.isIP(host) === 0 ? { servername: host } : {}),
      ...(options.ca ? { ca: options.ca as string } : {}),
      ...(options.cert ? { cert: options.cert as string } : {}),
      ...(options.key ? { key: options.key as string } : {}),
      rejectUnauthorized: true,
    });
    // As MQTT.js's own TLS builder: a TLS failure (an untrusted server) is the client's error.
    const onError = (error: Error): void => {
      client.emit('error', error);
      socket.end();
    };
    socket.setNoDelay(true);
    socket.on('error', onError);
    socket.on('secureConnect', () => socket.removeListener('error', onError));
    return socket;
  };
  const client = new Client(build, {
    ...options,
    host,
    hostname: host,
    port,
    protocol: secure ? 'mqtts' : 'mqtt',
    ...(username !== undefined ? { username } : {}),
    ...(password !== undefined ? { password } : {}),
  });
  // As mqtt.connect does: stream errors (a broker restart's ECONNRESET) become 'error' events, which must not
  // crash the process; connection loss is handled through 'close'.
  client.on('error', () => {});
  return client;
}

/**
 * Connects and resolves once the broker accepted (CONNACK 0), or rejects with BROKER_REFUSED (credentials,
 * authorisation) or BROKER_UNREACHABLE (network, TLS, timeout) within the connect timeout.
 */
export async function connectBroker(input: ConnectInput): Promise<MqttClient> {
  const options = await clientOptions(input);
  const client = await createClient(input.settings.url, options);
  // MQTT.js 5.16 keeps `customHandleAcks` only for MQTT 5 and acknowledges every 3.1.1 message on arrival: a
  // worker on 3.1.1 would never see its job. Its publish handler reads the option at each message, for any
  // protocol (test/mqtt-surface.test.ts pins both facts).
  if (input.customHandleAcks) client.options.customHandleAcks = input.customHandleAcks;
  input.onClient?.(client);
  return new Promise<MqttClient>((resolve, reject) => {
    const timer = setTimeout(
      () => fail(new Error(`no answer within ${input.settings.connectTimeoutMs} ms`)),
      input.settings.connectTimeoutMs,
    );
    const cleanup = (): void => {
      clearTimeout(timer);
      client.off('connect', onConnect);
      client.off('error', fail);
      client.off('close', onClose);
    };
    const onConnect = (): void => {
      cleanup();
      resolve(client);
    };
    // A broker that reads an MQTT 5 CONNECT and hangs up without a CONNACK speaks only 3.1.1 (RabbitMQ 3.x does
    // this): a refusal with the fix, not an outage to retry forever.
    const connectSent = (): boolean =>
      ((client.stream as { bytesWritten?: number } | undefined)?.bytesWritten ?? 0) > 0;
    const onClose = (): void =>
      fail(
        connectSent() && input.settings.protocol === '5'
          ? Object.assign(new Error('closed on an MQTT 5 CONNECT'), { code: CLOSED_ON_V5 })
          : new Error('the connection was closed before the broker answered'),
      );
    function fail(error: Error): void {
      cleanup();
      client.end(true);
      reject(classify(error, input.settings));
    }
    client.once('connect', onConnect);
    client.on('error', fail);
    client.on('close', onClose);
  });
}

// MQTT.js passes the publish packet, not the PUBACK, to a publish callback: PUBACK reason codes (such as 0x10
// "no matching subscribers", which it counts as success) are read off the incoming packets instead.
const pubackCodes = new WeakMap<MqttClient, Map<number, number>>();

function trackPubacks(client: MqttClient): Map<number, number> {
  let codes = pubackCodes.get(client);
  if (!codes) {
    const map = new Map<number, number>();
    client.on('packetreceive', (packet) => {
      if (packet.cmd === 'puback' && packet.messageId !== undefined)
        map.set(packet.messageId, packet.reasonCode ?? 0);
    });
    pubackCodes.set(client, map);
    codes = map;
  }
  return codes;
}

/** Publishes and resolves with the PUBACK reason code (0 for success; MQTT 3.1.1 and QoS 0 always give 0). */
export function publish(
  client: MqttClient,
  topic: string,
  payload: string | Buffer,
  options: IClientPublishOptions,
): Promise<number> {
  const codes = trackPubacks(client);
  return new Promise((resolve, reject) => {
    client.publish(topic, payload, options, (error, packet) => {
      const code = (error as { code?: unknown } | undefined)?.code;
      if (error && typeof code !== 'number') {
        reject(error);
        return;
      }
      const id = packet?.messageId;
      const acked = id !== undefined ? codes.get(id) : undefined;
      if (id !== undefined) codes.delete(id);
      resolve(typeof code === 'number' ? code : (acked ?? 0));
    });
  });
}

/** Disconnects, giving the DISCONNECT a moment to leave; never throws. */
export function disconnect(
  client: MqttClient,
  options: { force?: boolean; reasonCode?: number; sessionExpiry?: number } = {},
): Promise<void> {
  return new Promise((resolve) => {
    // end() waits for unacknowledged publishes; never let that keep the process alive.
    const timer = setTimeout(() => {
      client.stream?.destroy();
      resolve();
    }, 2000);
    const properties =
      options.sessionExpiry !== undefined ? { sessionExpiryInterval: options.sessionExpiry } : undefined;
    try {
      client.end(
        options.force ?? false,
        { reasonCode: options.reasonCode ?? 0, ...(properties ? { properties } : {}) },
        () => {
          clearTimeout(timer);
          resolve();
        },
      );
    } catch {
      clearTimeout(timer);
      resolve();
    }
  });
}
