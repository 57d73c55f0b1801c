import { describe, expect, it } from 'vitest';
import { parseRequest } from '../../src/job/request.js';
import { parseJobFile } from '../../src/job/spec.js';
import { isWorkerError } from '../../src/shared/errors.js';

function problemsOf(text: string): string[] {
  try {
    parseJobFile(text);
  } catch (error) {
    if (isWorkerError(error, 'INVALID_JOB_FILE')) return [...error.problems];
    throw error;
  }
  return [];
}

describe('parseJobFile', () => {
  it('accepts the contract example and applies defaults', () => {
    const spec = parseJobFile(
      JSON.stringify({
        steps: ['npm ci', { name: 'test', run: 'npm test', timeout: '15m', env: { CI: 1, DEBUG: false } }],
        env: { NODE_ENV: 'test' },
        timeout: '1h',
        limits: { cpus: 1.5, memory: '2G', pids: 512 },
        artifacts: { exclude: ['node_modules/**', '**/*.tmp'] },
      }),
    );
    expect(spec.steps).toEqual([
      { index: 0, name: 'step 0', run: 'npm ci', timeoutMs: undefined, env: {}, continueOnError: false },
      {
        index: 1,
        name: 'test',
        run: 'npm test',
        timeoutMs: 900_000,
        env: { CI: '1', DEBUG: 'false' },
        continueOnError: false,
      },
    ]);
    expect(spec.env).toEqual({ NODE_ENV: 'test' });
    expect(spec.timeoutMs).toBe(3_600_000);
    expect(spec.limits).toEqual({ cpus: 1.5, memoryBytes: 2 * 1024 ** 3, pids: 512 });
    expect(spec.artifacts).toEqual({ include: ['**'], exclude: ['node_modules/**', '**/*.tmp'] });
  });

  it.each([
    ['90s', 90_000],
    ['10m', 600_000],
    ['1.5h', 5_400_000],
    [30, 30_000],
  ])('reads the duration %j', (timeout, ms) => {
    expect(parseJobFile(JSON.stringify({ steps: ['x'], timeout })).timeoutMs).toBe(ms);
  });

  it.each([
    ['512M', 512 * 1024 ** 2],
    ['2G', 2 * 1024 ** 3],
    ['2GiB', 2 * 1024 ** 3],
    ['100k', 100 * 1024],
    [1048576, 1048576],
  ])('reads the size %j', (memory, bytes) => {
    expect(parseJobFile(JSON.stringify({ steps: ['x'], limits: { memory } })).limits.memoryBytes).toBe(bytes);
  });

  it.each([
    ['not json', '{steps', 'job.json is not valid JSON'],
    ['an array', '[]', 'job.json must be an object like {"steps": ["npm test"]}, got an array of 0'],
    ['null', 'null', 'job.json must be an object like {"steps": ["npm test"]}, got null'],
    ['no steps', '{}', 'steps: Required, but missing'],
    ['empty steps', '{"steps": []}', 'steps: Expected at least one step'],
    [
      'steps not an array',
      '{"steps": "npm test"}',
      'steps: Expected an array of steps, got "npm test" (string)',
    ],
    ['a number step', '{"steps": [42]}', 'steps[0]: Expected a command string or a step object'],
    ['an empty command', '{"steps": ["  "]}', 'steps[0]'],
    ['a NUL in a command', '{"steps": ["echo \\u0000"]}', 'steps[0]'],
    ['a step without run', '{"steps": [{"name": "x"}]}', 'steps[0]'],
    [
      'a bad step timeout',
      '{"steps": [{"run": "x", "timeout": "ten"}]}',
      'steps[0].timeout: Expected a duration like "90s"',
    ],
    ['a unitless timeout string', '{"steps": ["x"], "timeout": "10"}', 'timeout: Expected a duration'],
    ['a negative timeout', '{"steps": ["x"], "timeout": -5}', 'timeout: Expected a duration'],
    [
      'a bad memory',
      '{"steps": ["x"], "limits": {"memory": "lots"}}',
      'limits.memory: Expected a size like "512M"',
    ],
    ['negative cpus', '{"steps": ["x"], "limits": {"cpus": -1}}', 'limits.cpus'],
    [
      'cpus as a string',
      '{"steps": ["x"], "limits": {"cpus": "2"}}',
      'limits.cpus: Expected a number of CPUs',
    ],
    ['fractional pids', '{"steps": ["x"], "limits": {"pids": 1.5}}', 'limits.pids'],
    ['an unknown key', '{"steps": ["x"], "timout": "1m"}', 'timout: Unknown key'],
    ['a bad env name', '{"steps": ["x"], "env": {"A-B": "1"}}', 'env'],
    [
      'an object env value',
      '{"steps": ["x"], "env": {"A": {}}}',
      'env.A: Expected a string, number or boolean',
    ],
    [
      'an absolute exclude',
      '{"steps": ["x"], "artifacts": {"exclude": ["/etc/**"]}}',
      'artifacts.exclude[0]: Expected a relative glob',
    ],
    [
      'a parent exclude',
      '{"steps": ["x"], "artifacts": {"include": ["../**"]}}',
      'artifacts.include[0]: Expected a relative glob',
    ],
    [
      'continueOnError not boolean',
      '{"steps": [{"run": "x", "continueOnError": "yes"}]}',
      'steps[0].continueOnError',
    ],
  ])('rejects %s', (_name, text, expected) => {
    const problems = problemsOf(text);
    expect(problems.length).toBeGreaterThan(0);
    expect(problems.join('\n')).toContain(expected);
  });

  it('reports every problem at once', () => {
    const problems = problemsOf(
      JSON.stringify({
        steps: [1, { run: 'x', timeout: 'soon' }],
        timeout: 'never',
        limits: { memory: 'big' },
      }),
    );
    expect(problems).toHaveLength(4);
  });

  it('rejects more than 1000 steps', () => {
    expect(problemsOf(JSON.stringify({ steps: Array(1001).fill('x') })).join()).toContain(
      'at most 1000 steps',
    );
  });

  it("replaces the file's steps with a request's own", () => {
    const spec = parseJobFile(JSON.stringify({ steps: ['a'], env: { A: '1' } }), 'job.json', ['b', 'c']);
    expect(spec.steps.map((s) => s.run)).toEqual(['b', 'c']);
    expect(spec.env).toEqual({ A: '1' });
  });
});

