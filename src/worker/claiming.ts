import { type HeldDir, holdResults, type JobPaths, resolveJobPaths, resolveJobsRoot } from '../job/paths.js';
import { toResultPayload } from '../job/report.js';
import { parseRequest } from '../job/request.js';
import type { JobRequest } from '../job/spec.js';
import { ErrorCode, isWorkerError } from '../shared/errors.js';
import type { Logger } from '../shared/log.js';
import {
  acquireClaim,
  acquirePublisher,
  type Claim,
  type ClaimRecord,
  type ClaimState,
  inspectClaim,
  markPublished,
  type StoredRequest,
} from './claim.js';
import { publishResult } from './publish.js';
import { runClaimed } from './run-claimed.js';
import { addRunning, type IndexRound, listRunning, removeRunning } from './running-index.js';
import type { Slot, WorkerOutcome } from './slot.js';

// What a job's claim says a delivery means (run it, leave it, publish a finished result nobody published), and
// taking over the jobs of dead workers from the index of running claims.

/** A job's folder, and its results/ held open for every write the worker makes there. */
export interface JobFolder {
  readonly paths: JobPaths;
  readonly results: HeldDir;
}

export async function openJobFolder(jobsDir: string, id: string, create: boolean): Promise<JobFolder> {
  const paths = await resolveJobPaths(jobsDir, id, create);
  return { paths, results: await holdResults(paths.resultsDir) };
}

export function inspectFolder(folder: JobFolder, slot: Slot): Promise<ClaimState> {
  const now = (slot.now ?? Date.now)();
  return inspectClaim(folder.results.path, slot.identity, slot.options.claimLeaseMs, now);
}

/** Claims `attempt` of the job in `folder` for this process, keeping the request that asked for it. */
export function claimAttempt(
  folder: JobFolder,
  slot: Slot,
  attempt: number,
  stored: StoredRequest,
  request: JobRequest,
): Promise<Claim | undefined> {
  const now = new Date((slot.now ?? Date.now)());
  return acquireClaim(folder.results.path, slot.identity, attempt, now, { ...stored, rerun: request.rerun });
}

/**
 * Takes the job's next attempt when it is free (or finished, for a new re-run token); otherwise settles what the
 * claim says (a finished result its dead runner never published is published by exactly one slot) and returns
 * undefined: the request is not this process's to run.
 */
export async function claimOrSettle(
  slot: Slot,
  folder: JobFolder,
  first: ClaimState,
  request: JobRequest,
  stored: StoredRequest,
  log: Logger,
): Promise<Claim | undefined> {
  let state = first;
  for (let tries = 0; tries < 3; tries++) {
    if (state.kind === 'finished' && request.rerun !== undefined && request.rerun !== state.claim.rerun) {
      log.info(`re-run ${request.rerun} of a finished job (attempt ${state.manifest.attempt})`);
      state = { kind: 'free', attempt: state.claim.attempt + 1 };
    }
    if (state.kind === 'finished') {
      await settleFinished(slot, folder, state, log, stored);
      return undefined;
    }
    if (state.kind === 'live') {
      log.info(
        `already claimed by live worker ${state.claim.workerId} (attempt ${state.claim.attempt}); it will publish the result`,
      );
      return undefined;
    }
    if (state.why) log.warn(`taking over: ${state.why}`, { attempt: state.attempt });
    await addRunning(folder.paths.root, request.id, log);
    const claim = await claimAttempt(folder, slot, state.attempt, stored, request);
    if (claim) return claim;
    state = await inspectFolder(folder, slot);
  }
  return undefined;
}

/**
 * A finished attempt: nothing to publish on the results topic, unless its result never reached the broker and its
 * runner is gone. A request that asks for an answer on its own response topic gets the stored result there (a
 * controller that missed the result, or asks about a finished job, learns it; the results topic stays one message
 * per run).
 */
