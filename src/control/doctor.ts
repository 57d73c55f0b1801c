import { connackOf, connectBroker, disconnect } from '../broker/client.js';
import { checkGrants } from '../broker/consumer.js';
import { sharedSubscriptionProblem } from '../broker/probe.js';
import type { Options } from '../config/options.js';
import { jobsDirProblem } from '../job/paths.js';
import type { EngineConfig } from '../job/run-job.js';
import { effectiveLimits, openJobLimits } from '../limits/index.js';
import type { Logger } from '../shared/log.js';
import { isShared } from '../shared/topics.js';
import { inspectDrive } from '../worker/drive.js';
import { workspacesProblem } from '../worker/preflight.js';

// `doctor`: the worker's preflight, the cgroup mode and the broker connection, checked and printed for a human.
// It never subscribes to the jobs topic (a probe on a clean session could take a real job and lose it).

export interface Check {
  readonly name: string;
  readonly ok: boolean;
  /** Passes, but worth knowing (a drive that caches what a re-run reads). */
  readonly warn?: boolean;
  readonly detail: string;
}

export async function doctor(options: Options, config: EngineConfig): Promise<Check[]> {
  const checks: Check[] = [];
  const add = (name: string, problem: string | undefined, detail: string): void => {
    checks.push({ name, ok: problem === undefined, detail: problem ?? detail });
  };
  const jobsDir = await jobsDirProblem(options.jobsDir);
  add('jobs directory', jobsDir, options.jobsDir);
  if (jobsDir === undefined)
    for (const finding of (await inspectDrive(options.jobsDir, options.claimLeaseMs)).findings)
      checks.push({
        name: 'shared drive',
        ok: finding.level !== 'fail',
        ...(finding.level === 'warn' ? { warn: true } : {}),
        detail: finding.text,
      });
  add('workspaces directory', await workspacesProblem(options.workspacesDir), options.workspacesDir);
  const settings = config.limits ?? { policy: 'off' as const, defaults: {}, ceilings: {} };
  let defaults: ReturnType<typeof effectiveLimits> | undefined;
  try {
    defaults = effectiveLimits({}, settings);
    add('limits', undefined, `defaults ${JSON.stringify(defaults)} within the ceilings`);
  } catch (error) {
    add('limits', (error as Error).message, '');
  }
  if (defaults) {
    try {
      const opened = await openJobLimits(defaults, settings.policy, `mqtt-fs-worker-${options.id}.doctor`);
      await opened.cgroups?.close();
      add('cgroups', undefined, `${opened.mode}${opened.reason ? ` (${opened.reason})` : ''}`);
    } catch (error) {
      add('cgroups', (error as Error).message, '');
    }
  }
  const { overlayProblem } = await import('../job/workspace/overlay.js');
  const overlay = await overlayProblem(options.workspacesDir, config.runAs !== undefined);
  if (options.stage === 'overlay') add('staging', overlay, 'overlay (mounted and unmounted one)');
  else if (options.stage === 'copy') add('staging', undefined, 'copy (--stage copy)');
  else
    add(
      'staging',
      undefined,
      overlay
        ? `copy (an overlay cannot be used: ${overlay})`
        : 'overlay for folders of 256 files or 16 MiB and more, copy below',
    );
  checks.push(await brokerCheck(options));
  return checks;
}

async function brokerCheck(options: Options): Promise<Check> {
  const warnings: string[] = [];
  const log: Logger = {
    debug: () => {},
    info: () => {},
    warn: (message) => warnings.push(message),
    error: (message) => warnings.push(message),
    child: () => log,
  };
  try {
    // Asked for the session the worker asks for, so the CONNACK shows what the broker grants a slot (ejabberd caps
    // the expiry); the session is discarded on the way out.
    const persistent = options.protocol === '5' && !options.clean;
    const client = await connectBroker({
      settings: options,
      clientId: `${options.id}.doctor`,
      clean: !persistent,
      sessionExpirySeconds: options.sessionExpirySeconds,
    });
    try {
      const connack = connackOf(client);
      checkGrants(connack, {
        clientId: `${options.id}.doctor`,
        clean: options.clean,
        sessionExpirySeconds: options.sessionExpirySeconds,
        topics: options.topics,
        log,
      });
      const granted = await client.subscribeAsync(`${options.statusTopic}/doctor-probe`, { qos: 1 });
      const qos = granted[0]?.qos ?? 0;
      if (qos !== 1)
        return { name: 'broker', ok: false, detail: `a QoS 1 subscription was granted QoS ${qos}` };
      if (options.protocol === '3.1.1' && options.topics.some(isShared)) {
        const problem = await sharedSubscriptionProblem(options, `${options.id}.doctor`);
        if (problem) return { name: 'broker', ok: false, detail: `${problem} (exit 7 in a worker)` };
      }
      const extra = warnings.length > 0 ? `; ${warnings.join('; ')}` : '';
      return { name: 'broker', ok: true, detail: `${options.url} accepted MQTT ${options.protocol}${extra}` };
    } finally {
      await disconnect(client, persistent ? { sessionExpiry: 0 } : {});
    }
  } catch (error) {
    return { name: 'broker', ok: false, detail: (error as Error).message };
  }
}
