import { execFile } from 'node:child_process';
import { type Dirent, lstatSync, readFileSync } from 'node:fs';
import { lstat, mkdir, readdir, rename, rm } from 'node:fs/promises';
import path from 'node:path';
import { ErrorCode, WorkerError } from '../../shared/errors.js';
import { parseMountinfo } from '../../shared/mountinfo.js';
import { isInside } from '../paths.js';
import { RESULTS_DIR } from '../results-layout.js';
import type { SkippedEntry, StageResult } from './stage.js';

// Zero-copy staging: the job folder becomes the read-only lower layer of an overlay mounted at the workspace, and
// everything a step writes lands in an upper layer of the worker's own. Staging costs one mount whatever the
// folder's size, and the upper layer holds exactly what the job created or changed, so the sync walks only that.
// What the steps see is what a copy would give them: results/ and special files are hidden by whiteouts (a copy
// skips them), and the mount is nosuid,nodev.

export type StageMode = 'auto' | 'copy' | 'overlay';

/**
 * Where overlays keep their parts, apart from every workspace (a step must not see them beside its own):
 * `{workspaces}/.overlay/mask` (shared, see ensureMask) and `{workspaces}/.overlay/layers/{worker id}`.
 */
export function overlayRoot(workspacesDir: string): string {
  return path.join(workspacesDir, '.overlay');
}

export function overlayLayers(
  workspacesDir: string,
  workerId: string,
): { base: string; upper: string; work: string } {
  const base = path.join(overlayRoot(workspacesDir), 'layers', workerId);
  return { base, upper: path.join(base, 'upper'), work: path.join(base, 'work') };
}

/** Why an overlay cannot stage this job here; undefined when one may be tried. */
export function overlayRefusal(input: {
  jobDir: string;
  workspace: string;
  runAs: boolean;
}): string | undefined {
  if (process.platform !== 'linux') return 'overlays are a Linux feature';
  if (process.geteuid?.() !== 0) return 'mounting an overlay needs root (CAP_SYS_ADMIN)';
  // Through an overlay, the job's files keep their owner on the shared drive: the step user could not change them.
  if (input.runAs) return 'with --run-as the step user must own its copy of the job files';
  // Overlay mount options use `,` and `:` as separators (and `\` to escape them).
  const odd = [input.jobDir, input.workspace].find((dir) => /[,:\\\n]/.test(dir));
  if (odd)
    return `the path ${odd} holds a character the overlay's mount options cannot carry (, : \\ or a newline)`;
  return undefined;
}

/** What a look at the job folder found: its files, the special files to hide, and (up to a bound) their bytes. */
export interface Survey {
  readonly files: number;
  readonly hidden: readonly string[];
  /** Bytes of the files, counted until the bound was passed. */
  readonly bytes: number;
}

// Below these, copying costs less than mounting and unmounting (~20 ms): `auto` copies.
export const OVERLAY_FROM_FILES = 256;
export const OVERLAY_FROM_BYTES = 16 * 1024 * 1024;

/** Whether `auto` should mount an overlay for a folder so surveyed. */
export function overlayPays(survey: Survey): boolean {
  return survey.files >= OVERLAY_FROM_FILES || survey.bytes >= OVERLAY_FROM_BYTES;
}

/**
 * Mounts `jobDir` (read-only, below `mask`, see ensureMask) and a fresh upper layer at `workspace`. Fails with the
 * mount's own words when the kernel or the filesystem refuses (the caller falls back to copying).
 */
export async function stageOverlay(
  jobDir: string,
  workspace: string,
  layers: { readonly upper: string; readonly work: string },
  survey: Survey,
  mask: string,
): Promise<StageResult & { upper: string }> {
  const { upper, work } = layers;
  await Promise.all([mkdir(upper, { recursive: true }), mkdir(work, { recursive: true })]);
  if (survey.hidden.length > 0) {
    // Whiteouts in the upper layer hide the special files a copy skips (rare: one more process for them).
    const parents = [...new Set(survey.hidden.map((rel) => path.dirname(rel)).filter((dir) => dir !== '.'))];
    await Promise.all(parents.map((dir) => mkdir(path.join(upper, dir), { recursive: true })));
    await run('/bin/sh', [
      '-c',
      'for w; do mknod "$w" c 0 0 || exit 1; done',
      'sh',
      ...survey.hidden.map((rel) => path.join(upper, rel)),
    ]);
  }
  const options = [
    'nosuid',
    'nodev',
    `lowerdir=${mask}:${jobDir}`,
    `upperdir=${upper}`,
    `workdir=${work}`,
    // Copy-ups must copy data (a metadata-only copy-up leaves no file to sync) and nothing may point elsewhere.
    'metacopy=off',
    'redirect_dir=off',
    'index=off',
  ].join(',');
  await run('mount', ['-t', 'overlay', 'overlay', '-o', options, workspace]);
  const skipped: SkippedEntry[] = survey.hidden.map((rel) => ({ path: rel, reason: 'special-file' }));
  return { snapshot: new Map(), files: survey.files, bytes: 0, skipped, upper };
}

/**
 * The top lower layer every overlay shares: a folder holding one whiteout, `results`, so that no step sees the
 * job's results/. Made once per workspaces directory (a whiteout is a device node: root makes it with mknod).
 */
