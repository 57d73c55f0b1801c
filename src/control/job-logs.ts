import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { open, readdir } from 'node:fs/promises';
import path from 'node:path';
import { type BrokerSettings, connectBroker, disconnect } from '../broker/client.js';
import type { Manifest, ResultPayload } from '../job/report.js';
import { MANIFEST_NAME, RESULTS_DIR, stepLogIndex, stepLogName } from '../job/results-layout.js';
import { jsonObject } from '../shared/json.js';
import type { LogChunk } from '../worker/log-stream.js';

// `logs <id> [--follow]`: a job's step output, from the shared drive where this host reaches the job's folder
// (history first), then, with --follow, live from `{logs-topic}/{id}` until the job's result arrives. A batch that
// did not arrive (QoS 0, or dropped by a busy worker) is filled from the drive where it can be, else marked.

/** Where the output goes: a step begins, bytes of it, a note, the step ends (LiveView takes exactly these). */
export interface LogSink {
  stepStarted(step: number, name: string): void;
  output(step: number, bytes: Buffer): void;
  note(text: string): void;
  stepEnded(): void;
}

export interface JobLogsInput {
  readonly settings: BrokerSettings;
  readonly id: string;
  /** The job's folder when this host can read it. */
  readonly jobDir: string | undefined;
  readonly logsTopic: string;
  readonly statusTopic: string;
  readonly resultsTopic: string;
  readonly follow: boolean;
  readonly sink: LogSink;
  /** Give up following after this long. */
  readonly timeoutMs: number;
}

export type JobLogsOutcome =
  | { readonly kind: 'result'; readonly status: string }
  | { readonly kind: 'history' }
  | { readonly kind: 'timeout' };

/** Prints the job's output; with `follow`, until its result (or `timeoutMs`). */
export async function jobLogs(input: JobLogsInput): Promise<JobLogsOutcome> {
  const printer = new Printer(input);
  // History from the drive, and whether the job is already over (its result.json is the current run's).
  const finished = input.jobDir
    ? await printHistory(input.jobDir, (step, name) => printer.begin(step, name), input.sink, printer.printed)
    : undefined;
  if (!input.follow || finished) {
    printer.end();
    return finished ? { kind: 'result', status: finished.status } : { kind: 'history' };
  }
  return follow(input, printer);
}

/** What has been printed of each step, so that the drive's history and the live batches never overlap. */
class Printer {
  readonly printed = new Map<number, number>();
  readonly #input: JobLogsInput;
  #current = -1;

  constructor(input: JobLogsInput) {
    this.#input = input;
  }

  begin(step: number, name: string): void {
    if (step === this.#current) return;
    this.end();
    this.#current = step;
    this.#input.sink.stepStarted(step, name);
  }

  end(): void {
    if (this.#current >= 0) this.#input.sink.stepEnded();
  }

  async chunk(chunk: LogChunk): Promise<void> {
    const { sink, jobDir } = this.#input;
    this.begin(chunk.step, chunk.name);
    const seen = this.printed.get(chunk.step) ?? 0;
    const end = chunk.offset + chunk.bytes;
    if (end <= seen) return; // already shown from the drive
    if (chunk.offset > seen) {
      // A gap: batches that never came. The drive has them where it is reachable.
      const filled = jobDir ? await readRange(jobDir, chunk.step, seen, chunk.offset) : undefined;
      if (filled) sink.output(chunk.step, filled);
      else
        sink.note(`… ${chunk.offset - seen} bytes of output did not arrive (the log on the drive has them)`);
    }
    const bytes = Buffer.from(chunk.text);
    const skip = Math.max(0, seen - chunk.offset);
    sink.output(chunk.step, skip > 0 ? bytes.subarray(skip) : bytes);
    this.printed.set(chunk.step, end);
  }
}

/** The job's live output over MQTT, until its result, the timeout or a lost connection. */
async function follow(input: JobLogsInput, printer: Printer): Promise<JobLogsOutcome> {
  const client = await connectBroker({
    settings: input.settings,
    clientId: `logs-${randomBytes(6).toString('hex')}`,
    clean: true,
  });
  const topics = {
    logs: `${input.logsTopic}/${input.id}`,
    status: `${input.statusTopic}/${input.id}`,
    result: `${input.resultsTopic}/${input.id}`,
  };
  // Messages are handled one after another: filling a gap from the drive must not let a later batch overtake it.
  let queue = Promise.resolve();
  const inOrder = (work: () => void | Promise<void>): void => {
    queue = queue.then(work).catch(() => {});
  };
  try {
    return await new Promise<JobLogsOutcome>((resolve) => {
      const timer = setTimeout(() => resolve({ kind: 'timeout' }), input.timeoutMs);
      client.on('message', (topic, payload) => {
        const body = jsonObject(payload);
        if (!body || body.id !== input.id) return;
        if (topic === topics.result)
          inOrder(() => {
            clearTimeout(timer);
            printer.end();
            resolve({ kind: 'result', status: String((body as unknown as ResultPayload).status) });
          });
        else if (topic === topics.status && body.event === 'step-started')
          inOrder(() => printer.begin(Number(body.step), String(body.name)));
        else if (topic === topics.logs) inOrder(() => printer.chunk(body as unknown as LogChunk));
      });
      client.on('close', () => {
        clearTimeout(timer);
        resolve({ kind: 'timeout' });
      });
      client.subscribe([topics.logs, topics.status, topics.result], { qos: 1 });
    });
  } finally {
    await disconnect(client);
  }
}

/** Each step log in order; returns the run's result when result.json says the job is over. */
async function printHistory(
  jobDir: string,
  begin: (step: number, name: string) => void,
  sink: LogSink,
  printed: Map<number, number>,
): Promise<Manifest | undefined> {
  const resultsDir = path.join(jobDir, RESULTS_DIR);
  const manifest = await readJson<Manifest>(path.join(resultsDir, MANIFEST_NAME));
  const steps = (await readdir(resultsDir).catch(() => [] as string[]))
    .map(stepLogIndex)
    .filter((n): n is number => n !== undefined)
    .sort((a, b) => a - b);
  for (const step of steps) {
    const bytes = await readRange(jobDir, step, 0, Number.POSITIVE_INFINITY);
    if (!bytes) continue;
    begin(step, manifest?.steps[step]?.name ?? `step ${step}`);
    sink.output(step, bytes);
    printed.set(step, bytes.length);
  }
  // A run starts by emptying results/: a result.json there is the last run's end.
  return manifest;
}

async function readRange(
  jobDir: string,
  step: number,
  from: number,
  to: number,
): Promise<Buffer | undefined> {
  const file = path.join(jobDir, RESULTS_DIR, stepLogName(step));
  if (!existsSync(file)) return undefined;
  const handle = await open(file, 'r').catch(() => undefined);
  if (!handle) return undefined;
  try {
    const size = (await handle.stat()).size;
    const end = Math.min(size, to);
    if (end <= from) return undefined;
    const buffer = Buffer.alloc(end - from);
    await handle.read(buffer, 0, buffer.length, from);
    return buffer;
  } finally {
    await handle.close();
  }
}

async function readJson<T>(file: string): Promise<T | undefined> {
  const handle = await open(file, 'r').catch(() => undefined);
  if (!handle) return undefined;
  try {
    return JSON.parse(await handle.readFile('utf8')) as T;
  } catch {
    return undefined;
  } finally {
    await handle.close();
  }
}
