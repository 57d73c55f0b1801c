import { readFile } from 'node:fs/promises';
import path from 'node:path';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { maskText, StreamMasker, secretValues } from '../../src/step/mask.js';
import { runStep } from '../../src/step/run-step.js';
import { tempDir } from '../helpers/tmp.js';

describe('secretValues', () => {
  it('takes the values of secret-looking variables, the extras, longest first, none too short', () => {
    const env = {
      DB_PASSWORD: 'hunter22',
      GITHUB_TOKEN: 'ghp_abcdefghij',
      AWS_SECRET_ACCESS_KEY: 'aws-secret-value',
      NPM_API_KEY: 'npm-key-1',
      SSH_PRIVATE_KEY: 'ssh-private',
      PASSWORD: 'plainpass',
      PATH: '/usr/bin',
      TOKENIZER: 'not-a-secret',
      SHORT_TOKEN: 'abc',
    };
    expect(secretValues(env, ['broker-pass', undefined])).toEqual([
      'aws-secret-value',
      'ghp_abcdefghij',
      'ssh-private',
      'broker-pass',
      'npm-key-1',
      'plainpass',
      'hunter22',
    ]);
  });

  it('takes names that end in a secret word without an underscore (PGPASSWORD), and not look-alikes', () => {
    const env = {
      PGPASSWORD: 'pg-password',
      MYSQL_PWD_PASSWD: 'my-passwd',
      VAULTTOKEN: 'vault-token',
      OAUTH_CALLBACK_URL: 'https://example.test/cb',
      MONKEY: 'banana-split',
      PASSWORDLESS: 'yes-please',
    };
    expect(secretValues(env).sort()).toEqual(['my-passwd', 'pg-password', 'vault-token']);
  });

  it('masks every occurrence in a line', () => {
    expect(maskText('user=a pass=hunter22 again hunter22', ['hunter22'])).toBe('user=a pass=*** again ***');
  });
});

describe('StreamMasker', () => {
  const run = (secrets: string[], chunks: string[]): string => {
    const masker = new StreamMasker(secrets);
    return Buffer.concat([...chunks.map((c) => masker.push(Buffer.from(c))), masker.end()]).toString();
  };

  it.each([
    [['topsecret'], ['a topsecret b'], 'a *** b'],
    [['topsecret'], ['a top', 'secret b'], 'a *** b'],
    [['topsecret'], ['a t', 'o', 'p', 's', 'e', 'c', 'r', 'e', 't b'], 'a *** b'],
    [['topsecret'], ['a top', 'hat'], 'a tophat'],
    [['topsecret'], ['ends with topsec'], 'ends with topsec'],
    [['abcd', 'abcdef'], ['x abcdef y abcd z'], 'x *** y *** z'],
    [['aaaa'], ['aaaaaaaa'], '******'],
  ])('masks %j in %j', (secrets, chunks, expected) => {
    expect(run(secrets, chunks)).toBe(expected);
  });

  it('holds back only a tail that could start a secret', () => {
    const masker = new StreamMasker(['password123']);
    expect(masker.push(Buffer.from('line one\n')).toString()).toBe('line one\n');
    expect(masker.push(Buffer.from('value: pass')).toString()).toBe('value: ');
    expect(masker.push(Buffer.from('word123\n')).toString()).toBe('***\n');
  });

  it('never lets a secret through, however the output is split (property)', () => {
    fc.assert(
      fc.property(
        fc.string({ minLength: 4, maxLength: 12, unit: fc.constantFrom('a', 'b', 'c', 'x') }),
        fc.array(fc.string({ maxLength: 8, unit: fc.constantFrom('a', 'b', 'c', 'x', '\n') }), {
          maxLength: 6,
        }),
        fc.array(fc.nat(), { maxLength: 6 }),
        (secret, fillers, cuts) => {
          const text = fillers.join(secret);
          const bounds = [0, ...new Set(cuts.map((c) => c % (text.length + 1))), text.length].sort(
            (a, b) => a - b,
          );
          const chunks = bounds.slice(1).map((end, i) => text.slice(bounds[i], end));
          const out = run([secret], chunks);
          expect(out.includes(secret)).toBe(false);
          expect(out).toBe(maskText(text, [secret]));
        },
      ),
      { numRuns: 2000 },
    );
  });
});

describe('masking in step logs', () => {
  it('masks secret variables and extras, also split across two writes of the step', async () => {
    const dir = await tempDir();
    const log = path.join(dir, 'step.log');
    const outcome = await runStep({
      command:
        'echo "db: $DB_PASSWORD"; printf "half:%s" "super-"; sleep 0.2; printf "secret-value\\n"; echo broker=brokerpass',
      cwd: dir,
      env: { PATH: process.env.PATH ?? '/usr/bin:/bin', DB_PASSWORD: 'hunter22' },
      logFile: log,
      maxLogBytes: 1e6,
      timeoutMs: undefined,
      killGraceMs: 500,
      secrets: secretValues({ DB_PASSWORD: 'hunter22' }, ['super-secret-value', 'brokerpass']),
    });
    expect(outcome.exitCode).toBe(0);
    expect(await readFile(log, 'utf8')).toBe('db: ***\nhalf:***\nbroker=***\n');
  });
});
