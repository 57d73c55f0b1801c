import { hostname } from 'node:os';
import type { EngineConfig } from '../job/run-job.js';
import type { Options } from './options.js';
import { maskedValues } from './secrets.js';

/** Variables of the worker's own configuration; steps never see them (the broker password among them). */
const WORKER_ONLY_ENV = /^(MQTT_|WORKER_ID$)/;

function stepBaseEnv(env: NodeJS.ProcessEnv): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [name, value] of Object.entries(env)) {
    if (value !== undefined && !WORKER_ONLY_ENV.test(name)) out[name] = value;
  }
  return out;
}

/** The job engine's configuration from the resolved options (`version`: the running build's). */
export async function engineConfig(
  options: Options,
  env: NodeJS.ProcessEnv,
  version: string,
): Promise<EngineConfig> {
  const runAs = options.runAs
    ? await (await import('../step/run-as.js')).resolveRunAs(options.runAs, process.getuid?.() === 0)
    : undefined;
  return {
    ...(runAs ? { runAs } : {}),
    jobsDir: options.jobsDir,
    workspacesDir: options.workspacesDir,
    workerId: options.id,
    hostname: hostname(),
    version,
    killGraceMs: options.killGraceMs,
    maxLogBytes: options.maxLogBytes,
    stage: options.stage,
    baseEnv: stepBaseEnv(env),
    mask: maskedValues(options),
    limits: {
      policy: options.limits,
      defaults: {
        cpus: options.cpus,
        memoryBytes: options.memoryBytes,
        pids: options.pids,
        ioReadBps: options.ioBps,
        ioWriteBps: options.ioBps,
      },
      ceilings: {
        cpus: options.maxCpus,
        memoryBytes: options.maxMemoryBytes,
        pids: options.maxPids,
        ioReadBps: options.maxIoBps,
        ioWriteBps: options.maxIoBps,
      },
    },
  };
}
