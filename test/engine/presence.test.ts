import { mkdir, symlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { drivePresence, mergePresence, PRESENCE_STALE_MS } from '../../src/worker/presence-board.js';
import { tempDir } from '../helpers/tmp.js';

// The slots' presence files on the drive (`{jobs}/.mqtt-fs-worker/slots/{id}.json`), as `workers`, `submit` and
// the dashboard read them where the broker shows no retained presence (RabbitMQ). Written by real slots in
// test/e2e/fleet-brokers.test.ts; here, what a reader makes of files as a crash or a hostile user leaves them.

const at = Date.parse('2026-12-01T12:00:00Z');
const presence = (id: string, state: string, when = at) =>
  JSON.stringify({ id, state, at: new Date(when).toISOString(), host: 'h', topics: ['jobs/pending'] });

async function slotsDir(): Promise<{ jobs: string; slots: string }> {
  const jobs = await tempDir('mfw-presence-');
  const slots = path.join(jobs, '.mqtt-fs-worker', 'slots');
  await mkdir(slots, { recursive: true });
  return { jobs, slots };
}

describe('presence on the drive', () => {
  it('reads a slot as written while it is refreshed, and as offline once its writes stopped', async () => {
    const { jobs, slots } = await slotsDir();
    await writeFile(path.join(slots, 'a.json'), presence('a', 'idle'));
    await writeFile(path.join(slots, 'b.json'), presence('b', 'busy'));
    const fresh = await drivePresence(jobs, at + 1000);
    expect(fresh.map((p) => [p.id, p.state])).toEqual([
      ['a', 'idle'],
      ['b', 'busy'],
    ]);
    // A process that died writes nothing more: past the stale age it reads as offline, last seen when it wrote.
    const later = await drivePresence(jobs, at + PRESENCE_STALE_MS + 1);
    expect(later.map((p) => [p.id, p.state, p.at])).toEqual([
      ['a', 'offline', new Date(at).toISOString()],
      ['b', 'offline', new Date(at).toISOString()],
    ]);
  });

  it('ignores what is not a slot of its own name: links, other ids, junk, names that are not ids', async () => {
    const { jobs, slots } = await slotsDir();
    const outside = path.join(await tempDir(), 'secret.json');
    await writeFile(outside, presence('linked', 'idle'));
    await symlink(outside, path.join(slots, 'linked.json'));
    await writeFile(path.join(slots, 'liar.json'), presence('someone-else', 'idle'));
    await writeFile(path.join(slots, 'junk.json'), '{"not":"presence"}');
    await writeFile(path.join(slots, '.hidden.json'), presence('.hidden', 'idle'));
    await writeFile(path.join(slots, 'ok.json'), presence('ok', 'idle'));
    expect((await drivePresence(jobs, at)).map((p) => p.id)).toEqual(['ok']);
  });

  it('reads nothing, and throws nothing, where the folder is missing or is a link', async () => {
    expect(await drivePresence(path.join(await tempDir(), 'none'), at)).toEqual([]);
    const jobs = await tempDir('mfw-presence-');
    const elsewhere = await tempDir();
    await mkdir(path.join(elsewhere, 'slots'));
    await writeFile(path.join(elsewhere, 'slots', 'x.json'), presence('x', 'idle'));
    await symlink(elsewhere, path.join(jobs, '.mqtt-fs-worker'));
    expect(await drivePresence(jobs, at)).toEqual([]);
  });

  it("takes the broker's word for a slot it shows, and the drive's for the rest", () => {
    const broker = [JSON.parse(presence('a', 'offline'))];
    const drive = [JSON.parse(presence('a', 'idle')), JSON.parse(presence('c', 'idle'))];
    expect(mergePresence(broker, drive).map((p) => [p.id, p.state])).toEqual([
      ['a', 'offline'],
      ['c', 'idle'],
    ]);
  });
});
