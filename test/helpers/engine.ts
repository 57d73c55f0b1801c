import path from 'node:path';
import type { EngineConfig } from '../../src/job/run-job.js';
import { tempDir } from './tmp.js';

let stageMode: EngineConfig['stage'];

/**
 * The staging mode the next fixtures get (engine suites run once per mode: an overlay must be indistinguishable
 * from a copy but for its speed).
 */
export function stageFixturesBy(mode: EngineConfig['stage']): void {
  stageMode = mode;
}

/** The modes an engine suite runs in here: overlays need root. */
export const STAGE_MODES: readonly NonNullable<EngineConfig['stage']>[] =
  process.getuid?.() === 0 ? ['copy', 'overlay'] : ['copy'];

/** A jobs root and a workspaces root in temp folders, and an engine configuration over them. */
export async function engineFixture(
  overrides: Partial<EngineConfig> = {},
): Promise<{ jobs: string; workspaces: string; config: EngineConfig }> {
  const base = await tempDir();
  const jobs = path.join(base, 'jobs');
  const workspaces = path.join(base, 'workspaces');
  const { mkdir } = await import('node:fs/promises');
  await mkdir(jobs);
  await mkdir(workspaces);
  const config: EngineConfig = {
    jobsDir: jobs,
    workspacesDir: workspaces,
    workerId: `test-worker-${Math.random().toString(36).slice(2, 8)}`,
    hostname: 'test-host',
    version: '0.0.0-test',
    killGraceMs: 500,
    maxLogBytes: 10 * 1024 * 1024,
    baseEnv: { PATH: process.env.PATH ?? '/usr/bin:/bin' },
    ...(stageMode ? { stage: stageMode } : {}),
    ...overrides,
  };
  return { jobs, workspaces, config };
}

/** What a workspaces root holds after runs, the overlay mask every run shares left out (see overlay.ts). */
export async function leftIn(workspaces: string): Promise<string[]> {
  const { readdir } = await import('node:fs/promises');
  const names = (await readdir(workspaces)).filter((name) => name !== '.overlay');
  const layers = await readdir(path.join(workspaces, '.overlay', 'layers')).catch(() => [] as string[]);
  return [...names, ...layers.map((name) => `.overlay/layers/${name}`)];
}
