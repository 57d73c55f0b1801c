import { execFileSync } from 'node:child_process';
import { appendFile, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { freshBrokerPerTest } from '../helpers/mosquitto.js';
import { tempDir, waitFor, writeTree } from '../helpers/tmp.js';
import {
  BIN,
  fleetDirs,
  pullArgs,
  registerSlots,
  runWorkerOnce,
  slot as slotId,
  startWorker,
} from '../helpers/worker.js';

// What an operator and a job author see: live dry runs on a terminal and in a pipe, --watch, `workers`,
// `status` and `submit --follow`, against real processes, a real pseudo-terminal (script(1)) and a real broker.

const ESC = '\u001b[';

/** Runs the CLI inside a pseudo-terminal (script(1)); returns what the terminal showed. */
function inTerminal(args: string[], cwd: string, env: Record<string, string> = {}): string {
  const command = [process.execPath, BIN, ...args].map((a) => `'${a.replaceAll("'", `'\\''`)}'`).join(' ');
  return execFileSync('script', ['-qec', command, '/dev/null'], {
    cwd,
    env: { PATH: process.env.PATH ?? '/usr/bin:/bin', TERM: 'xterm', ...env },
    encoding: 'utf8',
  });
}

async function dryRunFolder(steps: unknown[]): Promise<{ dir: string; jobs: string; workspaces: string }> {
  const dir = await tempDir('mfw-vis-');
  await writeTree(dir, {
    'jobs/demo/job.json': JSON.stringify({ steps }),
    'jobs/demo/input.txt': 'one\n',
    'test-payload.json': '{"id":"demo"}',
    'workspaces/': null,
  });
  return { dir, jobs: path.join(dir, 'jobs'), workspaces: path.join(dir, 'workspaces') };
}

const dryArgs = (f: { jobs: string; workspaces: string }, extra: string[] = []) => [
  '--dry-run',
  '--jobs-dir',
  f.jobs,
  '--workspaces-dir',
  f.workspaces,
  '--limits',
  'off',
  ...extra,
];

describe('live dry runs', () => {
  const steps = [
    { name: 'greet', run: 'echo hello; printf "no newline"' },
    { name: 'count', run: 'wc -l < input.txt; echo to-stderr >&2' },
  ];

  it('on a terminal: prefixed, coloured step output as it comes, then a summary, then the result', async () => {
    const f = await dryRunFolder(steps);
    const shown = inTerminal(dryArgs(f), f.dir).replaceAll('\r\n', '\n');
    expect(shown).toMatch(
      new RegExp(`${ESC.replace('[', '\\[')}\\d+mgreet \\|${ESC.replace('[', '\\[')}0m hello\n`),
    );
    expect(shown).toContain('no newline\n'); // a last line without a newline is shown when the step ends
    expect(shown).toMatch(/count \|\S* 1\n/);
    expect(shown).toMatch(/count \|\S* to-stderr\n/);
    expect(shown).toMatch(/summary\S* demo: \S*success/);
    expect(shown).toMatch(/success\s*\S*\s+greet/);
    // The result message comes last, on its own line.
    expect(shown.trimEnd().split('\n').at(-1)).toMatch(/^\{"id":"demo","status":"success"/);
  });

  it('in a pipe: plain lines on stderr, only the result message on stdout; --quiet shows neither', async () => {
    const f = await dryRunFolder(steps);
    const run = await runWorkerOnce(dryArgs(f), {}, f.dir);
    expect(run.code).toBe(0);
    expect(run.stdout.trim().split('\n')).toHaveLength(1);
    expect(JSON.parse(run.stdout)).toMatchObject({ id: 'demo', status: 'success' });
    expect(run.stderr).not.toContain(ESC);
    expect(run.stderr).toContain('greet | hello\n');
    expect(run.stderr).toContain('count | to-stderr\n');
    expect(run.stderr).toMatch(/summary demo: success in/);
    expect(run.stderr).toMatch(/artifacts: 0 files \(0 B\) in jobs\/demo\/results/);
    const quiet = await runWorkerOnce(dryArgs(f, ['--quiet']), {}, f.dir);
    expect(quiet.code).toBe(0);
    expect(quiet.stderr).not.toContain('greet | hello');
    expect(quiet.stderr).not.toContain('summary');
    expect(quiet.stderr).toContain('step 0 started: greet'); // the log stays
    expect(JSON.parse(quiet.stdout)).toMatchObject({ id: 'demo', status: 'success' });
  });

  it('shows a failed step and masked secrets as the log has them', async () => {
    const f = await dryRunFolder([{ name: 'leak', run: 'echo "token is $API_TOKEN"; exit 3' }]);
    const run = await runWorkerOnce(dryArgs(f), { API_TOKEN: 'sup3r-s3cret' }, f.dir);
    expect(run.code).toBe(1);
    expect(run.stderr).toContain('leak | token is ***\n');
    expect(run.stderr).not.toContain('sup3r-s3cret');
    expect(run.stderr).toMatch(/failed \(exit 3\)\s+leak/);
  });
});

describe('--dry-run --watch', () => {
  it('runs again after an edit of job.json and of an input, ignores results/, stops a long step for a change', {
    timeout: 60_000,
  }, async () => {
    const f = await dryRunFolder([{ name: 'read', run: 'cat input.txt' }]);
    const watcher = startWorker(dryArgs(f, ['--watch']), {}, f.dir);
    let stdout = '';
    watcher.child.stdout?.on('data', (chunk: Buffer) => {
      stdout += chunk.toString();
    });
    const runs = () => resultLines(stdout);
    await waitFor(() => runs().length === 1, 15_000);
    await watcher.sawLog('watching for changes');

    // An input changes: a second run, which reads the new content.
    await writeFile(path.join(f.jobs, 'demo/input.txt'), 'two\n');
    await waitFor(() => runs().length === 2, 15_000);
    await watcher.sawLog('read | two');

    // Writes into results/ (the job's own output) start nothing: the run that follows names the input that
    // changed after them, and no run names results/.
    await appendFile(path.join(f.jobs, 'demo/results/extra.txt'), 'x');
    await writeFile(path.join(f.jobs, 'demo/input.txt'), 'three\n');
    await waitFor(() => runs().length === 3, 15_000);
    await watcher.sawLog('read | three');
    const reruns = watcher.stderrNow().match(/^.* changed: running the job again$/gm) ?? [];
    expect(reruns).toHaveLength(2);
    expect(reruns.every((line) => line.includes('input.txt changed'))).toBe(true);

    // job.json changes to a long step; a change while it runs stops it and runs again.
    await writeFile(
      path.join(f.jobs, 'demo/job.json'),
      JSON.stringify({ steps: [{ name: 'long', run: 'echo started-long; sleep 300' }] }),
    );
    await watcher.sawLog('long | started-long');
    await writeFile(path.join(f.jobs, 'demo/job.json'), JSON.stringify({ steps: ['echo after-edit'] }));
    await watcher.sawLog('a change came while the job ran; it was stopped, running it again');
    await waitFor(() => runs().length === 4, 15_000);
    expect(runs().at(-1)).toMatchObject({ status: 'success' });
    expect(await readFile(path.join(f.jobs, 'demo/results/step_0.log'), 'utf8')).toBe('after-edit\n');

    // Ctrl-C: ends with the last run's exit code.
    watcher.child.kill('SIGINT');
    const exit = await watcher.exited;
    expect(exit.code).toBe(0);
    expect(exit.stderr).not.toMatch(/\n\s+at /);
  });
});

function resultLines(stdout: string): Record<string, unknown>[] {
  return stdout
    .split('\n')
    .filter((line) => line.startsWith('{'))
    .map((line) => JSON.parse(line) as Record<string, unknown>);
}

describe('the fleet and one job at a glance', () => {
  const { broker } = freshBrokerPerTest();

  it('workers --watch prints the whole list again at each change, one JSON line each in a pipe, until Ctrl-C', {
    timeout: 60_000,
  }, async () => {
    const dirs = await fleetDirs();
    const url = broker().url;
    const watcher = startWorker(['workers', '--url', url, '--json', '--watch']);
    let stdout = '';
    watcher.child.stdout?.on('data', (chunk: Buffer) => {
      stdout += chunk.toString();
    });
    const lists = () =>
      stdout
        .split('\n')
        .filter((line) => line.startsWith('['))
        .map((line) => JSON.parse(line) as { id: string; state: string }[]);
    await waitFor(() => lists().length >= 1, 10_000); // the first list: nobody yet
    expect(lists()[0]).toEqual([]);
    const id = slotId('vis-watch');
    const slot = startWorker(pullArgs(url, dirs, id, ['--idle-timeout', '60s']));
    await waitFor(
      () => lists().some((list) => list.some((row) => row.id === id && row.state === 'idle')),
      15_000,
    );
    slot.child.kill('SIGTERM');
    await slot.exited;
    watcher.child.kill('SIGINT');
    const exit = await watcher.exited;
    expect(exit.code, exit.stderr).toBe(0);
    expect(exit.stdout).not.toContain('\u001b[');
  });

  it('workers lists a busy, an idle and a gone slot; status and submit --follow show a running job', {
    timeout: 90_000,
  }, async () => {
    const dirs = await fleetDirs();
    const release = path.join(dirs.jobs, 'release');
    await writeTree(dirs.jobs, {
      'slow/job.json': JSON.stringify({
        steps: [
          { name: 'warm-up', run: 'echo warming' },
          { name: 'wait', run: `echo waiting; while [ ! -e ${release} ]; do sleep 0.1; done; echo released` },
        ],
      }),
    });
    const [busy, idle, gone] = [slotId('vis-busy'), slotId('vis-idle'), slotId('vis-gone')];
    const url = broker().url;
    // Sessions first (pull dispatch: a slot gets the requests published while its session exists).
    await registerSlots(url, dirs, [busy, idle]);
    // The gone slot: a clean session has no will delay, so the broker says offline as soon as it is killed.
    const goneWorker = startWorker(pullArgs(url, dirs, gone, ['--clean', '--idle-timeout', '60s']));
    await goneWorker.sawLog('waiting for one job');
    goneWorker.child.kill('SIGKILL');
    await goneWorker.exited;

    const busyWorker = startWorker(pullArgs(url, dirs, busy, ['--idle-timeout', '60s']));
    await busyWorker.sawLog('waiting for one job');
    const follow = startWorker([
      'submit',
      'slow',
      '--follow',
      '--url',
      url,
      '--jobs-dir',
      dirs.jobs,
      '--timeout',
      '60s',
    ]);
    await busyWorker.sawLog('step 1 started: wait');
    const idleWorker = startWorker(pullArgs(url, dirs, idle, ['--idle-timeout', '60s']));
    await idleWorker.sawLog('waiting for one job');

    const listed = await runWorkerOnce(['workers', '--url', url, '--json', '--abandoned-after', '1h']);
    expect(listed.code, listed.stderr).toBe(0);
    const rows = JSON.parse(listed.stdout) as Record<string, unknown>[];
    const row = (id: string) => rows.find((r) => r.id === id);
    expect(row(busy)).toMatchObject({ state: 'busy', job: 'slow', attempt: 1, step: 1, stepName: 'wait' });
    expect(row(busy)?.version).toEqual(expect.any(String));
    expect(row(busy)?.host).toEqual(expect.any(String));
    expect(row(idle)).toMatchObject({ state: 'idle', job: null });
    expect(row(gone)).toMatchObject({ state: 'offline' });
    // Offline longer than the threshold: abandoned, with the command that retires it.
    const table = inTerminal(['workers', '--url', url, '--abandoned-after', '1ms'], dirs.jobs);
    expect(table).toContain(`${ESC}1mSLOT`);
    expect(table).toMatch(new RegExp(`${gone}\\s+\\u001b\\[31mabandoned`));
    expect(table).toContain(`mqtt-fs-worker drain --id ${gone}`);
    const plain = await runWorkerOnce(['workers', '--url', url]);
    expect(plain.stdout).not.toContain(ESC);
    expect(plain.stdout).toMatch(new RegExp(`${busy}\\s+busy\\s+slow\\s+1 wait`));

    // One job at a glance, while it runs.
    const status = await runWorkerOnce(['status', 'slow', '--jobs-dir', dirs.jobs, '--json']);
    expect(status.code, status.stderr).toBe(0);
    expect(JSON.parse(status.stdout)).toMatchObject({
      id: 'slow',
      state: 'running',
      claim: { workerId: busy, attempt: 1 },
      step: { index: 1, name: 'wait', log: 'step_1.log', tail: ['waiting'] },
      result: null,
    });
    const human = await runWorkerOnce(['status', 'slow', '--jobs-dir', dirs.jobs]);
    expect(human.stdout).toContain(`job slow: running (attempt 1, slot ${busy}`);
    expect(human.stdout).toContain('  | waiting');

    await writeFile(release, '');
    const followed = await follow.exited;
    expect(followed.code, followed.stderr).toBe(0);
    expect(JSON.parse(followed.stdout)).toMatchObject({ id: 'slow', status: 'success' });
    const progress = followed.stderr.slice(followed.stderr.indexOf('claimed by'));
    const order = [
      `claimed by ${busy} (attempt 1)`,
      'step 0 started: warm-up',
      'warm-up | warming',
      'step 0 success (exit code 0)',
      'step 1 started: wait',
      'wait | waiting',
      'wait | released',
      'step 1 success (exit code 0)',
      'done: success (exit code 0)',
    ];
    let at = -1;
    for (const line of order) {
      const next = progress.indexOf(line, at + 1);
      expect(next, `${line} after position ${at} in:\n${progress}`).toBeGreaterThan(at);
      at = next;
    }
    expect((await busyWorker.exited).code).toBe(0);
    const finished = await runWorkerOnce(['status', 'slow', '--jobs-dir', dirs.jobs, '--json']);
    expect(JSON.parse(finished.stdout)).toMatchObject({
      state: 'finished',
      result: { status: 'success', published: true },
    });
    expect((await runWorkerOnce(['status', 'nothing-here', '--jobs-dir', dirs.jobs])).code).toBe(1);

    // Retiring the gone slot removes it from the list.
    const drained = await runWorkerOnce(['drain', '--url', url, '--id', gone, '--topic', 'jobs/pending']);
    expect(drained.code, drained.stderr).toBe(0);
    const after = JSON.parse((await runWorkerOnce(['workers', '--url', url, '--json'])).stdout) as {
      id: string;
    }[];
    expect(after.map((r) => r.id)).not.toContain(gone);
    idleWorker.child.kill('SIGTERM');
    await idleWorker.exited;
  });
});
