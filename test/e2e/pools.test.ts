import { describe, expect, it } from 'vitest';
import { freshBrokerPerTest } from '../helpers/mosquitto.js';
import { waitFor } from '../helpers/tmp.js';
import {
  collect,
  fleetDirs,
  runWorkerOnce,
  slot,
  startWorker,
  testClient,
  workerArgs,
} from '../helpers/worker.js';

// A slot that serves several pools (a GPU host takes `jobs/gpu` and the default queue): one session, several
// subscriptions, each request still one claim.

const { broker } = freshBrokerPerTest();

describe('a slot serving several pools', () => {
  it('with --topic jobs/pending --topic jobs/gpu runs a job routed to each, and says so in its presence', async () => {
    const url = broker().url;
    const dirs = await fleetDirs();
    const me = slot('pool-gpu');
    const args = (extra: string[] = []) =>
      workerArgs(url, dirs, me, extra).filter((arg, i, all) => arg !== '--topic' && all[i - 1] !== '--topic');
    const pools = ['--topic', 'jobs/pending', '--topic', 'jobs/gpu'];
    const first = startWorker([...args(), ...pools]);
    await first.sawLog('waiting for one job on jobs/pending, jobs/gpu');
    const listed = await runWorkerOnce(['workers', '--url', url, '--json']);
    expect(JSON.parse(listed.stdout)).toEqual([
      expect.objectContaining({ id: me, topics: ['jobs/pending', 'jobs/gpu'] }),
    ]);
    const client = await testClient(url);
    const results = await collect(client, 'jobs/results/+');
    // A controller routes by topic: `submit --topic`.
    const gpu = await runWorkerOnce([
      'submit',
      'render',
      '--url',
      url,
      '--topic',
      'jobs/gpu',
      '--steps',
      'echo gpu',
    ]);
    expect(gpu.code, gpu.stderr).toBe(0);
    expect(gpu.stderr).toContain('published job render to jobs/gpu');
    expect((await first.exited).code).toBe(0);
    const second = startWorker([...args(), ...pools]);
    await second.sawLog('waiting for one job');
    const plain = await runWorkerOnce(['submit', 'lint', '--url', url, '--steps', 'echo plain']);
    expect(plain.code, plain.stderr).toBe(0);
    expect((await second.exited).code).toBe(0);
    await waitFor(() => results.length === 2);
    expect(results.map((r) => [r.body.id, r.body.status, r.body.workerId])).toEqual([
      ['render', 'success', me],
      ['lint', 'success', me],
    ]);
    // The same from the environment (comma-separated), as a container sets it.
    const third = startWorker(args(['--idle-timeout', '300ms']), { MQTT_TOPIC: 'jobs/pending,jobs/gpu' });
    await third.sawLog('waiting for one job on jobs/pending, jobs/gpu');
    expect((await third.exited).code).toBe(0);
    await client.endAsync();
  });
});
