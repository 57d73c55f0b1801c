// The library API: the engine and its parts, for embedding the worker in another program.
export { ErrorCode, ExitCode, isWorkerError, WorkerError } from './errors.js';
export {
  type EngineConfig,
  type JobEvent,
  JobInterrupted,
  type JobOutcome,
  type JobRun,
  runJob,
} from './job.js';
export { type JobRequest, type JobSpec, parseJobFile, parseRequest, type StepSpec } from './job-spec.js';
export { createLogger, type Logger, silentLogger } from './log.js';
export { type OptionFlags, type Options, resolveOptions } from './options.js';
export { type Manifest, type ResultPayload, toResultPayload } from './report.js';
export { validateJobDefinition } from './validate.js';
