// The library API: the engine and its parts, for embedding the worker in another program.

export type { OptionFlags, Options } from './config/options.js';
export { resolveOptions } from './config/resolve.js';
export { type Manifest, type ResultPayload, toResultPayload } from './job/report.js';
export { parseRequest } from './job/request.js';
export {
  type EngineConfig,
  type JobEvent,
  JobInterrupted,
  type JobOutcome,
  type JobRun,
  runJob,
} from './job/run-job.js';
export { type JobRequest, type JobSpec, parseJobFile, type StepSpec } from './job/spec.js';
export { validateJobDefinition } from './job/validate.js';
export { ErrorCode, ExitCode, isWorkerError, WorkerError } from './shared/errors.js';
export { createLogger, type Logger, silentLogger } from './shared/log.js';
