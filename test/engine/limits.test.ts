import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { chmod, mkdir, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { runJob } from '../../src/job/run-job.js';
import { detectLayout, layoutFrom } from '../../src/limits/detect.js';
import { effectiveLimits, type LimitSettings } from '../../src/limits/index.js';
import { openCgroupV2 } from '../../src/limits/v2.js';
import { silentLogger } from '../../src/shared/log.js';
import { engineFixture } from '../helpers/engine.js';
import { isAlive, tempDir, waitFor, writeTree } from '../helpers/tmp.js';

const MiB = 1024 * 1024;

describe('layout detection from recorded samples', () => {
  it('finds the v1 controllers and the controller-less cgroup2 of a hybrid host (as these machines)', () => {
    const mountinfo = [
      '31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755',
      '32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu',
      '33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct',
      '35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory',
      '37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer',
      '39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids',
      '41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw',
    ].join('\n');
    const cgroup = [
      '8:pids:/',
      '6:freezer:/',
      '4:memory:/process_api/abc',
      '2:cpuacct:/',
      '1:cpu:/',
      '0::/',
    ].join('\n');
    expect(layoutFrom(mountinfo, cgroup)).toEqual({
      unified: '/sys/fs/cgroup/unified',
      v1: {
        memory: '/sys/fs/cgroup/memory/process_api/abc',
        cpu: '/sys/fs/cgroup/cpu',
        cpuacct: '/sys/fs/cgroup/cpuacct',
        pids: '/sys/fs/cgroup/pids',
        freezer: '/sys/fs/cgroup/freezer',
      },
    });
  });

  it('finds a classic v1 host with cpu,cpuacct on one mount', () => {
    const mountinfo = [
      '25 18 0:22 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpuacct,cpu',
      '26 18 0:23 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory',
      '27 18 0:24 / /sys/fs/cgroup/pids rw,nosuid - cgroup cgroup rw,pids',
      '28 18 0:25 / /sys/fs/cgroup/freezer rw,nosuid - cgroup cgroup rw,freezer',
    ].join('\n');
    const cgroup = [
      '5:pids:/system.slice/w.service',
      '4:memory:/system.slice/w.service',
      '3:cpuacct,cpu:/system.slice/w.service',
      '2:freezer:/',
    ].join('\n');
    const layout = layoutFrom(mountinfo, cgroup);
    expect(layout.unified).toBeUndefined();
    expect(layout.v1.cpu).toBe('/sys/fs/cgroup/cpu,cpuacct/system.slice/w.service');
    expect(layout.v1.cpuacct).toBe(layout.v1.cpu);
    expect(layout.v1.memory).toBe('/sys/fs/cgroup/memory/system.slice/w.service');
  });

  it('finds the unit cgroup of a pure v2 host', () => {
    const layout = layoutFrom(
      '30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot',
      '0::/system.slice/system-mqtt\\x2dfs\\x2dworker.slice/mqtt-fs-worker@slot-1.service',
    );
    expect(layout).toEqual({
      unified:
        '/sys/fs/cgroup/system.slice/system-mqtt\\x2dfs\\x2dworker.slice/mqtt-fs-worker@slot-1.service',
      v1: {},
    });
  });

  it('finds the root of a v2 container with its own cgroup namespace, and maps a container without one', () => {
    expect(layoutFrom('612 600 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup rw', '0::/')).toEqual({
      unified: '/sys/fs/cgroup',
      v1: {},
    });
    // Without a cgroup namespace the mount shows the container's own cgroup as its root.
    expect(
      layoutFrom('612 600 0:26 /docker/3f2a /sys/fs/cgroup ro,nosuid - cgroup2 cgroup rw', '0::/docker/3f2a'),
    ).toEqual({
      unified: '/sys/fs/cgroup',
      v1: {},
    });
  });

  it('decodes escaped mount points', () => {
    expect(layoutFrom('1 0 0:1 / /mnt/my\\040cgroups rw - cgroup2 cgroup2 rw', '0::/x').unified).toBe(
      '/mnt/my cgroups/x',
    );
  });
});

describe('limits against ceilings', () => {
  const settings: LimitSettings = {
    policy: 'auto',
    defaults: { cpus: 1, memoryBytes: 512 * MiB },
    ceilings: { cpus: 2, memoryBytes: 1024 * MiB, pids: 100 },
  };
  it('takes the job request, else the default', () => {
    expect(effectiveLimits({ cpus: 1.5 }, settings)).toEqual({
      cpus: 1.5,
      memoryBytes: 512 * MiB,
      pids: null,
    });
  });
  it('refuses a request above a ceiling, naming each one, never lowering it', () => {
    expect(() => effectiveLimits({ cpus: 4, memoryBytes: 2048 * MiB, pids: 100 }, settings)).toThrow(
      /limits.cpus asks for 4, above the worker's ceiling of 2; limits.memory asks for 2 GiB, above the worker's ceiling of 1 GiB/,
    );
  });
});

describe('cgroup v2 against a v2-shaped tree', () => {
  async function tree() {
    const own = await tempDir('mfw-cg2-');
    await writeFile(path.join(own, 'cgroup.controllers'), 'cpuset cpu io memory hugetlb pids rdma\n');
    await writeFile(path.join(own, 'cgroup.procs'), '4242\n4343\n');
    await writeFile(path.join(own, 'cgroup.subtree_control'), '');
    return own;
  }
  const remove = (dir: string) => rm(dir, { recursive: true, force: true });

  it('moves the worker to supervisor/, enables controllers, writes the limits of each step leaf', async () => {
    const own = await tree();
    const cgroups = await openCgroupV2(
      own,
      'mqtt-fs-worker-w1',
      { cpus: 1.5, memoryBytes: 256 * MiB, pids: 64 },
      remove,
    );
    expect(cgroups.mode).toBe('cgroup2');
    expect(await readFile(path.join(own, 'supervisor/cgroup.procs'), 'utf8')).toBe('4343');
    expect(await readFile(path.join(own, 'cgroup.subtree_control'), 'utf8')).toBe('+cpu +memory +pids');
    const leaf = path.join(own, 'mqtt-fs-worker-w1-step-0');
    // A kernel creates the interface files with the folder; this tree gets memory.swap.max to show it is used.
    await mkdir(leaf);
    await writeFile(path.join(leaf, 'memory.swap.max'), 'max');
    const sandbox = await cgroups.step(0);
    expect(await readFile(path.join(leaf, 'memory.max'), 'utf8')).toBe(String(256 * MiB));
    expect(await readFile(path.join(leaf, 'memory.swap.max'), 'utf8')).toBe('0');
    expect(await readFile(path.join(leaf, 'cpu.max'), 'utf8')).toBe('150000 100000');
    expect(await readFile(path.join(leaf, 'pids.max'), 'utf8')).toBe('64');

    // Join a real process, then let "the kernel" account for it: freeze-and-kill is used (no cgroup.kill here).
    const child = spawn('sleep', ['30']);
    if (!('join' in sandbox)) throw new Error('the worker moves a step into a v2 sandbox');
    await sandbox.join(child.pid as number);
    expect(await readFile(path.join(leaf, 'cgroup.procs'), 'utf8')).toBe(String(child.pid));
    await writeFile(path.join(leaf, 'memory.peak'), String(123 * MiB));
    await writeFile(
      path.join(leaf, 'memory.events'),
      'low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n',
    );
    await writeFile(
      path.join(leaf, 'cpu.stat'),
      'usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\nnr_periods 10\nnr_throttled 0\n',
    );
    await writeFile(path.join(leaf, 'pids.events'), 'max 0\n');
    const exited = new Promise((resolve) => child.once('exit', resolve));
    const closing = sandbox.close();
    await exited;
    await writeFile(path.join(leaf, 'cgroup.procs'), '');
    expect(await closing).toEqual({
      peakMemoryBytes: 123 * MiB,
      cpuMs: 2500,
      oomKilled: true,
      limitsHit: ['memory'], // memory.events max 3; cpu and pids never throttled or refused
      ioReadBytes: null,
      ioWriteBytes: null,
    });
    // The leaf's removal runs on after the step's close; the job's close waits for it.
    await cgroups.close();
    expect(existsSync(leaf)).toBe(false);
    expect(await readFile(path.join(own, 'cgroup.freeze'), 'utf8').catch(() => 'none')).toBe('none');
  });

  it('kills through cgroup.kill where the kernel has it, and reports null accounting it cannot read', async () => {
    const own = await tree();
    const cgroups = await openCgroupV2(own, 'w', { cpus: null, memoryBytes: null, pids: null }, remove);
    const leaf = path.join(own, 'w-step-3');
    await mkdir(leaf);
    await writeFile(path.join(leaf, 'cgroup.kill'), '');
    const sandbox = await cgroups.step(3);
    expect(await readdir(leaf)).toEqual(['cgroup.kill']);
    expect(await sandbox.close()).toEqual({
      peakMemoryBytes: null,
      cpuMs: null,
      oomKilled: null,
      limitsHit: null,
      ioReadBytes: null,
      ioWriteBytes: null,
    });
  });

  it("reports a step cgroup that could not be removed when the job's cgroups close", async () => {
    const own = await tree();
    const stuck = Object.assign(new Error('EBUSY: resource busy, rmdir'), { code: 'EBUSY' });
    const cgroups = await openCgroupV2(own, 'w', { cpus: null, memoryBytes: null, pids: null }, () =>
      Promise.reject(stuck),
    );
    const sandbox = await cgroups.step(0);
    // The step's outcome does not wait for the removal; the job's close reports it.
    expect(await sandbox.close()).toEqual({
      peakMemoryBytes: null,
      cpuMs: null,
      oomKilled: null,
      limitsHit: null,
      ioReadBytes: null,
      ioWriteBytes: null,
    });
    await expect(cgroups.close()).rejects.toBe(stuck);
  });

  it('refuses controllers that are not delegated, and a login session scope, naming the fix', async () => {
    const own = await tempDir('mfw-cg2-');
    await writeFile(path.join(own, 'cgroup.controllers'), 'cpu\n');
    await expect(
      openCgroupV2(own, 'w', { cpus: 1, memoryBytes: 64 * MiB, pids: null }, remove),
    ).rejects.toMatchObject({
      code: 'LIMITS_UNAVAILABLE',
      message: expect.stringMatching(/memory are not delegated.*Delegate=yes/),
    });
    await expect(
      openCgroupV2('/sys/fs/cgroup/user.slice/user-1000.slice/session-3.scope', 'w', {
        cpus: null,
        memoryBytes: null,
        pids: null,
      }),
    ).rejects.toMatchObject({
      code: 'LIMITS_UNAVAILABLE',
      message: expect.stringContaining("login session's cgroup"),
    });
  });

  it('classifies a read-only cgroupfs with the Docker flags that fix it', async () => {
    const own = await tree();
    await writeFile(path.join(own, 'supervisor'), 'a file where a folder must go');
    await expect(
      openCgroupV2(own, 'w', { cpus: null, memoryBytes: null, pids: null }, remove),
    ).rejects.toMatchObject({
      code: 'LIMITS_UNAVAILABLE',
      message: expect.stringContaining('--security-opt writable-cgroups=true'),
    });
  });
});

// Real cgroups: these machines have the v1 controllers (and enforce them).
const layout = detectLayout();
const hasV1 = Boolean(
  layout.v1.memory && layout.v1.cpu && layout.v1.pids && layout.v1.freezer && process.getuid?.() === 0,
);

describe.skipIf(!hasV1)('steps in real cgroup v1', () => {
  const limited = (settings: Partial<LimitSettings> = {}) =>
    engineFixture({ limits: { policy: 'auto', defaults: {}, ceilings: {}, ...settings } });
  const job = (id: string) => ({ request: { id, steps: undefined }, attempt: 1, log: silentLogger });

  async function leftovers(workerId: string): Promise<string[]> {
    const found: string[] = [];
    for (const dir of Object.values(layout.v1)) {
      if (dir && existsSync(path.join(dir, `mqtt-fs-worker-${workerId}`))) found.push(dir);
    }
    return found;
  }

  it('OOM-kills a memory hog and reports it, with no cgroup left afterwards', async () => {
    const { jobs, config } = await limited();
    await writeTree(jobs, {
      j: null,
      'j/job.json': JSON.stringify({
        steps: ['python3 -c "a = bytearray(300 * 1024 * 1024)"'],
        limits: { memory: '64M' },
      }),
    });
    const { manifest } = await runJob(config, job('j'));
    expect(manifest.limits).toMatchObject({ mode: 'cgroup1', memoryBytes: 64 * MiB });
    expect(manifest.status).toBe('failed');
    expect(manifest.steps[0]).toMatchObject({ status: 'failed', exitCode: 137, oomKilled: true });
    expect(manifest.steps[0]?.limitsHit).toContain('memory');
    expect(manifest.steps[0]?.peakMemoryBytes).toBeLessThanOrEqual(64 * MiB);
    expect(await leftovers(config.workerId)).toEqual([]);
  });

  it('reports an OOM kill of a child even when the step exits 0', async () => {
    const { jobs, config } = await limited();
    await writeTree(jobs, {
      'j/job.json': JSON.stringify({
        steps: ['python3 -c "a = bytearray(300 * 1024 * 1024)" || true'],
        limits: { memory: '64M' },
      }),
    });
    const { manifest } = await runJob(config, job('j'));
    expect(manifest.steps[0]).toMatchObject({ exitCode: 0, oomKilled: true, status: 'failed' });
    expect(manifest.status).toBe('failed');
  });

  it('measures peak memory within a few MB of what a step allocates', async () => {
    const { jobs, config } = await limited();
    await writeTree(jobs, {
      'j/job.json': JSON.stringify({
        steps: ['python3 -c "a = bytearray(100 * 1024 * 1024); a[::4096] = b\'x\' * len(a[::4096])"'],
        limits: { memory: '1G' },
      }),
    });
    const { manifest } = await runJob(config, job('j'));
    expect(manifest.steps[0]?.status).toBe('success');
    const peak = manifest.steps[0]?.peakMemoryBytes ?? 0;
    expect(peak).toBeGreaterThanOrEqual(100 * MiB);
    expect(peak).toBeLessThan(130 * MiB);
  });

  it('contains a fork loop with pids', async () => {
    const { jobs, config } = await limited();
    await writeTree(jobs, {
      'j/job.json': JSON.stringify({
        steps: ['i=0; while [ $i -lt 200 ]; do sleep 30 & i=$((i+1)); done; echo started $i'],
        limits: { pids: 20 },
        timeout: '20s',
      }),
    });
    const started = Date.now();
    const { manifest } = await runJob(config, job('j'));
    expect(Date.now() - started).toBeLessThan(15_000);
    expect(manifest.steps[0]?.status).toBe('failed');
    const log = await readFile(path.join(jobs, 'j/results/step_0.log'), 'utf8');
    expect(log).toMatch(/fork|Resource temporarily unavailable/i);
    expect(log).not.toContain('started 200');
    // The kernel's own counter says which limit the step ran into (pids.events).
    expect(manifest.steps[0]?.limitsHit).toContain('pids');
  });

  it('throttles a CPU quota: the kernel counts the throttling, and the step never gets more than its share', async () => {
    const { jobs, config } = await limited();
    const burn = { run: 'timeout 2 sh -c "while :; do :; done" || true', timeout: '10s' };
    await writeTree(jobs, { 'quarter/job.json': JSON.stringify({ steps: [burn], limits: { cpus: 0.25 } }) });
    const step = (await runJob(config, job('quarter'))).manifest.steps[0];
    // No fixed CPU figure (a loaded machine gives a step less than it may use): the kernel's own throttling
    // counter, and the quota's bound over the step's own time (one 100 ms period of slack), which load cannot break.
    expect(step?.limitsHit).toContain('cpus');
    expect(step?.cpuMs ?? 0).toBeGreaterThan(0);
    expect(step?.cpuMs ?? Number.POSITIVE_INFINITY).toBeLessThanOrEqual(0.25 * (step?.durationMs ?? 0) + 100);
  });

  it('puts a step in the cpu and pids hierarchies only when they limit it', async () => {
    const { jobs, config } = await limited();
    await writeTree(jobs, {
      'plain/job.json': JSON.stringify({ steps: ['cat /proc/self/cgroup'] }),
      'capped/job.json': JSON.stringify({ steps: ['cat /proc/self/cgroup'], limits: { cpus: 1, pids: 50 } }),
    });
    // "4:pids:/…/mqtt-fs-worker-w/step-0" → the controllers whose cgroup is the step's.
    const inStep = async (id: string): Promise<string[]> => {
      expect((await runJob(config, job(id))).manifest.status).toBe('success');
      const lines = (await readFile(path.join(jobs, id, 'results/step_0.log'), 'utf8')).split('\n');
      return lines
        .filter((line) => line.endsWith(`/mqtt-fs-worker-${config.workerId}/step-0`))
        .flatMap((line) => (line.split(':')[1] ?? '').split(','))
        .filter((controller) => ['memory', 'cpu', 'cpuacct', 'pids', 'freezer'].includes(controller))
        .sort();
    };
    expect(await inStep('plain')).toEqual(['cpuacct', 'freezer', 'memory']);
    expect(await inStep('capped')).toEqual(['cpu', 'cpuacct', 'freezer', 'memory', 'pids']);
    expect(await leftovers(config.workerId)).toEqual([]);
  });

  it('kills a setsid daemon started by a step when the step ends', async () => {
    const { jobs, config } = await limited();
    const dir = await tempDir();
    await writeTree(jobs, {
      'j/job.json': JSON.stringify({
        steps: [`setsid sh -c 'echo $$ > ${dir}/daemon.pid; exec sleep 300' & sleep 0.3; echo main done`],
      }),
    });
    const started = Date.now();
    const { manifest } = await runJob(config, job('j'));
    expect(manifest.steps[0]?.status).toBe('success');
    expect(manifest.limits.mode).toBe('cgroup1');
    // The escaped daemon held the log pipe: without the cgroup kill the step would wait out the drain period.
    expect(Date.now() - started).toBeLessThan(1800);
    const pid = Number(await readFile(path.join(dir, 'daemon.pid'), 'utf8'));
    await waitFor(() => !isAlive(pid), 2000);
  });

  it('refuses a request over a ceiling with LIMIT_ABOVE_CEILING, before running anything', async () => {
    const { jobs, config } = await limited({ ceilings: { memoryBytes: 512 * MiB } });
    await writeTree(jobs, {
      'j/job.json': JSON.stringify({ steps: ['touch ran'], limits: { memory: '1G' } }),
    });
    const { manifest } = await runJob(config, job('j'));
    expect(manifest).toMatchObject({ status: 'error', error: { code: 'LIMIT_ABOVE_CEILING' } });
    expect(manifest.error?.message).toContain('above the worker');
    expect(existsSync(path.join(jobs, 'j/results/ran'))).toBe(false);
  });

  it('accounts every step even without limits, and leaves no cgroup', async () => {
    const { jobs, config } = await limited();
    await writeTree(jobs, { 'j/job.json': JSON.stringify({ steps: ['true', 'true'] }) });
    const { manifest } = await runJob(config, job('j'));
    expect(manifest.limits).toEqual({ mode: 'cgroup1', cpus: null, memoryBytes: null, pids: null });
    expect(manifest.steps.map((s) => typeof s.peakMemoryBytes)).toEqual(['number', 'number']);
    expect(manifest.steps.map((s) => s.oomKilled)).toEqual([false, false]);
    expect(await leftovers(config.workerId)).toEqual([]);
  });

  it('sweeps the cgroups a crashed run of the same worker left behind', async () => {
    const { jobs, config } = await limited();
    const stale = path.join(layout.v1.memory as string, `mqtt-fs-worker-${config.workerId}`, 'step-7');
    await mkdir(stale, { recursive: true });
    await writeTree(jobs, { 'j/job.json': JSON.stringify({ steps: ['true'] }) });
    await runJob(config, job('j'));
    expect(existsSync(stale)).toBe(false);
    expect(await leftovers(config.workerId)).toEqual([]);
  });
});

describe.skipIf(process.getuid?.() !== 0)('--run-as', () => {
  it('runs steps as another user with its groups and HOME, in a workspace it owns, inside the cgroup', async () => {
    const { resolveRunAs } = await import('../../src/step/run-as.js');
    const user = await resolveRunAs('nobody', true);
    const { jobs, workspaces, config } = await engineFixture({
      runAs: user,
      limits: { policy: 'auto', defaults: {}, ceilings: {} },
    });
    // The user must be able to reach its workspace: temp folders are 0700.
    for (let dir = workspaces; dir !== path.dirname(dir) && dir.startsWith('/tmp/'); dir = path.dirname(dir))
      await chmod(dir, 0o755);
    await writeTree(jobs, {
      'j/job.json': JSON.stringify({
        steps: ['echo "$(id -u):$(id -g):$(id -G):$HOME:$USER" > who.txt; echo more >> input.txt'],
      }),
      'j/input.txt': 'in\n',
    });
    const { manifest } = await runJob(config, {
      request: { id: 'j', steps: undefined },
      attempt: 1,
      log: silentLogger,
    });
    expect(manifest.status, JSON.stringify(manifest.steps)).toBe('success');
    expect(await readFile(path.join(jobs, 'j/results/who.txt'), 'utf8')).toBe(
      `${user.uid}:${user.gid}:${user.groups.join(' ')}:${user.home}:nobody\n`,
    );
    expect(await readFile(path.join(jobs, 'j/results/input.txt'), 'utf8')).toBe('in\nmore\n');
    expect(manifest.steps[0]?.peakMemoryBytes).toEqual(hasV1 ? expect.any(Number) : null);
  });

  it('refuses an unknown user and a worker that is not root', async () => {
    const { resolveRunAs } = await import('../../src/step/run-as.js');
    await expect(resolveRunAs('no-such-user-xyz', true)).rejects.toMatchObject({
      code: 'INVALID_OPTION',
      message: expect.stringContaining('no user'),
    });
    await expect(resolveRunAs('nobody', false)).rejects.toMatchObject({
      code: 'INVALID_OPTION',
      message: expect.stringContaining('must run as root'),
    });
  });
});
