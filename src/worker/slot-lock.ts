import type { Server } from 'node:net';
import { ErrorCode, WorkerError } from '../shared/errors.js';
import { dryRunId } from '../shared/ids.js';

// One worker id, one process on a host. The lock is a listening Unix socket in Linux's abstract namespace: the
// kernel lets one process bind a name, and frees it when that process dies however it dies, so there is no stale
// lock file to judge and no race between two processes that both find the holder dead. Its scope is the network
// namespace, which is the host for services and a container's own for containers: exactly where a slot's
// workspace, cgroups and claims could be shared.

const NAMESPACE = 'mqtt-fs-worker';

/** A held worker id; `release` frees it (the kernel does so anyway when the process exits). */
export interface SlotLock {
  readonly id: string;
  release(): void;
}

/**
 * Takes the lock of `id`; undefined when another process holds it. Systems without abstract sockets (not Linux)
 * have no cgroups to share either: the lock is granted there without holding anything.
 */
export async function tryLockSlot(id: string): Promise<SlotLock | undefined> {
  if (process.platform !== 'linux') return { id, release: () => {} };
  const { createServer } = await import('node:net');
  const server = createServer();
  return new Promise((resolve, reject) => {
    const onError = (error: NodeJS.ErrnoException): void => {
      server.close();
      if (error.code === 'EADDRINUSE') resolve(undefined);
      else reject(error);
    };
    server.once('error', onError);
    server.listen({ path: `\0${NAMESPACE}/${id}` }, () => {
      server.off('error', onError);
      // Nothing ever connects; the socket only marks the name as taken and must not keep the process alive.
      server.unref();
      server.on('connection', (socket) => socket.destroy());
      resolve({ id, release: () => closeQuietly(server) });
    });
  });
}

function closeQuietly(server: Server): void {
  try {
    server.close();
  } catch {
    // Already closed.
  }
}

/** Holds `id` for this worker process or throws ID_IN_USE: a second process must never touch the first's work. */
export async function lockWorkerId(id: string): Promise<SlotLock> {
  const lock = await tryLockSlot(id);
  if (lock) return lock;
  throw new WorkerError(
    ErrorCode.ID_IN_USE,
    `worker id ${id} is already held by another process on this host; give every slot its own --id (WORKER_ID)`,
  );
}

/**
 * A dry run's own identity, `dry-run-N` with the lowest N no other dry run on this host holds: never a worker's
 * id, so a dry run never touches a worker's workspace, cgroups or claims; and reused, so that the next dry run to
 * take a number sweeps what a crashed one left under it.
 */
export async function lockDryRunIdentity(): Promise<SlotLock> {
  for (let n = 1; ; n++) {
    const lock = await tryLockSlot(dryRunId(n));
    if (lock) return lock;
  }
}
