import { parseSizeValue } from '../shared/units.js';
import type { Kind, OptionDef } from './options.js';

// The option table: every option's flag, environment variable, kind and default, in one place (--help, the README
// and config/resolve.ts all read it).

const text = (fallback: string): Kind => ({ type: 'text', fallback });

const duration = (fallback: string, off = false): Kind => ({ type: 'duration', fallback, off });

const topic = (fallback: string, filter = false): Kind => ({ type: 'topic', fallback, filter });

const positive = (value: string): number | undefined => {
  const n = Number(value);
  return value.trim() !== '' && Number.isFinite(n) && n > 0 ? n : undefined;
};

const count = (value: string): number | undefined => {
  const n = positive(value);
  return n !== undefined && Number.isSafeInteger(n) ? n : undefined;
};

const cpus: Kind = { type: 'limit', parse: positive, expected: 'a number of CPUs like 1.5' };

const memory: Kind = { type: 'limit', parse: parseSizeValue, expected: 'a size like "2G"' };

const pids: Kind = { type: 'limit', parse: count, expected: 'a whole number of processes like 512' };
const bandwidth: Kind = {
  type: 'limit',
  parse: parseSizeValue,
  expected: 'a rate in bytes per second like "10M"',
};

/** The option table: commander's help, the README and `resolveOptions` all follow it. */
export const OPTION_DEFS: readonly OptionDef[] = [
  {
    key: 'url',
    flags: '-u, --url <url>',
    env: 'MQTT_URL',
    description: 'broker URL (mqtt, mqtts, ws, wss)',
    kind: text('mqtt://localhost:1883'),
  },
  {
    key: 'username',
    flags: '-n, --username <user>',
    env: 'MQTT_USERNAME',
    description: 'broker user',
    kind: { type: 'optional' },
  },
  {
    key: 'password',
    flags: '-p, --password <password>',
    env: 'MQTT_PASSWORD',
    description: 'broker password',
    kind: { type: 'optional' },
  },
  {
    key: 'passwordFile',
    flags: '--password-file <file>',
    env: 'MQTT_PASSWORD_FILE',
    description: 'file holding the broker password (Docker secrets)',
    kind: { type: 'file' },
  },
  {
    key: 'caFile',
    flags: '--ca <file>',
    env: 'MQTT_CA_FILE',
    description: 'CA certificate(s) to trust for mqtts/wss (PEM)',
    kind: { type: 'file' },
  },
  {
    key: 'certFile',
    flags: '--cert <file>',
    env: 'MQTT_CERT_FILE',
    description: 'client certificate (PEM)',
    kind: { type: 'file' },
  },
  {
    key: 'keyFile',
    flags: '--key <file>',
    env: 'MQTT_KEY_FILE',
    description: 'client private key (PEM)',
    kind: { type: 'file' },
  },
  {
    key: 'protocol',
    flags: '--protocol <version>',
    env: 'MQTT_PROTOCOL',
    description: 'MQTT version: 5, or 3.1.1 (the broker must then allow one message in flight)',
    kind: { type: 'choice', fallback: '5', choices: ['5', '3.1.1'] },
  },
  {
    key: 'id',
    flags: '-i, --id <id>',
    env: 'WORKER_ID',
    description: 'worker id, also the MQTT client id',
    kind: text(''),
    defaultText: 'the host name',
  },
  {
    key: 'jobsDir',
    flags: '-j, --jobs-dir <dir>',
    env: 'MQTT_JOBS_DIR',
    description: 'root of job folders (shared drive)',
    kind: { type: 'dir', fallback: './jobs' },
  },
  {
    key: 'workspacesDir',
    flags: '-w, --workspaces-dir <dir>',
    env: 'MQTT_WORKSPACES_DIR',
    description: 'root of local workspaces',
    kind: { type: 'dir', fallback: './workspaces' },
  },
  {
    key: 'topic',
    flags: '-t, --topic <topic>',
    env: 'MQTT_TOPIC',
    description:
      'subscription, e.g. jobs/pending/gpu; repeat it (or comma-separate it) for a slot that serves several pools',
    kind: topic('jobs/pending', true),
    repeatable: true,
  },
  {
    key: 'fanout',
    flags: '--fanout <k>',
    env: 'MQTT_FANOUT',
    description:
      'each request reaches K slots (one per share group; the first idle one claims it) instead of all',
    kind: {
      type: 'limit',
      parse: (value) => {
        if (value.trim().toLowerCase() === 'all') return 0;
        const k = count(value);
        return k !== undefined && k <= 64 ? k : undefined;
      },
      expected: '"all" or a number of slots from 1 to 64',
    },
    defaultText: 'all',
  },
  {
    key: 'clean',
    flags: '--clean',
    env: 'MQTT_CLEAN',
    description: 'clean MQTT session (loses the jobs queued for this worker)',
    kind: { type: 'boolean' },
    defaultText: 'false',
  },
  {
    key: 'keepaliveMs',
    flags: '--keepalive <duration>',
    env: 'MQTT_KEEPALIVE',
    description: 'MQTT keepalive',
    kind: duration('30s'),
  },
  {
    key: 'connectTimeoutMs',
    flags: '--connect-timeout <duration>',
    env: 'MQTT_CONNECT_TIMEOUT',
    description: 'give up connecting to the broker after this',
    kind: duration('10s'),
  },
  {
    key: 'sessionExpirySeconds',
    flags: '--session-expiry <duration>',
    env: 'MQTT_SESSION_EXPIRY',
    description:
      'how long the broker keeps the session of an absent worker ("never" or a duration; default: 1d, never with $share/)',
    kind: duration('never', true),
    defaultText: 'auto',
  },
  {
    key: 'respawn',
    flags: '--respawn',
    env: 'MQTT_RESPAWN',
    description:
      'stay up: run each job in a fresh worker process, one after another, backing off on failures',
    kind: { type: 'boolean' },
    defaultText: 'false',
  },
  {
    key: 'idleTimeoutMs',
    flags: '--idle-timeout <duration>',
    env: 'MQTT_IDLE_TIMEOUT',
    description: 'exit 0 when no job came within this time ("off" or a duration)',
    kind: duration('off', true),
  },
  {
    key: 'claimLeaseMs',
    flags: '--claim-lease <duration>',
    env: 'MQTT_CLAIM_LEASE',
    description: "a claim whose heartbeat is older than this is a dead worker's",
    kind: duration('60s'),
  },
  {
    key: 'resultsTopic',
    flags: '--results-topic <root>',
    env: 'MQTT_RESULTS_TOPIC',
    description: 'results are published to {root}/{id}',
    kind: topic('jobs/results'),
  },
  {
    key: 'statusTopic',
    flags: '--status-topic <root>',
    env: 'MQTT_STATUS_TOPIC',
    description: 'progress events go to {root}/{id}',
    kind: topic('jobs/status'),
  },
  {
    key: 'cancelTopic',
    flags: '--cancel-topic <root>',
    env: 'MQTT_CANCEL_TOPIC',
    description: 'a message on {root}/{id} cancels the running job',
    kind: topic('jobs/cancel'),
  },
  {
    key: 'presenceTopic',
    flags: '--presence-topic <root>',
    env: 'MQTT_PRESENCE_TOPIC',
    description: 'retained presence at {root}/{worker id}',
    kind: topic('jobs/workers'),
  },
  {
    key: 'rejectedTopic',
    flags: '--rejected-topic <topic>',
    env: 'MQTT_REJECTED_TOPIC',
    description: 'refused requests are reported on {root}/{id}, or {root} without a usable id',
    kind: topic('jobs/rejected'),
  },
  {
    key: 'logsTopic',
    flags: '--logs-topic <root>',
    env: 'MQTT_LOGS_TOPIC',
    description: 'each step\'s output is published to {root}/{id} as it comes (QoS 0, batched; "off": never)',
    kind: topic('jobs/logs'),
  },
  {
    key: 'responseTopicPrefix',
    flags: '--response-topic-prefix <prefix>',
    env: 'MQTT_RESPONSE_TOPIC_PREFIX',
    description: 'honour MQTT 5 response topics only under this prefix ("off": never)',
    kind: { type: 'optional' },
    defaultText: '{results-topic}/',
  },
  {
    key: 'killGraceMs',
    flags: '--kill-grace <duration>',
    env: 'MQTT_KILL_GRACE',
    description: 'time between SIGTERM and SIGKILL when a step is stopped',
    kind: duration('10s'),
  },
  {
    key: 'maxLogBytes',
    flags: '--max-log-size <size>',
    env: 'MQTT_MAX_LOG_SIZE',
    description: 'per-step log cap; the step keeps running past it',
    kind: { type: 'size', fallback: '100M' },
  },
  {
    key: 'cpus',
    flags: '--cpus <n>',
    env: 'MQTT_CPUS',
    description: "each job's default CPU limit",
    kind: cpus,
    defaultText: 'none',
  },
  {
    key: 'memoryBytes',
    flags: '--memory <size>',
    env: 'MQTT_MEMORY',
    description: "each job's default memory limit",
    kind: memory,
    defaultText: 'none',
  },
  {
    key: 'pids',
    flags: '--pids <n>',
    env: 'MQTT_PIDS',
    description: "each job's default process limit",
    kind: pids,
    defaultText: 'none',
  },
  {
    key: 'maxCpus',
    flags: '--max-cpus <n>',
    env: 'MQTT_MAX_CPUS',
    description: 'the most CPUs a job may ask for',
    kind: cpus,
    defaultText: 'none',
  },
  {
    key: 'maxMemoryBytes',
    flags: '--max-memory <size>',
    env: 'MQTT_MAX_MEMORY',
    description: 'the most memory a job may ask for',
    kind: memory,
    defaultText: 'none',
  },
  {
    key: 'maxPids',
    flags: '--max-pids <n>',
    env: 'MQTT_MAX_PIDS',
    description: 'the most processes a job may ask for',
    kind: pids,
    defaultText: 'none',
  },
  {
    key: 'ioBps',
    flags: '--io-bps <rate>',
    env: 'MQTT_IO_BPS',
    description: "each job's default I/O bandwidth, bytes per second read and written (cgroups)",
    kind: bandwidth,
    defaultText: 'none',
  },
  {
    key: 'maxIoBps',
    flags: '--max-io-bps <rate>',
    env: 'MQTT_MAX_IO_BPS',
    description: 'the most I/O bandwidth a job may ask for, each direction',
    kind: bandwidth,
    defaultText: 'none',
  },
  {
    key: 'limits',
    flags: '--limits <policy>',
    env: 'MQTT_LIMITS',
    description: 'required, optional or off; auto: required when any limit is set or asked for',
    kind: { type: 'choice', fallback: 'auto', choices: ['auto', 'required', 'optional', 'off'] },
  },
  {
    key: 'stage',
    flags: '--stage <mode>',
    env: 'MQTT_STAGE',
    description:
      'overlay: mount the job folder under a private upper layer (root); copy: copy it; auto: overlay where it mounts, else copy',
    kind: { type: 'choice', fallback: 'auto', choices: ['auto', 'copy', 'overlay'] },
  },
  {
    key: 'runAs',
    flags: '--run-as <user>',
    env: 'MQTT_RUN_AS',
    description: 'run steps as this user, with its groups and HOME (the worker must be root)',
    kind: { type: 'optional' },
  },
  {
    key: 'mask',
    flags: '--mask <values>',
    env: 'MQTT_MASK',
    description: 'comma-separated values to mask as *** in logs',
    kind: { type: 'list' },
    defaultText: 'none',
  },
  {
    key: 'secret',
    flags: '--secret <secret>',
    env: 'MQTT_SHARED_SECRET',
    description: 'accept only requests signed with this shared secret (HMAC-SHA256)',
    kind: { type: 'optional' },
  },
  {
    key: 'secretFile',
    flags: '--secret-file <file>',
    env: 'MQTT_SHARED_SECRET_FILE',
    description: 'file holding the shared secret',
    kind: { type: 'file' },
  },
  {
    key: 'maxAgeMs',
    flags: '--max-age <duration>',
    env: 'MQTT_MAX_AGE',
    description: 'refuse signed requests older than this',
    kind: duration('5m'),
  },
  {
    key: 'noPayloadSteps',
    flags: '--no-payload-steps',
    env: 'MQTT_NO_PAYLOAD_STEPS',
    description: "refuse requests that carry their own steps (run only job.json's)",
    kind: { type: 'boolean' },
    defaultText: 'false',
  },
  {
    key: 'logFormat',
    flags: '--log-format <format>',
    env: 'MQTT_LOG_FORMAT',
    description: "the worker's own log: text or json",
    kind: { type: 'choice', fallback: 'text', choices: ['text', 'json'] },
  },
];
