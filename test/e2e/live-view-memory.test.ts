import { spawn } from 'node:child_process';
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { sleep, tempDir, writeTree } from '../helpers/tmp.js';
import { BIN } from '../helpers/worker.js';

// The dry run's live view keeps the worker's memory flat whatever a step prints and however slowly stderr is read
// (`--dry-run 2>&1 | tee run.log` in CI): it drops what the reader cannot take and says so; the log has every byte.

const MiB = 1024 * 1024;

/** The process's peak resident memory so far (VmHWM), or undefined once it is gone. */
async function peakOf(pid: number): Promise<number | undefined> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8').catch(() => undefined);
  const match = status && /^VmHWM:\s+(\d+) kB/m.exec(status);
  return match ? Number(match[1]) * 1024 : undefined;
}

describe('the live view of a step that floods its output', () => {
  it('stays under 100 MiB with stderr in a pipe read slowly, says what it did not show, and the log has it all', {
    timeout: 120_000,
  }, async () => {
    const cwd = await tempDir('mfw-flood-');
    await writeTree(cwd, {
      // ~300 MB of 100-character lines; the log keeps its default cap (100 MiB).
      'jobs/flood/job.json': JSON.stringify({
        steps: ['head -c 300000000 /dev/zero | tr "\\000" x | fold -w 100'],
      }),
    });
    await writeFile(path.join(cwd, 'test-payload.json'), '{"id":"flood"}');
    const child = spawn(process.execPath, [BIN, '--dry-run'], { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    let peak = 0;
    let stderrBytes = 0;
    let tail = '';
    let saidDropped = false;
    const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
    // A slow reader: nothing is read for the first second and a half, then it reads as it comes.
    child.stderr.pause();
    setTimeout(() => {
      child.stderr.on('data', (chunk: Buffer) => {
        stderrBytes += chunk.length;
        tail = (tail + chunk.toString('utf8')).slice(-8192);
        saidDropped ||= tail.includes('not shown: stderr could not keep up');
      });
      child.stderr.resume();
    }, 1500);
    const stdout: Buffer[] = [];
    child.stdout.on('data', (chunk: Buffer) => stdout.push(chunk));
    let done = false;
    void exited.then(() => {
      done = true;
    });
    while (!done) {
      peak = Math.max(peak, (await peakOf(child.pid as number)) ?? 0);
      await sleep(50);
    }
    expect(await exited).toBe(0);
    expect(peak).toBeGreaterThan(0);
    expect(peak).toBeLessThanOrEqual(100 * MiB);
    // The view showed part of it, and said how much it did not.
    const manifest = JSON.parse(await readFile(path.join(cwd, 'jobs/flood/results/result.json'), 'utf8'));
    expect(manifest.steps[0]).toMatchObject({ status: 'success', logTruncated: true });
    expect(manifest.steps[0].logBytes).toBeGreaterThanOrEqual(100 * MiB);
    expect(stderrBytes).toBeLessThan(manifest.steps[0].logBytes);
    expect(saidDropped).toBe(true);
    expect(tail).toContain('summary flood: success');
    expect(JSON.parse(Buffer.concat(stdout).toString())).toMatchObject({ id: 'flood', status: 'success' });
  });
});
