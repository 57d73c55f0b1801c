import { spawn } from 'node:child_process';
import { mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';
import { beforeAll, describe, expect, it } from 'vitest';
import { sleep } from '../helpers/tmp.js';

// The helper writes to the process's own descriptors, so each case runs in a child process (the module, compiled
// here for it) whose stdout is a pipe this test controls.
let BUILT = '';
beforeAll(async () => {
  // Not a per-test temp folder (removed after each test): the module serves every test of the file.
  BUILT = path.join(await mkdtemp(path.join(tmpdir(), 'mfw-stdio-')), 'stdio.mjs');
  await build({
    entryPoints: [fileURLToPath(new URL('../../src/cli/stdio.ts', import.meta.url))],
    bundle: true,
    format: 'esm',
    platform: 'node',
    outfile: BUILT,
    logLevel: 'warning',
  });
});

function child(body: string): ReturnType<typeof spawn> {
  const script = `import { stdioFlushed, writeStdio } from ${JSON.stringify(BUILT)};\n${body}`;
  return spawn(process.execPath, ['--input-type=module', '-e', script], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
}

async function collect(stream: NodeJS.ReadableStream): Promise<string> {
  let text = '';
  for await (const chunk of stream) text += chunk;
  return text;
}

const exitOf = (proc: ReturnType<typeof spawn>) =>
  new Promise<number | null>((resolve) => proc.on('exit', (code) => resolve(code)));

describe('writeStdio', () => {
  it('writes everything in order through a pipe that is full and non-blocking', async () => {
    // Touching process.stdout makes Node switch the pipe to non-blocking; 1 MiB then overflows it (EAGAIN) while
    // this test is not reading yet. The rest and later writes must go through Node's stream, in order.
    const proc = child(`
      process.stdout;
      writeStdio(1, 'a'.repeat(1 << 20));
      writeStdio(1, 'b'.repeat(1000));
      writeStdio(1, 'end\\n');
      // The pipe refused part of it (EAGAIN): the rest waits in Node's stream. Said on stderr, so the test knows
      // it exercised that path and not only the direct write.
      writeStdio(2, process.stdout.writableLength > 0 ? 'through the stream\\n' : 'direct\\n');
      // As the binary ends: process.exit does not wait for a stream, so the CLI waits for it first.
      await stdioFlushed();
      process.exit(0);
    `);
    const stderr = collect(proc.stderr as NodeJS.ReadableStream);
    await sleep(300);
    const stdout = await collect(proc.stdout as NodeJS.ReadableStream);
    expect(await exitOf(proc)).toBe(0);
    expect(await stderr).toBe('through the stream\n');
    expect(stdout.length).toBe((1 << 20) + 1000 + 4);
    expect(stdout).toBe(`${'a'.repeat(1 << 20)}${'b'.repeat(1000)}end\n`);
  });

  it('drops output quietly when the reader has gone (no EPIPE crash)', async () => {
    const proc = child(`
      await new Promise((resolve) => setTimeout(resolve, 200));
      for (let i = 0; i < 100; i++) writeStdio(1, 'x'.repeat(65536));
      writeStdio(2, 'still here\\n');
    `);
    proc.stdout?.destroy();
    const stderr = await collect(proc.stderr as NodeJS.ReadableStream);
    expect(await exitOf(proc)).toBe(0);
    expect(stderr).toBe('still here\n');
  });
});