describe('parseRequest', () => {
  it('accepts an id alone and an id with steps', () => {
    expect(parseRequest('{"id":"job_2026_01"}')).toEqual({
      ok: true,
      request: { id: 'job_2026_01', steps: undefined },
    });
    expect(parseRequest(Buffer.from('{"id":"a","steps":["echo hi"]}'))).toEqual({
      ok: true,
      request: { id: 'a', steps: ['echo hi'] },
    });
  });

  it("names an unknown key, and keeps a controller's own data under meta", () => {
    const typo = parseRequest('{"id":"x","stpes":["echo hi"]}');
    expect(typo.ok || typo.error.message).toContain('unknown key "stpes"');
    expect(parseRequest('{"id":"x","meta":{"ticket":"OPS-1","by":["ci"]}}')).toEqual({
      ok: true,
      request: { id: 'x', steps: undefined },
    });
  });

  it.each([
    ['empty', '', 'INVALID_PAYLOAD', undefined],
    ['not JSON', 'hello', 'INVALID_PAYLOAD', undefined],
    ['binary', Buffer.from([0xff, 0x00, 0xfe]), 'INVALID_PAYLOAD', undefined],
    ['an array', '[{"id":"a"}]', 'INVALID_PAYLOAD', undefined],
    ['a string', '"a"', 'INVALID_PAYLOAD', undefined],
    ['null', 'null', 'INVALID_PAYLOAD', undefined],
    ['no id', '{}', 'INVALID_ID', undefined],
    ['an empty id', '{"id":""}', 'INVALID_ID', undefined],
    ['a numeric id', '{"id":42}', 'INVALID_ID', undefined],
    ['a dot id', '{"id":"."}', 'INVALID_ID', undefined],
    ['a dot-dot id', '{"id":".."}', 'INVALID_ID', undefined],
    ['a traversal id', '{"id":"../../etc"}', 'INVALID_ID', undefined],
    ['a slash id', '{"id":"a/b"}', 'INVALID_ID', undefined],
    ['an absolute id', '{"id":"/etc/passwd"}', 'INVALID_ID', undefined],
    ['a NUL id', '{"id":"a\\u0000b"}', 'INVALID_ID', undefined],
    ['a wildcard id', '{"id":"a+#"}', 'INVALID_ID', undefined],
    ['a huge id', JSON.stringify({ id: 'a'.repeat(5000) }), 'INVALID_ID', undefined],
    ['steps of the wrong type', '{"id":"ok","steps":"echo"}', 'INVALID_PAYLOAD', 'ok'],
    ['steps with a number', '{"id":"ok","steps":["a",3]}', 'INVALID_PAYLOAD', 'ok'],
    [
      'an oversized payload',
      JSON.stringify({ id: 'big', pad: 'x'.repeat(300 * 1024) }),
      'INVALID_PAYLOAD',
      'big', // named, so that its refusal goes to the rejected topic under its id
    ],
    [
      'a request nested too deep',
      `{"id":"deep","x":${'['.repeat(70)}${']'.repeat(70)}}`,
      'INVALID_PAYLOAD',
      'deep',
    ],
    ['a re-run token that is not a string', '{"id":"r","rerun":true}', 'INVALID_PAYLOAD', 'r'],
    ['a misspelled key (stpes)', '{"id":"x","stpes":["echo hi"]}', 'INVALID_PAYLOAD', 'x'],
    ['meta that is not an object', '{"id":"m","meta":[1]}', 'INVALID_PAYLOAD', 'm'],
  ] as [string, string | Buffer, string, string | undefined][])('rejects %s', (_name, payload, code, id) => {
    const parsed = parseRequest(payload);
    expect(parsed.ok).toBe(false);
    if (parsed.ok) return;
    expect(parsed.error.code).toBe(code);
    expect(parsed.id).toBe(id);
    expect(parsed.error.message.length).toBeGreaterThan(10);
  });
});

