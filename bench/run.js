#!/usr/bin/env node
// Benchmarks of the worker's hot paths against their anchors, side by side in one run. Prints a table; it is a
// measurement, not a test (nothing fails on speed). `--quick` runs a small version so CI keeps it working.
//
//   node bench/run.js [--quick] [--runs N] [--only staging,log,...]
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, tmpdir, totalmem } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('..', import.meta.url));
const bin = path.join(root, 'bin', 'mqtt-fs-worker.js');
const args = process.argv.slice(2);
const quick = args.includes('--quick');
const runsArg = args.indexOf('--runs');
const runs = runsArg >= 0 ? Number(args[runsArg + 1]) : quick ? 1 : 5;
const onlyArg = args.indexOf('--only');
const only = onlyArg >= 0 ? new Set(args[onlyArg + 1].split(',')) : undefined;
const scale = quick
  ? { files: 200, fileKb: 100, bigMb: 16, logMb: 20, watchFiles: 2000 }
  : { files: 2000, fileKb: 100, bigMb: 256, logMb: 300, watchFiles: 20000 };

const work = mkdtempSync(path.join(tmpdir(), 'mfw-bench-'));
process.on('exit', () => rmSync(work, { recursive: true, force: true }));

const rows = [];
const stats = (values) => {
  const sorted = [...values].sort((a, b) => a - b);
  return { min: sorted[0], median: sorted[Math.floor(sorted.length / 2)], max: sorted.at(-1) };
};
const time = (fn) => {
  const started = process.hrtime.bigint();
  fn();
  return Number(process.hrtime.bigint() - started) / 1e6;
};
const dropCaches = () => spawnSync('sh', ['-c', 'sync']);

/** Runs the CLI with `args` in `cwd`; returns wall ms and the worker's peak RSS (KiB, from GNU time). */
function worker(cliArgs, cwd) {
  const started = process.hrtime.bigint();
  const result = spawnSync('/usr/bin/time', ['-f', '%M', process.execPath, bin, ...cliArgs], {
    cwd,
    encoding: 'utf8',
  });
  const ms = Number(process.hrtime.bigint() - started) / 1e6;
  if (result.status !== 0) throw new Error(`worker failed (${result.status}): ${result.stderr}`);
  const rssKb = Number(result.stderr.trim().split('\n').at(-1));
  return { ms, rssKb, stdout: result.stdout };
}

function row(name, anchorName, anchor, ours, extra = '') {
  rows.push({ name, anchorName, anchor: stats(anchor), ours: stats(ours), extra });
}

function want(name) {
  return !only || only.has(name);
}

// --- staging: N files of 100 KB plus one big file, `cp -a` against the worker's stage phase -------------------
if (want('staging')) {
  const src = path.join(work, 'stage-src');
  mkdirSync(path.join(src, 'data'), { recursive: true });
  const chunk = Buffer.alloc(scale.fileKb * 1024, 'a');
  for (let i = 0; i < scale.files; i++) writeFileSync(path.join(src, 'data', `f${i}.bin`), chunk);
  execFileSync(
    'dd',
    ['if=/dev/urandom', `of=${path.join(src, 'big.bin')}`, 'bs=1M', `count=${scale.bigMb}`],
    { stdio: 'ignore' },
  );
  writeFileSync(path.join(src, 'job.json'), JSON.stringify({ steps: ['true'] }));
  const { stageJob } = await import(path.join(root, 'dist/stage.js'));
  const cp = [];
  const ours = [];
  for (let i = 0; i < runs; i++) {
    const a = path.join(work, `cp-${i}`);
    dropCaches();
    cp.push(time(() => execFileSync('cp', ['-a', src, a])));
    const b = path.join(work, `stage-${i}`);
    mkdirSync(b);
    dropCaches();
    const started = process.hrtime.bigint();
    await stageJob(src, b);
    ours.push(Number(process.hrtime.bigint() - started) / 1e6);
    rmSync(a, { recursive: true, force: true });
    rmSync(b, { recursive: true, force: true });
  }
  row(`staging ${scale.files} x ${scale.fileKb} KB + ${scale.bigMb} MB`, 'cp -a', cp, ours);
  rmSync(src, { recursive: true, force: true });
}

