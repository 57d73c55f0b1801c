/**
 * Names of variables whose values are secrets: `DB_PASSWORD`, `PGPASSWORD`, `GITHUB_TOKEN`,
 * `AWS_SECRET_ACCESS_KEY`, … The four plainest words count at the end of any name; the others only after `_` or
 * alone (`OAUTH_CALLBACK_URL` and `MONKEY` are not secrets).
 */
export const SECRET_NAME =
  /(PASSWORD|PASSWD|SECRET|TOKEN)$|(^|_)(API_?KEY|PRIVATE_?KEY|ACCESS_?KEY|SECRET_?KEY|CREDENTIALS?|AUTH)$/i;

/** Shorter values are not masked: masking "1" or "on" would ruin every log and hide nothing. */
export const MIN_SECRET_LENGTH = 4;
const MASK = Buffer.from('***');

/** The values to mask: of secret-looking variables in `env`, plus `extra` (the broker password, `--mask`). */
export function secretValues(
  env: Readonly<Record<string, string>>,
  extra: readonly (string | undefined)[] = [],
): string[] {
  const values = new Set<string>();
  for (const [name, value] of Object.entries(env)) if (SECRET_NAME.test(name)) values.add(value);
  for (const value of extra) if (value !== undefined) values.add(value);
  // Longest first, so that a secret containing another is masked whole.
  return [...values].filter((v) => v.length >= MIN_SECRET_LENGTH).sort((a, b) => b.length - a.length);
}

/** Masks secrets in a line of text (the worker's own log). */
export function maskText(text: string, secrets: readonly string[]): string {
  let out = text;
  for (const secret of secrets) if (out.includes(secret)) out = out.split(secret).join('***');
  return out;
}

/**
 * Masks secrets in a stream of chunks, also when a secret is split across two writes of the step. Only a tail
 * that could be the start of a secret is held back (until the next chunk or the end), so ordinary output still
 * reaches the log at once.
 */
export class StreamMasker {
  readonly #secrets: Buffer[];
  #carry: Buffer = Buffer.alloc(0);

  constructor(secrets: readonly string[]) {
    this.#secrets = [...secrets].sort((a, b) => b.length - a.length).map((s) => Buffer.from(s));
  }

  get active(): boolean {
    return this.#secrets.length > 0;
  }

  /** The masked bytes that can be written now. */
  push(chunk: Buffer): Buffer {
    const data = this.#carry.length > 0 ? Buffer.concat([this.#carry, chunk]) : chunk;
    const masked = this.#replace(data);
    const hold = this.#partialTail(masked);
    this.#carry = hold > 0 ? Buffer.from(masked.subarray(masked.length - hold)) : Buffer.alloc(0);
    return hold > 0 ? masked.subarray(0, masked.length - hold) : masked;
  }

  /** What is left at the end of the stream. */
  end(): Buffer {
    const rest = this.#carry;
    this.#carry = Buffer.alloc(0);
    return rest;
  }

  #replace(data: Buffer): Buffer {
    let current = data;
    for (const secret of this.#secrets) {
      let at = current.indexOf(secret);
      if (at < 0) continue;
      const parts: Buffer[] = [];
      let from = 0;
      while (at >= 0) {
        parts.push(current.subarray(from, at), MASK);
        from = at + secret.length;
        at = current.indexOf(secret, from);
      }
      parts.push(current.subarray(from));
      current = Buffer.concat(parts);
    }
    return current;
  }

  // The length of the longest tail of `data` that is a proper prefix of some secret.
  #partialTail(data: Buffer): number {
    let longest = 0;
    for (const secret of this.#secrets) {
      for (let length = Math.min(secret.length - 1, data.length); length > longest; length--) {
        if (data.compare(secret, 0, length, data.length - length) === 0) {
          longest = length;
          break;
        }
      }
    }
    return longest;
  }
}
