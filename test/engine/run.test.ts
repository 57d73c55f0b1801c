import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { lstat, readFile, stat, symlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { NO_ACCOUNTING, runStep } from '../../src/step/run-step.js';
import { isAlive, tempDir, waitFor } from '../helpers/tmp.js';

async function setup() {
  const dir = await tempDir();
  const log = path.join(dir, 'step_0.log');
  const base = {
    cwd: dir,
    env: { PATH: process.env.PATH ?? '/usr/bin:/bin' },
    logFile: log,
    maxLogBytes: 1 << 30,
    timeoutMs: undefined,
    killGraceMs: 500,
  };
  return { dir, log, base };
}

/** Live processes whose command line holds `token`. */
function gateProcesses(token: string): number[] {
  return readdirSync('/proc')
    .filter((entry) => /^\d+$/.test(entry))
    .filter((pid) => {
      try {
        return readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(token) && isAlive(Number(pid));
      } catch {
        return false;
      }
    })
    .map(Number);
}

describe('runStep', () => {
  it('runs through sh -c in the workspace and returns the exit code', async () => {
    const { dir, log, base } = await setup();
    const outcome = await runStep({
      ...base,
      command: 'pwd; echo "$GREETING"; exit 3',
      env: { ...base.env, GREETING: 'hello' },
    });
    expect(outcome).toMatchObject({
      exitCode: 3,
      signal: null,
      stoppedFor: null,
      logTruncated: false,
      spawnError: null,
    });
    expect(await readFile(log, 'utf8')).toBe(`${dir}\nhello\n`);
    expect(outcome.logBytes).toBe(dir.length + 7);
  });

  it('keeps stdout and stderr in order in one log', async () => {
    const { log, base } = await setup();
    await runStep({ ...base, command: 'for i in 1 2 3; do echo out$i; echo err$i >&2; done' });
    expect(await readFile(log, 'utf8')).toBe('out1\nerr1\nout2\nerr2\nout3\nerr3\n');
  });

  it('gives steps an empty stdin', async () => {
    const { log, base } = await setup();
    const outcome = await runStep({ ...base, command: 'cat; echo done' });
    expect(outcome.exitCode).toBe(0);
    expect(await readFile(log, 'utf8')).toBe('done\n');
  });

  it('writes a line to the log while the step still runs', async () => {
    const { dir, log, base } = await setup();
    // The step waits for the test to let it go: the first line must be in the log before it can end.
    const gate = path.join(dir, 'go');
    const running = runStep({
      ...base,
      command: `echo first; while [ ! -e ${gate} ]; do sleep 0.02; done; echo second`,
    });
    let ended = false;
    void running.then(() => {
      ended = true;
    });
    await waitFor(async () => (await readFile(log, 'utf8').catch(() => '')) === 'first\n', 15_000, 10);
    expect(ended).toBe(false);
    await writeFile(gate, '');
    const outcome = await running;
    expect(outcome.exitCode).toBe(0);
    expect(await readFile(log, 'utf8')).toBe('first\nsecond\n');
  });

  it('reports a signal as 128 + its number', async () => {
    const { base } = await setup();
    const outcome = await runStep({ ...base, command: 'kill -9 $$' });
    expect(outcome).toMatchObject({ exitCode: 137, signal: 'SIGKILL' });
  });

  it('on timeout, stops the step and its children: SIGTERM, then SIGKILL after the grace', async () => {
    const { dir, base } = await setup();
    const started = Date.now();
    const outcome = await runStep({
      ...base,
      // The parent ignores SIGTERM, so only the SIGKILL after the grace ends it; the child records its pid.
      command: `trap '' TERM; sleep 60 & echo $! > ${dir}/child.pid; wait`,
      timeoutMs: 300,
      killGraceMs: 400,
    });
    const elapsed = Date.now() - started;
    expect(outcome.stoppedFor).toBe('timeout');
    expect(outcome.signal).toBe('SIGKILL');
    expect(elapsed).toBeGreaterThanOrEqual(650);
    expect(elapsed).toBeLessThan(5000);
    const child = Number(await readFile(path.join(dir, 'child.pid'), 'utf8'));
    await waitFor(() => !isAlive(child), 2000);
  });

  it('kills a background process the step left running', async () => {
    const { dir, base } = await setup();
    const outcome = await runStep({
      ...base,
      command: `(sleep 60; echo late > ${dir}/late.txt) & echo $! > ${dir}/bg.pid; exit 0`,
    });
    expect(outcome.exitCode).toBe(0);
    const pid = Number(await readFile(path.join(dir, 'bg.pid'), 'utf8'));
    await waitFor(() => !isAlive(pid), 2000);
  });

  it('without a sandbox, kills setsid and double-forked daemons by their environment tag', async () => {
    const { dir, base } = await setup();
    const outcome = await runStep({
      ...base,
      command: [
        `setsid sh -c 'echo $$ > ${dir}/escaped.pid; exec sleep 300' &`,
        `sh -c "setsid sh -c 'echo \\$\\$ > ${dir}/forked.pid; exec sleep 300' & exit 0" &`,
        `until [ -s ${dir}/escaped.pid ] && [ -s ${dir}/forked.pid ]; do sleep 0.05; done; echo main done`,
      ].join('\n'),
    });
    expect(outcome).toMatchObject({ exitCode: 0, leftoversKilled: 2 });
    for (const name of ['escaped.pid', 'forked.pid']) {
      const pid = Number(await readFile(path.join(dir, name), 'utf8'));
      await waitFor(() => !isAlive(pid), 2000);
    }
  });

  it('does not wait forever for output held open by a process that escaped the group and its tag', async () => {
    const { dir, base } = await setup();
    const outcome = await runStep({
      ...base,
      command: `env -i setsid sh -c 'echo $$ > ${dir}/escaped.pid; sleep 30' & sleep 0.2; echo main done`,
    });
    expect(outcome).toMatchObject({ exitCode: 0, leftoversKilled: 0 });
    const pid = Number(await readFile(path.join(dir, 'escaped.pid'), 'utf8'));
    expect(isAlive(pid)).toBe(true); // what the README and limits.reason warn about
    process.kill(pid, 'SIGKILL');
  });

  it('stops on abort with the abort reason', async () => {
    const { base } = await setup();
    const controller = new AbortController();
    setTimeout(() => controller.abort('cancelled'), 200);
    const outcome = await runStep({ ...base, command: 'sleep 30', signal: controller.signal });
    expect(outcome).toMatchObject({ stoppedFor: 'cancelled', exitCode: 143, signal: 'SIGTERM' });
  });

  it('truncates the log at the cap and marks it, while the step runs to the end', async () => {
    const { dir, log, base } = await setup();
    const outcome = await runStep({
      ...base,
      maxLogBytes: 1000,
      command: `head -c 100000 /dev/zero | tr '\\0' x; echo ran-to-end > ${dir}/end`,
    });
    expect(outcome).toMatchObject({ exitCode: 0, logBytes: 1000, logTruncated: true });
    const text = await readFile(log, 'utf8');
    expect(text.startsWith('x'.repeat(1000))).toBe(true);
    expect(text).toContain('log truncated at 1000 B');
    expect((await stat(path.join(dir, 'end'))).isFile()).toBe(true);
  });

  it('replaces a log planted as a symlink (or a file) without writing through it', async () => {
    const { dir, log, base } = await setup();
    const outside = path.join(dir, 'outside.txt');
    await writeFile(outside, 'keep\n');
    await symlink(outside, log);
    await runStep({ ...base, command: 'echo new' });
    expect((await lstat(log)).isSymbolicLink()).toBe(false);
    expect(await readFile(log, 'utf8')).toBe('new\n');
    expect(await readFile(outside, 'utf8')).toBe('keep\n');
    await runStep({ ...base, command: 'echo newer' });
    expect(await readFile(log, 'utf8')).toBe('newer\n');
  });

  it('fails without leaving the held step behind when its log cannot be created', async () => {
    const { dir, base } = await setup();
    const marker = path.join(dir, 'ran');
    const token = `never-released-${process.pid}-${Date.now()}`;
    await expect(
      runStep({
        ...base,
        logFile: path.join(dir, 'no-such-dir', 'step_0.log'),
        command: `touch ${marker} # ${token}`,
      }),
    ).rejects.toMatchObject({ code: 'ENOENT' });
    // The step's shell was started (the log is opened meanwhile), then killed at its gate: it never ran.
    await waitFor(() => !gateProcesses(token).length, 2000, 10);
    expect(existsSync(marker)).toBe(false);
  });

  it('moves itself in before its command runs where the sandbox lets it (selfJoin files each get 0)', async () => {
    const { dir, log, base } = await setup();
    const files = [path.join(dir, 'memory-tasks'), path.join(dir, 'pids-tasks')];
    const sandbox = { selfJoin: files, signal: async () => {}, close: async () => NO_ACCOUNTING };
    // The command sees what the gate wrote: the moves came first.
    const outcome = await runStep({ ...base, sandbox, command: `cat ${files.join(' ')}` });
    expect(outcome).toMatchObject({ exitCode: 0, spawnError: null });
    expect(await readFile(log, 'utf8')).toBe('0\n0\n');
  });

  it('never runs the command when the step cannot move itself in, and says why', async () => {
    const { dir, log, base } = await setup();
    const marker = path.join(dir, 'ran');
    const sandbox = {
      selfJoin: [path.join(dir, 'no-such-cgroup', 'tasks')],
      signal: async () => {},
      close: async () => NO_ACCOUNTING,
    };
    const outcome = await runStep({ ...base, sandbox, command: `touch ${marker}` });
    expect(outcome.exitCode).toBe(125);
    expect(outcome.spawnError).toMatch(/^cannot move the step into its cgroup: .*no-such-cgroup.*tasks/);
    expect(existsSync(marker)).toBe(false);
    expect(await readFile(log, 'utf8')).toBe('');
  });

  it('reports a step that cannot start', async () => {
    const { dir, base } = await setup();
    const outcome = await runStep({ ...base, cwd: path.join(dir, 'missing'), command: 'true' });
    expect(outcome.exitCode).not.toBe(0);
    expect(outcome.spawnError).toMatch(/missing|ENOENT/);
  });
});
