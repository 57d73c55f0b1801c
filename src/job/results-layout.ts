// What a job's folder holds besides its inputs, in one place: `results/` (never staged, never visible to a step
// through an overlay), the step logs and result.json the worker writes there, and the worker's own files in it
// (claims and their markers, see worker/claim.ts), which survive a run's reset of results/ and which no artifact may
// replace.

/** The job folder's output directory. */
export const RESULTS_DIR = 'results';
/** The manifest in results/. */
export const MANIFEST_NAME = 'result.json';
/** The manifest's path relative to the job folder, as the result message names it. */
export const MANIFEST_FILE = `${RESULTS_DIR}/${MANIFEST_NAME}`;

/** Step N's log in results/. */
export function stepLogName(index: number): string {
  return `step_${index}.log`;
}

/** The index of a step log's name, or undefined for any other name. */
export function stepLogIndex(name: string): number | undefined {
  const match = /^step_(\d+)\.log$/.exec(name);
  return match ? Number(match[1]) : undefined;
}

/** Every file of the worker's own in results/ starts with this. */
export const WORKER_FILE_PREFIX = '.mqtt-fs-worker.';
/** `{prefix}{attempt}`: a claim, the marker of a published result, the lock of the one slot that publishes it. */
export const CLAIM_PREFIX = `${WORKER_FILE_PREFIX}claim.`;
export const PUBLISHED_PREFIX = `${WORKER_FILE_PREFIX}published.`;
export const PUBLISHER_PREFIX = `${WORKER_FILE_PREFIX}publisher.`;

/** Names in results/ that a run's reset keeps (the claim and its markers). */
export function survivesReset(name: string): boolean {
  return name.startsWith(WORKER_FILE_PREFIX);
}

/** Top-level names in results/ that belong to the worker: an artifact never replaces them. */
export function isReservedName(name: string): boolean {
  return name === MANIFEST_NAME || stepLogIndex(name) !== undefined || name.startsWith(WORKER_FILE_PREFIX);
}
