import parseSize from 'filesize-parser';
import ms from 'ms';

// A bare number is seconds for durations (as in `timeout: 90`) and bytes for sizes; strings need a unit so that
// "10" never silently means ten milliseconds.
const DURATION_WITH_UNIT =
  /^\s*\d+(\.\d+)?\s*(ms|s|sec|secs|seconds?|m|min|mins|minutes?|h|hr|hrs|hours?|d|days?)\s*$/i;
const SIZE = /^\s*\d+(\.\d+)?\s*([kmgtp]i?b?|b)?\s*$/i;

/** Milliseconds for `"90s"`, `"10m"`, `"1h"`, `"1.5h"` or a number of seconds; undefined when not a duration. */
export function parseDuration(value: unknown): number | undefined {
  if (typeof value === 'number')
    return Number.isFinite(value) && value > 0 ? Math.round(value * 1000) : undefined;
  if (typeof value !== 'string' || !DURATION_WITH_UNIT.test(value)) return undefined;
  const parsed = ms(value.trim() as ms.StringValue);
  return Number.isFinite(parsed) && parsed > 0 ? parsed : undefined;
}

/** Bytes for `"512M"`, `"2G"`, `"2GiB"`, `"100k"` (binary units, as Docker and the kernel use) or a number. */
export function parseSizeValue(value: unknown): number | undefined {
  if (typeof value === 'number') return Number.isSafeInteger(value) && value > 0 ? value : undefined;
  if (typeof value !== 'string' || !SIZE.test(value)) return undefined;
  try {
    const parsed = parseSize(value.trim());
    return Number.isSafeInteger(parsed) && parsed > 0 ? parsed : undefined;
  } catch {
    return undefined;
  }
}

/** `1.5 GiB`, `300 MiB`, `12 KiB`, `10 B`: for log lines and messages. */
export function formatBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${unit === 0 ? value : Number(value.toFixed(1))} ${units[unit]}`;
}

/** `250ms`, `4.2s`, `3m 05s`: for log lines. */
export function formatDuration(milliseconds: number): string {
  if (milliseconds < 1000) return `${Math.round(milliseconds)}ms`;
  if (milliseconds < 60_000) return `${(milliseconds / 1000).toFixed(1)}s`;
  const minutes = Math.floor(milliseconds / 60_000);
  const seconds = Math.round((milliseconds % 60_000) / 1000);
  return `${minutes}m ${String(seconds).padStart(2, '0')}s`;
}
