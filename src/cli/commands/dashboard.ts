import { existsSync } from 'node:fs';
import type { OptionFlags } from '../../config/options.js';
import { ErrorCode, ExitCode, WorkerError } from '../../shared/errors.js';
import { interruptOnSignals, logger, resolve } from '../context.js';
import { writeStdio } from '../stdio.js';

export interface DashboardFlags {
  readonly port?: string;
  readonly host?: string;
  readonly allowCancel?: boolean;
}

/** `dashboard`: serves the fleet's page until Ctrl-C (or SIGTERM). */
export async function runDashboard(dashboardFlags: DashboardFlags, flags: OptionFlags): Promise<number> {
  const options = await resolve(flags);
  const port = Number(dashboardFlags.port ?? '8080');
  if (!Number.isInteger(port) || port < 0 || port > 65535)
    throw new WorkerError(
      ErrorCode.INVALID_OPTION,
      `--port: expected a port number, got ${JSON.stringify(dashboardFlags.port)}`,
    );
  const { serveDashboard } = await import('../../control/dashboard.js');
  const log = logger(options);
  const interrupt = interruptOnSignals();
  try {
    const served = await serveDashboard({
      settings: options,
      host: dashboardFlags.host ?? '127.0.0.1',
      port,
      presenceTopic: options.presenceTopic,
      statusTopic: options.statusTopic,
      resultsTopic: options.resultsTopic,
      logsTopic: options.logsTopic,
      cancelTopic: options.cancelTopic,
      jobsDir: existsSync(options.jobsDir) ? options.jobsDir : undefined,
      leaseMs: options.claimLeaseMs,
      allowCancel: dashboardFlags.allowCancel === true,
      log,
      signal: interrupt.signal,
    }).catch((error: NodeJS.ErrnoException) => {
      if (error.code === 'EADDRINUSE' || error.code === 'EACCES')
        throw new WorkerError(
          ErrorCode.INVALID_OPTION,
          `--port ${port}: cannot listen there (${error.code})`,
        );
      throw error;
    });
    writeStdio(1, `${served.url}\n`);
    log.info(
      `dashboard at ${served.url} (Ctrl-C to stop)${dashboardFlags.allowCancel ? '; cancel allowed' : ''}`,
    );
    await served.closed;
    return ExitCode.OK;
  } finally {
    interrupt.dispose();
  }
}
