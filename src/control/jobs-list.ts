import { readdir } from 'node:fs/promises';
import { hostname } from 'node:os';
import { resolveJobsRoot } from '../job/paths.js';
import { idProblem } from '../shared/ids.js';
import { forEachLimit } from '../shared/pool.js';
import { formatDuration } from '../shared/units.js';
import { type JobState, type JobStatusReport, jobStatus } from './job-status.js';

// `jobs`: every job folder under --jobs-dir with its state, slot, attempt, times and status: `status` for each,
// 32 at a time (a network drive answers many small requests at once better than one after another).

export type JobsFilter = JobState | 'failed';

export interface JobRow {
  readonly id: string;
  readonly state: JobState;
  /** The result's status for a finished job. */
  readonly status: string | null;
  readonly slot: string | null;
  readonly attempt: number | null;
  readonly claimedAt: string | null;
  readonly endedAt: string | null;
  readonly durationMs: number | null;
}

export interface JobsInput {
  readonly jobsDir: string;
  readonly leaseMs: number;
  readonly state?: JobsFilter;
}

export async function listJobs(input: JobsInput): Promise<JobRow[]> {
  const root = await resolveJobsRoot(input.jobsDir);
  const entries = await readdir(root, { withFileTypes: true });
  const ids = entries.filter((e) => e.isDirectory() && idProblem(e.name) === undefined).map((e) => e.name);
  const rows: JobRow[] = [];
  await forEachLimit(ids, 32, async (id) => {
    const report = await jobStatus({
      jobsDir: root,
      id,
      workerIdForLiveness: `jobs-${process.pid}`,
      host: hostname(),
      leaseMs: input.leaseMs,
      tailLines: 0,
    }).catch(() => undefined); // removed meanwhile, or not a job folder after all
    if (report && matches(report, input.state)) rows.push(rowOf(report));
  });
  return rows.sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
}

function matches(report: JobStatusReport, filter: JobsFilter | undefined): boolean {
  if (filter === undefined) return true;
  if (filter === 'failed') return report.state === 'finished' && report.result?.status !== 'success';
  return report.state === filter;
}

function rowOf(report: JobStatusReport): JobRow {
  return {
    id: report.id,
    state: report.state,
    status: report.result?.status ?? null,
    slot: report.claim?.workerId ?? null,
    attempt: report.claim?.attempt ?? null,
    claimedAt: report.claim?.claimedAt ?? null,
    endedAt: report.result?.endedAt ?? null,
    durationMs: report.result?.durationMs ?? null,
  };
}

/** The table `jobs` prints. */
export function formatJobs(rows: readonly JobRow[]): string {
  if (rows.length === 0) return 'no jobs\n';
  const header = ['JOB', 'STATE', 'STATUS', 'SLOT', 'ATTEMPT', 'CLAIMED', 'TOOK'];
  const cells = rows.map((r) => [
    r.id,
    r.state,
    r.status ?? '-',
    r.slot ?? '-',
    r.attempt === null ? '-' : String(r.attempt),
    r.claimedAt ?? '-',
    r.durationMs === null ? '-' : formatDuration(r.durationMs),
  ]);
  const widths = header.map((title, i) => Math.max(title.length, ...cells.map((c) => (c[i] ?? '').length)));
  const line = (values: string[]) =>
    values
      .map((v, i) => v.padEnd(widths[i] ?? 0))
      .join('  ')
      .trimEnd();
  return `${[line(header), ...cells.map(line)].join('\n')}\n`;
}
