import path from 'node:path';
import { type FSWatcher, watch } from 'chokidar';
import { isInside } from '../job/paths.js';
import { RESULTS_DIR } from '../job/results-layout.js';
import type { Logger } from '../shared/log.js';

// `--dry-run --watch`: run the job, then again whenever its definition or inputs change. chokidar watches with
// inotify (one watch per folder, nothing polled), so a folder of 20,000 files costs nothing at rest.

export interface WatchInput {
  /** The payload file; its job folder is read from it before each run (the id can change). */
  readonly payloadFile: string;
  /** The job folder the payload names now, or undefined when it names none (then only the payload is watched). */
  readonly jobDir: () => string | undefined;
  /** Folders whose changes never start a run (the workspaces). */
  readonly ignored: readonly string[];
  /** One run; aborted (reason 'interrupted') when a change comes while it runs. Resolves to its exit code. */
  readonly run: (signal: AbortSignal) => Promise<number | 'interrupted'>;
  /** Ctrl-C: stop the run in progress and end. */
  readonly signal: AbortSignal;
  readonly log: Logger;
  /** Changes closer together than this start one run. */
  readonly debounceMs?: number;
}

/** Runs until `signal` aborts; resolves to the exit code of the last run that ended on its own (0 if none did). */
export async function watchDryRun(input: WatchInput): Promise<number> {
  const debounceMs = input.debounceMs ?? 200;
  let lastCode = 0;
  let watchedDir: string | undefined;
  const watcher = watch(input.payloadFile, {
    ignoreInitial: true,
    ignored: (file) => isIgnored(file, watchedDir, input.ignored),
  });
  await new Promise<void>((resolve) => watcher.once('ready', () => resolve()));
  const follow = (): void => {
    const dir = input.jobDir();
    if (dir === watchedDir) return;
    if (watchedDir) watcher.unwatch(watchedDir);
    watchedDir = dir;
    if (dir) watcher.add(dir);
  };
  try {
    for (;;) {
      follow();
      const controller = new AbortController();
      const changed = nextChange(watcher, debounceMs, input.signal);
      const running = input.run(AbortSignal.any([controller.signal, input.signal]));
      const first = await Promise.race([running.then(() => 'ended' as const), changed]);
      if (first !== 'ended') {
        controller.abort('interrupted');
        await running;
        if (first === 'stopped') return lastCode;
        input.log.info(`${first}: a change came while the job ran; it was stopped, running it again`);
        continue;
      }
      const code = await running;
      if (code !== 'interrupted') lastCode = code;
      if (input.signal.aborted) return lastCode;
      input.log.info('watching for changes (Ctrl-C to stop)');
      const next = await changed;
      if (next === 'stopped') return lastCode;
      input.log.info(`${next}: running the job again`);
    }
  } finally {
    await watcher.close();
  }
}

/** The next burst of changes (named by its first file), or 'stopped' when `signal` aborts first. */
function nextChange(watcher: FSWatcher, debounceMs: number, signal: AbortSignal): Promise<string> {
  return new Promise((resolve) => {
    let first: string | undefined;
    let timer: NodeJS.Timeout | undefined;
    const onChange = (_event: string, file: string): void => {
      first ??= path.relative(process.cwd(), file) || file;
      clearTimeout(timer);
      timer = setTimeout(() => done(`${first} changed`), debounceMs);
    };
    const onAbort = (): void => done('stopped');
    const done = (what: string): void => {
      clearTimeout(timer);
      watcher.off('all', onChange);
      signal.removeEventListener('abort', onAbort);
      resolve(what);
    };
    if (signal.aborted) return done('stopped');
    watcher.on('all', onChange);
    signal.addEventListener('abort', onAbort, { once: true });
  });
}

function isIgnored(file: string, jobDir: string | undefined, ignored: readonly string[]): boolean {
  const inside = (dir: string) => isInside(dir, file);
  if (jobDir && inside(path.join(jobDir, RESULTS_DIR))) return true;
  return ignored.some(inside);
}
