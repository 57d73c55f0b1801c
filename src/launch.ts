import {
  closeSync,
  fstatSync,
  lstatSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  type Stats,
  writeFileSync,
} from 'node:fs';
import Module, { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { Script } from 'node:vm';

// A worker process runs one job and exits, so compiling its JavaScript is paid on every job. V8 can skip that
// work with a code cache, but Node's own (module.enableCompileCache, Node >= 22.1) stores a script's cache right
// after compiling it, before it runs: the functions compiled lazily while it runs — nearly all of a bundle's code —
// are compiled again by every process. This launcher loads the bundled CLI (one CommonJS file) through a cache
// written after a run, on every Node version. A missing, stale or unusable cache only costs speed.

/** Where caches live and which one this run uses; `dir` undefined: no cache. */
export interface CacheSettings {
  readonly dir: string | undefined;
  /** Runs of one kind (the broker worker, a dry run, …) compile the same functions: each kind has its cache. */
  readonly profile: 'worker' | 'dry-run' | 'other';
}

const INFO_FLAGS = new Set(['--version', '-V', '--help', '-h']);

/** `MQTT_CODE_CACHE`: unset → a private folder under the temp dir; `off` → none; else the folder to use. */
export function cacheSettings(argv: readonly string[], env: NodeJS.ProcessEnv, uid: number): CacheSettings {
  const setting = env.MQTT_CODE_CACHE;
  const dir =
    setting === 'off' ? undefined : setting || path.join(tmpdir(), `mqtt-fs-worker-code-cache-${uid}`);
  const args = argv.slice(2);
  // A subcommand (validate, submit, drain, help) or an information flag: short runs of their own.
  const other =
    (args[0] !== undefined && !args[0].startsWith('-')) || args.some((arg) => INFO_FLAGS.has(arg));
  const profile = args.includes('--dry-run') ? 'dry-run' : other ? 'other' : 'worker';
  return { dir, profile };
}

export interface LoadedModule {
  readonly exports: Record<string, unknown>;
  /** The cache V8 took: one written after a job ran (warm), after some other run (cold), or none. */
  readonly cache: 'warm' | 'cold' | 'none';
  /**
   * Call after the run. Writes a cache when there was none, and replaces a cold one after a run that did a job:
   * a cache holds what its run compiled, and a worker's first run may have found no job to run.
   */
  save(warm: boolean): void;
}

/**
 * Loads a CommonJS file as `require` would, through a cache in `settings.dir`. V8 matches a cache to its script
 * by length only, so the cache file's name says which file it belongs to: its path (hashed), size, inode and
 * change time (which no copy or unpacking can set back, unlike the modification time that npm pins to 1985), with
 * the Node version and architecture. The folder must belong to this user and be closed to others (a cache is
 * code); otherwise no cache is read or written.
 */
export function loadWithCache(file: string, settings: CacheSettings, uid: number): LoadedModule {
  // The text and its identity through one descriptor: a bundle replaced in between cannot give new text an old key.
  const bundle = readRegular(file);
  if (!bundle) throw new Error(`${file} is not a regular file`);
  const { data, stats } = bundle;
  const source = data.toString('utf8');
  const dir = settings.dir !== undefined && privateDir(settings.dir, uid) ? settings.dir : undefined;
  const prefix = `${path.basename(file)}.${fnv1a(file)}.${settings.profile}.`;
  const key = `${prefix}${process.version}-${process.arch}-${stats.size}-${stats.ino}-${Math.trunc(stats.ctimeMs)}`;
  const cacheFile = (cacheDir: string, kind: 'warm' | 'cold') => path.join(cacheDir, `${key}.${kind}.bin`);
  let found: 'warm' | 'cold' | 'none' = 'none';
  let cachedData: Buffer | undefined;
  for (const kind of ['warm', 'cold'] as const) {
    cachedData = dir === undefined ? undefined : readIfPresent(cacheFile(dir, kind));
    if (cachedData) {
      found = kind;
      break;
    }
  }

  const script = new Script(Module.wrap(source), { filename: file, ...(cachedData ? { cachedData } : {}) });
  const module = { exports: {} as Record<string, unknown> };
  const init = script.runInThisContext() as (...args: unknown[]) => void;
  init.call(module.exports, module.exports, createRequire(file), module, file, path.dirname(file));

  // A refused cache (another Node build's flags, a damaged file) would be refused again: drop it.
  if (script.cachedDataRejected && dir !== undefined && found !== 'none')
    rmSync(cacheFile(dir, found), { force: true });
  const cache = script.cachedDataRejected ? 'none' : found;
  return {
    exports: module.exports,
    cache,
    save(warm) {
      const kind = warm && cache !== 'warm' ? 'warm' : cache === 'none' ? 'cold' : undefined;
      if (dir === undefined || kind === undefined) return;
      try {
        writeAtomically(cacheFile(dir, kind), script.createCachedData());
        removeStale(dir, prefix, key, kind);
      } catch {
        // A full or read-only temp dir: the next run compiles again, nothing else changes.
      }
    },
  };
}

/** A short, stable name for a path (FNV-1a, 32 bits): installs in other places keep their own caches. */
function fnv1a(text: string): string {
  let hash = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) hash = Math.imul(hash ^ text.charCodeAt(i), 0x01000193);
  return (hash >>> 0).toString(16).padStart(8, '0');
}

