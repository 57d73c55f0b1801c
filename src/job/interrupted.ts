import { ErrorCode, WorkerError } from '../shared/errors.js';

/** The job was interrupted (the worker is shutting down): no result, the job stays claimable. */
export class JobInterrupted extends WorkerError {
  constructor() {
    super(ErrorCode.INTERRUPTED, 'The job was interrupted before it finished; it will run again');
  }
}
