import { randomBytes } from 'node:crypto';
import { constants } from 'node:fs';
import { open, readdir, readFile, realpath, unlink } from 'node:fs/promises';
import path from 'node:path';
import { isInside } from '../job/paths.js';
import { type MountEntry, parseMountinfo } from '../shared/mountinfo.js';
import { formatDuration } from '../shared/units.js';

// What the filesystem under the jobs directory does to claims and inputs. A heartbeat is only as fresh as the
// attribute cache of the client that reads it, a timestamp only as fine as the protocol carries it, and a listing
// only as fresh as the client's directory cache: read from the mount's options (and, for sshfs, from its
// process's command line, since FUSE options do not reach mountinfo) and measured with a probe file.
//
// The lease's arithmetic (README, "Claims on a network drive"): a live runner touches its claim every lease/4, so
// another host sees it at most lease/4 + staleness old; staleness = attribute cache + timestamp precision + clock
// offset. It must stay under the lease, or a live job is taken over: the worker refuses a lease where
// staleness >= 3/4 of it, and warns from 1/4 on. A runner whose touches fail stops at lease/2 (self-fencing).

export interface DriveReport {
  /** `nfs4`, `fuse.sshfs`, `ext4`, … */
  readonly fsType: string;
  readonly mountPoint: string;
  /** How old a heartbeat read through this client may look beyond its true age (ms), as far as known. */
  readonly stalenessMs: number;
  /** Each finding, most important first. */
  readonly findings: readonly Finding[];
}

export interface Finding {
  readonly level: 'ok' | 'warn' | 'fail';
  readonly text: string;
}

interface Mount {
  readonly mountPoint: string;
  readonly fsType: string;
  readonly source: string;
  readonly options: ReadonlyMap<string, string>;
}

const LOCAL = new Set(['ext2', 'ext3', 'ext4', 'xfs', 'btrfs', 'tmpfs', 'overlay', 'zfs', 'f2fs', 'ramfs']);

function parseOptions(...lists: string[]): Map<string, string> {
  const options = new Map<string, string>();
  for (const list of lists)
    for (const item of list.split(',')) {
      if (item === '') continue;
      const at = item.indexOf('=');
      options.set(at < 0 ? item : item.slice(0, at), at < 0 ? '' : item.slice(at + 1));
    }
  return options;
}

/** The mount that holds `dir` (the longest mount point above it), from /proc/self/mountinfo. */
export async function mountOf(dir: string, mountinfo?: string): Promise<Mount | undefined> {
  const real = await realpath(dir);
  const text = mountinfo ?? (await readFile('/proc/self/mountinfo', 'utf8').catch(() => ''));
  let best: MountEntry | undefined;
  for (const mount of parseMountinfo(text))
    if (isInside(mount.mountPoint, real) && (!best || mount.mountPoint.length >= best.mountPoint.length))
      best = mount;
  return (
    best && {
      mountPoint: best.mountPoint,
      fsType: best.fsType,
      source: best.source,
      options: parseOptions(...best.mountOptions, ...best.superOptions),
    }
  );
}

/** sshfs's own options, from the command line of the process that serves `mountPoint`; undefined if not found. */
async function sshfsOptions(mountPoint: string): Promise<Map<string, string> | undefined> {
  const pids = await readdir('/proc').catch(() => [] as string[]);
  for (const pid of pids.filter((name) => /^\d+$/.test(name))) {
    const argv = (await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '')).split('\0');
    if (!path.basename(argv[0] ?? '').startsWith('sshfs') || !argv.includes(mountPoint)) continue;
    const lists: string[] = [];
    argv.forEach((arg, i) => {
      if (arg === '-o' && argv[i + 1] !== undefined) lists.push(argv[i + 1] as string);
      else if (arg.startsWith('-o') && arg.length > 2) lists.push(arg.slice(2));
    });
    return parseOptions(...lists);
  }
  return undefined;
}

const seconds = (value: string | undefined, fallback: number): number => {
  const n = value === undefined ? Number.NaN : Number(value);
  return Number.isFinite(n) && n >= 0 ? n * 1000 : fallback;
};
const off = (value: string | undefined): boolean => value === 'no' || value === 'false' || value === '0';

