import { type ChildProcess, spawn } from 'node:child_process';
import { mkdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import mqtt, { type MqttClient } from 'mqtt';
import { topicMatches } from '../../src/shared/topics.js';
import { tempDir } from './tmp.js';

export const BIN = fileURLToPath(new URL('../../bin/mqtt-fs-worker.js', import.meta.url));

export interface Exited {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export interface Running {
  child: ChildProcess;
  exited: Promise<Exited>;
  /** Resolves when stderr has shown `text`. */
  sawLog: (text: string | RegExp, timeoutMs?: number) => Promise<void>;
  /** What stderr has shown so far. */
  stderrNow: () => string;
}

/** Starts the worker (the repo's bin) with `args`; its environment holds only PATH and `env`. */
export function startWorker(args: string[], env: Record<string, string> = {}, cwd?: string): Running {
  return startProcess(process.execPath, [BIN, ...args], env, cwd);
}

/** Starts `command` (e.g. the worker behind `unshare`), watched like startWorker's. */
export function startProcess(
  command: string,
  args: string[],
  env: Record<string, string> = {},
  cwd?: string,
): Running {
  const child = spawn(command, args, {
    cwd,
    env: { PATH: process.env.PATH ?? '/usr/bin:/bin', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  const watchers: { test: string | RegExp; resolve: () => void }[] = [];
  const matches = (test: string | RegExp): boolean =>
    typeof test === 'string' ? stderr.includes(test) : test.test(stderr);
  child.stdout?.on('data', (chunk: Buffer) => {
    stdout += chunk.toString();
  });
  child.stderr?.on('data', (chunk: Buffer) => {
    stderr += chunk.toString();
    for (const watcher of watchers.filter((w) => matches(w.test))) watcher.resolve();
  });
  const exited = new Promise<Exited>((resolve) => {
    child.on('close', (code, signal) => resolve({ code, signal, stdout, stderr }));
  });
  const sawLog = (test: string | RegExp, timeoutMs = 15_000): Promise<void> =>
    new Promise((resolve, reject) => {
      if (matches(test)) return resolve();
      const timer = setTimeout(
        () => reject(new Error(`worker did not log ${test} within ${timeoutMs} ms; stderr:\n${stderr}`)),
        timeoutMs,
      );
      watchers.push({
        test,
        resolve: () => {
          clearTimeout(timer);
          resolve();
        },
      });
      void exited.then(() => {
        clearTimeout(timer);
        if (matches(test)) resolve();
        else reject(new Error(`worker exited without logging ${test}; stderr:\n${stderr}`));
      });
    });
  return { child, exited, sawLog, stderrNow: () => stderr };
}

/** Runs a worker and waits for it to exit. */
export async function runWorkerOnce(
  args: string[],
  env: Record<string, string> = {},
  cwd?: string,
): Promise<Exited> {
  return startWorker(args, env, cwd).exited;
}

/** A jobs root and a workspaces root, and the worker arguments that point at them and at the broker. */
export async function fleetDirs(): Promise<{ jobs: string; workspaces: string }> {
  const base = await tempDir('mfw-fleet-');
  const jobs = path.join(base, 'jobs');
  const workspaces = path.join(base, 'workspaces');
  await mkdir(jobs);
  await mkdir(workspaces);
  return { jobs, workspaces };
}

/** Worker arguments for a slot in pull dispatch: the plain jobs topic (see workerArgs for the rest). */
export function pullArgs(
  url: string,
  dirs: { jobs: string; workspaces: string },
  id: string,
  extra: string[] = [],
): string[] {
  // workerArgs' shared topic left out: --topic given twice subscribes both (a slot serving several pools).
  const shared = workerArgs(url, dirs, id);
  const at = shared.indexOf('--topic');
  return [...shared.slice(0, at), ...shared.slice(at + 2), '--topic', 'jobs/pending', ...extra];
}

export function workerArgs(
  url: string,
  dirs: { jobs: string; workspaces: string },
  id: string,
  extra: string[] = [],
): string[] {
  return [
    '--url',
    url,
    '--jobs-dir',
    dirs.jobs,
    '--workspaces-dir',
    dirs.workspaces,
    '--id',
    id,
    '--topic',
    '$share/workers/jobs/pending',
    '--kill-grace',
    '1s',
    ...extra,
  ];
}

/** A plain MQTT client for the test's side: publish requests, watch results and events. */
export async function testClient(url: string, options: mqtt.IClientOptions = {}): Promise<MqttClient> {
  const client = await mqtt.connectAsync(url, {
    protocolVersion: 5,
    reconnectPeriod: 0,
    clientId: `test-${Math.random().toString(36).slice(2, 10)}`,
    ...options,
  });
  return client;
}

/** Collects every message on `filter` into an array (topic, parsed JSON). */
export async function collect(
  client: MqttClient,
  filter: string,
): Promise<{ topic: string; body: Record<string, unknown>; properties?: unknown }[]> {
  const seen: { topic: string; body: Record<string, unknown>; properties?: unknown }[] = [];
  client.on('message', (topic, payload, packet) => {
    if (!topicMatches(filter, topic)) return;
    try {
      seen.push({ topic, body: JSON.parse(payload.toString()), properties: packet.properties });
    } catch {
      seen.push({ topic, body: { raw: payload.toString() } });
    }
  });
  await client.subscribeAsync(filter, { qos: 1 });
  return seen;
}

export async function publishJob(
  client: MqttClient,
  body: unknown,
  properties?: mqtt.IClientPublishOptions['properties'],
): Promise<void> {
  const payload = typeof body === 'string' || Buffer.isBuffer(body) ? body : JSON.stringify(body);
  await client.publishAsync('jobs/pending', payload, {
    qos: 1,
    ...(properties ? { properties } : {}),
  });
}

/**
 * Runs a slot the way `restart: always` does: start the worker, and when it exits start it again, until
 * `stop()` is called. Returns every run's exit.
 */
export function slotLoop(
  args: () => string[],
  env: Record<string, string> = {},
  start: (args: string[], env: Record<string, string>) => Running = startWorker,
): {
  stop: () => Promise<Exited[]>;
  retire: () => Promise<Exited[]>;
  runs: Exited[];
  current: () => Running | undefined;
} {
  const runs: Exited[] = [];
  let stopped = false;
  let current: Running | undefined;
  const loop = (async () => {
    while (!stopped) {
      current = start(args(), env);
      runs.push(await current.exited);
    }
  })();
  return {
    runs,
    current: () => current,
    stop: async () => {
      stopped = true;
      current?.child.kill('SIGTERM');
      await loop;
      return runs;
    },
    // A slot that dies for good (a host gone, a pod replaced): SIGKILL, and no restart.
    retire: async () => {
      stopped = true;
      current?.child.kill('SIGKILL');
      await loop;
      return runs;
    },
  };
}

/**
 * A worker id of this test process's own: a worker id is held by one process at a time on a host, and test
 * files run side by side, so two files must never share one.
 */
export function slot(name: string): string {
  // The pid first: a slot's ordinal (`hol-1`) stays the id's last number, which --fanout groups by.
  return `p${process.pid}-${name}`;
}

/** Every job has a success result message and a success result.json: the fleet lost none. */
export async function expectAllSucceeded(
  jobsDir: string,
  jobs: readonly string[],
  results: readonly { body: Record<string, unknown> }[],
): Promise<void> {
  const { expect } = await import('vitest');
  expect(new Set(results.map((r) => r.body.id))).toEqual(new Set(jobs));
  expect(results.every((r) => r.body.status === 'success')).toBe(true);
  for (const id of jobs) {
    const manifest = JSON.parse(await readFile(path.join(jobsDir, id, 'results/result.json'), 'utf8'));
    expect(manifest.status, id).toBe('success');
  }
}

export type SlotArgs = (
  url: string,
  dirs: { jobs: string; workspaces: string },
  id: string,
  extra?: string[],
) => string[];

/**
 * Connects each slot once and lets it go, so that its persistent session (and its subscription) exists before
 * jobs are published: a request published before a slot's session exists never reaches that slot.
 */
export async function registerSlots(
  url: string,
  dirs: { jobs: string; workspaces: string },
  ids: readonly string[],
  args: SlotArgs = pullArgs,
): Promise<void> {
  const { expect } = await import('vitest');
  for (const id of ids) {
    const run = await runWorkerOnce(args(url, dirs, id, ['--idle-timeout', '100ms']));
    expect(run.code, `${id}: ${run.stderr}`).toBe(0);
  }
}

/**
 * Slots in restart loops (`args` per slot), `count` jobs published, `kills` SIGKILLs of slots mid-job: every job
 * has one success result, none is lost. `client` is how the test's own client connects (protocol, credentials).
 */
export async function killAndCount(input: {
  url: string;
  names: readonly string[];
  count: number;
  kills: number;
  args: SlotArgs;
  client?: mqtt.IClientOptions;
}): Promise<void> {
  const { url, args } = input;
  const { sleep, waitFor } = await import('./tmp.js');
  const dirs = await fleetDirs();
  const slots = input.names.map(slot);
  await registerSlots(url, dirs, slots, args);
  const client = await testClient(url, input.client ?? { protocolVersion: 4 });
  const results = await collect(client, 'jobs/results/+');
  const jobs = Array.from({ length: input.count }, (_, i) => `fleet-${i}`);
  for (const id of jobs) await mkdir(path.join(dirs.jobs, id));
  for (const id of jobs) await publishJob(client, { id, steps: ['sleep 0.4'] });
  const loops = slots.map((id) => slotLoop(() => args(url, dirs, id)));
  let killed = 0;
  while (killed < input.kills) {
    const victim = loops[killed % loops.length]?.current() as Running;
    await victim.sawLog('step 0 started', 60_000).catch(() => undefined);
    if (victim.child.exitCode === null && victim.child.kill('SIGKILL')) killed++;
    await sleep(100);
  }
  try {
    await waitFor(() => new Set(results.map((r) => r.body.id)).size === jobs.length, 120_000, 100);
  } finally {
    const runs = (await Promise.all(loops.map((loop) => loop.stop()))).flat();
    const done = new Set(results.map((r) => r.body.id));
    const missing = jobs.filter((id) => !done.has(id));
    if (missing.length > 0)
      console.error(`missing ${missing.join(' ')}\n${runs.map((r) => r.stderr).join('\n---\n')}`);
  }
  await expectAllSucceeded(dirs.jobs, jobs, results);
  await client.endAsync();
}
