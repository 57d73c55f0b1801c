import { StringDecoder } from 'node:string_decoder';
import type { Manifest, StepRecord } from '../job/report.js';
import type { JobEvent } from '../job/run-job.js';
import { formatBytes, formatDuration } from '../shared/units.js';

// What a dry run shows on the terminal while it runs: each step's output line by line, prefixed with the step's
// name, then a summary. It goes to stderr, beside the log, so that stdout keeps only the result message.

export interface LiveViewOptions {
  readonly write: (text: string) => void;
  /** ANSI colours (a TTY without NO_COLOR). */
  readonly color: boolean;
}

// A line longer than this is shown in pieces: the view never holds more than this per step.
const MAX_PENDING = 16 * 1024;
const PALETTE = [36, 35, 34, 33, 32, 96, 95, 94];

export class LiveView {
  readonly #write: (text: string) => void;
  readonly #color: boolean;
  readonly #names = new Map<number, string>();
  #decoder = new StringDecoder('utf8');
  #step = -1;
  #pending = '';
  #width = 0;

  constructor(options: LiveViewOptions) {
    this.#write = options.write;
    this.#color = options.color;
  }

  event(event: JobEvent): void {
    if (event.type === 'step-started') {
      this.#flush();
      this.#step = event.step;
      this.#names.set(event.step, event.name);
      this.#width = Math.min(24, Math.max(this.#width, event.name.length));
      this.#decoder = new StringDecoder('utf8');
    } else if (event.type === 'step-ended') {
      this.#pending += this.#decoder.end();
      this.#flush();
    }
  }

  output(step: number, chunk: Buffer): void {
    if (step !== this.#step) return; // steps run one after another: never the case, but never mixed either
    this.#pending += this.#decoder.write(chunk);
    const lines = this.#pending.split('\n');
    this.#pending = lines.pop() ?? '';
    for (const line of lines) this.#line(line);
    while (this.#pending.length > MAX_PENDING) {
      this.#line(this.#pending.slice(0, MAX_PENDING));
      this.#pending = this.#pending.slice(MAX_PENDING);
    }
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

  #line(text: string): void {
    const name = this.#names.get(this.#step) ?? `step ${this.#step}`;
    const prefix = this.#paint(PALETTE[this.#step % PALETTE.length] ?? 36, `${name.padEnd(this.#width)} |`);
    this.#write(`${prefix} ${text}\n`);
  }

  #flush(): void {
    if (this.#pending.length > 0) this.#line(this.#pending);
    this.#pending = '';
  }

  #paint(code: number, text: string): string {
    return this.#color ? `\u001b[${code}m${text}\u001b[0m` : text;
  }
}
