import { execFile, execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { cp, readdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, inject, it } from 'vitest';
import { parse, parseAllDocuments } from 'yaml';
import { OPTION_DEFS } from '../../src/config/option-table.js';
import { tempDir } from '../helpers/tmp.js';

const root = fileURLToPath(new URL('../..', import.meta.url));
const bin = inject('installedBin');
const documentedEnv = new Set([...OPTION_DEFS.map((d) => d.env)]);

function installed(args: string[], cwd?: string): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(bin, args, { cwd, env: { PATH: process.env.PATH ?? '' } }, (error, stdout, stderr) =>
      resolve({ code: error ? ((error as { code?: number }).code ?? 1) : 0, stdout, stderr }),
    );
  });
}

describe('the npm package', () => {
  it('ships only the whitelist, with the bundle the bin needs', async () => {
    const pkg = JSON.parse(await readFile(path.join(root, 'package.json'), 'utf8'));
    expect(pkg.files).toEqual(['bin', 'dist', 'README.md', 'LICENSE']);
    expect(pkg.engines.node).toBe('>=20.16.0');
    expect(pkg.type).toBe('module');
    const [packed] = JSON.parse(
      // --ignore-scripts: the prepack build would replace dist/ under the tests that run beside this one.
      execFileSync('npm', ['pack', '--dry-run', '--json', '--ignore-scripts'], {
        cwd: root,
        encoding: 'utf8',
        stdio: ['ignore', 'pipe', 'ignore'],
      }),
    );
    const files: string[] = packed.files.map((f: { path: string }) => f.path);
    // The README's size figures are the packed package's, to one decimal.
    const readme = await readFile(path.join(root, 'README.md'), 'utf8');
    const [, installed, download] = /about ([\d.]+) MB installed, a ([\d.]+) MB download/.exec(readme) ?? [];
    expect(Number(installed)).toBeCloseTo(packed.unpackedSize / 1e6, 1);
    expect(Number(download)).toBeCloseTo(packed.size / 1e6, 1);
    // Only what runs: the bundles, the library's single module, and the types (no per-module JavaScript).
    expect(files.filter((f) => f.startsWith('dist/') && f.endsWith('.js'))).toEqual(['dist/index.js']);
    expect(files).toContain('bin/mqtt-fs-worker.js');
    expect(files).toContain('bin/package.json'); // makes the bin CommonJS
    expect(files).toContain('dist/bundle/cli.cjs');
    expect(files).toContain('dist/bundle/launch.cjs');
    expect(files).toContain('dist/bundle/cli.cjs.map'); // for readable stack traces (src/cli/stack.ts)
    for (const vendored of ['ws', 'socks', 'execa'])
      expect(files).toContain(`dist/bundle/vendor/${vendored}.cjs`);
    expect(files).toContain('dist/index.d.ts');
    expect(
      files.every((f) => /^(bin|dist)\//.test(f) || ['README.md', 'LICENSE', 'package.json'].includes(f)),
    ).toBe(true);
  });

  it('installs as itself alone: everything it runs is in its bundle, no dependency is installed again', async () => {
    const installed = path.join(path.dirname(bin), '..', 'lib', 'node_modules', 'mqtt-fs-worker');
    expect(existsSync(path.join(installed, 'dist/bundle/cli.cjs'))).toBe(true);
    expect(existsSync(path.join(installed, 'node_modules'))).toBe(false);
    // The library API loads from the installed package alone too.
    const api = await import(path.join(installed, 'dist/index.js'));
    expect(typeof api.runJob).toBe('function');
  });

  it('validates every example job and dry-runs the hello example from the installed command', async () => {
    const jobs = path.join(root, 'examples/jobs');
    for (const job of await readdir(jobs)) {
      const run = await installed(['validate', path.join(jobs, job)]);
      expect(run.code, `${job}: ${run.stdout}`).toBe(0);
    }
    const cwd = await tempDir();
    await cp(path.join(root, 'examples/test-payload.json'), path.join(cwd, 'test-payload.json'));
    await cp(path.join(jobs, 'hello'), path.join(cwd, 'jobs/hello'), {
      recursive: true,
      filter: (src) => !src.includes('/results'),
    });
    const run = await installed(['--dry-run'], cwd);
    expect(run.code, run.stderr).toBe(0);
    expect(JSON.parse(run.stdout)).toMatchObject({ id: 'hello', status: 'success' });
    expect(await readFile(path.join(cwd, 'jobs/hello/results/out/words.txt'), 'utf8')).toMatch(/^15 /);
  });
});

describe('deployment files', () => {
  it('docker-compose.yml parses, runs three always-restarting slots on a shared folder, and names only documented variables', async () => {
    const compose = parse(await readFile(path.join(root, 'examples/docker-compose.yml'), 'utf8'));
    const { mosquitto, worker } = compose.services;
    expect(mosquitto.image).toMatch(/^eclipse-mosquitto:2/);
    expect(mosquitto.volumes).toContain('./mosquitto.conf:/mosquitto/config/mosquitto.conf:ro');
    expect(existsSync(path.join(root, 'examples/mosquitto.conf'))).toBe(true);
    expect(worker.restart).toBe('always');
    // Docker's own wait after SIGTERM must outlast the worker's --kill-grace (10 s).
    expect(Number.parseInt(worker.stop_grace_period, 10)).toBeGreaterThan(10);
    expect(worker.deploy.replicas).toBe(3);
    expect(worker.build).toBe('..');
    expect(existsSync(path.join(root, 'Dockerfile'))).toBe(true);
    expect(worker.cgroup).toBe('private');
    expect(worker.security_opt).toContain('writable-cgroups=true');
    for (const name of Object.keys(worker.environment)) expect(documentedEnv.has(name), name).toBe(true);
    // Pull dispatch, the fleet's default; the broker is reachable from this host only.
    expect(worker.environment.MQTT_TOPIC).toBe('jobs/pending');
    // Off 1883, which Debian's own mosquitto service holds on many hosts.
    expect(mosquitto.ports).toEqual(['127.0.0.1:11883:1883']);
    expect(worker.volumes).toContain('./jobs:/jobs');
    expect(worker.environment.MQTT_JOBS_DIR).toBe('/jobs');
    for (const volume of mosquitto.volumes.filter((v: string) => !v.startsWith('.'))) {
      expect(Object.keys(compose.volumes)).toContain(volume.split(':')[0]);
    }
  });

  it('mosquitto.conf has the settings loss-free delivery needs', async () => {
    const conf = await readFile(path.join(root, 'examples/mosquitto.conf'), 'utf8');
    const lines = conf.split('\n').map((line) => line.trim());
    for (const line of ['persistence true', 'autosave_on_changes true', 'max_queued_messages 0'])
      expect(lines).toContain(line);
    // Mosquitto has no inline comments: a value followed by "# ..." is a different value.
    expect(lines.filter((line) => /^[^#].*#/.test(line))).toEqual([]);
  });

  it('the systemd template runs one slot per instance with the lines that matter', async () => {
    const file = path.join(root, 'examples/systemd/mqtt-fs-worker@.service');
    const unit = await readFile(file, 'utf8');
    const lines = unit.split('\n').map((l) => l.trim());
    for (const line of [
      'Environment=WORKER_ID=%i',
      'StartLimitIntervalSec=0',
      'Environment=MQTT_RESPAWN=true',
      'Restart=always',
      'RestartSec=1',
      'Delegate=yes',
      'KillMode=mixed',
      'WantedBy=multi-user.target',
    ]) {
      expect(lines, line).toContain(line);
    }
    const exec = lines.find((l) => l.startsWith('ExecStart='));
    expect(exec).toMatch(/^ExecStart=\/\S+/);
    for (const match of unit.matchAll(/^Environment=(\w+)=/gm))
      expect(documentedEnv.has(match[1] as string), match[1]).toBe(true);
    const analyze = ['/usr/bin/systemd-analyze', '/bin/systemd-analyze'].find(existsSync);
    if (analyze) execFileSync(analyze, ['verify', file], { stdio: 'pipe' });
  });

  it('the Kubernetes example is a StatefulSet whose pod names are the worker ids, with documented variables only', async () => {
    const docs = parseAllDocuments(
      await readFile(path.join(root, 'examples/kubernetes/statefulset.yaml'), 'utf8'),
    );
    expect(docs.every((doc) => doc.errors.length === 0)).toBe(true);
    const set = docs[0]?.toJS();
    expect(set).toMatchObject({ apiVersion: 'apps/v1', kind: 'StatefulSet' });
    const pod = set.spec.template.spec;
    expect(set.spec.selector.matchLabels).toEqual(set.spec.template.metadata.labels);
    expect(pod.terminationGracePeriodSeconds).toBeGreaterThan(10);
    const [container] = pod.containers;
    const env = new Map(container.env.map((e: { name: string }) => [e.name, e]));
    expect(env.get('WORKER_ID')).toEqual({
      name: 'WORKER_ID',
      valueFrom: { fieldRef: { fieldPath: 'metadata.name' } },
    });
    expect(env.get('MQTT_RESPAWN')).toMatchObject({ value: 'true' });
    for (const name of env.keys()) expect(documentedEnv.has(name as string), name as string).toBe(true);
    const mounts = container.volumeMounts.map((m: { name: string }) => m.name).sort();
    expect(mounts).toEqual(pod.volumes.map((v: { name: string }) => v.name).sort());
  });

  it('the Dockerfile builds on the current Node LTS and copies only what exists', async () => {
    const dockerfile = await readFile(path.join(root, 'Dockerfile'), 'utf8');
    expect(dockerfile).toMatch(/^ARG NODE_VERSION=(22|24)$/m);
    expect(dockerfile).toMatch(/^FROM node:\$\{NODE_VERSION\}-bookworm-slim AS build$/m);
    expect(dockerfile).toContain('ENTRYPOINT ["tini", "--", "mqtt-fs-worker"]');
    for (const [, from] of dockerfile.matchAll(/^COPY (?!--from)(.+) \S+$/gm)) {
      for (const source of (from as string).split(' '))
        expect(existsSync(path.join(root, source)), source).toBe(true);
    }
    for (const [, from] of dockerfile.matchAll(/^COPY --from=build \/src\/(\S+) /gm)) {
      expect(existsSync(path.join(root, from as string)), from).toBe(true);
    }
  });
});

describe('the README', () => {
  it('documents every option, variable, error code and exit code the worker has', async () => {
    // The README and the reference pages under docs/ it links to.
    const pages = ['README.md', ...(await readdir(path.join(root, 'docs'))).map((name) => `docs/${name}`)];
    const readme = (await Promise.all(pages.map((page) => readFile(path.join(root, page), 'utf8')))).join(
      '\n',
    );
    const { ErrorCode, ExitCode } = await import('../../src/shared/errors.js');
    for (const def of OPTION_DEFS) {
      const long = def.flags.split(/[ ,]+/).find((part) => part.startsWith('--')) as string;
      expect(readme, long).toMatch(new RegExp(`\`[^\`\n]*${long}\\b[^\`\n]*\``));
      expect(readme, def.env).toContain(`\`${def.env}\``);
    }
    for (const code of Object.values(ErrorCode)) expect(readme, code).toContain(`\`${code}\``);
    for (const [name, code] of Object.entries(ExitCode)) {
      if (name === 'SIGNAL_BASE') expect(readme).toContain('128 + n');
      else expect(readme, name).toMatch(new RegExp(`^\\|\\s*${code}\\s*\\|`, 'm'));
    }
    for (const command of ['validate', 'submit', 'drain', '--dry-run'])
      expect(readme).toContain(`mqtt-fs-worker ${command}`);
  });
});