/** The attribute cache a client keeps, and what it means for inputs, per filesystem family. */
async function caching(mount: Mount): Promise<{ cacheMs: number; findings: Finding[] }> {
  const o = mount.options;
  const findings: Finding[] = [];
  if (mount.fsType === 'fuse.sshfs') {
    const own = await sshfsOptions(mount.mountPoint);
    if (!own)
      findings.push({
        level: 'warn',
        text: "cannot read sshfs's options (its process is not visible here): assuming its defaults",
      });
    const s = own ?? new Map<string, string>();
    const dirCache = !off(s.get('dir_cache') ?? s.get('cache'));
    const stat = dirCache
      ? seconds(
          s.get('dcache_stat_timeout') ?? s.get('cache_stat_timeout'),
          seconds(s.get('dcache_timeout') ?? s.get('cache_timeout'), 20_000),
        )
      : 0;
    const attr = seconds(s.get('attr_timeout'), 1000);
    if (dirCache || attr > 0 || seconds(s.get('entry_timeout'), 1000) > 0)
      findings.push({
        level: 'warn',
        text: `sshfs caches listings and attributes (${formatDuration(stat)} + ${formatDuration(attr)}): a re-run can stage a changed input at its old size or miss a new one; mount with -o cache=no,attr_timeout=0,entry_timeout=0`,
      });
    return { cacheMs: stat + attr, findings };
  }
  if (mount.fsType === 'nfs' || mount.fsType === 'nfs4') {
    if (o.has('nocto'))
      findings.push({
        level: 'fail',
        text: 'nocto: without close-to-open consistency neither heartbeats nor inputs are read fresh; remove nocto',
      });
    const lookup = o.get('lookupcache') ?? 'all';
    if (lookup === 'all')
      findings.push({
        level: 'warn',
        text: 'lookupcache=all caches names that were missing: a new input, or a claim another host just made, can stay unseen for acdirmax; mount with lookupcache=positive',
      });
    // Opening a file revalidates its attributes (close-to-open): a heartbeat is read as the server has it.
    return { cacheMs: o.has('nocto') ? seconds(o.get('actimeo') ?? o.get('acregmax'), 60_000) : 0, findings };
  }
  if (mount.fsType === 'cifs' || mount.fsType === 'smb3') {
    if (o.get('cache') === 'loose' || o.get('cache') === 'none')
      findings.push({
        level: o.get('cache') === 'loose' ? 'warn' : 'ok',
        text: `cache=${o.get('cache')}${o.get('cache') === 'loose' ? ': files are not revalidated on open; use cache=strict (the default)' : ''}`,
      });
    return { cacheMs: seconds(o.get('actimeo'), 1000), findings };
  }
  return { cacheMs: 0, findings };
}

/** How far behind this clock a file's stamp can be on the same host: the kernel's coarse clock, a tick or so. */
const COARSE_CLOCK_MS = 50;

/**
 * The drive's timestamps, measured: a probe file is created, its mtime set to a value with milliseconds and read
 * back (precision), and its creation time compared with this host's clock (offset). The probe is removed.
 */
async function measureTimestamps(jobsDir: string): Promise<{ precisionMs: number; offsetMs: number }> {
  const probe = path.join(jobsDir, `.mqtt-fs-worker-probe.${process.pid}.${randomBytes(4).toString('hex')}`);
  const before = Date.now();
  const handle = await open(
    probe,
    constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW,
  );
  try {
    const created = (await handle.stat()).mtimeMs;
    const after = Date.now();
    // Milliseconds of .999: a drive that keeps whole seconds shows it as a difference of 999 ms.
    const wanted = Math.floor(after / 1000) * 1000 - 10_000 + 999;
    await handle.utimes(wanted / 1000, wanted / 1000);
    const read = (await handle.stat()).mtimeMs;
    // A creation stamp that falls between the two readings of this clock is an offset of 0. Below them, a drive
    // with whole-second stamps (sshfs: SFTP v3) truncates by up to a second, and the kernel stamps files from a
    // coarse clock up to a tick behind this one: a stamp of the second before `before` is no offset either.
    const slack = 1000 + COARSE_CLOCK_MS;
    const offsetMs = created < before - slack ? before - created : created > after ? created - after : 0;
    const missed = Math.abs(read - wanted);
    return { precisionMs: missed < 1 ? 1 : Math.ceil(missed / 1000) * 1000, offsetMs };
  } finally {
    await handle.close();
    await unlink(probe).catch(() => {});
  }
}

/** What the jobs directory's filesystem means for claims and inputs, and whether `leaseMs` can be honoured. */
export async function inspectDrive(
  jobsDir: string,
  leaseMs: number,
  mountinfo?: string,
): Promise<DriveReport> {
  const mount = await mountOf(jobsDir, mountinfo);
  if (!mount) return { fsType: 'unknown', mountPoint: '/', stalenessMs: 0, findings: [] };
  const what = `${mount.fsType} at ${mount.mountPoint}`;
  if (LOCAL.has(mount.fsType))
    return {
      fsType: mount.fsType,
      mountPoint: mount.mountPoint,
      stalenessMs: 0,
      findings: [{ level: 'ok', text: `${what}: a local filesystem (one host's slots share it)` }],
    };
  const { cacheMs, findings } = await caching(mount);
  const { precisionMs, offsetMs } = await measureTimestamps(jobsDir);
  const stalenessMs = cacheMs + precisionMs + offsetMs;
  const budget = `attribute cache ${formatDuration(cacheMs)} + timestamp precision ${formatDuration(precisionMs)} + clock offset ${formatDuration(offsetMs)} = ${formatDuration(stalenessMs)}`;
  const lease = formatDuration(leaseMs);
  if (stalenessMs * 4 >= leaseMs * 3)
    findings.unshift({
      level: 'fail',
      text: `${what}: a heartbeat can look ${formatDuration(stalenessMs)} older than it is (${budget}), so --claim-lease ${lease} cannot be honoured: a live job would be taken over; use a lease above ${formatDuration(Math.ceil((stalenessMs * 4) / 3 / 1000 + 1) * 1000)} or mount with less caching`,
    });
  else if (stalenessMs * 4 >= leaseMs)
    findings.unshift({
      level: 'warn',
      text: `${what}: ${budget}, a thin margin for --claim-lease ${lease}; a longer lease or less caching is safer`,
    });
  else findings.unshift({ level: 'ok', text: `${what}: ${budget}, within --claim-lease ${lease}` });
  return { fsType: mount.fsType, mountPoint: mount.mountPoint, stalenessMs, findings };
}
