import { constants } from 'node:fs';
import { type FileHandle, open, unlink } from 'node:fs/promises';
import { Writable } from 'node:stream';
import { formatBytes } from '../shared/units.js';
import type { StreamMasker } from './mask.js';

const CREATE_FLAGS = constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW;

/**
 * Creates `file` anew without following a link: a step can write into `results/`, so a `step_N.log` planted as a
 * symlink there must not redirect the worker's writes outside the job folder. Usually nothing is there (results/
 * was emptied when the job started): one open, and only an existing entry is removed first.
 */
export async function createFresh(file: string, mode = 0o644): Promise<FileHandle> {
  try {
    return await open(file, CREATE_FLAGS, mode);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw error;
  }
  await unlink(file).catch((error: NodeJS.ErrnoException) => {
    if (error.code !== 'ENOENT') throw error;
  });
  return open(file, CREATE_FLAGS, mode);
}

/**
 * A step's log file: every chunk is written as it arrives (a tailing controller sees it at once), nothing is held
 * in memory beyond the chunk in flight, and past `maxBytes` the rest is counted but not written, after one
 * marker line.
 */
export class LogSink extends Writable {
  /** Bytes in the file, the marker line excluded. */
  written = 0;
  /** Bytes the step produced in all. */
  received = 0;
  truncated = false;
  /** The drive filled up: the log was cut back to make room for the marker and result.json. */
  noSpace = false;
  readonly #handle: FileHandle;
  readonly #maxBytes: number;
  readonly #masker: StreamMasker | undefined;
  readonly #tap: ((chunk: Buffer) => void) | undefined;

  /** `tap` sees every chunk the file gets (masked, up to the cap, the marker included): a dry run's live view. */
  constructor(handle: FileHandle, maxBytes: number, masker?: StreamMasker, tap?: (chunk: Buffer) => void) {
    super({ highWaterMark: 1024 * 1024 });
    this.#handle = handle;
    this.#maxBytes = maxBytes;
    this.#masker = masker?.active ? masker : undefined;
    this.#tap = tap;
  }

  static async create(
    file: string,
    maxBytes: number,
    masker?: StreamMasker,
    tap?: (chunk: Buffer) => void,
  ): Promise<LogSink> {
    return new LogSink(await createFresh(file), maxBytes, masker, tap);
  }

  override _writev(chunks: { chunk: Buffer }[], callback: (error?: Error | null) => void): void {
    const masked = chunks.map(({ chunk }) => {
      this.received += chunk.length;
      return this.#masker ? this.#masker.push(chunk) : chunk;
    });
    this.#write(masked, callback);
  }

  /** Writes (masked) chunks up to the cap. */
  #write(chunks: Buffer[], callback: (error?: Error | null) => void): void {
    // Once the drive is full the step's output is counted and dropped, never left to block or SIGPIPE the step.
    if (this.noSpace) {
      callback();
      return;
    }
    const buffers: Buffer[] = [];
    for (const chunk of chunks) {
      const room = this.#maxBytes - this.written;
      if (room <= 0) {
        if (!this.truncated && chunk.length > 0) buffers.push(this.#marker());
        this.truncated ||= chunk.length > 0;
        continue;
      }
      const part = chunk.length > room ? chunk.subarray(0, room) : chunk;
      buffers.push(part);
      this.written += part.length;
      if (part.length < chunk.length) {
        this.truncated = true;
        buffers.push(this.#marker());
      }
    }
    if (buffers.length === 0) {
      callback();
      return;
    }
    if (this.#tap) for (const buffer of buffers) this.#tap(buffer);
    this.#writeAll(buffers).then(
      () => callback(),
      (error: NodeJS.ErrnoException) =>
        error.code === 'ENOSPC' || error.code === 'EDQUOT' ? this.#cutForSpace(callback) : callback(error),
    );
  }

  /**
   * The drive is full: cut the log back by 64 KiB, so that the marker line and result.json still fit, and drop
   * the rest of the step's output (the step keeps running).
   */
  #cutForSpace(callback: (error?: Error | null) => void): void {
    this.noSpace = true;
    this.truncated = true;
    const marker = Buffer.from('\n[mqtt-fs-worker] log cut: the drive is full; the step keeps running\n');
    (async () => {
      const { size } = await this.#handle.stat();
      const keep = Math.max(0, size - 64 * 1024);
      await this.#handle.truncate(keep);
      this.written = keep;
      await this.#handle.write(marker, 0, marker.length, keep).catch(() => {});
    })().then(
      () => callback(),
      () => callback(),
    );
  }

  override _write(chunk: Buffer, _encoding: BufferEncoding, callback: (error?: Error | null) => void): void {
    this._writev([{ chunk }], callback);
  }

  override _final(callback: (error?: Error | null) => void): void {
    const rest = this.#masker?.end();
    const close = (error?: Error | null): void => {
      this.#handle.close().then(() => callback(error), callback);
    };
    if (rest && rest.length > 0) this.#write([rest], close);
    else close();
  }

  override _destroy(error: Error | null, callback: (error?: Error | null) => void): void {
    this.#handle.close().then(
      () => callback(error),
      () => callback(error),
    );
  }

  #marker(): Buffer {
    return Buffer.from(
      `\n[mqtt-fs-worker] log truncated at ${formatBytes(this.#maxBytes)} (--max-log-size); the step keeps running\n`,
    );
  }

  async #writeAll(buffers: Buffer[]): Promise<void> {
    // writev may write less than asked (rarely, on some filesystems); finish the rest.
    let pending = buffers;
    while (pending.length > 0) {
      const { bytesWritten } = await this.#handle.writev(pending);
      let skip = bytesWritten;
      const rest: Buffer[] = [];
      for (const buffer of pending) {
        if (skip >= buffer.length) skip -= buffer.length;
        else {
          rest.push(skip > 0 ? buffer.subarray(skip) : buffer);
          skip = 0;
        }
      }
      pending = rest;
    }
  }
}
