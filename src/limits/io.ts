import { existsSync, readFileSync, realpathSync, statSync } from 'node:fs';
import path from 'node:path';
import { ErrorCode, WorkerError } from '../shared/errors.js';
import { readKernelFile } from './detect.js';

// I/O bandwidth limits are set per block device (cgroup v2 `io.max`, v1 `blkio.throttle.*_bps_device`): the
// devices that hold what a step reads and writes, i.e. the workspace (an overlay's upper layer) and the job's
// folder (an overlay's lower layer). A partition is throttled through its whole disk (the kernel's throttling lives
// on the disk's queue), and a loop device through the device of its backing file too (a step's writes reach both).

/** A block device as the cgroup files name it: `MAJ:MIN`. */
export type Device = string;

function majorMinor(dev: bigint): Device {
  const major = ((dev >> 8n) & 0xfffn) | ((dev >> 32n) & ~0xfffn);
  const minor = (dev & 0xffn) | ((dev >> 12n) & ~0xffn);
  return `${major}:${minor}`;
}

/** The whole disk of a block device (itself, unless it is a partition); undefined for no block device at all. */
function wholeDisk(device: Device, sys: string): Device | undefined {
  const dir = path.join(sys, 'dev/block', device);
  if (!existsSync(dir)) return undefined; // tmpfs, overlay, a network filesystem: anonymous devices
  if (!existsSync(path.join(dir, 'partition'))) return device;
  return readKernelFile(path.join(realpathSync(dir), '..', 'dev'))?.trim();
}

/**
 * The block devices under `paths` (with the backing devices of loop devices), for I/O limits. `sys` is where sysfs
 * is mounted (a test passes a tree of its own).
 */
export function ioDevices(paths: readonly string[], sys = '/sys'): Device[] {
  const found = new Set<Device>();
  const add = (file: string, depth: number): void => {
    let dev: bigint;
    try {
      dev = statSync(file, { bigint: true }).dev;
    } catch {
      return;
    }
    const disk = wholeDisk(majorMinor(dev), sys);
    if (!disk || found.has(disk)) return;
    found.add(disk);
    const backing = path.join(sys, 'dev/block', disk, 'loop/backing_file');
    if (depth < 4 && existsSync(backing)) add(readFileSync(backing, 'utf8').trim(), depth + 1);
  };
  for (const file of paths) add(file, 0);
  return [...found];
}

/** Refuses I/O limits where no block device holds the job's files (they would limit nothing). */
export function requireDevices(devices: readonly Device[], paths: readonly string[]): void {
  if (devices.length > 0) return;
  throw new WorkerError(
    ErrorCode.LIMITS_UNAVAILABLE,
    `I/O limits need a block device under the workspace and the job folder, and ${paths.join(' and ')} have none (tmpfs, a network filesystem?): put --workspaces-dir on a local disk, or drop ioBps`,
  );
}

/**
 * Whether a step ran into its I/O limit: the kernel counts bytes, not throttled waits (v1 has no such counter), so
 * a step that moved at least half of what its limit allows over its lifetime counts as held back by it.
 */
export function ioLimitHit(
  bytes: { read: number | null; write: number | null },
  limits: { readonly ioReadBps?: number | null; readonly ioWriteBps?: number | null },
  sinceMs: number,
): boolean | null {
  if (bytes.read === null && bytes.write === null) return null;
  const seconds = Math.max((Date.now() - sinceMs) / 1000, 0.001);
  const near = (moved: number | null, bps: number | null | undefined): boolean =>
    moved !== null && bps != null && moved >= 0.5 * bps * seconds;
  return near(bytes.read, limits.ioReadBps) || near(bytes.write, limits.ioWriteBps);
}