describe('parsers under generated input (property)', () => {
  const codes = new Set(['INVALID_PAYLOAD', 'INVALID_ID', 'INVALID_SIGNATURE']);

  it('parseRequest never throws and every rejection carries a known code', async () => {
    const fc = (await import('fast-check')).default;
    const requestLike = fc.record(
      {
        id: fc.oneof(
          fc.string(),
          fc.integer(),
          fc.constant(null),
          fc.constantFrom('..', '.', 'a/b', '/etc', 'ok-id', 'x'.repeat(200)),
        ),
        steps: fc.oneof(fc.anything(), fc.array(fc.oneof(fc.string(), fc.object(), fc.integer()))),
      },
      { requiredKeys: [] },
    );
    fc.assert(
      fc.property(
        fc.oneof(
          fc.anything().map((v) => JSON.stringify(v) ?? ''),
          fc.string(),
          fc.uint8Array({ maxLength: 64 }).map((b) => Buffer.from(b)),
          requestLike.map((v) => JSON.stringify(v)),
        ),
        (payload) => {
          const parsed = parseRequest(payload);
          if (!parsed.ok) {
            expect(codes.has(parsed.error.code)).toBe(true);
            expect(parsed.error.message.length).toBeGreaterThan(0);
          } else {
            expect(typeof parsed.request.id).toBe('string');
          }
        },
      ),
      { numRuns: 3000 },
    );
  });

  it('parseJobFile either returns a spec or throws INVALID_JOB_FILE with problems, nothing else', async () => {
    const fc = (await import('fast-check')).default;
    const step = fc.oneof(
      fc.string(),
      fc.record(
        {
          run: fc.oneof(fc.string(), fc.anything()),
          name: fc.anything(),
          timeout: fc.oneof(fc.string(), fc.double(), fc.constantFrom('10m', '1h', 'soon', '-1s')),
          env: fc.anything(),
          continueOnError: fc.anything(),
        },
        { requiredKeys: [] },
      ),
      fc.anything(),
    );
    const jobFile = fc.record(
      {
        steps: fc.oneof(fc.array(step, { maxLength: 5 }), fc.anything()),
        env: fc.oneof(
          fc.dictionary(fc.string(), fc.oneof(fc.string(), fc.integer(), fc.boolean(), fc.object())),
          fc.anything(),
        ),
        timeout: fc.anything(),
        limits: fc.oneof(
          fc.record(
            { cpus: fc.anything(), memory: fc.oneof(fc.string(), fc.integer()), pids: fc.anything() },
            { requiredKeys: [] },
          ),
          fc.anything(),
        ),
        artifacts: fc.anything(),
        extra: fc.anything(),
      },
      { requiredKeys: [] },
    );
    fc.assert(
      fc.property(
        fc.oneof(
          jobFile.map((v) => JSON.stringify(v)),
          fc.string(),
        ),
        (text) => {
          try {
            const spec = parseJobFile(text);
            expect(spec.steps.length).toBeGreaterThan(0);
          } catch (error) {
            expect(error).toMatchObject({ code: 'INVALID_JOB_FILE' });
            expect((error as { problems: string[] }).problems.length).toBeGreaterThan(0);
          }
        },
      ),
      { numRuns: 3000 },
    );
  });
});
