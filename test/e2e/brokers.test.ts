import { execFile } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { AedesBroker, Mosquitto } from '../helpers/mosquitto.js';
import { sleep, waitFor } from '../helpers/tmp.js';
import {
  collect,
  fleetDirs,
  killAndCount,
  publishJob,
  pullArgs,
  registerSlots,
  runWorkerOnce,
  slot,
  slotLoop,
  startWorker,
  testClient,
  workerArgs,
} from '../helpers/worker.js';

// What the worker does on brokers other than the reference setup: MQTT 3.1.1 on Mosquitto, Aedes (3.1.1 only, no
// shared subscriptions), and grants that break the promise.

const stops: (() => Promise<void>)[] = [];
afterEach(async () => {
  await Promise.all(stops.splice(0).map((stop) => stop()));
});

async function mosquitto(globalLines: string[] = [], listenerLines: string[] = []): Promise<Mosquitto> {
  const broker = await Mosquitto.start({
    globalLines,
    listenerLines: ['allow_anonymous true', ...listenerLines],
  });
  stops.push(() => broker.dispose());
  return broker;
}

async function aedes(): Promise<AedesBroker> {
  const broker = await AedesBroker.start();
  stops.push(() => broker.stop());
  return broker;
}

type Args = (
  url: string,
  dirs: { jobs: string; workspaces: string },
  id: string,
  extra?: string[],
) => string[];
const v311: Args = (url, dirs, id, extra = []) => pullArgs(url, dirs, id, ['--protocol', '3.1.1', ...extra]);

describe('MQTT 3.1.1', () => {
  it('loses no job on Mosquitto with max_inflight_messages 1, with SIGKILLs mid-job (pull)', {
    timeout: 180_000,
  }, async () => {
    const broker = await mosquitto(['max_inflight_messages 1']);
    await killAndCount({
      url: broker.url,
      names: ['m311-1', 'm311-2', 'm311-3'],
      count: 15,
      kills: 4,
      args: v311,
    });
  });

  it('never acknowledges a request it has not taken: a second job waits in the session for the next run', async () => {
    const broker = await mosquitto(['max_inflight_messages 1']);
    const dirs = await fleetDirs();
    const id = slot('v3-one');
    await runWorkerOnce(v311(broker.url, dirs, id, ['--idle-timeout', '100ms']));
    const client = await testClient(broker.url, { protocolVersion: 4 });
    const results = await collect(client, 'jobs/results/+');
    await publishJob(client, { id: 'first', steps: ['sleep 0.5'] });
    await publishJob(client, { id: 'second', steps: ['true'] });
    expect((await runWorkerOnce(v311(broker.url, dirs, id))).code).toBe(0);
    await waitFor(() => results.length === 1);
    expect((await runWorkerOnce(v311(broker.url, dirs, id, ['--idle-timeout', '5s']))).code).toBe(0);
    await waitFor(() => results.length === 2);
    expect(results.map((r) => r.body.id)).toEqual(['first', 'second']);
    await client.endAsync();
  });
});

describe('Aedes (a second, real broker: MQTT 3.1.1 only, no shared subscriptions)', () => {
  it('refuses an MQTT 5 worker with exit 4 and says which protocol to use', async () => {
    const broker = await aedes();
    const dirs = await fleetDirs();
    const run = await runWorkerOnce(
      pullArgs(broker.url, dirs, slot('aedes-v5'), ['--connect-timeout', '5s']),
    );
    expect(run.code, run.stderr).toBe(4);
    expect(run.stderr).toContain('BROKER_REFUSED');
    expect(run.stderr).toContain('--protocol 3.1.1');
  });

  it('runs jobs end to end in pull mode and loses none when slots are SIGKILLed mid-job', {
    timeout: 180_000,
  }, async () => {
    const broker = await aedes();
    await killAndCount({ url: broker.url, names: ['aedes-1', 'aedes-2'], count: 10, kills: 3, args: v311 });
  });
});