export async function ensureMask(workspacesDir: string): Promise<string> {
  const mask = path.join(overlayRoot(workspacesDir), 'mask');
  const whiteout = path.join(mask, RESULTS_DIR);
  const ready = await lstat(whiteout).then(
    (stats) => stats.isCharacterDevice() && stats.rdev === 0,
    () => false,
  );
  if (ready) return mask;
  const temp = `${mask}.${process.pid}`;
  await rm(temp, { recursive: true, force: true });
  await mkdir(temp, { recursive: true });
  await run('mknod', [path.join(temp, RESULTS_DIR), 'c', '0', '0']);
  await rm(mask, { recursive: true, force: true });
  await rename(temp, mask).catch(async (error: NodeJS.ErrnoException) => {
    // Another worker made it meanwhile: theirs serves as well.
    await rm(temp, { recursive: true, force: true });
    if (error.code !== 'ENOTEMPTY' && error.code !== 'EEXIST') throw error;
  });
  return mask;
}

/**
 * Looks at the job folder without copying: counts its files, lists the special files (but results/), and adds
 * up sizes until `bytesCap` is passed (synchronous lstat: a few microseconds each on a warm cache).
 */
export async function survey(jobDir: string, bytesCap = OVERLAY_FROM_BYTES): Promise<Survey> {
  let files = 0;
  let bytes = 0;
  const hidden: string[] = [];
  const walk = async (relative: string): Promise<void> => {
    let entries: Dirent[];
    try {
      entries = await readdir(path.join(jobDir, relative), { withFileTypes: true });
    } catch (error) {
      throw new WorkerError(
        ErrorCode.STAGING_FAILED,
        `Staging failed at ${relative || '.'}: ${(error as NodeJS.ErrnoException).code ?? error}`,
        { cause: error },
      );
    }
    const folders: string[] = [];
    for (const entry of entries) {
      const rel = relative ? `${relative}/${entry.name}` : entry.name;
      if (!relative && entry.name === RESULTS_DIR) continue;
      if (entry.isDirectory()) folders.push(rel);
      else if (entry.isFile()) {
        files++;
        if (bytes < bytesCap) bytes += sizeOf(path.join(jobDir, rel));
      } else if (!entry.isSymbolicLink()) hidden.push(rel);
    }
    await Promise.all(folders.map(walk));
  };
  await walk('');
  return { files, bytes, hidden: hidden.sort() };
}

function sizeOf(file: string): number {
  try {
    return lstatSync(file).size;
  } catch {
    return 0;
  }
}

/** Every mount point at or below `dir`, deepest first (from /proc/self/mountinfo). */
export function mountsUnder(dir: string): string[] {
  let table: string;
  try {
    table = readFileSync('/proc/self/mountinfo', 'utf8');
  } catch {
    return [];
  }
  const points = parseMountinfo(table)
    .map((mount) => mount.mountPoint)
    .filter((point) => isInside(dir, point));
  return [...new Set(points)].sort((a, b) => b.length - a.length);
}

/**
 * Unmounts whatever is mounted at or below `dir` (an overlay a run left, also a crashed one's). A mount still busy
 * (a process that escaped its step holds it) is detached lazily: the kernel frees it when the last user goes.
 */
export async function unmountUnder(dir: string): Promise<void> {
  for (const point of mountsUnder(dir)) {
    await run('umount', [point]).catch(() => run('umount', ['-l', point]));
  }
}

function run(command: string, args: string[]): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile(command, args, { timeout: 30_000 }, (error, _stdout, stderr) => {
      if (!error) return resolve();
      // The first line says what failed (mount adds a hint about dmesg after it).
      const said = stderr.trim().split('\n')[0]?.trim() || error.message;
      reject(
        new WorkerError(ErrorCode.STAGING_FAILED, `${path.basename(command)}: ${said}`, { cause: error }),
      );
    });
  });
}

/**
 * Whether an overlay can be mounted in `workspacesDir` (with `runAs`, never): one is made over an empty folder and
 * taken down again (~30 ms). Undefined when it can; else why not, in the mount's words.
 */
export async function overlayProblem(workspacesDir: string, runAs: boolean): Promise<string | undefined> {
  const probe = path.join(overlayRoot(workspacesDir), `probe-${process.pid}`);
  const refusal = overlayRefusal({
    jobDir: path.join(probe, 'lower'),
    workspace: path.join(probe, 'merged'),
    runAs,
  });
  if (refusal) return refusal;
  try {
    await Promise.all(['lower', 'merged'].map((dir) => mkdir(path.join(probe, dir), { recursive: true })));
    const mask = await ensureMask(workspacesDir);
    const layers = { upper: path.join(probe, 'upper'), work: path.join(probe, 'work') };
    const empty = { files: 0, bytes: 0, hidden: [] };
    await stageOverlay(path.join(probe, 'lower'), path.join(probe, 'merged'), layers, empty, mask);
    return undefined;
  } catch (error) {
    return (error as Error).message;
  } finally {
    await unmountUnder(probe).catch(() => {});
    await rm(probe, { recursive: true, force: true }).catch(() => {});
  }
}
