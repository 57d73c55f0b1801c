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
/** What the suite needs from the machine that npm does not install, said in one line when it is missing. */
function missingTools(): string[] {
  const has = (check: string): boolean => {
    try {
      execFileSync('sh', ['-c', check], { stdio: 'ignore' });
      return true;
    } catch {
      return false;
    }
  };
  return [
    has('command -v mosquitto || test -x /usr/sbin/mosquitto') ? undefined : 'mosquitto',
    has("/usr/bin/python3 -c 'import paho.mqtt'") ? undefined : 'python3-paho-mqtt',
    has('test -x /usr/lib/rabbitmq/bin/rabbitmq-server') ? undefined : 'rabbitmq-server',
    has('test -x /usr/sbin/ejabberdctl') ? undefined : 'ejabberd',
  ].filter((name): name is string => name !== undefined);
}

export default function setup(project: TestProject): () => void {
  if (!existsSync(path.join(root, 'dist/bundle/cli.cjs'))) {
    throw new Error('dist/ is missing: run `npm run build` (npm test does) before the tests');
  }
  const missing = missingTools();
  if (missing.length > 0) {
    throw new Error(
      `the tests need ${missing.join(' and ')}: apt-get install -y ${missing.join(' ')} (sshfs and openssh-server too for the network-drive tests, chromium for the dashboard's)`,
    );
  }
  const prefix = mkdtempSync(path.join(tmpdir(), 'mfw-prefix-'));
  const npm = (args: string[], cwd: string): string =>
    execFileSync('npm', args, { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  // --ignore-scripts: npm test has just built; the prepack build would build a second time.
  const tarball = npm(['pack', '--silent', '--ignore-scripts', '--pack-destination', prefix], root)
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
