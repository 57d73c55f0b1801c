/**
 * Where to cut `bytes` at most `at` long without splitting a UTF-8 sequence (continuation bytes are 10xxxxxx); `at`
 * itself where no boundary is near (bytes that are no UTF-8 at all).
 */
export function charBoundary(bytes: Buffer, at: number): number {
  if (at >= bytes.length) return bytes.length;
  let cut = at;
  while (cut > at - 4 && cut > 0 && ((bytes[cut] ?? 0) & 0xc0) === 0x80) cut--;
  return cut > 0 ? cut : at;
}

/** How many leading bytes of `bytes` end on a whole UTF-8 character (a last, incomplete sequence left out). */
export function wholeCharacters(bytes: Buffer): number {
  let start = bytes.length - 1;
  while (start > bytes.length - 4 && start > 0 && ((bytes[start] ?? 0) & 0xc0) === 0x80) start--;
  const lead = bytes[start] ?? 0;
  const length = lead >= 0xf0 ? 4 : lead >= 0xe0 ? 3 : lead >= 0xc0 ? 2 : 1;
  return start >= 0 && start + length > bytes.length ? start : bytes.length;
}
