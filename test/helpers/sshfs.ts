import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { createServer, Socket } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll } from 'vitest';
import { waitFor } from './tmp.js';
import { BIN, type Running, startProcess } from './worker.js';

// A real network filesystem with per-client caches: a private sshd on a free loopback port serves one folder
// over SFTP, and sshfs mounts it once per "host". Each mount keeps its own caches (listings, attributes), as two
// NFS clients do; a worker started through `onHost` runs in its own UTS namespace, so its claims carry another
// host name and are judged by their heartbeat, as a real second host's are.

/** Whether this machine can run the fixture (root, sshd, sshfs, FUSE). */
export const sshfsAvailable = ((): boolean => {
  try {
    execFileSync('sh', ['-c', 'command -v sshfs && test -x /usr/sbin/sshd && test -e /dev/fuse'], {
      stdio: 'ignore',
    });
    return process.getuid?.() === 0;
  } catch {
    return false;
  }
})();

/** The options the README prescribes for a jobs directory on sshfs: no client caching. */
export const FRESH = ['cache=no', 'attr_timeout=0', 'entry_timeout=0'];
/** NFS-like short caches, as measured in the issue (3 s). */
export const SHORT = ['cache_timeout=3', 'attr_timeout=3'];
/** sshfs's own defaults (a 20 s cache of listings and attributes). */
export const DEFAULTS: string[] = [];

export interface Mounted {
  readonly path: string;
  /** Cuts the mount as a network outage does: its sshfs process dies, every access fails with ENOTCONN. */
  cut(): Promise<void>;
}

export interface SshfsServer {
  /** The served folder (the "server's disk"). */
  readonly root: string;
  mount(options: readonly string[]): Promise<Mounted>;
}

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as { port: number };
      server.close(() => resolve(port));
    });
  });
}

async function accepts(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = new Socket();
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
    socket.connect(port, '127.0.0.1');
  });
}

async function mounted(at: string): Promise<boolean> {
  const info = await readFile('/proc/self/mountinfo', 'utf8');
  return info.split('\n').some((line) => line.split(' ')[4] === at && line.includes('fuse.sshfs'));
}

function isMountedSync(at: string): boolean {
  return execFileSync('cat', ['/proc/self/mountinfo'], { encoding: 'utf8' })
    .split('\n')
    .some((line) => line.split(' ')[4] === at);
}

/** Starts sshd for the file's tests (before all, stopped after all) and mounts on demand. */
export function sshfsPerFile(): () => SshfsServer {
  let server: SshfsServer | undefined;
  let sshd: ChildProcess | undefined;
  const mounts: { at: string; child: ChildProcess }[] = [];
  let base: string | undefined;
  beforeAll(async () => {
    if (!sshfsAvailable) return;
    // Not a per-test temp folder: those are removed after each test, and this one holds live mounts.
    base = await mkdtemp(path.join(tmpdir(), 'mfw-sshfs-'));
    const keys = path.join(base, 'keys');
    const root = path.join(base, 'srv');
    await mkdir(keys);
    await mkdir(root);
    for (const name of ['host_key', 'client_key'])
      execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', path.join(keys, name)]);
    await writeFile(path.join(keys, 'authorized_keys'), await readFile(path.join(keys, 'client_key.pub')));
    const port = await freePort();
    await writeFile(
      path.join(keys, 'sshd_config'),
      [
        `Port ${port}`,
        'ListenAddress 127.0.0.1',
        `HostKey ${path.join(keys, 'host_key')}`,
        `AuthorizedKeysFile ${path.join(keys, 'authorized_keys')}`,
        'PermitRootLogin yes',
        'PasswordAuthentication no',
        'UsePAM no',
        'StrictModes no',
        `PidFile ${path.join(keys, 'sshd.pid')}`,
        'Subsystem sftp internal-sftp',
        '',
      ].join('\n'),
    );
    await mkdir('/run/sshd', { recursive: true });
    sshd = spawn('/usr/sbin/sshd', ['-D', '-e', '-f', path.join(keys, 'sshd_config')], { stdio: 'ignore' });
    await waitFor(() => accepts(port), 10_000, 50);
    let count = 0;
    server = {
      root,
      mount: async (options) => {
        const at = path.join(base as string, `mount-${count++}`);
        await mkdir(at);
        const all = [
          `IdentityFile=${path.join(keys, 'client_key')}`,
          'StrictHostKeyChecking=no',
          'UserKnownHostsFile=/dev/null',
          'LogLevel=ERROR',
          `port=${port}`,
          ...options,
        ];
        // -f: the mount's process stays ours, to cut it and to reap it.
        const child = spawn('sshfs', ['-f', '-o', all.join(','), `root@127.0.0.1:${root}`, at], {
          stdio: 'ignore',
        });
        mounts.push({ at, child });
        await waitFor(() => mounted(at), 10_000, 50);
        return {
          path: at,
          cut: async () => {
            child.kill('SIGKILL');
            await new Promise((resolve) => child.once('exit', resolve));
          },
        };
      },
    };
  }, 60_000);
  afterAll(async () => {
    for (const { at, child } of mounts) {
      child.kill('SIGKILL');
      try {
        execFileSync('umount', ['-l', at], { stdio: 'ignore' });
      } catch {
        // already gone
      }
    }
    sshd?.kill('SIGTERM');
    // Only once nothing is mounted below it: removing through a live mount would empty the served folder.
    if (base && mounts.every(({ at }) => !isMountedSync(at)))
      await rm(base, { recursive: true, force: true });
  });
  return () => {
    if (!server) throw new Error('the sshfs fixture is not available on this machine');
    return server;
  };
}

/** Starts the worker as if on another host: its own UTS namespace, with `host` as its host name. */
export function onHost(host: string, args: string[], env: Record<string, string> = {}): Running {
  return startProcess(
    'unshare',
    ['--uts', 'sh', '-c', 'hostname "$0" && exec "$@"', host, process.execPath, BIN, ...args],
    env,
  );
}