// --- log streaming: a step printing N MB, against the same command redirected to a file ------------------------
if (want('log')) {
  const cwd = path.join(work, 'log');
  mkdirSync(cwd);
  const command = `head -c ${scale.logMb}M /dev/zero | tr '\\0' 'x'`;
  writeFileSync(path.join(cwd, 'test-payload.json'), JSON.stringify({ id: 'log', steps: [command] }));
  const redirect = [];
  const ours = [];
  let rss = 0;
  for (let i = 0; i < runs; i++) {
    redirect.push(time(() => execFileSync('sh', ['-c', `${command} > ${path.join(cwd, 'redirect.log')}`])));
    const started = process.hrtime.bigint();
    const result = worker(['--dry-run', '--max-log-size', '1G'], cwd);
    const manifest = JSON.parse(result.stdout);
    if (manifest.status !== 'success') throw new Error('log job failed');
    // The step's own time, measured by the worker, against the redirect; the process total is reported below.
    ours.push(Number(process.hrtime.bigint() - started) / 1e6);
    rss = Math.max(rss, result.rssKb);
  }
  row(
    `step printing ${scale.logMb} MB (whole dry run)`,
    'sh -c "cmd > file"',
    redirect,
    ours,
    `worker peak RSS ${(rss / 1024).toFixed(0)} MiB`,
  );
}

// --- first line visible in step_0.log ---------------------------------------------------------------------------
if (want('first-line')) {
  const cwd = path.join(work, 'first');
  mkdirSync(cwd);
  const { runStep } = await import(path.join(root, 'dist/run.js'));
  const latencies = [];
  for (let i = 0; i < Math.max(runs, 5); i++) {
    const log = path.join(cwd, `step_${i}.log`);
    const { readFile } = await import('node:fs/promises');
    // The step prints its own clock (ms since epoch) and sleeps; we poll the log until that line appears.
    const running = runStep({
      command: 'date +%s%3N; sleep 1',
      cwd,
      env: { PATH: process.env.PATH },
      logFile: log,
      maxLogBytes: 1e9,
      timeoutMs: undefined,
      killGraceMs: 1000,
    });
    let seen;
    for (;;) {
      const text = await readFile(log, 'utf8').catch(() => '');
      if (text.includes('\n')) {
        seen = Date.now() - Number(text.trim());
        break;
      }
      await new Promise((r) => setTimeout(r, 2));
    }
    latencies.push(seen);
    await running;
  }
  row('first line of a step visible in its log', '-', [0], latencies, 'ms after the step printed it');
}

// --- start-up: --version and a trivial dry run, against `node -e 0` ---------------------------------------------
if (want('startup')) {
  const cwd = path.join(work, 'startup');
  mkdirSync(cwd);
  writeFileSync(path.join(cwd, 'test-payload.json'), JSON.stringify({ id: 'trivial', steps: ['true'] }));
  const bare = [];
  const version = [];
  const dry = [];
  for (let i = 0; i < Math.max(runs, 5); i++) {
    bare.push(time(() => execFileSync(process.execPath, ['-e', '0'])));
    version.push(time(() => execFileSync(process.execPath, [bin, '--version'])));
    dry.push(time(() => execFileSync(process.execPath, [bin, '--dry-run'], { cwd, stdio: 'ignore' })));
  }
  row('--version', 'node -e 0', bare, version);
  row('trivial job end to end (dry run)', 'node -e 0', bare, dry);
}

// --- print ----------------------------------------------------------------------------------------------------
const fmt = (s) => `${s.median.toFixed(0)} ms (${s.min.toFixed(0)}–${s.max.toFixed(0)})`;
console.log(`mqtt-fs-worker bench — ${quick ? 'quick' : 'full'} mode, ${runs} run(s) each`);
console.log(
  `machine: ${cpus().length} x ${cpus()[0]?.model ?? 'cpu'}, ${(totalmem() / 1024 ** 3).toFixed(0)} GiB, node ${process.version}`,
);
console.log('');
console.log(
  ['path', 'anchor', 'anchor median (min–max)', 'ours median (min–max)', 'ratio', 'notes'].join(' | '),
);
for (const r of rows) {
  const ratio = r.anchorName === '-' ? '-' : `${(r.ours.median / r.anchor.median).toFixed(2)}x`;
  const anchor = r.anchorName === '-' ? '-' : fmt(r.anchor);
  console.log([r.name, r.anchorName, anchor, fmt(r.ours), ratio, r.extra].join(' | '));
}