export async function settleFinished(
  slot: Slot,
  folder: JobFolder,
  state: Extract<ClaimState, { kind: 'finished' }>,
  log: Logger,
  asking?: Omit<StoredRequest, 'request'>,
): Promise<void> {
  const { manifest, claim } = state;
  const what = `attempt ${manifest.attempt}, ${manifest.status}`;
  if (state.published) {
    if (asking?.responseTopic) {
      log.info(`already finished (${what}); answering on the request's response topic`);
      await publishResult(slot.sidecar, slot, toResultPayload(manifest), asking, { responseOnly: true });
    } else log.info(`already finished (${what}); its result was published`);
    await removeRunning(folder.paths.root, manifest.id, log);
    return;
  }
  if (state.ownerAlive) {
    log.info(`already finished (${what}); its worker ${claim.workerId} publishes the result`);
    return;
  }
  const now = (slot.now ?? Date.now)();
  const lease = slot.options.claimLeaseMs;
  if (!(await acquirePublisher(folder.results.path, manifest.attempt, slot.identity, lease, now))) {
    log.info(`already finished (${what}); another slot publishes its result`);
    return;
  }
  log.info(`already finished (${what}), but its result never reached the broker; publishing it`);
  if (await publishResult(slot.sidecar, slot, toResultPayload(manifest), claim)) {
    await markPublished(folder.results.path, manifest.attempt);
    await removeRunning(folder.paths.root, manifest.id, log);
  }
}

/**
 * Looks through the index of running claims (the entries `round` picks) for a job whose worker died: its result
 * is published if it finished, or the job is taken over (attempt + 1) and run here from the request in its claim.
 */
export async function takeOverOrphan(slot: Slot, round: IndexRound): Promise<WorkerOutcome | undefined> {
  const root = await resolveJobsRoot(slot.options.jobsDir).catch(() => undefined);
  if (root === undefined) return undefined;
  for (const id of round.pick(await listRunning(root, slot.log))) {
    const jobLog = slot.log.child({ job: id });
    try {
      const ran = await lookAtRunning(slot, root, id, jobLog);
      if (ran) return ran;
    } catch (error) {
      // A job folder removed meanwhile has nothing left to run or publish.
      if (isWorkerError(error, ErrorCode.JOB_NOT_FOUND)) await removeRunning(root, id, jobLog);
      else jobLog.warn(`cannot look at the running job ${id}: ${(error as Error).message}`);
    }
  }
  return undefined;
}

/** One entry of the index: left alone (live), settled (finished), or taken over and run here. */
export async function lookAtRunning(
  slot: Slot,
  root: string,
  id: string,
  log: Logger,
): Promise<WorkerOutcome | undefined> {
  const folder = await openJobFolder(slot.options.jobsDir, id, false);
  let claim: Claim | undefined;
  try {
    const state = await inspectFolder(folder, slot);
    if (state.kind === 'live') return undefined;
    if (state.kind === 'finished') {
      await settleFinished(slot, folder, state, log);
      return undefined;
    }
    const stored = state.previous ? storedRequestOf(state.previous, slot) : undefined;
    if (!stored) {
      await removeRunning(root, id, log); // nothing was claimed, or by a version that kept no request
      return undefined;
    }
    if (stored.request.id !== id) {
      // A claim copied or planted from another folder: running it would answer a job nobody asked for here.
      log.warn(
        `refusing to take over ${id}: its claim holds a request for ${JSON.stringify(stored.request.id)}; index entry cleared`,
      );
      await removeRunning(root, id, log);
      return undefined;
    }
    log.warn(`taking over from the index of running jobs: ${state.why}`, { attempt: state.attempt });
    claim = await claimAttempt(folder, slot, state.attempt, stored.stored, stored.request);
    return claim ? await runClaimed(slot, { ...stored, folder, claim }) : undefined;
  } finally {
    if (!claim) await folder.results.close();
  }
}

/** The request a dead worker's claim holds, checked against this worker's rules (signatures aside: it was). */
export function storedRequestOf(
  record: ClaimRecord,
  slot: Slot,
): { request: JobRequest; stored: StoredRequest } | undefined {
  if (record.request === undefined) return undefined;
  const { secret: _verifiedWhenClaimed, ...policy } = slot.requestPolicy ?? {};
  const parsed = parseRequest(record.request, policy);
  if (!parsed.ok) return undefined;
  const { request, responseTopic, correlationData } = record;
  return {
    request: parsed.request,
    stored: {
      request,
      ...(responseTopic ? { responseTopic } : {}),
      ...(correlationData ? { correlationData } : {}),
    },
  };
}
