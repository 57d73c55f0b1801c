import { spawnSync } from 'node:child_process';
import { readdir, utimes, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import {
  acquireClaim as acquire,
  acquirePublisher,
  type Identity,
  inspectClaim,
  markPublished,
  selfIdentity,
} from '../../src/worker/claim.js';
import { tempDir } from '../helpers/tmp.js';

// Every decision a claim makes, on real files: what a slot that meets a job's folder does with it. Identities are
// built for this process (alive), for a process that has exited (dead, same host) and for another host (alive
// while its heartbeat is younger than the lease).

const LEASE = 60_000;

// Every claim holds its file open: closed after each test, never left to the garbage collector.
const held: { stopHeartbeat(): void }[] = [];
afterEach(() => {
  for (const claim of held.splice(0)) claim.stopHeartbeat();
});
const acquireClaim: typeof acquire = async (...args) => {
  const claim = await acquire(...args);
  if (claim) held.push(claim);
  return claim;
};
const stored = { request: '{"id":"j"}' };

function deadProcess(workerId: string): Identity {
  const exited = spawnSync('true');
  return { ...selfIdentity(workerId, 'test-host', process.pid), pid: exited.pid ?? 999_999, pidStart: 1 };
}

async function resultsDir(): Promise<string> {
  return tempDir('mfw-claim-');
}

async function finish(dir: string, attempt: number, workerId: string): Promise<void> {
  await writeFile(
    path.join(dir, 'result.json'),
    JSON.stringify({ id: 'j', attempt, worker: { id: workerId } }),
  );
}

describe('claim decisions', () => {
  const me = selfIdentity('slot-me', 'test-host', process.pid);
  const other = selfIdentity('slot-other', 'test-host', process.pid); // alive: this very process

  it('free as attempt 1 when nobody claimed the job', async () => {
    expect(await inspectClaim(await resultsDir(), me, LEASE, Date.now())).toEqual({
      kind: 'free',
      attempt: 1,
    });
  });

  it('live while its holder runs (same host: the process is there), and free as the next attempt once it died', async () => {
    const dir = await resultsDir();
    await acquireClaim(dir, other, 1, new Date(), stored);
    expect(await inspectClaim(dir, me, LEASE, Date.now())).toMatchObject({
      kind: 'live',
      claim: { workerId: 'slot-other' },
    });
    const dead = await resultsDir();
    await acquireClaim(dead, deadProcess('slot-dead'), 1, new Date(), stored);
    expect(await inspectClaim(dead, me, LEASE, Date.now())).toMatchObject({
      kind: 'free',
      attempt: 2,
      previous: { workerId: 'slot-dead', attempt: 1, request: stored.request },
    });
  });

  it('another host: live while its heartbeat is within the lease, free once it is older', async () => {
    const dir = await resultsDir();
    const remote = selfIdentity('slot-remote', 'another-host', 1);
    await acquireClaim(dir, remote, 1, new Date(), stored);
    expect((await inspectClaim(dir, me, LEASE, Date.now())).kind).toBe('live');
    const [claimFile] = (await readdir(dir)).filter((name) => name.includes('claim.'));
    const old = new Date(Date.now() - 2 * LEASE);
    await utimes(path.join(dir, claimFile as string), old, old);
    expect(await inspectClaim(dir, me, LEASE, Date.now())).toMatchObject({ kind: 'free', attempt: 2 });
  });

  it('finished and published: nothing to do; a result of another attempt or worker does not count', async () => {
    const dir = await resultsDir();
    await acquireClaim(dir, other, 1, new Date(), stored);
    await finish(dir, 1, 'slot-other');
    await markPublished(dir, 1);
    expect(await inspectClaim(dir, me, LEASE, Date.now())).toMatchObject({
      kind: 'finished',
      published: true,
      ownerAlive: true,
    });
    // A dry run's result (another worker id) never finishes the fleet's attempt.
    await finish(dir, 1, 'dry-run-1');
    expect((await inspectClaim(dir, me, LEASE, Date.now())).kind).toBe('live');
  });

  it('finished but unpublished: its live runner publishes it; when it died, exactly one slot takes its place', async () => {
    const alive = await resultsDir();
    await acquireClaim(alive, other, 1, new Date(), stored);
    await finish(alive, 1, 'slot-other');
    expect(await inspectClaim(alive, me, LEASE, Date.now())).toMatchObject({
      kind: 'finished',
      published: false,
      ownerAlive: true,
    });

    const dir = await resultsDir();
    await acquireClaim(dir, deadProcess('slot-dead'), 1, new Date(), stored);
    await finish(dir, 1, 'slot-dead');
    expect(await inspectClaim(dir, me, LEASE, Date.now())).toMatchObject({
      kind: 'finished',
      published: false,
      ownerAlive: false,
    });
    expect(await acquirePublisher(dir, 1, me, LEASE, Date.now())).toBe(true);
    // A second slot (alive, another id) finds the publisher alive: it leaves the result to it.
    expect(await acquirePublisher(dir, 1, other, LEASE, Date.now())).toBe(false);
  });

  it('two slots claiming the same attempt at once: exactly one wins the race', async () => {
    const dir = await resultsDir();
    const contenders = Array.from({ length: 8 }, (_, i) =>
      selfIdentity(`slot-${i}`, 'test-host', process.pid),
    );
    const claims = await Promise.all(contenders.map((id) => acquireClaim(dir, id, 1, new Date(), stored)));
    expect(claims.filter((claim) => claim !== undefined)).toHaveLength(1);
  });

  it('a runner reads back its claim before publishing: ours, then taken over by a later attempt', async () => {
    const dir = await resultsDir();
    const claim = await acquireClaim(dir, me, 1, new Date(), stored);
    expect(await claim?.standing()).toBe('ours');
    // A take-over after this runner's heartbeat went quiet: attempt 2 stands beside it.
    await acquireClaim(dir, other, 2, new Date(), stored);
    expect(await claim?.standing()).toBe('taken-over');
    claim?.stopHeartbeat();
  });

  it('a claim file replaced by another record (same name, another nonce) is not ours', async () => {
    const dir = await resultsDir();
    const claim = await acquireClaim(dir, me, 1, new Date(), stored);
    await writeFile(path.join(dir, '.mqtt-fs-worker.claim.1'), JSON.stringify({ workerId: 'x', nonce: 'n' }));
    expect(await claim?.standing()).toBe('taken-over');
    claim?.stopHeartbeat();
  });

  it('fences itself once its heartbeat has failed for the fence time, and not while it succeeds', async () => {
    const dir = await resultsDir();
    const healthy = await acquireClaim(dir, me, 1, new Date(), stored);
    let healthyFenced = false;
    const since = Date.now();
    healthy?.startHeartbeat(
      50,
      1000,
      () => {},
      () => {
        healthyFenced = true;
      },
    );
    const failing = await acquireClaim(dir, other, 2, new Date(), stored);
    // An immutable claim file: every touch fails (EPERM), as on a drive that went away.
    spawnSync('chattr', ['+i', path.join(dir, '.mqtt-fs-worker.claim.2')]);
    const errors: string[] = [];
    try {
      const silentFor = await new Promise<number>((resolve) =>
        failing?.startHeartbeat(50, 400, (error) => errors.push(error.message), resolve),
      );
      expect(silentFor).toBeGreaterThanOrEqual(400);
      expect(errors.length).toBeGreaterThan(0);
      // Past the healthy claim's fence time: had its touches not counted, it would have fenced by now.
      await new Promise((resolve) => setTimeout(resolve, Math.max(0, since + 1300 - Date.now())));
      expect(healthyFenced).toBe(false);
    } finally {
      spawnSync('chattr', ['-i', path.join(dir, '.mqtt-fs-worker.claim.2')]);
      healthy?.stopHeartbeat();
      failing?.stopHeartbeat();
    }
  });
});
