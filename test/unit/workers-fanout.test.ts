import { describe, expect, it } from 'vitest';
import { fanoutLockstep, formatWorkers, type SlotRow } from '../../src/control/workers.js';

// `workers` says when a fan-out's groups would be dealt to in step on Mosquitto (bench/sim: 100 slots with
// --fanout 2, uniform jobs, makespan 1.73× the bound in step against 1.12× with 101 slots).

const row = (id: string, group: number, state: SlotRow['state'] = 'idle'): SlotRow => ({
  id,
  state,
  job: null,
  attempt: null,
  step: null,
  stepName: null,
  forMs: null,
  lastSeen: new Date(0).toISOString(),
  version: null,
  host: null,
  topics: [`$share/mqtt-fs-worker-fanout-${group}/jobs/pending`],
});
const fleet = (size: number, k: number, state?: SlotRow['state']) =>
  Array.from({ length: size }, (_, i) => row(`slot-${i}`, i % k, state));

describe('workers: fan-out groups dealt to in step', () => {
  it('says it for groups whose sizes share a factor, and not for sizes that share none', () => {
    expect(fanoutLockstep(fleet(16, 2))).toContain('groups of 8, 8 online slots');
    expect(fanoutLockstep(fleet(17, 2))).toBeUndefined();
    // Two of three groups in step are enough to pin their copies to fixed pairs.
    expect(fanoutLockstep(fleet(7, 3))).toContain('groups of 3, 2, 2'); // gcd(2, 2) = 2
    expect(fanoutLockstep(fleet(8, 3))).toContain('groups of 3, 3, 2');
    const coprime = [2, 3, 5].flatMap((size, g) =>
      Array.from({ length: size }, (_, i) => row(`g${g}-${i}`, g)),
    );
    expect(fanoutLockstep(coprime)).toBeUndefined();
  });

  it('counts only online slots, and is silent for pull and plain shared topics', () => {
    const gone = fleet(16, 2).map((r, i) => (i === 15 ? { ...r, state: 'offline' as const } : r));
    expect(fanoutLockstep(gone)).toBeUndefined(); // 8 and 7 online
    const pull = fleet(4, 2).map((r) => ({ ...r, topics: ['jobs/pending'] }));
    expect(fanoutLockstep(pull)).toBeUndefined();
    expect(formatWorkers(fleet(4, 2), 0, false)).toContain('Fan-out on jobs/pending: groups of 2, 2');
  });
});
