import type { Manifest, StepRecord } from '../job/report.js';
import type { JobEvent } from '../job/run-job.js';
import { formatBytes, formatDuration } from '../shared/units.js';
import { charBoundary } from '../shared/utf8.js';

// What a dry run shows on the terminal while it runs: each step's output line by line, prefixed with the step's
// name, then a summary. It goes to stderr, beside the log, so that stdout keeps only the result message.

export interface LiveViewOptions {
  readonly write: (text: string | Buffer) => void;
  /** ANSI colours (a TTY without NO_COLOR). */
  readonly color: boolean;
  /** Bytes written but not yet taken by the reader (a pipe to a slow `tee`, a paused terminal). */
  readonly backlog?: () => number;
}

// A line longer than this is shown in pieces: the view never holds more than this per step.
const MAX_PENDING = 16 * 1024;
// Past this much unread output the view drops lines (and says how much) instead of queueing them: the log file has
// every byte, and the worker's memory stays flat however fast a step prints and however slow the reader is.
const MAX_BACKLOG = 1024 * 1024;
const PALETTE = [36, 35, 34, 33, 32, 96, 95, 94];
const NEWLINE = Buffer.from('\n');

export class LiveView {
  readonly #write: (text: string | Buffer) => void;
  readonly #color: boolean;
  readonly #names = new Map<number, string>();
  #step = -1;
  /** The bytes of an unfinished line (never more than MAX_PENDING). */
  #pending: Buffer = Buffer.alloc(0);
  #width = 0;
  readonly #backlog: () => number;
  /** Bytes of the current step not shown because the reader fell behind; shown as one line once it caught up. */
  #dropped = 0;

  constructor(options: LiveViewOptions) {
    this.#write = options.write;
    this.#color = options.color;
    this.#backlog = options.backlog ?? (() => 0);
  }

  event(event: JobEvent): void {
    if (event.type === 'step-started') {
      this.#flush();
      this.#step = event.step;
      this.#names.set(event.step, event.name);
      this.#width = Math.min(24, Math.max(this.#width, event.name.length));
      this.#dropped = 0;
    } else if (event.type === 'step-ended') {
      this.#flush();
      this.#sayDropped();
    }
  }

  output(step: number, chunk: Buffer): void {
    if (step !== this.#step) return; // steps run one after another: never the case, but never mixed either
    if (this.#backlog() > MAX_BACKLOG) {
      // Dropped whole, undecoded: a flood costs the view nothing while the reader catches up.
      if (this.#dropped === 0) this.#pending = Buffer.alloc(0);
      this.#dropped += chunk.length;
      return;
    }
    if (this.#dropped > 0) {
      // Resume at a line's start: the rest of a dropped line is dropped too.
      const newline = chunk.indexOf(10);
      if (newline < 0) {
        this.#dropped += chunk.length;
        return;
      }
      this.#dropped += newline + 1;
      this.#sayDropped();
      chunk = chunk.subarray(newline + 1);
    }
    // Bytes, not strings: lines are cut at newlines (a byte no UTF-8 sequence holds), each gets its prefix, and the
    // chunk goes out in one write. Decoding a flood into strings cost a step printing 100 MB ~30 MB of garbage.
    const data = this.#pending.length > 0 ? Buffer.concat([this.#pending, chunk]) : chunk;
    const prefix = Buffer.from(`${this.#prefix()} `);
    const parts: Buffer[] = [];
    let start = 0;
    for (let newline = data.indexOf(10); newline >= 0; newline = data.indexOf(10, start)) {
      parts.push(prefix, data.subarray(start, newline + 1));
      start = newline + 1;
    }
    let rest = data.subarray(start);
    while (rest.length > MAX_PENDING) {
      const cut = charBoundary(rest, MAX_PENDING);
      parts.push(prefix, rest.subarray(0, cut), NEWLINE);
      rest = rest.subarray(cut);
    }
    // A copy: the rest must not keep the whole chunk alive.
    this.#pending = Buffer.from(rest);
    if (parts.length > 0) this.#write(Buffer.concat(parts));
  }

  summary(manifest: Manifest, resultsDir: string): void {
    this.#flush();
    const status = this.#paint(manifest.status === 'success' ? 32 : 31, manifest.status);
    const lines = [
      `${this.#paint(1, 'summary')} ${manifest.id}: ${status} in ${formatDuration(manifest.durationMs)}`,
    ];
    for (const step of manifest.steps) lines.push(`  ${this.#stepLine(step)}`);
    const artifacts = manifest.artifacts.length;
    const bytes = manifest.artifacts.reduce((sum, a) => sum + a.bytes, 0);
    lines.push(
      `  artifacts: ${artifacts} file${artifacts === 1 ? '' : 's'} (${formatBytes(bytes)}) in ${resultsDir}` +
        (manifest.skipped.length > 0 ? `, ${manifest.skipped.length} skipped` : ''),
    );
    if (manifest.error) lines.push(`  ${this.#paint(31, manifest.error.code)}: ${manifest.error.message}`);
    this.#write(`${lines.join('\n')}\n`);
  }

  #stepLine(step: StepRecord): string {
    const colour = step.status === 'success' ? 32 : step.status === 'skipped' ? 90 : 31;
    const status =
      step.status === 'failed' || step.status === 'timeout'
        ? `${step.status} (exit ${step.exitCode})`
        : step.status;
    const facts = [
      step.durationMs === null ? undefined : formatDuration(step.durationMs),
      step.peakMemoryBytes === null ? undefined : `peak ${formatBytes(step.peakMemoryBytes)}`,
      step.cpuMs === null ? undefined : `cpu ${formatDuration(step.cpuMs)}`,
      step.limitsHit?.length ? `hit ${step.limitsHit.join(',')}` : undefined,
      step.logTruncated ? 'log truncated' : undefined,
    ].filter(Boolean);
    return `${this.#paint(colour, status.padEnd(15))} ${step.name.padEnd(this.#width)}  ${facts.join('  ')}`;
  }

  #prefix(): string {
    const name = this.#names.get(this.#step) ?? `step ${this.#step}`;
    return this.#paint(PALETTE[this.#step % PALETTE.length] ?? 36, `${name.padEnd(this.#width)} |`);
  }

  #line(text: string): void {
    this.#write(`${this.#prefix()} ${text}\n`);
  }

  /** A line of the view's own about the current step (grey), e.g. output that never arrived. */
  note(text: string): void {
    this.#flush();
    this.#line(this.#paint(90, text));
  }

  #sayDropped(): void {
    if (this.#dropped === 0) return;
    this.#line(
      this.#paint(
        90,
        `… ${formatBytes(this.#dropped)} not shown: stderr could not keep up (the step's log has every byte)`,
      ),
    );
    this.#dropped = 0;
  }

  #flush(): void {
    if (this.#pending.length > 0)
      this.#write(Buffer.concat([Buffer.from(`${this.#prefix()} `), this.#pending, NEWLINE]));
    this.#pending = Buffer.alloc(0);
  }

  #paint(code: number, text: string): string {
    return this.#color ? `\u001b[${code}m${text}\u001b[0m` : text;
  }
}
