import { readFileSync } from 'node:fs';
import path from 'node:path';
import { type MountEntry as Mount, parseMountinfo } from '../shared/mountinfo.js';

/** The v1 controllers the worker uses (cpu and cpuacct may share a mount or not). */
export const V1_CONTROLLERS = ['memory', 'cpu', 'cpuacct', 'pids', 'freezer', 'blkio'] as const;
export type V1Controller = (typeof V1_CONTROLLERS)[number];

/** Where this process's cgroups are, per hierarchy. */
export interface CgroupLayout {
  /** The cgroup2 directory of this process, when a cgroup2 hierarchy is mounted. */
  readonly unified: string | undefined;
  /** The v1 directory of this process for each v1 controller that is mounted. */
  readonly v1: Partial<Record<V1Controller, string>>;
}

// /proc/self/cgroup: "4:memory:/path" (v1, controllers comma-separated) and "0::/path" (v2).
function parseProcCgroup(text: string): { v2: string | undefined; v1: Map<string, string> } {
  const v1 = new Map<string, string>();
  let v2: string | undefined;
  for (const line of text.split('\n')) {
    const match = /^(\d+):([^:]*):(.*)$/.exec(line.trim());
    if (!match) continue;
    const [, id, controllers, cgroupPath] = match as unknown as [string, string, string, string];
    if (id === '0' && controllers === '') v2 = cgroupPath;
    else for (const controller of controllers.split(',')) v1.set(controller, cgroupPath);
  }
  return { v2, v1 };
}

// A process's cgroup path is relative to the hierarchy's root; a mount may show only a subtree (containers
// without a cgroup namespace mount their own cgroup as the root). Map the path onto the mount.
function directoryIn(mount: Mount, cgroupPath: string): string {
  const relative =
    mount.root === '/'
      ? cgroupPath
      : cgroupPath.startsWith(mount.root)
        ? cgroupPath.slice(mount.root.length)
        : '/';
  return path.resolve(mount.mountPoint, `.${relative}`);
}

/** Works out the layout from the texts of /proc/self/mountinfo and /proc/self/cgroup (pure, for tests). */
export function layoutFrom(mountinfo: string, procCgroup: string): CgroupLayout {
  const mounts = parseMountinfo(mountinfo);
  const own = parseProcCgroup(procCgroup);
  const unifiedMount = mounts.find((m) => m.fsType === 'cgroup2');
  const unified = unifiedMount && own.v2 !== undefined ? directoryIn(unifiedMount, own.v2) : undefined;
  const v1: Partial<Record<V1Controller, string>> = {};
  for (const controller of V1_CONTROLLERS) {
    const mount = mounts.find((m) => m.fsType === 'cgroup' && m.superOptions.includes(controller));
    const cgroupPath = own.v1.get(controller);
    if (mount && cgroupPath !== undefined) v1[controller] = directoryIn(mount, cgroupPath);
  }
  return { unified, v1 };
}

/**
 * A file of /proc or of a cgroup filesystem; undefined if it cannot be read. The kernel makes these in memory, so
 * reading one takes microseconds and is done synchronously: fs.promises.readFile would take four trips to the
 * thread pool (open, stat, read, close), each waiting for the main thread in between. (Writing a cgroup file can
 * block, see writeControl in cgroupfs.ts.)
 */
export function readKernelFile(file: string): string | undefined {
  try {
    return readFileSync(file, 'utf8');
  } catch {
    return undefined;
  }
}

export function detectLayout(procRoot = '/proc'): CgroupLayout {
  const read = (file: string): string => readKernelFile(path.join(procRoot, file)) ?? '';
  return layoutFrom(read('self/mountinfo'), read('self/cgroup'));
}
