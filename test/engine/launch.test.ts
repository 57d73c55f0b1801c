import { execFileSync } from 'node:child_process';
import { chmod, chown, lstat, mkdir, readdir, stat, symlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { type CacheSettings, cacheSettings } from '../../src/launch.js';
import { tempDir } from '../helpers/tmp.js';

const UID = process.getuid?.() ?? 0;
// Every load runs in a process of its own: within one process V8 finds a script it compiled before in memory and
// never looks at the cache it is given. The built module runs there (npm test builds first).
// The launcher as the bin loads it: the bundle (npm test builds first).
const BUILT = fileURLToPath(new URL('../../dist/bundle/launch.cjs', import.meta.url));

// Enough functions that a cache made after calling them differs from one made before.
const FIXTURE = `
'use strict';
const parts = [];
function add(n) { parts.push(n * 2); return parts.length; }
function total() { return parts.reduce((a, b) => a + b, 0); }
exports.main = async (argv, hooks) => {
  for (let i = 0; i < 10; i++) add(i);
  if (argv.includes('job')) hooks.jobDone();
  return total() === 90 ? 7 : 1;
};
`;

async function fixture(): Promise<{ file: string; cacheDir: string }> {
  const dir = await tempDir();
  const file = path.join(dir, 'cli.cjs');
  await writeFile(file, FIXTURE);
  return { file, cacheDir: path.join(dir, 'cache') };
}

/** Loads the fixture through the cache in a new process, runs it, then saves as after a run (warm or not). */
function load(file: string, settings: CacheSettings, save?: boolean): { cache: string; code: number } {
  const script = `import { createRequire } from 'node:module';
  const { loadWithCache } = createRequire(import.meta.url)(${JSON.stringify(BUILT)});
    const [file, settings, uid, save] = JSON.parse(process.argv[1]);
    const loaded = loadWithCache(file, settings, uid);
    const code = await loaded.exports.main([], { jobDone() {} });
    if (save !== null) loaded.save(save);
    process.stdout.write(JSON.stringify({ cache: loaded.cache, code }));`;
  const args = JSON.stringify([file, settings, UID, save ?? null]);
  return JSON.parse(
    execFileSync(process.execPath, ['--input-type=module', '-e', script, args], { encoding: 'utf8' }),
  );
}

/** The binary's path: `launch()` in a new process with these arguments and variables; its exit code. */
function launch(file: string, args: string[], env: Record<string, string>): number {
  const script = `import { createRequire } from 'node:module';
  const { launch } = createRequire(import.meta.url)(${JSON.stringify(BUILT)});
    process.exitCode = await launch(${JSON.stringify(file)}, process.argv, process.env);`;
  try {
    // `node -e` has no script path in argv: 'bin' stands in for it, as argv[1] of the real binary.
    execFileSync(process.execPath, ['--input-type=module', '-e', script, 'bin', ...args], {
      env: { PATH: process.env.PATH ?? '', ...env },
    });
    return 0;
  } catch (error) {
    return (error as { status: number }).status;
  }
}

const names = async (dir: string) => (await readdir(dir)).sort();
const worker = (dir: string): CacheSettings => ({ dir, profile: 'worker' });

describe('cacheSettings', () => {
  it('tells the broker worker, dry runs and the other commands apart', () => {
    const profile = (...args: string[]) => cacheSettings(['node', 'bin', ...args], {}, 0).profile;
    expect(profile()).toBe('worker');
    expect(profile('--url', 'mqtt://b', '--id', 'slot-1')).toBe('worker');
    expect(profile('--dry-run')).toBe('dry-run');
    expect(profile('--id', 'x', '--dry-run', 'payload.json')).toBe('dry-run');
    expect(profile('--version')).toBe('other');
    expect(profile('-h')).toBe('other');
    expect(profile('validate', 'job.json')).toBe('other');
    expect(profile('submit', 'job-1', '--wait')).toBe('other');
  });

  it('keeps caches in a per-user temp folder, a chosen folder, or nowhere', () => {
    expect(cacheSettings(['node', 'bin'], {}, 1234).dir).toMatch(/mqtt-fs-worker-code-cache-1234$/);
    expect(cacheSettings(['node', 'bin'], { MQTT_CODE_CACHE: '/var/cache/mfw' }, 0).dir).toBe(
      '/var/cache/mfw',
    );
    expect(cacheSettings(['node', 'bin'], { MQTT_CODE_CACHE: 'off' }, 0).dir).toBeUndefined();
  });
});

describe('loadWithCache', () => {
  it('compiles from source first, then runs from the cache a finished run left behind', async () => {
    const { file, cacheDir } = await fixture();
    expect(load(file, worker(cacheDir), false)).toEqual({ cache: 'none', code: 7 });
    const [cold] = await names(cacheDir);
    expect(cold).toMatch(
      new RegExp(
        `^cli\\.cjs\\.[0-9a-f]{8}\\.worker\\.${process.version}-${process.arch}-\\d+-\\d+-\\d+\\.cold\\.bin$`,
      ),
    );
    expect((await stat(cacheDir)).mode & 0o777).toBe(0o700);
    const coldFile = path.join(cacheDir, cold as string);
    expect((await stat(coldFile)).mode & 0o777).toBe(0o600);

    const before = (await stat(coldFile)).mtimeMs;
    expect(load(file, worker(cacheDir), false)).toEqual({ cache: 'cold', code: 7 });
    expect((await stat(coldFile)).mtimeMs).toBe(before); // another run without a job leaves it as it is

    // A run that did a job replaces the cold cache with a warm one, which later runs prefer and keep.
    expect(load(file, worker(cacheDir), true).cache).toBe('cold');
    const [warm] = await names(cacheDir);
    expect(warm).toBe((cold as string).replace('.cold.', '.warm.'));
    const warmTime = (await stat(path.join(cacheDir, warm as string))).mtimeMs;
    expect(load(file, worker(cacheDir), true)).toEqual({ cache: 'warm', code: 7 });
    expect(await names(cacheDir)).toEqual([warm]);
    expect((await stat(path.join(cacheDir, warm as string))).mtimeMs).toBe(warmTime);
  });

  it('drops a damaged cache and writes a good one', async () => {
    const { file, cacheDir } = await fixture();
    load(file, worker(cacheDir), true);
    const [warm] = await names(cacheDir);
    await writeFile(path.join(cacheDir, warm as string), Buffer.alloc(4096, 7));

    expect(load(file, worker(cacheDir))).toEqual({ cache: 'none', code: 7 });
    expect(await names(cacheDir)).toEqual([]); // refused, so removed
    load(file, worker(cacheDir), false);
    expect(load(file, worker(cacheDir)).cache).toBe('cold');
  });

  it("never runs an earlier build's cache, removes it, and keeps another profile's", async () => {
    const { file, cacheDir } = await fixture();
    load(file, { dir: cacheDir, profile: 'dry-run' }, true);
    load(file, worker(cacheDir), true);
    expect(await names(cacheDir)).toHaveLength(2);
    // A rebuild of the same length: V8 alone would take the old cache and run the old code (returning 7).
    await writeFile(file, FIXTURE.replace('? 7 : 1', '? 8 : 1'));
    expect(load(file, worker(cacheDir), true)).toEqual({ cache: 'none', code: 8 });
    const left = await names(cacheDir);
    expect(left).toHaveLength(2);
    const { ino, ctimeMs } = await stat(file);
    expect(left.filter((name) => name.includes('.worker.'))).toEqual([
      expect.stringContaining(`-${ino}-${Math.trunc(ctimeMs)}.warm.bin`),
    ]);
  });

  it('neither reads nor writes a cache in a folder others can write to, own, or redirect', async () => {
    const { file, cacheDir } = await fixture();
    await mkdir(cacheDir);
    await chmod(cacheDir, 0o777);
    expect(load(file, worker(cacheDir), true).cache).toBe('none');
    expect(await names(cacheDir)).toEqual([]);

    // A cache in a folder that stopped being private is not used either: someone else may have written it.
    await chmod(cacheDir, 0o700);
    load(file, worker(cacheDir), true);
    expect(load(file, worker(cacheDir)).cache).toBe('warm');
    await chmod(cacheDir, 0o777);
    expect(load(file, worker(cacheDir)).cache).toBe('none');

    if (UID === 0) {
      const foreign = path.join(path.dirname(cacheDir), 'foreign');
      await mkdir(foreign, { mode: 0o700 });
      await chown(foreign, 65534, 65534);
      load(file, worker(foreign), true);
      expect(await names(foreign)).toEqual([]);
    }

    const target = path.join(path.dirname(cacheDir), 'target');
    await mkdir(target, { mode: 0o700 });
    const link = path.join(path.dirname(cacheDir), 'link');
    await symlink(target, link);
    expect(load(file, worker(link), true).cache).toBe('none');
    expect(await names(target)).toEqual([]);
    expect((await lstat(link)).isSymbolicLink()).toBe(true);
  });
});

describe('launch', () => {
  it('runs main; caches warm after a job, cold after a run without one, nothing when off', async () => {
    const { file, cacheDir } = await fixture();
    const env = { MQTT_CODE_CACHE: cacheDir };
    expect(launch(file, ['--id', 'a'], env)).toBe(7);
    expect(await names(cacheDir)).toEqual([expect.stringMatching(/\.worker\..*\.cold\.bin$/)]);
    expect(launch(file, ['--id', 'a', 'job'], env)).toBe(7);
    expect(await names(cacheDir)).toEqual([expect.stringMatching(/\.worker\..*\.warm\.bin$/)]);

    const off = await fixture();
    expect(launch(off.file, ['job'], { MQTT_CODE_CACHE: 'off' })).toBe(7);
    expect(await readdir(path.dirname(off.file))).toEqual(['cli.cjs']);
  });
});
