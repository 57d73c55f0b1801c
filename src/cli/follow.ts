import path from 'node:path';
import { followLog } from '../control/job-status.js';
import { RESULTS_DIR, stepLogName } from '../job/results-layout.js';

// `submit --follow`: the job's status events as they come from the broker, and, where the shared drive is
// mounted here too, each step's log as it grows (the broker carries no step output).

export interface FollowerInput {
  /** The job's folder when this host can read it (asked at each step); undefined: events only. */
  readonly jobDir: () => string | undefined;
  readonly write: (text: string) => void;
}

export class Follower {
  readonly #input: FollowerInput;
  #stopStep: (() => void) | undefined;
  #tailing: Promise<void> = Promise.resolve();
  #queue: Promise<void> = Promise.resolve();
  /** The step whose output comes over MQTT (no drive here), and its lines. */
  #live: { step: number; lines: PrefixedLines } | undefined;

  constructor(input: FollowerInput) {
    this.#input = input;
  }

  /** One status event (`jobs/status/{id}`), shown in order, after the log lines of the step before it. */
  event(event: Record<string, unknown>): void {
    this.#queue = this.#queue.then(() => this.#show(event)).catch(() => {});
  }

  async #show(event: Record<string, unknown>): Promise<void> {
    const write = this.#input.write;
    const step = `step ${String(event.step)}`;
    switch (event.event) {
      case 'claimed':
        write(`claimed by ${String(event.workerId)} (attempt ${String(event.attempt)})\n`);
        return;
      case 'step-started':
        await this.#endStep();
        write(`${step} started: ${String(event.name)}\n`);
        this.#tail(Number(event.step), String(event.name));
        return;
      case 'step-ended':
        await this.#endStep();
        write(`${step} ${String(event.status)} (exit code ${String(event.exitCode)})\n`);
        return;
      case 'done':
        await this.#endStep();
        write(`done: ${String(event.status)} (exit code ${String(event.exitCode)})\n`);
        return;
      default:
        if (typeof event.event === 'string') write(`${event.event}\n`);
    }
  }

  /** A batch of step output from `{logs-topic}/{id}`: shown for a step whose log this host cannot read. */
  chunk(chunk: { step?: unknown; text?: unknown }): void {
    this.#queue = this.#queue
      .then(() => {
        const live = this.#live;
        if (live && chunk.step === live.step && typeof chunk.text === 'string') live.lines.push(chunk.text);
      })
      .catch(() => {});
  }

  /** Stops following; resolves once the last log bytes were shown. */
  async close(): Promise<void> {
    await this.#queue;
    await this.#endStep();
  }

  #tail(step: number, name: string): void {
    const jobDir = this.#input.jobDir();
    const lines = new PrefixedLines(name, this.#input.write);
    if (!jobDir) {
      this.#live = { step, lines };
      return;
    }
    let stop: () => void = () => {};
    const stopped = new Promise<void>((resolve) => {
      stop = resolve;
    });
    this.#stopStep = stop;
    const file = path.join(jobDir, RESULTS_DIR, stepLogName(step));
    this.#tailing = followLog(file, (text) => lines.push(text), stopped).then(() => lines.flush());
  }

  async #endStep(): Promise<void> {
    this.#live?.lines.flush();
    this.#live = undefined;
    this.#stopStep?.();
    this.#stopStep = undefined;
    await this.#tailing.catch(() => {});
  }
}

/** A step's output as `name | line` lines: text comes in pieces, and a line is shown once it is whole (or flushed). */
class PrefixedLines {
  #pending = '';

  constructor(
    readonly name: string,
    readonly write: (text: string) => void,
  ) {}

  push(text: string): void {
    const lines = (this.#pending + text).split('\n');
    this.#pending = lines.pop() ?? '';
    for (const line of lines) this.write(`${this.name} | ${line}\n`);
  }

  flush(): void {
    if (this.#pending) this.write(`${this.name} | ${this.#pending}\n`);
    this.#pending = '';
  }
}
