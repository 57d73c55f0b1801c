import { randomBytes } from 'node:crypto';
import { type BrokerSettings, connectBroker, disconnect } from '../broker/client.js';
import { type Presence, parsePresence } from '../shared/presence.js';
import { formatDuration } from '../shared/units.js';
import { drivePresence, mergePresence } from '../worker/presence-board.js';

// `workers`: the fleet at a glance, from the slots' retained presence messages. The broker hands every retained
// message over right after the subscription; the list is complete once none came for a short while. Slots the
// broker does not show (RabbitMQ sends no retained message to a wildcard) come from their files on the drive.

export interface WorkersInput {
  readonly settings: BrokerSettings;
  /** The presence root, e.g. `jobs/workers`. */
  readonly presenceTopic: string;
  /** Where slots also write their presence (for brokers that send no retained message to a wildcard). */
  readonly jobsDir?: string;
  /** With a signal: keep following changes, calling `onChange` with the whole list, until it aborts. */
  readonly signal?: AbortSignal;
  readonly onChange?: (slots: readonly Presence[]) => void;
}

// Retained messages come in one burst after the SUBACK; this much silence ends it (3 s at most).
const SETTLE_MS = 300;
const SETTLE_MAX_MS = 3000;
const DRIVE_POLL_MS = 5000;

/** The slots' presence, sorted by id; with `signal`, follows changes until it aborts and returns the last list. */
export async function listWorkers(input: WorkersInput): Promise<Presence[]> {
  const client = await connectBroker({
    settings: input.settings,
    clientId: `workers-${randomBytes(6).toString('hex')}`,
    clean: true,
  });
  const slots = new Map<string, Presence>();
  let onDrive: Presence[] = [];
  const sorted = () => mergePresence([...slots.values()], onDrive);
  const readDrive = async () => {
    if (input.jobsDir) onDrive = await drivePresence(input.jobsDir, Date.now());
  };
  let changed: () => void = () => {};
  const prefix = `${input.presenceTopic}/`;
  client.on('message', (topic, payload) => {
    const id = topic.slice(prefix.length);
    const presence = parsePresence(payload);
    if (presence) slots.set(id, presence);
    else slots.delete(id); // cleared (drain) or not a presence message
    changed();
  });
  try {
    const settled = new Promise<void>((resolve) => {
      let timer = setTimeout(resolve, SETTLE_MS);
      const cap = setTimeout(resolve, SETTLE_MAX_MS);
      changed = () => {
        clearTimeout(timer);
        timer = setTimeout(() => {
          clearTimeout(cap);
          resolve();
        }, SETTLE_MS);
      };
    });
    await client.subscribeAsync(`${prefix}+`, { qos: 1 });
    await Promise.all([settled, readDrive()]);
    const signal = input.signal;
    if (!signal) return sorted();
    input.onChange?.(sorted());
    changed = () => input.onChange?.(sorted());
    // The drive has no messages to wait for: it is read again every few seconds.
    let shown = JSON.stringify(onDrive);
    const poll = setInterval(async () => {
      await readDrive();
      const now = JSON.stringify(onDrive);
      if (now !== shown) changed();
      shown = now;
    }, DRIVE_POLL_MS);
    await new Promise<void>((resolve) => {
      if (signal.aborted) resolve();
      else signal.addEventListener('abort', () => resolve(), { once: true });
    }).finally(() => clearInterval(poll));
    return sorted();
  } finally {
    await disconnect(client);
  }
}

export interface SlotRow {
  readonly id: string;
  /** `offline` for longer than the threshold: `abandoned`. */
  readonly state: 'idle' | 'busy' | 'offline' | 'abandoned';
  readonly job: string | null;
  readonly attempt: number | null;
  readonly step: number | null;
  readonly stepName: string | null;
  /** How long the slot has been busy with its job. */
  readonly forMs: number | null;
  /**
   * Online slots: now (the broker would have sent their will otherwise). Offline: the time of their last message,
   * the will, which is written when the slot's last process connected: they were seen at least that recently.
   */
  readonly lastSeen: string;
  readonly version: string | null;
  readonly host: string | null;
  /** The subscriptions (pools) the slot takes jobs from; null where its presence does not say. */
  readonly topics: readonly string[] | null;
}