/** Creates the folder (mode 0700) if needed; true when it is a real folder of this user's that others cannot use. */
function privateDir(dir: string, uid: number): boolean {
  try {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    const stats = lstatSync(dir);
    return stats.isDirectory() && stats.uid === uid && (stats.mode & 0o077) === 0;
  } catch {
    return false;
  }
}

/** A regular file's content and stats, through one descriptor; undefined for anything else. */
function readRegular(file: string): { data: Buffer; stats: Stats } | undefined {
  const fd = openSync(file, 'r');
  try {
    const stats = fstatSync(fd);
    return stats.isFile() ? { stats, data: readFileSync(fd) } : undefined;
  } finally {
    closeSync(fd);
  }
}

function readIfPresent(file: string): Buffer | undefined {
  try {
    return readRegular(file)?.data;
  } catch {
    return undefined;
  }
}

/** Temp file and rename: workers starting together never read half a cache. */
function writeAtomically(file: string, data: Buffer): void {
  const temp = `${file}.${process.pid}.tmp`;
  try {
    writeFileSync(temp, data, { mode: 0o600, flag: 'wx' });
    renameSync(temp, file);
  } catch (error) {
    rmSync(temp, { force: true });
    throw error;
  }
}

/** Caches of this file's earlier builds or other Node versions (an upgrade), and the cold one a warm one replaces. */
function removeStale(dir: string, prefix: string, key: string, written: 'warm' | 'cold'): void {
  for (const entry of readdirSync(dir)) {
    const stale = entry.startsWith(prefix) && !entry.startsWith(`${key}.`);
    if (stale || (written === 'warm' && entry === `${key}.cold.bin`))
      rmSync(path.join(dir, entry), { force: true });
  }
}

type Main = (argv: string[], hooks: { jobDone: () => void }) => Promise<number>;

/** What the binary does: load the CLI bundle through the cache, run it, then save the cache if that helps. */
export async function launch(file: string, argv: string[], env: NodeJS.ProcessEnv): Promise<number> {
  const uid = process.getuid?.() ?? 0;
  const settings = cacheSettings(argv, env, uid);
  const loaded = loadWithCache(file, settings, uid);
  // Other commands are short and always run the same code: any run of theirs is a warm one.
  let warm = settings.profile === 'other';
  const code = await (loaded.exports.main as Main)(argv, { jobDone: () => (warm = true) });
  loaded.save(warm);
  return code;
}
