import { describe, expect, it } from 'vitest';
import type { OptionFlags } from '../../src/config/options.js';
import { defaultWorkerId, resolveOptions } from '../../src/config/resolve.js';
import { isWorkerError } from '../../src/shared/errors.js';

const context = { cwd: '/srv/worker', hostname: 'build-7' };

function problemsOf(flags: OptionFlags, env: Record<string, string> = {}): string[] {
  try {
    resolveOptions(flags, env, context);
  } catch (error) {
    if (isWorkerError(error, 'INVALID_OPTION')) return [...error.problems];
    throw error;
  }
  return [];
}

describe('resolveOptions', () => {
  it('applies the contract defaults', () => {
    const options = resolveOptions({}, {}, context);
    expect(options).toMatchObject({
      url: 'mqtt://localhost:1883',
      username: undefined,
      password: undefined,
      id: 'build-7',
      jobsDir: '/srv/worker/jobs',
      workspacesDir: '/srv/worker/workspaces',
      topic: 'jobs/pending',
      clean: false,
      killGraceMs: 10_000,
      maxLogBytes: 100 * 1024 * 1024,
      protocol: '5',
      keepaliveMs: 30_000,
      connectTimeoutMs: 10_000,
      sessionExpirySeconds: 86_400,
      idleTimeoutMs: undefined,
      claimLeaseMs: 60_000,
      resultsTopic: 'jobs/results',
      statusTopic: 'jobs/status',
      cancelTopic: 'jobs/cancel',
      presenceTopic: 'jobs/workers',
      rejectedTopic: 'jobs/rejected',
      logFormat: 'text',
    });
    expect(Object.isFrozen(options)).toBe(true);
  });

  it('lets a pull slot session expire after a day by default, and never a shared subscription one', () => {
    expect(resolveOptions({}, {}, context).sessionExpirySeconds).toBe(86_400);
    expect(
      resolveOptions({ topic: '$share/w/jobs/pending' }, {}, context).sessionExpirySeconds,
    ).toBeUndefined();
    expect(
      resolveOptions({ topic: '$share/w/jobs/pending' }, { MQTT_SESSION_EXPIRY: '2h' }, context)
        .sessionExpirySeconds,
    ).toBe(7200);
  });

  it('refuses $ topics to publish to: the broker would drop the connection', () => {
    for (const flag of ['resultsTopic', 'statusTopic', 'rejectedTopic'] as const)
      expect(() => resolveOptions({ [flag]: '$share/g/jobs/results' }, {}, context)).toThrow(
        /not starting with \$/,
      );
    expect(() => resolveOptions({}, { MQTT_RESULTS_TOPIC: '$SYS/x' }, context)).toThrow(/MQTT_RESULTS_TOPIC/);
  });

  it('takes several topics (a slot serving several pools): repeated on the command line, comma-separated in the environment', () => {
    // commander joins a repeated --topic with commas (program.ts), as MQTT_TOPIC is written.
    const flagged = resolveOptions({ topic: 'jobs/pending,jobs/gpu' }, {}, context);
    expect(flagged.topics).toEqual(['jobs/pending', 'jobs/gpu']);
    expect(flagged.topic).toBe('jobs/pending');
    const fromEnv = resolveOptions({}, { MQTT_TOPIC: ' jobs/pending , jobs/pending/gpu ' }, context);
    expect(fromEnv.topics).toEqual(['jobs/pending', 'jobs/pending/gpu']);
    expect(resolveOptions({}, {}, context).topics).toEqual(['jobs/pending']);
    // Any shared one keeps the session from expiring; each topic is checked on its own.
    expect(
      resolveOptions({ topic: 'jobs/pending,$share/w/jobs/gpu' }, {}, context).sessionExpirySeconds,
    ).toBeUndefined();
    expect(problemsOf({ topic: 'jobs/pending,jobs/#' })).toEqual([
      expect.stringContaining('--topic: "jobs/#" (string) also matches the worker\'s own messages'),
    ]);
  });

  it("--fanout K subscribes one of K share groups, chosen by the slot id's ordinal (else a hash)", () => {
    const slot3 = resolveOptions({ topic: 'jobs/pending,jobs/gpu', fanout: '2', id: 'slot-3' }, {}, context);
    expect(slot3.topics).toEqual([
      '$share/mqtt-fs-worker-fanout-1/jobs/pending',
      '$share/mqtt-fs-worker-fanout-1/jobs/gpu',
    ]);
    expect(resolveOptions({ fanout: '2', id: 'slot-4' }, {}, context).topics).toEqual([
      '$share/mqtt-fs-worker-fanout-0/jobs/pending',
    ]);
    // The ordinal is the last number: a host's or a project's number before it does not put a host in one group.
    const groupOf = (id: string) => resolveOptions({ fanout: '2', id }, {}, context).topics[0];
    expect(['node12-slot3', 'node12-slot4', 'jobs2-worker-1', 'jobs2-worker-2'].map(groupOf)).toEqual([
      '$share/mqtt-fs-worker-fanout-1/jobs/pending',
      '$share/mqtt-fs-worker-fanout-0/jobs/pending',
      '$share/mqtt-fs-worker-fanout-1/jobs/pending',
      '$share/mqtt-fs-worker-fanout-0/jobs/pending',
    ]);
    // Copies elsewhere: the session may expire as in pull dispatch; with 1 group it holds the only copy.
    expect(slot3.sessionExpirySeconds).toBe(86_400);
    expect(resolveOptions({ fanout: '1', id: 'a' }, {}, context).sessionExpirySeconds).toBeUndefined();
    expect(resolveOptions({ fanout: 'all' }, {}, context)).toMatchObject({
      fanout: undefined,
      topics: ['jobs/pending'],
    });
    expect(problemsOf({ fanout: '2', topic: '$share/g/jobs/pending' })).toEqual([
      expect.stringContaining('--fanout: applies to plain topics'),
    ]);
    expect(problemsOf({ fanout: '0' })).toEqual([
      expect.stringContaining('--fanout: expected "all" or a number'),
    ]);
  });

  it('refuses a jobs topic that would also take the worker own messages', () => {
    for (const topic of ['jobs/#', '$share/g/jobs/#', 'jobs/+/+', '#'])
      expect(() => resolveOptions({ topic }, {}, context), topic).toThrow(
        /also matches the worker's own messages/,
      );
    expect(resolveOptions({ topic: 'jobs/pending/+' }, {}, context).topic).toBe('jobs/pending/+');
  });

  it('keeps dry-run-N ids for dry runs', () => {
    expect(() => resolveOptions({ id: 'dry-run-1' }, {}, context)).toThrow(/kept for dry runs/);
    expect(resolveOptions({ id: 'dry-run-box' }, {}, context).id).toBe('dry-run-box');
  });

  it('reads durations that may be off', () => {
    const options = resolveOptions({ idleTimeoutMs: '5m', sessionExpirySeconds: '7d' }, {}, context);
    expect(options.idleTimeoutMs).toBe(300_000);
    expect(options.sessionExpirySeconds).toBe(7 * 86_400);
    expect(
      resolveOptions({}, { MQTT_IDLE_TIMEOUT: 'off', MQTT_SESSION_EXPIRY: 'never' }, context),
    ).toMatchObject({
      idleTimeoutMs: undefined,
      sessionExpirySeconds: undefined,
    });
  });

  it('reads every contract variable from the environment', () => {
    const options = resolveOptions(
      {},
      {
        MQTT_URL: 'mqtts://broker:8883',
        MQTT_USERNAME: 'u',
        MQTT_PASSWORD: 'p',
        WORKER_ID: 'slot-1',
        MQTT_JOBS_DIR: '/mnt/jobs',
        MQTT_WORKSPACES_DIR: 'ws',
        MQTT_TOPIC: '$share/workers/jobs/pending',
        MQTT_CLEAN: 'true',
        MQTT_KILL_GRACE: '2s',
        MQTT_MAX_LOG_SIZE: '4M',
      },
      context,
    );
    expect(options).toMatchObject({
      url: 'mqtts://broker:8883',
      username: 'u',
      password: 'p',
      id: 'slot-1',
      jobsDir: '/mnt/jobs',
      workspacesDir: '/srv/worker/ws',
      topic: '$share/workers/jobs/pending',
      clean: true,
      killGraceMs: 2000,
      maxLogBytes: 4 * 1024 * 1024,
    });
  });

  it('lets flags win over the environment', () => {
    const options = resolveOptions(
      { id: 'from-flag', clean: true },
      { WORKER_ID: 'from-env', MQTT_CLEAN: 'false' },
      context,
    );
    expect(options.id).toBe('from-flag');
    expect(options.clean).toBe(true);
  });

  it.each([
    [{ url: 'http://broker' }, {}, '--url: expected an mqtt://'],
    [{ url: 'not a url' }, {}, '--url: expected a URL'],
    [{ id: '../etc' }, {}, '--id: Expected `worker id`'],
    [{}, { WORKER_ID: 'a/b' }, '--id: Expected `worker id`'],
    [{}, { MQTT_CLEAN: 'maybe' }, 'MQTT_CLEAN: expected true or false, got "maybe" (string)'],
    [{ killGraceMs: 'ten' }, {}, '--kill-grace: expected a duration like "10s", got "ten" (string)'],
    [{ killGraceMs: '10' }, {}, '--kill-grace: expected a duration'],
    [{ maxLogBytes: 'lots' }, {}, '--max-log-size: expected a size like "100M", got "lots" (string)'],
    [{ topic: '' }, {}, '--topic: expected an MQTT topic filter'],
    [{ passwordFile: 'a\0b' }, {}, '--password-file: expected a file path'],
    [{ jobsDir: '' }, {}, '--jobs-dir: expected a directory path'],
    [{ resultsTopic: 'jobs/+/results' }, {}, '--results-topic: expected an MQTT topic without wildcards'],
    [{ protocol: '4' }, {}, '--protocol: expected one of 5, 3.1.1, got "4" (string)'],
    [{ logFormat: 'xml' }, {}, '--log-format: expected one of text, json'],
    [{ idleTimeoutMs: 'soonish' }, {}, '--idle-timeout: expected a duration like "10m" or "off"'],
    [{ certFile: 'c.pem' }, {}, '--cert and --key: expected both or neither'],
  ] as [OptionFlags, Record<string, string>, string][])('rejects %j %j', (flags, env, expected) => {
    const problems = problemsOf(flags, env);
    expect(problems).toHaveLength(1);
    expect(problems[0]).toContain(expected);
  });

  it('reports every invalid value at once', () => {
    expect(problemsOf({ url: 'ftp://x', killGraceMs: 'x' }, { MQTT_CLEAN: 'perhaps' })).toHaveLength(3);
  });
});

describe('defaultWorkerId', () => {
  it.each([
    ['build-7', 'build-7'],
    ['3f2a9c1b7d4e', '3f2a9c1b7d4e'],
    ['host.example.com', 'host.example.com'],
    ['weird host!name', 'weird-host-name'],
    ['-leading', 'leading'],
    ['', 'worker'],
    ['x'.repeat(300), 'x'.repeat(128)],
  ])('%s -> %s', (host, id) => {
    expect(defaultWorkerId(host)).toBe(id);
  });
});