/** What `workers` shows of each slot at `now`. */
export function slotRows(slots: readonly Presence[], now: number, abandonedAfterMs: number): SlotRow[] {
  return slots.map((slot) => {
    const seen = Date.parse(slot.at);
    const since = (iso: string | undefined) => (iso ? Math.max(0, now - Date.parse(iso)) : null);
    const abandoned = slot.state === 'offline' && now - seen > abandonedAfterMs;
    return {
      id: slot.id,
      state: abandoned ? 'abandoned' : slot.state,
      job: slot.state === 'busy' ? (slot.job ?? null) : null,
      attempt: slot.state === 'busy' ? (slot.attempt ?? null) : null,
      step: slot.state === 'busy' ? (slot.step ?? null) : null,
      stepName: slot.state === 'busy' ? (slot.stepName ?? null) : null,
      forMs: slot.state === 'busy' ? since(slot.jobStartedAt) : null,
      lastSeen: slot.state === 'offline' ? slot.at : new Date(now).toISOString(),
      version: slot.version ?? null,
      host: slot.host ?? null,
      topics: slot.topics ?? null,
    };
  });
}

/** The table `workers` prints on a terminal, and what to run for abandoned slots. */
export function formatWorkers(rows: readonly SlotRow[], now: number, color: boolean): string {
  if (rows.length === 0) return 'no slots have announced themselves on this broker or in --jobs-dir\n';
  const paint = (code: number, text: string) => (color ? `\u001b[${code}m${text}\u001b[0m` : text);
  const colours: Record<SlotRow['state'], number> = { idle: 32, busy: 33, offline: 90, abandoned: 31 };
  const header = ['SLOT', 'STATE', 'JOB', 'STEP', 'FOR', 'LAST SEEN', 'VERSION', 'HOST', 'TOPICS'];
  const cells = rows.map((row) => [
    row.id,
    row.state,
    row.job ?? '-',
    row.step === null ? '-' : `${row.step}${row.stepName ? ` ${row.stepName}` : ''}`,
    row.forMs === null ? '-' : formatDuration(row.forMs),
    row.state === 'idle' || row.state === 'busy'
      ? 'now'
      : `${formatDuration(Math.max(0, now - Date.parse(row.lastSeen)))} ago`,
    row.version ?? '-',
    row.host ?? '-',
    row.topics?.join(',') ?? '-',
  ]);
  const widths = header.map((title, column) =>
    Math.max(title.length, ...cells.map((c) => (c[column] ?? '').length)),
  );
  const line = (values: string[], state?: SlotRow['state']) =>
    values
      .map((value, column) => {
        const padded = value.padEnd(widths[column] ?? 0);
        return column === 1 && state ? paint(colours[state], padded) : padded;
      })
      .join('  ')
      .trimEnd();
  const lines = [paint(1, line(header)), ...cells.map((c, i) => line(c, rows[i]?.state))];
  const abandoned = rows.filter((row) => row.state === 'abandoned');
  if (abandoned.length > 0) {
    lines.push(
      '',
      'Likely abandoned (offline longer than --abandoned-after). To retire one (ends its session and',
    );
    lines.push('moves anything queued in it back to the group, then removes it from this list):');
    for (const row of abandoned) lines.push(`  mqtt-fs-worker drain --id ${row.id}`);
  }
  const lockstep = fanoutLockstep(rows);
  if (lockstep) lines.push('', lockstep);
  return `${lines.join('\n')}\n`;
}

const FANOUT_GROUP = /^\$share\/mqtt-fs-worker-fanout-(\d+)\/(.+)$/;
const gcd = (a: number, b: number): number => (b === 0 ? a : gcd(b, a % b));

/**
 * Mosquitto deals a shared subscription's messages to its members in turn, each group on its own. Groups of sizes
 * with a common factor turn in step: with 8 and 8, a request's two copies always reach the same two slots (the
 * fan-out becomes fixed pairs, each a `$share` of two). Sizes with no common factor (8 and 9) pair every slot with
 * every other group's slots in turn. Said where the online slots of a fan-out topic make such groups.
 */
export function fanoutLockstep(rows: readonly SlotRow[]): string | undefined {
  const groups = new Map<string, Map<string, number>>();
  for (const row of rows) {
    if (row.state !== 'idle' && row.state !== 'busy') continue;
    for (const topic of row.topics ?? []) {
      const [, group, filter] = FANOUT_GROUP.exec(topic) ?? [];
      if (group === undefined || filter === undefined) continue;
      const sizes = groups.get(filter) ?? new Map<string, number>();
      sizes.set(group, (sizes.get(group) ?? 0) + 1);
      groups.set(filter, sizes);
    }
  }
  for (const [filter, sizes] of groups) {
    const counts = [...sizes.values()];
    // Any two groups in step make their copies land on fixed pairs, whatever the other groups do.
    if (!counts.some((a, i) => counts.slice(i + 1).some((b) => gcd(a, b) > 1))) continue;
    return (
      `Fan-out on ${filter}: groups of ${counts.join(', ')} online slots. On Mosquitto, groups whose sizes share a ` +
      'factor are dealt to in step, so each request reaches the same slots every time; sizes with no common ' +
      'factor (with --fanout 2: an odd number of slots) spread them.'
    );
  }
  return undefined;
}
