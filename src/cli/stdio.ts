import { writeSync } from 'node:fs';

// The CLI writes its output and log lines straight to descriptors 1 and 2. `process.stdout` and `process.stderr`
// are built on first use, and on a pipe (a container's log, a script reading `--version`) that loads Node's socket
// and stream modules: ~8 ms, more than the rest of `--version`. Everything the CLI prints goes through here, so
// lines keep their order whichever way they leave.

export type StdioFd = 1 | 2;

// Descriptors that refused a write with EAGAIN: they were left non-blocking by whoever opened them (a parent
// process sharing its own pipe). Node's stream waits for room, so from then on everything for them goes through
// it, in order.
const throughStream = new Set<StdioFd>();

function streamFor(fd: StdioFd): NodeJS.WriteStream {
  return fd === 1 ? process.stdout : process.stderr;
}

/**
 * Writes `text` to stdout (1) or stderr (2). A reader that went away (EPIPE) or a closed descriptor loses the text,
 * as it would have anyway, without an error event that would end the process.
 */
export function writeStdio(fd: StdioFd, text: string | Buffer): void {
  if (throughStream.has(fd)) {
    streamFor(fd).write(text);
    return;
  }
  let rest = typeof text === 'string' ? Buffer.from(text) : text;
  while (rest.length > 0) {
    try {
      rest = rest.subarray(writeSync(fd, rest));
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'EAGAIN') {
        throughStream.add(fd);
        streamFor(fd).on('error', () => {}); // as below: a reader that went away loses the text
        streamFor(fd).write(rest);
      }
      return;
    }
  }
}

/** Bytes handed to a descriptor but not written yet (queued in Node's stream after EAGAIN): a slow reader's backlog. */
export function backlog(fd: StdioFd): number {
  return throughStream.has(fd) ? streamFor(fd).writableLength : 0;
}

/**
 * Resolves once everything handed to Node's streams (after EAGAIN, above) has been written: the binary ends the
 * process with process.exit, which does not wait for them. Immediate when no stream took over.
 */
export async function stdioFlushed(): Promise<void> {
  await Promise.all(
    [...throughStream].map(async (fd) => {
      const stream = streamFor(fd);
      while (stream.writableLength > 0 && !stream.destroyed) {
        await new Promise((resolve) => {
          stream.once('drain', resolve);
          stream.once('close', resolve);
        });
      }
    }),
  );
}
