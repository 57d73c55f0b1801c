import { wholeCharacters } from '../shared/utf8.js';

// Step output over MQTT (`{logs-topic}/{id}`): what the step's log file gets (masked, within --max-log-size), in
// batches of at most 16 KiB or 100 ms, QoS 0. Each batch says its step and the byte offset of its first byte in
// that step's log, so a reader sees gaps and can fill them from the drive. Best effort by design: a batch the
// connection cannot take at once (more than 1 MiB waiting to be sent) is dropped, never queued, so a slow broker or
// reader never slows a step or grows the worker's memory.

export interface LogChunk {
  readonly id: string;
  readonly workerId: string;
  readonly attempt: number;
  readonly step: number;
  readonly name: string;
  /** Where `text` starts in the step's log, in bytes. */
  readonly offset: number;
  /** How many bytes of the log `text` is (it is decoded as UTF-8, so its length in characters differs). */
  readonly bytes: number;
  readonly text: string;
}

export interface LogStreamInput {
  readonly id: string;
  readonly workerId: string;
  readonly attempt: number;
  /** Sends one batch (QoS 0, fire and forget). */
  readonly send: (payload: string) => void;
  /** Bytes the connection has not sent yet. */
  readonly backlog: () => number;
}

const BATCH_BYTES = 16 * 1024;
const BATCH_MS = 100;
const MAX_BACKLOG = 1024 * 1024;

export class LogStream {
  readonly #input: LogStreamInput;
  #step = -1;
  #name = '';
  /** Bytes of the current step's log accounted for (sent, or dropped as a gap). */
  #offset = 0;
  #pending: Buffer[] = [];
  #pendingBytes = 0;
  #timer: NodeJS.Timeout | undefined;
  /** Batches dropped because the connection was behind: for the log line at the end. */
  dropped = 0;

  constructor(input: LogStreamInput) {
    this.#input = input;
  }

  stepStarted(step: number, name: string): void {
    this.flush(true);
    this.#step = step;
    this.#name = name;
    this.#offset = 0;
  }

  output(step: number, chunk: Buffer): void {
    if (step !== this.#step) return;
    this.#pending.push(chunk);
    this.#pendingBytes += chunk.length;
    if (this.#pendingBytes >= BATCH_BYTES) this.flush(false);
    else this.#timer ??= setTimeout(() => this.flush(false), BATCH_MS);
  }

  /** Sends what is pending; at a step's end (`whole`), also a last partial UTF-8 sequence. */
  flush(whole = true): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    if (this.#pendingBytes === 0) return;
    const data = this.#pending.length === 1 ? (this.#pending[0] as Buffer) : Buffer.concat(this.#pending);
    // A character split across batches would be decoded as two replacement characters: keep its start for later.
    const cut = whole ? data.length : wholeCharacters(data);
    const rest = data.subarray(cut);
    this.#pending = rest.length > 0 ? [Buffer.from(rest)] : [];
    this.#pendingBytes = rest.length;
    const batch = data.subarray(0, cut);
    if (batch.length === 0) return;
    const offset = this.#offset;
    this.#offset += batch.length;
    if (this.#input.backlog() > MAX_BACKLOG) {
      this.dropped++;
      return;
    }
    const chunk: LogChunk = {
      id: this.#input.id,
      workerId: this.#input.workerId,
      attempt: this.#input.attempt,
      step: this.#step,
      name: this.#name,
      offset,
      bytes: batch.length,
      text: batch.toString('utf8'),
    };
    this.#input.send(JSON.stringify(chunk));
  }
}