describe('what the broker grants', () => {
  it('stops before taking a job when the broker allows QoS 0 only (exit 7)', async () => {
    const broker = await mosquitto([], ['max_qos 0']);
    const dirs = await fleetDirs();
    const run = await runWorkerOnce(pullArgs(broker.url, dirs, slot('qos0'), ['--idle-timeout', '1s']));
    expect(run.code, run.stderr).toBe(7);
    expect(run.stderr).toMatch(/BROKER_UNSUITABLE: .*QoS not supported \(code 155\)/);
    expect(run.stderr).not.toMatch(/\n\s+at /);
  });
});

describe('an independent MQTT 5 client (Paho for Python)', () => {
  it('gets the result on its response topic with its correlation data, signed with non-ASCII steps', {
    timeout: 60_000,
  }, async () => {
    const broker = await mosquitto();
    const dirs = await fleetDirs();
    const secret = 'paho-shared-secret';
    const worker = startWorker(
      pullArgs(broker.url, dirs, slot('paho'), ['--secret', secret, '--response-topic-prefix', 'replies/']),
    );
    await worker.sawLog('waiting for one job');
    const request = { id: 'from-python', steps: ['echo "héllo ✓" > out.txt'], responseTopic: 'replies/py-1' };
    const script = new URL('../helpers/paho-request.py', import.meta.url).pathname;
    const port = String(broker.port);
    const out = await new Promise<string>((resolve, reject) =>
      execFile(
        '/usr/bin/python3',
        [script, '127.0.0.1', port, JSON.stringify(request), 'replies/py-1', 'corr-42', secret],
        (error, stdout, stderr) =>
          error ? reject(new Error(`${error.message}\n${stderr}`)) : resolve(stdout),
      ),
    );
    const response = JSON.parse(out) as { payload: Record<string, unknown>; correlation: string };
    expect(response.correlation).toBe('corr-42');
    expect(response.payload).toMatchObject({ id: 'from-python', status: 'success' });
    expect(await readFile(path.join(dirs.jobs, 'from-python/results/out.txt'), 'utf8')).toBe('héllo ✓\n');
    expect((await worker.exited).code).toBe(0);
  });
});

describe('end-to-end confirmation', () => {
  it('submit --confirm loses no job when the broker is SIGKILLed while requests come in', {
    timeout: 180_000,
  }, async () => {
    const broker = await mosquitto();
    const dirs = await fleetDirs();
    const slots = ['crash-1', 'crash-2'].map(slot);
    await registerSlots(broker.url, dirs, slots);
    const loops = slots.map((id) =>
      slotLoop(() => pullArgs(broker.url, dirs, id, ['--connect-timeout', '2s'])),
    );
    const ids = Array.from({ length: 10 }, (_, i) => `crash-${i}`);
    const submits = ids.map((id, i) =>
      sleep(i * 100).then(() =>
        runWorkerOnce([
          'submit',
          id,
          '--url',
          broker.url,
          '--steps',
          'sleep 0.2',
          '--wait',
          '--confirm',
          '2s',
          '--timeout',
          '120s',
          '--connect-timeout',
          '2s',
        ]),
      ),
    );
    await sleep(400);
    await broker.stop('SIGKILL');
    await sleep(700);
    await broker.resume();
    const runs = await Promise.all(submits);
    await Promise.all(loops.map((loop) => loop.stop()));
    for (const [i, run] of runs.entries()) {
      expect(run.code, `${ids[i]}: ${run.stderr}`).toBe(0);
      expect(JSON.parse(run.stdout)).toMatchObject({ id: ids[i], status: 'success' });
    }
  });
});

