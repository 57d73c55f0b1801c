import { execFile } from 'node:child_process';
import { once } from 'node:events';
import { chmod, lstat, readdir, readFile, writeFile } from 'node:fs/promises';
import { type AddressInfo, createConnection } from 'node:net';
import path from 'node:path';
import { describe, expect, inject, it } from 'vitest';
import { createWebSocketStream, WebSocketServer } from 'ws';
import { freePort, Mosquitto } from '../helpers/mosquitto.js';
import { tempDir, waitFor, writeTree } from '../helpers/tmp.js';
import { collect, fleetDirs, publishJob, slot, testClient, workerArgs } from '../helpers/worker.js';

const bin = inject('installedBin');

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

function cli(args: string[], options: { cwd?: string; env?: Record<string, string> } = {}): Promise<Run> {
  return new Promise((resolve) => {
    execFile(
      bin,
      args,
      {
        cwd: options.cwd,
        env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? '/root', ...options.env },
        encoding: 'utf8',
      },
      (error, stdout, stderr) =>
        resolve({ code: error ? ((error as { code?: number }).code ?? 1) : 0, stdout, stderr }),
    );
  });
}

/**
 * MQTT over WebSockets in front of the real broker (Debian's Mosquitto 2.0 is built without WebSockets): every
 * WebSocket connection is piped to a TCP connection to the broker, byte for byte.
 */
async function websocketFront(brokerPort: number): Promise<{ url: string; close: () => Promise<void> }> {
  const server = new WebSocketServer({
    host: '127.0.0.1',
    port: 0,
    handleProtocols: (protocols) => (protocols.has('mqtt') ? 'mqtt' : false),
  });
  await once(server, 'listening');
  server.on('connection', (socket) => {
    const stream = createWebSocketStream(socket);
    const tcp = createConnection({ host: '127.0.0.1', port: brokerPort });
    stream.on('error', () => tcp.destroy());
    tcp.on('error', () => stream.destroy());
    stream.pipe(tcp).pipe(stream);
  });
  const { port } = server.address() as AddressInfo;
  return {
    url: `ws://127.0.0.1:${port}`,
    close: () => new Promise((resolve) => server.close(() => resolve())),
  };
}

