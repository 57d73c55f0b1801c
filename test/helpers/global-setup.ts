import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { TestProject } from 'vitest/node';

declare module 'vitest' {
  export interface ProvidedContext {
    /** The `mqtt-fs-worker` command installed from the packed tarball into a temp prefix. */
    installedBin: string;
  }
}

const root = fileURLToPath(new URL('../..', import.meta.url));

// The end-to-end tests run what users install: `npm pack`, then `npm install -g` of that tarball into a temp
// prefix. Done once for the whole run.
export default function setup(project: TestProject): () => void {
  if (!existsSync(path.join(root, 'dist/cli/main.js'))) {
    throw new Error('dist/ is missing: run `npm run build` (npm test does) before the tests');
  }
  const prefix = mkdtempSync(path.join(tmpdir(), 'mfw-prefix-'));
  const npm = (args: string[], cwd: string): string =>
    execFileSync('npm', args, { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  const tarball = npm(['pack', '--silent', '--pack-destination', prefix], root)
    .trim()
    .split('\n')
    .pop() as string;
  npm(
    [
      'install',
      '-g',
      '--prefix',
      prefix,
      '--no-audit',
      '--no-fund',
      '--prefer-offline',
      path.join(prefix, tarball),
    ],
    prefix,
  );
  project.provide('installedBin', path.join(prefix, 'bin', 'mqtt-fs-worker'));
  return () => rmSync(prefix, { recursive: true, force: true });
}
