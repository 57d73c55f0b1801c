import { ErrorCode, WorkerError } from '../shared/errors.js';
import type { Options } from './options.js';

// The secrets the worker knows: read once from their files, and the values never to print.

/** A file an option names (a certificate, a key, a secret), read whole; a failure names the option. */
export async function readOptionFile(file: string, option: string): Promise<string> {
  try {
    const { readFile } = await import('node:fs/promises');
    return await readFile(file, 'utf8');
  } catch (error) {
    throw new WorkerError(
      ErrorCode.INVALID_OPTION,
      `${option}: cannot read ${file}: ${(error as NodeJS.ErrnoException).code ?? error}`,
      { cause: error },
    );
  }
}

/** A secret kept in a file (Docker secrets): its content without one trailing newline. */
export async function readSecret(file: string, option: string): Promise<string> {
  return (await readOptionFile(file, option)).replace(/\r?\n$/, '');
}

/** Values never to print: the broker password (also one inside --url), the shared secret, `--mask`. */
export function maskedValues(options: Pick<Options, 'password' | 'secret' | 'mask' | 'url'>): string[] {
  return [options.password, urlPassword(options.url), options.secret, ...options.mask].filter(
    (v): v is string => v !== undefined && v !== '',
  );
}

function urlPassword(url: string): string | undefined {
  try {
    const { password } = new URL(url);
    return password ? decodeURIComponent(password) : undefined;
  } catch {
    return undefined;
  }
}
