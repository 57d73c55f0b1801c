import path from 'node:path';
import type { EngineConfig } from '../../src/job.js';
import { tempDir } from './tmp.js';

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
    ...overrides,
  };
  return { jobs, workspaces, config };
}
