import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { freePort, portOpen } from './mosquitto.js';

// RabbitMQ 3.10 (+ rabbitmq_mqtt) and ejabberd 23.01 (mod_mqtt) from Debian, each started by the tests on free
// loopback ports with a folder of its own, restartable with its data: the fleet's brokers besides Mosquitto and
// Aedes. Both run on the Erlang VM; each gets its own process group, so a stop takes every process it started.

function processGroup(
  command: string,
  args: string[],
  env: Record<string, string>,
  log: string,
): ChildProcess {
  return spawn('sh', ['-c', `exec "$0" "$@" >>'${log}' 2>&1`, command, ...args], {
    env: { PATH: process.env.PATH ?? '/usr/bin:/bin', ...env },
    stdio: 'ignore',
    detached: true,
  });
}

async function stopGroup(child: ChildProcess | undefined, signal: NodeJS.Signals): Promise<void> {
  if (!child?.pid || child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  try {
    process.kill(-child.pid, signal);
  } catch {
    return;
  }
  const late = setTimeout(() => {
    try {
      if (child.pid) process.kill(-child.pid, 'SIGKILL');
    } catch {}
  }, 30_000);
  await exited;
  clearTimeout(late);
  // Helpers the VM started in the group (erl_child_setup, inet_gethost) go with it.
  try {
    process.kill(-child.pid, 'SIGKILL');
  } catch {}
}

/** What a broker of the suite offers the fleet tests: where it is, what a client must add, how to restart it. */
export interface SuiteBroker {
  readonly name: string;
  readonly url: string;
  /** Worker arguments every client of this broker needs (protocol, credentials). */
  readonly clientArgs: readonly string[];
  /** MQTT protocol for the test's own client. */
  readonly protocolVersion: 4 | 5;
  readonly username?: string;
  readonly password?: string;
  stop(signal?: NodeJS.Signals): Promise<void>;
  resume(): Promise<void>;
  dispose(): Promise<void>;
  log(): Promise<string>;
}

abstract class ErlangBroker implements SuiteBroker {
  abstract readonly name: string;
  abstract readonly clientArgs: readonly string[];
  abstract readonly protocolVersion: 4 | 5;
  readonly dir: string;
  readonly port: number;
  protected process: ChildProcess | undefined;

  protected constructor(dir: string, port: number) {
    this.dir = dir;
    this.port = port;
  }

  get url(): string {
    return `mqtt://127.0.0.1:${this.port}`;
  }

  protected abstract spawn(): ChildProcess;

  /** Starts (again) and waits until the MQTT port accepts connections. */
  async resume(): Promise<void> {
    const child = this.spawn();
    this.process = child;
    const deadline = Date.now() + 90_000;
    while (!(await portOpen(this.port))) {
      if (child.exitCode !== null || Date.now() > deadline)
        throw new Error(
          `${this.name} did not start on port ${this.port}:\n${(await this.log()).slice(-3000)}`,
        );
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  }

  /** SIGTERM: the VM's orderly shutdown (what a service manager does); SIGKILL: a crash. */
  async stop(signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
    const child = this.process;
    this.process = undefined;
    await stopGroup(child, signal);
  }

  abstract log(): Promise<string>;

  async dispose(): Promise<void> {
    await this.stop();
    await rm(this.dir, { recursive: true, force: true });
  }
}

/** Where Debian puts ejabberd's Erlang applications (`/usr/lib/{multiarch}/ejabberd-*`), whatever the machine. */
function ejabberdLibs(): string | undefined {
  for (const arch of existsSync('/usr/lib') ? readdirSync('/usr/lib') : []) {
    const dir = path.join('/usr/lib', arch);
    if (arch.includes('-linux-') && readdirSync(dir).some((name) => name.startsWith('ejabberd-'))) return dir;
  }
  return undefined;
}

function erts(): string {
  const root = '/usr/lib/erlang';
  const version = existsSync(root) ? readdirSync(root).find((name) => name.startsWith('erts-')) : undefined;
  if (!version) throw new Error('Erlang is not installed: apt-get install -y rabbitmq-server ejabberd');
  return path.join(root, version, 'bin');
}

/**
 * RabbitMQ with its MQTT plugin (MQTT 3.1.1 only): durable sessions per client id, no shared subscriptions, no
 * retained messages for wildcard subscriptions. `mqtt.prefetch = 1` is the in-flight limit the README asks for.
 * Its own epmd on a free port, so that no node outside the test is touched.
 */
export class RabbitMq extends ErlangBroker {
  readonly name = 'RabbitMQ';
  readonly clientArgs = ['--protocol', '3.1.1'] as const;
  readonly protocolVersion = 4 as const;
  readonly #epmdPort: number;
  readonly #amqpPort: number;
  readonly #distPort: number;
  #epmd: ChildProcess | undefined;

  private constructor(dir: string, port: number, ports: { epmd: number; amqp: number; dist: number }) {
    super(dir, port);
    this.#epmdPort = ports.epmd;
    this.#amqpPort = ports.amqp;
    this.#distPort = ports.dist;
  }

  static async start(): Promise<RabbitMq> {
    if (!existsSync('/usr/lib/rabbitmq/bin/rabbitmq-server'))
      throw new Error('RabbitMQ is not installed: apt-get install -y rabbitmq-server');
    const dir = await mkdtemp(path.join(tmpdir(), 'mfw-rabbitmq-'));
    const broker = new RabbitMq(dir, await freePort(), {
      epmd: await freePort(),
      amqp: await freePort(),
      dist: await freePort(),
    });
    await writeFile(
      path.join(dir, 'rabbitmq.conf'),
      [
        `listeners.tcp.default = 127.0.0.1:${broker.#amqpPort}`,
        `mqtt.listeners.tcp.default = 127.0.0.1:${broker.port}`,
        'mqtt.allow_anonymous = true',
        'mqtt.prefetch = 1',
        'loopback_users = none',
        '',
      ].join('\n'),
    );
    await writeFile(path.join(dir, 'enabled_plugins'), '[rabbitmq_mqtt].\n');
    await broker.resume();
    return broker;
  }

  protected spawn(): ChildProcess {
    if (!this.#epmd || this.#epmd.exitCode !== null)
      this.#epmd = processGroup(
        path.join(erts(), 'epmd'),
        ['-port', String(this.#epmdPort), '-address', '127.0.0.1'],
        {},
        path.join(this.dir, 'epmd.log'),
      );
    return processGroup(
      '/usr/lib/rabbitmq/bin/rabbitmq-server',
      [],
      {
        HOME: this.dir,
        RABBITMQ_NODENAME: `mfw${this.port}@localhost`,
        // Its default (the AMQP port + 20000) is past 65535 for most free ports.
        RABBITMQ_DIST_PORT: String(this.#distPort),
        ERL_EPMD_PORT: String(this.#epmdPort),
        RABBITMQ_MNESIA_BASE: path.join(this.dir, 'mnesia'),
        RABBITMQ_LOG_BASE: path.join(this.dir, 'log'),
        RABBITMQ_CONFIG_FILE: path.join(this.dir, 'rabbitmq.conf'),
        RABBITMQ_ENABLED_PLUGINS_FILE: path.join(this.dir, 'enabled_plugins'),
        RABBITMQ_PID_FILE: path.join(this.dir, 'pid'),
      },
      path.join(this.dir, 'out.log'),
    );
  }

  async log(): Promise<string> {
    return readFile(path.join(this.dir, 'out.log'), 'utf8').catch(() => '');
  }

  override async dispose(): Promise<void> {
    await this.stop();
    await stopGroup(this.#epmd, 'SIGTERM');
    await rm(this.dir, { recursive: true, force: true });
  }
}

/**
 * ejabberd's MQTT module (MQTT 5 and 3.1.1): sessions in memory, no shared subscriptions, a session expiry capped
 * at 5 minutes. Clients log in anonymously with any name and password. The VM runs without distribution, so no
 * epmd and no node name are needed.
 */
export class Ejabberd extends ErlangBroker {
  readonly name = 'ejabberd';
  readonly protocolVersion: 4 | 5;
  readonly username = 'worker';
  readonly password = 'anonymous-login';
  readonly #protocol: '5' | '3.1.1';

  private constructor(dir: string, port: number, protocol: '5' | '3.1.1') {
    super(dir, port);
    this.#protocol = protocol;
    this.protocolVersion = protocol === '5' ? 5 : 4;
  }

  get clientArgs(): readonly string[] {
    return [
      '--protocol',
      this.#protocol,
      '--username',
      this.username,
      '--password-file',
      path.join(this.dir, 'password'),
    ];
  }

  static async start(protocol: '5' | '3.1.1' = '5'): Promise<Ejabberd> {
    if (ejabberdLibs() === undefined)
      throw new Error('ejabberd is not installed: apt-get install -y ejabberd');
    const dir = await mkdtemp(path.join(tmpdir(), 'mfw-ejabberd-'));
    const broker = new Ejabberd(dir, await freePort(), protocol);
    await mkdir(path.join(dir, 'spool'));
    await writeFile(path.join(dir, 'password'), broker.password);
    await writeFile(
      path.join(dir, 'ejabberd.yml'),
      [
        'hosts:',
        '  - localhost',
        'loglevel: info',
        'auth_method: [anonymous]',
        'anonymous_protocol: login_anon',
        'listen:',
        '  -',
        `    port: ${broker.port}`,
        '    ip: "127.0.0.1"',
        '    module: mod_mqtt',
        'modules:',
        '  mod_mqtt: {}',
        '',
      ].join('\n'),
    );
    await broker.resume();
    return broker;
  }

  protected spawn(): ChildProcess {
    return processGroup(
      '/usr/bin/erl',
      ['-noinput', '-mnesia', 'dir', `"${path.join(this.dir, 'spool')}"`, '-s', 'ejabberd'],
      {
        HOME: this.dir,
        ERL_LIBS: ejabberdLibs() as string,
        EJABBERD_CONFIG_PATH: path.join(this.dir, 'ejabberd.yml'),
        EJABBERD_LOG_PATH: path.join(this.dir, 'ejabberd.log'),
      },
      path.join(this.dir, 'out.log'),
    );
  }

  async log(): Promise<string> {
    return readFile(path.join(this.dir, 'ejabberd.log'), 'utf8').catch(() => '');
  }
}
