import { execFileSync } from 'node:child_process';
import { mkdir, readFile, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { runJob } from '../../src/job/run-job.js';
import { detectLayout } from '../../src/limits/detect.js';
import { effectiveLimits, ioDevices, type LimitSettings } from '../../src/limits/index.js';
import { openCgroupV2 } from '../../src/limits/v2.js';
import { silentLogger } from '../../src/shared/log.js';
import { engineFixture } from '../helpers/engine.js';
import { tempDir, writeTree } from '../helpers/tmp.js';

// I/O bandwidth limits: real cgroup v1 `blkio` throttling of a real disk here, and cgroup v2 `io.max` against a
// v2-shaped tree (this host's cgroup2 has no controllers).

const MiB = 1024 * 1024;
const isRoot = process.getuid?.() === 0;
// Throttling needs the blkio hierarchy and a block device under the temp folder (not tmpfs or an overlay root).
const hasBlkio = isRoot && detectLayout().v1.blkio !== undefined && ioDevices([tmpdir()]).length > 0;
const settings: LimitSettings = { policy: 'required', defaults: {}, ceilings: {} };

/** 40 MiB written past the page cache (direct I/O), so that the throttle sees every byte as it is written. */
const WRITE_40M = 'dd if=/dev/zero of=big bs=1M count=40 oflag=direct status=none && rm big';

async function timedJob(limits: Record<string, string> | undefined) {
  const { jobs, config } = await engineFixture({ limits: settings });
  await writeTree(jobs, {
    'io/job.json': JSON.stringify({ steps: [WRITE_40M], ...(limits ? { limits } : {}) }),
  });
  const { manifest } = await runJob(config, {
    request: { id: 'io', steps: undefined },
    attempt: 1,
    log: silentLogger,
  });
  return manifest;
}

describe.skipIf(!hasBlkio)('I/O limits on cgroup v1 (blkio), for real', () => {
  it('holds a step writing 40 MB to 10 MB/s, says so, and counts its bytes; without the limit it runs free', {
    timeout: 60_000,
  }, async () => {
    const limited = await timedJob({ ioBps: '10M' });
    expect(limited.status, JSON.stringify(limited.error)).toBe('success');
    const step = limited.steps[0];
    // The kernel enforces the rate: 40 MiB at 10 MiB/s cannot take less than ~4 s, however idle the machine.
    expect(step?.durationMs).toBeGreaterThanOrEqual(3500);
    expect(step?.limitsHit).toContain('io');
    expect(step?.ioWriteBytes).toBeGreaterThanOrEqual(40 * MiB);
    expect(limited.limits).toMatchObject({ mode: 'cgroup1', ioReadBps: 10 * MiB, ioWriteBps: 10 * MiB });
    expect(limited.limits.ioDevices?.length).toBeGreaterThan(0);

    const free = await timedJob(undefined);
    expect(free.status).toBe('success');
    // Measured against the limited run of the same machine, not a clock: the limit is what slowed it.
    expect(free.steps[0]?.durationMs).toBeLessThan((step?.durationMs ?? 0) / 2);
    expect(free.steps[0]?.limitsHit ?? []).not.toContain('io');
    expect(free.limits.ioDevices).toBeUndefined();
  });

  it('limits one direction alone: ioReadBps leaves writes free', { timeout: 60_000 }, async () => {
    const manifest = await timedJob({ ioReadBps: '1M' });
    expect(manifest.status).toBe('success');
    expect(manifest.limits).toMatchObject({ ioReadBps: MiB, ioWriteBps: null });
    expect(manifest.steps[0]?.limitsHit ?? []).not.toContain('io');
  });
});

describe('I/O limits against ceilings', () => {
  it('refuses a job that asks for more bandwidth than --max-io-bps, never silently less', () => {
    const capped: LimitSettings = {
      policy: 'required',
      defaults: {},
      ceilings: { ioReadBps: 5 * MiB, ioWriteBps: 5 * MiB },
    };
    expect(() => effectiveLimits({ ioWriteBps: 10 * MiB }, capped)).toThrow(
      /limits\.ioWriteBps asks for 10 MiB\/s, above the worker.s ceiling of 5 MiB\/s/,
    );
    expect(effectiveLimits({ ioReadBps: MiB }, capped)).toMatchObject({ ioReadBps: MiB, ioWriteBps: null });
    // No I/O limit in play: the manifest's limits read as before.
    expect(effectiveLimits({}, settings)).toEqual({ cpus: null, memoryBytes: null, pids: null });
  });
});

describe('cgroup v2 io.max against a v2-shaped tree', () => {
  it('enables io for the children, writes io.max per device and reads io.stat', async () => {
    const own = await tempDir('mfw-cg2-io-');
    await writeFile(path.join(own, 'cgroup.controllers'), 'cpuset cpu io memory pids\n');
    await writeFile(path.join(own, 'cgroup.procs'), '');
    await writeFile(path.join(own, 'cgroup.subtree_control'), '');
    const cgroups = await openCgroupV2(
      own,
      'w',
      {
        cpus: null,
        memoryBytes: null,
        pids: null,
        ioReadBps: null,
        ioWriteBps: 10 * MiB,
        ioDevices: ['8:0'],
      },
      async () => {},
    );
    expect(await readFile(path.join(own, 'cgroup.subtree_control'), 'utf8')).toBe('+cpu +memory +pids +io');
    const sandbox = await cgroups.step(0);
    const leaf = path.join(own, 'w-step-0');
    expect(await readFile(path.join(leaf, 'io.max'), 'utf8')).toBe(`8:0 rbps=max wbps=${10 * MiB}`);
    // "The kernel" accounts 40 MiB written on 8:0 and a little on another device.
    await writeFile(
      path.join(leaf, 'io.stat'),
      `8:0 rbytes=4096 wbytes=${40 * MiB} rios=1 wios=40 dbytes=0 dios=0\n8:16 rbytes=0 wbytes=8192 rios=0 wios=2\n`,
    );
    await writeFile(path.join(leaf, 'cgroup.procs'), '');
    const accounted = await sandbox.close();
    expect(accounted).toMatchObject({ ioReadBytes: 4096, ioWriteBytes: 40 * MiB + 8192 });
    expect(accounted.limitsHit).toContain('io');
  });

  it('refuses io limits where the io controller is not delegated, naming the fix', async () => {
    const own = await tempDir('mfw-cg2-io-');
    await writeFile(path.join(own, 'cgroup.controllers'), 'cpu memory pids\n');
    await writeFile(path.join(own, 'cgroup.procs'), '');
    await expect(
      openCgroupV2(own, 'w', {
        cpus: null,
        memoryBytes: null,
        pids: null,
        ioReadBps: MiB,
        ioDevices: ['8:0'],
      }),
    ).rejects.toThrow(/controllers io are not delegated/);
  });
});

describe('the devices an I/O limit applies to', () => {
  it('throttles a partition through its whole disk', async () => {
    const file = await tempDir('mfw-dev-');
    const real = ioDevices([file]);
    expect(real.length).toBeGreaterThan(0);
    // A sysfs of its own: the device of `file` is a partition of "disk" 253:7.
    const sys = await tempDir('mfw-sys-');
    const [device] = real;
    await mkdir(path.join(sys, 'devices/disk/part'), { recursive: true });
    await writeFile(path.join(sys, 'devices/disk/dev'), '253:7\n');
    await writeFile(path.join(sys, 'devices/disk/part/partition'), '1\n');
    await mkdir(path.join(sys, 'dev/block'), { recursive: true });
    await symlink(path.join(sys, 'devices/disk/part'), path.join(sys, 'dev/block', device as string));
    expect(ioDevices([file], sys)).toEqual(['253:7']);
  });

  it.skipIf(!isRoot)('throttles a loop device and the disk under its backing file', async () => {
    const dir = await tempDir('mfw-loop-');
    const image = path.join(dir, 'disk.img');
    const mounted = path.join(dir, 'mnt');
    execFileSync('truncate', ['-s', '16M', image]);
    execFileSync('mkfs.ext4', ['-q', '-F', image]);
    await mkdir(mounted);
    execFileSync('mount', ['-o', 'loop', image, mounted]);
    try {
      const found = ioDevices([mounted]);
      expect(found).toHaveLength(2);
      expect(found[0]).toMatch(/^7:\d+$/); // the loop device
      expect(found[1]).toBe(ioDevices([image])[0]); // the disk its image lives on
    } finally {
      execFileSync('umount', [mounted]);
    }
  });
});
