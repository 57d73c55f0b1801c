// node:crypto is loaded when a request is signed or checked, not by every job's start (it costs ~5 ms).
const crypto = () => process.getBuiltinModule('node:crypto');

// Signed requests: `signature` is the hex HMAC-SHA256, under a secret shared by controllers and workers, of the
// request's canonical JSON (every key but `signature`, keys sorted at every depth, no spaces). `timestamp`
// (milliseconds since the epoch) is part of what is signed, so an old request cannot be made fresh.

/** JSON with keys sorted at every depth: the same request always gives the same bytes. */
export function canonicalJson(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(',')}]`;
  if (value !== null && typeof value === 'object') {
    const entries = Object.entries(value as Record<string, unknown>)
      .filter(([, v]) => v !== undefined)
      .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
    return `{${entries.map(([k, v]) => `${JSON.stringify(k)}:${canonicalJson(v)}`).join(',')}}`;
  }
  return JSON.stringify(value);
}

function hmac(body: Record<string, unknown>, secret: string): string {
  const { signature: _ignored, ...signed } = body;
  return crypto().createHmac('sha256', secret).update(canonicalJson(signed)).digest('hex');
}

/** The request with `timestamp` and `signature` added. */
export function signRequest(
  request: Record<string, unknown>,
  secret: string,
  nowMs: number,
): Record<string, unknown> {
  const stamped = { ...request, timestamp: nowMs };
  return { ...stamped, signature: hmac(stamped, secret) };
}

/** Why a request's signature is not acceptable, or undefined when it is. */
export function signatureProblem(
  body: Record<string, unknown>,
  secret: string,
  maxAgeMs: number,
  nowMs: number,
): string | undefined {
  const { signature, timestamp } = body;
  if (signature === undefined)
    return 'the request is not signed, and this worker accepts only signed requests';
  if (typeof signature !== 'string' || !/^[0-9a-f]{64}$/i.test(signature))
    return 'the signature is not a hex HMAC-SHA256';
  if (typeof timestamp !== 'number' || !Number.isFinite(timestamp))
    return 'a signed request needs a numeric `timestamp` (ms since the epoch)';
  const expected = Buffer.from(hmac(body, secret), 'hex');
  if (!crypto().timingSafeEqual(expected, Buffer.from(signature, 'hex')))
    return 'the signature does not match (wrong secret, or the request was altered)';
  const age = nowMs - timestamp;
  if (age > maxAgeMs)
    return `the request is ${Math.round(age / 1000)}s old, older than the ${Math.round(maxAgeMs / 1000)}s allowed (--max-age)`;
  if (age < -maxAgeMs) return `the request's timestamp is ${Math.round(-age / 1000)}s in the future`;
  return undefined;
}
