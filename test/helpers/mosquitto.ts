import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { createConnection, createServer } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach } from 'vitest';

/** The mosquitto binary: on PATH, or where Debian puts it (/usr/sbin is not on every PATH). */
export function mosquittoBinary(): string {
  for (const candidate of ['/usr/sbin/mosquitto', '/usr/local/sbin/mosquitto'])
    if (existsSync(candidate)) return candidate;
  try {
    return execFileSync('sh', ['-c', 'command -v mosquitto'], { encoding: 'utf8' }).trim();
  } catch {
    throw new Error(
      'mosquitto is not installed: the broker tests need a real one (apt-get install -y mosquitto)',
    );
  }
}

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.unref();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      server.close(() => resolve(typeof address === 'object' && address ? address.port : 0));
    });
  });
}

/** Does something accept connections on this loopback port? */
export async function portOpen(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = createConnection({ port, host: '127.0.0.1' });
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}

export interface MosquittoOptions {
  /** Extra lines for mosquitto.conf (listener-scoped settings go after the listener line). */
  readonly listenerLines?: readonly string[];
  readonly globalLines?: readonly string[];
  readonly tls?: boolean;
}

/**
 * A real Mosquitto on a free loopback port, configured the way the README tells users to (persistence saved on
 * every change, no queue limit), with its own folder for persistence and logs. Restartable with its data.
 */
export class Mosquitto {
  readonly dir: string;
  readonly port: number;
  readonly #options: MosquittoOptions;
  #process: ChildProcess | undefined;

  private constructor(dir: string, port: number, options: MosquittoOptions) {
    this.dir = dir;
    this.port = port;
    this.#options = options;
  }

  static async start(options: MosquittoOptions = {}): Promise<Mosquitto> {
    const dir = await mkdtemp(path.join(tmpdir(), 'mfw-mosquitto-'));
    const broker = new Mosquitto(dir, await freePort(), options);
    await broker.#writeConfig();
    await broker.resume();
    return broker;
  }

  get url(): string {
    return `${this.#options.tls ? 'mqtts' : 'mqtt'}://127.0.0.1:${this.port}`;
  }

  async #writeConfig(): Promise<void> {
    const lines = [
      'user root',
      'per_listener_settings false',
      'persistence true',
      `persistence_location ${this.dir}/`,
      'autosave_interval 1',
      'autosave_on_changes true',
      'max_queued_messages 0',
      `log_dest file ${this.dir}/mosquitto.log`,
      'log_type error',
      'log_type warning',
      'log_type notice',
      'log_type information',
      'connection_messages true',
      ...(this.#options.globalLines ?? []),
      `listener ${this.port} 127.0.0.1`,
      ...(this.#options.listenerLines ?? ['allow_anonymous true']),
    ];
    await writeFile(path.join(this.dir, 'mosquitto.conf'), `${lines.join('\n')}\n`);
  }

  /** Starts (or starts again after `stop`) and waits until the port accepts connections. */
  async resume(): Promise<void> {
    const child = spawn(mosquittoBinary(), ['-c', path.join(this.dir, 'mosquitto.conf')], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let stderr = '';
    child.stderr?.on('data', (chunk: Buffer) => {
      stderr += chunk.toString();
    });
    this.#process = child;
    const deadline = Date.now() + 10_000;
    while (!(await portOpen(this.port))) {
      if (child.exitCode !== null || Date.now() > deadline) {
        throw new Error(`mosquitto did not start on port ${this.port}: ${stderr}${await this.log()}`);
      }
      await new Promise((resolve) => setTimeout(resolve, 25));
    }
  }

  /** Stops the broker (SIGTERM saves persistence; SIGKILL does not) and waits for it to exit. */
  async stop(signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
    const child = this.#process;
    this.#process = undefined;
    if (!child || child.exitCode !== null) return;
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    child.kill(signal);
    await exited;
  }

  async restart(): Promise<void> {
    await this.stop();
    await this.resume();
  }

  async log(): Promise<string> {
    return readFile(path.join(this.dir, 'mosquitto.log'), 'utf8').catch(() => '');
  }

  async dispose(): Promise<void> {
    await this.stop();
    await rm(this.dir, { recursive: true, force: true });
  }
}

/**
 * A fresh broker for every test of the calling file (slots' persistent sessions must not leak between tests).
 * `broker()` is the current one; `replace(options)` swaps it for one configured differently.
 */
export function freshBrokerPerTest(): {
  broker: () => Mosquitto;
  replace: (options: MosquittoOptions) => Promise<Mosquitto>;
} {
  let current: Mosquitto | undefined;
  beforeEach(async () => {
    current = await Mosquitto.start();
  });
  afterEach(async () => {
    await current?.dispose();
  });
  return {
    broker: () => {
      if (!current) throw new Error('no broker outside a test');
      return current;
    },
    replace: async (options) => {
      await current?.dispose();
      current = await Mosquitto.start(options);
      return current;
    },
  };
}

/** A real Aedes broker (npm) in a process of its own, on a free loopback port: the second broker of the suite. */
export class AedesBroker {
  readonly port: number;
  readonly #process: ChildProcess;

  private constructor(port: number, child: ChildProcess) {
    this.port = port;
    this.#process = child;
  }

  static async start(): Promise<AedesBroker> {
    const port = await freePort();
    const script = new URL('./aedes-server.mjs', import.meta.url).pathname;
    const child = spawn(process.execPath, [script, String(port)], { stdio: ['ignore', 'pipe', 'inherit'] });
    await new Promise<void>((resolve, reject) => {
      child.stdout?.once('data', () => resolve());
      child.once('exit', (code) => reject(new Error(`aedes exited with ${code}`)));
    });
    return new AedesBroker(port, child);
  }

  get url(): string {
    return `mqtt://127.0.0.1:${this.port}`;
  }

  async stop(): Promise<void> {
    if (this.#process.exitCode !== null || this.#process.signalCode !== null) return;
    const exited = new Promise<void>((resolve) => this.#process.once('exit', () => resolve()));
    this.#process.kill('SIGKILL');
    await exited;
  }
}