describe('the installed command', () => {
  it('prints its version and help', async () => {
    const pkg = JSON.parse(await readFile(new URL('../../package.json', import.meta.url), 'utf8'));
    expect(await cli(['--version'])).toMatchObject({ code: 0, stdout: `${pkg.version}\n` });
    const help = await cli(['--help']);
    expect(help.code).toBe(0);
    for (const text of [
      '--url',
      'MQTT_URL',
      '--jobs-dir',
      'MQTT_JOBS_DIR',
      '--dry-run',
      'validate',
      'WORKER_ID',
    ]) {
      expect(help.stdout).toContain(text);
    }
    // A subcommand's help lists the worker options it takes, whichever way it is asked for.
    for (const args of [
      ['help', 'submit'],
      ['submit', '--help'],
    ]) {
      const sub = await cli(args);
      expect(sub.code, args.join(' ')).toBe(0);
      expect(sub.stdout).toContain('Usage: mqtt-fs-worker submit');
      expect(sub.stdout).toContain('--steps');
      expect(sub.stdout).toContain('MQTT_URL');
      // Only its own: no limits, staging or workspaces options of the worker.
      for (const foreign of ['--max-memory', '--stage', '--workspaces-dir', '--run-as'])
        expect(sub.stdout, `${args.join(' ')}: ${foreign}`).not.toContain(foreign);
    }
    const workers = await cli(['workers', '--help']);
    expect(workers.stdout).toContain('--presence-topic');
    // The slots' presence files on the drive, for brokers that show no retained presence to a wildcard.
    expect(workers.stdout).toContain('--jobs-dir');
    expect(workers.stdout).not.toContain('--workspaces-dir');
    expect((await cli(['status', '--help'])).stdout).not.toContain('--url');
  });

  it('answers an unknown command, option or help topic in one line, in one style, exit 2', async () => {
    for (const [args, line] of [
      [['help', 'bogus'], "unknown command 'bogus'"],
      [['--bogus'], "unknown option '--bogus'"],
      [['submit', 'x', '--bogus'], "unknown option '--bogus'"],
      [['submit'], "missing required argument 'id'"],
    ] as const) {
      const run = await cli([...args]);
      expect(run.code, args.join(' ')).toBe(2);
      const lines = run.stderr.trim().split('\n');
      expect(lines, args.join(' ')).toHaveLength(1);
      expect(lines[0]).toMatch(new RegExp(`^mqtt-fs-worker: INVALID_OPTION: ${line}`));
      expect(run.stdout).toBe('');
    }
  });

  it('takes the dry run payload file anywhere on the line (--dry-run --watch file.json too)', async () => {
    const cwd = await tempDir();
    await writeFile(path.join(cwd, 'mine.json'), '{"id": "anywhere", "steps": ["echo hi"]}');
    const after = await cli(['--dry-run', '--quiet', 'mine.json'], { cwd });
    expect(after.code, after.stderr).toBe(0);
    expect(JSON.parse(after.stdout)).toMatchObject({ id: 'anywhere', status: 'success' });
  });

  it('runs ./test-payload.json with --dry-run, prints the result and exits 0', async () => {
    const cwd = await tempDir();
    await writeFile(
      path.join(cwd, 'test-payload.json'),
      '{"id": "dry-run-test", "steps": ["echo hi", "echo made > out.txt"]}',
    );
    const run = await cli(['--dry-run'], { cwd });
    expect(run.code).toBe(0);
    expect(JSON.parse(run.stdout)).toMatchObject({
      id: 'dry-run-test',
      status: 'success',
      exitCode: 0,
      manifestFile: 'results/result.json',
    });
    expect(run.stderr).toContain('dry-run-test');
    const results = path.join(cwd, 'jobs/dry-run-test/results');
    expect(await readFile(path.join(results, 'step_0.log'), 'utf8')).toBe('hi\n');
    expect(await readFile(path.join(results, 'out.txt'), 'utf8')).toBe('made\n');
    expect(JSON.parse(await readFile(path.join(results, 'result.json'), 'utf8')).status).toBe('success');
    expect(await readdir(path.join(cwd, 'workspaces'))).toEqual([]);
  });

  // ws, socks and execa ship as files of their own beside the bundle (scripts/bundle.mjs): these two runs load them
  // from the installed package.
  it('takes a job over MQTT over WebSockets (ws://)', { timeout: 30_000 }, async () => {
    const broker = await Mosquitto.start();
    const front = await websocketFront(broker.port);
    try {
      const dirs = await fleetDirs();
      // The slot's first run registers its session in the group, as a slot's first start does.
      const first = await cli([...workerArgs(front.url, dirs, slot('ws-slot')), '--idle-timeout', '100ms']);
      expect(first.code, first.stderr).toBe(0);
      const client = await testClient(front.url);
      const results = await collect(client, 'jobs/results/+');
      await publishJob(client, { id: 'over-ws', steps: ['echo via websockets'] });
      const run = await cli(workerArgs(front.url, dirs, slot('ws-slot')));
      expect(run.code, run.stderr).toBe(0);
      await waitFor(() => results.length === 1);
      expect(results[0]?.body).toMatchObject({ id: 'over-ws', status: 'success' });
      const log = await readFile(path.join(dirs.jobs, 'over-ws/results/step_0.log'), 'utf8');
      expect(log).toBe('via websockets\n');
      await client.endAsync();
    } finally {
      await front.close();
      await broker.dispose();
    }
  });

  it("prints MQTT.js's own traces only when DEBUG asks for them", async () => {
    const dirs = await fleetDirs();
    const port = await freePort(); // nothing listens: the connection is refused at once
    const args = [...workerArgs(`mqtt://127.0.0.1:${port}`, dirs, 'traced'), '--connect-timeout', '2s'];
    const traced = await cli(args, { env: { DEBUG: 'mqttjs*' } });
    expect(traced.code).toBe(3);
    expect(traced.stderr).toContain('mqttjs:client');
    const quiet = await cli(args);
    expect(quiet.code).toBe(3);
    expect(quiet.stderr).toContain('BROKER_UNREACHABLE');
    expect(quiet.stderr).not.toContain('mqttjs');
  });

  it.skipIf(process.getuid?.() !== 0)('runs a dry-run step as another user (--run-as)', async () => {
    const cwd = await tempDir();
    await chmod(cwd, 0o755); // the step's user must reach its workspace below
    await writeFile(path.join(cwd, 'test-payload.json'), '{"id": "as-nobody", "steps": ["id -un"]}');
    const run = await cli(['--dry-run', '--run-as', 'nobody'], { cwd });
    expect(run.code, run.stderr).toBe(0);
    const log = await readFile(path.join(cwd, 'jobs/as-nobody/results/step_0.log'), 'utf8');
    expect(log).toBe('nobody\n');
  });

  it('keeps its compiled code in MQTT_CODE_CACHE after a job, runs the same from it, and keeps none when off', async () => {
    const cwd = await tempDir();
    const cache = path.join(cwd, 'cache');
    await writeFile(path.join(cwd, 'test-payload.json'), '{"id": "cached", "steps": ["echo $JOB_ATTEMPT"]}');
    for (let run = 0; run < 2; run++) {
      const result = await cli(['--dry-run', '--limits', 'off'], { cwd, env: { MQTT_CODE_CACHE: cache } });
      expect(result.code, result.stderr).toBe(0);
      expect(JSON.parse(result.stdout)).toMatchObject({ id: 'cached', status: 'success' });
      expect(await readFile(path.join(cwd, 'jobs/cached/results/step_0.log'), 'utf8')).toBe('1\n');
    }
    expect(await readdir(cache)).toEqual([expect.stringMatching(/^cli\.cjs\.\w+\.dry-run\..*\.warm\.bin$/)]);
    expect(await cli(['--version'], { env: { MQTT_CODE_CACHE: cache } })).toMatchObject({ code: 0 });
    expect(await readdir(cache)).toHaveLength(2);

    const off = path.join(cwd, 'off');
    await cli(['--dry-run', '--limits', 'off'], { cwd, env: { MQTT_CODE_CACHE: 'off', TMPDIR: off } });
    await expect(lstat(off)).rejects.toThrow('ENOENT');
  });

  it('exits 1 for a failing dry-run job and names the payload file given', async () => {
    const cwd = await tempDir();
    await writeFile(path.join(cwd, 'fail.json'), '{"id": "f", "steps": ["exit 7"]}');
    const run = await cli(['--dry-run', 'fail.json', '--jobs-dir', 'j', '--workspaces-dir', 'w'], { cwd });
    expect(run.code).toBe(1);
    expect(JSON.parse(run.stdout)).toMatchObject({ id: 'f', status: 'failed', exitCode: 7 });
    expect(await lstat(path.join(cwd, 'j/f/results/result.json'))).toBeTruthy();
  });

  it('reports an invalid job.json in a dry run as status error with a code, without a stack trace', async () => {
    const cwd = await tempDir();
    await writeTree(cwd, {
      'test-payload.json': '{"id": "bad"}',
      'jobs/bad/job.json': '{"steps": "npm test"}',
    });
    const run = await cli(['--dry-run'], { cwd });
    expect(run.code).toBe(1);
    expect(JSON.parse(run.stdout)).toMatchObject({ status: 'error', error: { code: 'INVALID_JOB_FILE' } });
    expect(run.stderr).toContain('INVALID_JOB_FILE');
    expect(run.stderr).not.toMatch(/\n\s+at /);
  });

  it('exits 2 with one clear line for an invalid option value', async () => {
    const run = await cli(['--dry-run', '--kill-grace', 'soon']);
    expect(run.code).toBe(2);
    expect(run.stderr.trim()).toBe(
      'mqtt-fs-worker: INVALID_OPTION: --kill-grace: expected a duration like "10s", got "soon" (string)',
    );
    const env = await cli(['--dry-run'], { env: { MQTT_URL: 'http://x' } });
    expect(env.code).toBe(2);
    expect(env.stderr).toContain('--url: expected an mqtt://');
  });

  it('says "unknown command" for a word that is no command, and writes fatal errors as JSON with --log-format json', async () => {
    const unknown = await cli(['sumbit', 'job_1']);
    expect(unknown.code).toBe(2);
    expect(unknown.stderr.trim()).toBe(
      "mqtt-fs-worker: INVALID_OPTION: unknown command 'sumbit' (commands: validate, submit, status, logs, jobs, workers, dashboard, doctor, drain, help; see --help)",
    );
    const json = await cli(['--dry-run', '--kill-grace', 'soon', '--log-format', 'json']);
    expect(json.code).toBe(2);
    expect(JSON.parse(json.stderr.trim())).toMatchObject({
      level: 'error',
      code: 'INVALID_OPTION',
      msg: '--kill-grace: expected a duration like "10s", got "soon" (string)',
    });
  });

  it('exits 2 for an unknown option and for a missing payload file', async () => {
    expect((await cli(['--bogus'])).code).toBe(2);
    const cwd = await tempDir();
    const missing = await cli(['--dry-run'], { cwd });
    expect(missing.code).toBe(2);
    expect(missing.stderr).toContain('test-payload.json');
  });

  it('validate prints every problem and exits 1, or says valid and exits 0', async () => {
    const dir = await tempDir();
    await writeTree(dir, {
      'good/job.json': '{"steps": ["true", {"run": "make", "timeout": "5m"}]}',
      'bad/job.json': '{"steps": [1, {"run": "x", "timeout": "ten"}], "limits": {"memory": "lots"}}',
    });
    const good = await cli(['validate', path.join(dir, 'good')]);
    expect(good).toMatchObject({ code: 0 });
    expect(good.stdout).toContain('valid (2 steps)');
    const bad = await cli(['validate', path.join(dir, 'bad/job.json')]);
    expect(bad.code).toBe(1);
    expect(bad.stdout).toContain('3 problems');
    expect(bad.stdout).toContain('steps[0]');
    expect(bad.stdout).toContain('steps[1].timeout');
    expect(bad.stdout).toContain('limits.memory');
    const missing = await cli(['validate', path.join(dir, 'nope')]);
    expect(missing.code).toBe(1);
    expect(missing.stdout).toContain('ENOENT');
  });

  it('exits with 128 + signal and removes the workspace when interrupted during a dry run', async () => {
    const cwd = await tempDir();
    await writeFile(path.join(cwd, 'test-payload.json'), '{"id": "long", "steps": ["sleep 30"]}');
    const child = execFile(bin, ['--dry-run'], { cwd, env: { PATH: process.env.PATH ?? '' } });
    await new Promise((resolve) => setTimeout(resolve, 1500));
    child.kill('SIGTERM');
    const code = await new Promise<number | null>((resolve) => child.on('exit', resolve));
    expect(code).toBe(143);
    expect(await readdir(path.join(cwd, 'workspaces'))).toEqual([]);
  });
});