describe('a PUBLISH before its SUBACK', () => {
  it('runs the job a broker delivers ahead of the SUBACK (which it sends only once the job is acknowledged)', {
    timeout: 60_000,
  }, async () => {
    const { startEagerBroker } = await import('../helpers/eager-broker.js');
    const me = slot('eager');
    const broker = await startEagerBroker(me, {
      topic: 'jobs/pending',
      payload: JSON.stringify({ id: 'early', steps: ['echo early bird'] }),
    });
    stops.push(() => broker.close());
    const dirs = await fleetDirs();
    const run = await runWorkerOnce(pullArgs(broker.url, dirs, me, ['--connect-timeout', '5s']));
    expect(run.code, run.stderr).toBe(0);
    expect(run.stderr).not.toContain('INTERNAL');
    const result = broker.published.find((p) => p.topic === 'jobs/results/early');
    expect(JSON.parse(result?.payload ?? '{}')).toMatchObject({ id: 'early', status: 'success' });
  });
});

describe('brokers that say little on MQTT 3.1.1', () => {
  it('proves a $share/ subscription: Aedes (none) stops the slot with exit 7 within seconds, and doctor says why', async () => {
    const broker = await aedes();
    const dirs = await fleetDirs();
    const args = [
      ...workerArgs(broker.url, dirs, slot('aedes-share')),
      '--protocol',
      '3.1.1',
      '--connect-timeout',
      '5s',
    ];
    const run = await runWorkerOnce(args);
    expect(run.code, run.stderr).toBe(7);
    expect(run.stderr).toContain('BROKER_UNSUITABLE');
    expect(run.stderr).toContain('no shared subscriptions');
    expect(run.stderr).not.toMatch(/\n\s+at /);
    const doctor = await runWorkerOnce(['doctor', ...args]);
    expect(doctor.code).toBe(1);
    expect(doctor.stdout).toMatch(/^FAIL {2}broker .*no shared subscriptions/m);
  });

  it('takes the probe through on Mosquitto (shared subscriptions on 3.1.1), and runs the job', async () => {
    const broker = await mosquitto(['max_inflight_messages 1']);
    const dirs = await fleetDirs();
    const id = slot('m311-share');
    const client = await testClient(broker.url, { protocolVersion: 4 });
    const results = await collect(client, 'jobs/results/+');
    const worker = startWorker([...workerArgs(broker.url, dirs, id), '--protocol', '3.1.1']);
    await worker.sawLog('waiting for one job');
    await publishJob(client, { id: 'shared-311', steps: ['true'] });
    expect((await worker.exited).code).toBe(0);
    await waitFor(() => results.length === 1);
    await client.endAsync();
  });

  it('says which protocol to use when a broker hangs up on an MQTT 5 CONNECT (exit 4)', async () => {
    const { createServer } = await import('node:net');
    const server = createServer((socket) => socket.once('data', () => socket.destroy()));
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    stops.push(async () => {
      server.close();
    });
    const { port } = server.address() as { port: number };
    const dirs = await fleetDirs();
    const run = await runWorkerOnce(
      pullArgs(`mqtt://127.0.0.1:${port}`, dirs, slot('hangup'), ['--connect-timeout', '5s']),
    );
    expect(run.code, run.stderr).toBe(4);
    expect(run.stderr).toContain('closed the connection on an MQTT 5 CONNECT');
    expect(run.stderr).toContain('--protocol 3.1.1');
  });
});

describe('a broker that lost the slot session', () => {
  it('says so loudly: Aedes keeps sessions in memory, and a restart loses what was queued', {
    timeout: 60_000,
  }, async () => {
    const first = await aedes();
    const dirs = await fleetDirs();
    const id = slot('amnesia');
    await registerSlots(first.url, dirs, [id], v311);
    // The same slot on a broker that has no session for it (Aedes started again).
    await first.stop();
    const second = await aedes();
    const run = await runWorkerOnce(v311(second.url, dirs, id, ['--idle-timeout', '300ms']));
    expect(run.code, run.stderr).toBe(0);
    expect(run.stderr).toContain('SESSION LOST');
    expect(run.stderr).toContain('submit --confirm');
    // Its next start finds the session this run made: nothing to say.
    const again = await runWorkerOnce(v311(second.url, dirs, id, ['--idle-timeout', '300ms']));
    expect(again.stderr).not.toContain('SESSION LOST');
  });
});
