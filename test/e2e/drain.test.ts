import { describe, expect, it } from 'vitest';
import { freshBrokerPerTest } from '../helpers/mosquitto.js';
import { waitFor } from '../helpers/tmp.js';
import {
  collect,
  fleetDirs,
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

// `drain` retires a slot that is gone: it says what it did or why it could not, within seconds, and exits non-zero
// on anything short of done. It never knocks a live slot off the broker.

const { broker } = freshBrokerPerTest();

/** The slot's retained presence state, as `workers --json` reports it. */
async function presenceState(url: string, id: string): Promise<string | undefined> {
  const listed = await runWorkerOnce(['workers', '--url', url, '--json']);
  return (JSON.parse(listed.stdout) as { id: string; state: string }[]).find((row) => row.id === id)?.state;
}

describe('drain', () => {
  it('needs --id: the default id is the host name, every container slot default', async () => {
    const run = await runWorkerOnce(['drain', '--url', broker().url]);
    expect(run.code).toBe(2);
    expect(run.stderr).toContain('drain needs --id SLOT');
  });

  it('refuses a slot that is online, which stays connected and then runs a job', async () => {
    const url = broker().url;
    const dirs = await fleetDirs();
    const live = slot('drain-live');
    await registerSlots(url, dirs, [live]);
    const worker = startWorker(pullArgs(url, dirs, live));
    await worker.sawLog('waiting for one job');
    await waitFor(async () => (await presenceState(url, live)) === 'idle', 5000, 100);
    const refused = await runWorkerOnce(['drain', '--url', url, '--id', live]);
    expect(refused.code).toBe(1);
    expect(refused.stderr).toContain(`SLOT_ONLINE: slot ${live} is online (idle`);
    expect(refused.stderr).toContain('--force');
    // Still connected under its own session: it takes the next job.
    const client = await testClient(url);
    const results = await collect(client, 'jobs/results/still-here');
    await publishJob(client, { id: 'still-here', steps: ['true'] });
    const ran = await worker.exited;
    expect(ran.code, ran.stderr).toBe(0);
    expect(ran.stderr).not.toContain('session taken over');
    await waitFor(() => results.length === 1);
    expect(results[0]?.body).toMatchObject({ status: 'success', workerId: live });
    await client.endAsync();
  });

  for (const protocol of ['5', '3.1.1']) {
    it(`ends a gone pull slot's session that holds requests, within seconds (MQTT ${protocol})`, {
      timeout: 60_000,
    }, async () => {
      const url = broker().url;
      const dirs = await fleetDirs();
      const gone = slot(`drain-pull-${protocol}`);
      const proto = ['--protocol', protocol];
      await registerSlots(url, dirs, [gone], (u, d, id, extra = []) =>
        pullArgs(u, d, id, [...proto, ...extra]),
      );
      const client = await testClient(url);
      for (let i = 0; i < 3; i++) await publishJob(client, { id: `queued-${i}`, steps: ['true'] });
      await client.endAsync();
      // Its will turns it offline (MQTT 5: after the will delay); drain then needs no --force.
      await waitFor(async () => (await presenceState(url, gone)) === 'offline', 20_000, 250);
      const started = Date.now();
      const drained = await runWorkerOnce(['drain', '--url', url, '--id', gone, ...proto]);
      const took = Date.now() - started;
      expect(drained.code, drained.stderr).toBe(0);
      expect(JSON.parse(drained.stdout)).toMatchObject({
        slot: gone,
        mode: 'pull',
        topic: 'jobs/pending',
        moved: 0,
      });
      expect(drained.stderr).toContain(`ended slot ${gone}'s session (MQTT ${protocol}`);
      // The broker really discarded it: the slot's next connection finds no session and none of the copies.
      const next = await runWorkerOnce(pullArgs(url, dirs, gone, [...proto, '--idle-timeout', '500ms']));
      expect(next.code, next.stderr).toBe(0);
      expect(next.stderr).toContain('session=new');
      expect(next.stderr).not.toContain('queued-');
      // Whatever the machine's load, it ends well within the connect timeout, never a quiet 46 s.
      expect(took).toBeLessThan(20_000);
    });
  }

  it("reads a shared slot's subscription from its presence: drained without --topic, its jobs move", {
    timeout: 60_000,
  }, async () => {
    const url = broker().url;
    const dirs = await fleetDirs();
    const retired = slot('drain-shared-gone');
    const live = slot('drain-shared-live');
    await registerSlots(url, dirs, [retired, live], workerArgs);
    const client = await testClient(url);
    const results = await collect(client, 'jobs/results/+');
    const ids = ['s1', 's2', 's3', 's4'];
    for (const id of ids) await publishJob(client, { id, steps: ['true'] });
    const drained = await runWorkerOnce(['drain', '--url', url, '--id', retired, '--quiet', '1s', '--force']);
    expect(drained.code, drained.stderr).toBe(0);
    expect(JSON.parse(drained.stdout)).toMatchObject({
      mode: 'shared',
      topic: '$share/workers/jobs/pending',
      moved: 2,
    });
    expect(drained.stderr).toContain('(from its presence)');
    for (let i = 0; i < 4 && results.length < ids.length; i++) {
      const run = await runWorkerOnce(workerArgs(url, dirs, live, ['--idle-timeout', '2s']));
      expect(run.code, run.stderr).toBe(0);
    }
    await waitFor(() => results.length === ids.length);
    expect(results.map((r) => r.body.id).sort()).toEqual(ids);
    await client.endAsync();
  });
  it('leaves a shared slot alone while no other member of its group is online, then drains it to one', {
    timeout: 60_000,
  }, async () => {
    const url = broker().url;
    const dirs = await fleetDirs();
    const retired = slot('drain-group-gone');
    const member = slot('drain-group-member');
    await registerSlots(url, dirs, [retired, member], workerArgs);
    const client = await testClient(url);
    const results = await collect(client, 'jobs/results/+');
    const ids = ['g1', 'g2', 'g3', 'g4'];
    for (const id of ids) await publishJob(client, { id, steps: ['true'] });
    await waitFor(async () => (await presenceState(url, retired)) === 'offline', 20_000, 250);
    const refused = await runWorkerOnce(['drain', '--url', url, '--id', retired, '--quiet', '1s']);
    expect(refused.code, refused.stderr).toBe(1);
    expect(refused.stderr).toContain('GROUP_UNATTENDED');
    expect(refused.stdout).toBe('');
    // With a member online, the same drain moves what was dealt to the retired slot, and the member runs it all.
    const loop = slotLoop(() => workerArgs(url, dirs, member));
    await waitFor(async () => (await presenceState(url, member)) === 'idle', 20_000, 100);
    const drained = await runWorkerOnce(['drain', '--url', url, '--id', retired, '--quiet', '1s']);
    expect(drained.code, drained.stderr).toBe(0);
    expect(JSON.parse(drained.stdout)).toMatchObject({ mode: 'shared', moved: 2 });
    await waitFor(() => results.length === ids.length, 30_000);
    await loop.stop();
    expect(results.map((r) => r.body.id).sort()).toEqual(ids);
    await client.endAsync();
  });
});
