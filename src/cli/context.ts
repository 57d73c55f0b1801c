import { hostname } from 'node:os';
import type { OptionFlags, Options } from '../config/options.js';
import { resolveOptions } from '../config/resolve.js';
import { maskedValues, readSecret } from '../config/secrets.js';
import { ExitCode } from '../shared/errors.js';
import { createLogger, type Logger } from '../shared/log.js';
import { maskText } from '../step/mask.js';
import { readableStack } from './stack.js';
import { writeStdio } from './stdio.js';

// What every command takes from the process: its options (with the secrets kept in files read), its logger on
// stderr, and its signals. The cli folder is the only code that touches the process.

// Built in by scripts/bundle.mjs: the CLI runs from the bundle only (bin/ → dist/bundle/cli.cjs).
declare const __MFW_VERSION__: string;
export const VERSION = __MFW_VERSION__;

/** The options, with the secrets kept in files read (once, here): they must be masked from the first line on. */
export async function resolve(flags: OptionFlags): Promise<Options> {
  const options = resolveOptions(flags, process.env, { cwd: process.cwd(), hostname: hostname() });
  if (!options.secretFile && !options.passwordFile) return options;
  return Object.freeze({
    ...options,
    secret: options.secretFile ? await readSecret(options.secretFile, '--secret-file') : options.secret,
    password: options.passwordFile
      ? await readSecret(options.passwordFile, '--password-file')
      : options.password,
    passwordFile: undefined,
  });
}

export function logger(options: Pick<Options, 'logFormat' | 'password' | 'secret' | 'mask' | 'url'>): Logger {
  const secrets = maskedValues(options).sort((a, b) => b.length - a.length);
  return createLogger({
    format: options.logFormat,
    level: 'info',
    // A logged stack trace (an unexpected error in a job) points at src/, not at the bundle.
    write: (line) => writeStdio(2, line.includes('cli.cjs:') ? readableStack(line) : line),
    ...(secrets.length > 0 ? { redact: (line: string) => maskText(line, secrets) } : {}),
  });
}

export function signalExitCode(name: NodeJS.Signals, signals: Record<string, number>): number {
  return ExitCode.SIGNAL_BASE + (signals[name] ?? 15);
}

/** An AbortSignal fired by SIGINT/SIGTERM with reason 'interrupted'; `received` tells which arrived. */
export function interruptOnSignals(): {
  signal: AbortSignal;
  received: () => NodeJS.Signals | undefined;
  dispose: () => void;
} {
  const controller = new AbortController();
  let received: NodeJS.Signals | undefined;
  const handler = (name: NodeJS.Signals): void => {
    received ??= name;
    controller.abort('interrupted');
  };
  process.on('SIGINT', handler);
  process.on('SIGTERM', handler);
  return {
    signal: controller.signal,
    received: () => received,
    dispose: () => {
      process.off('SIGINT', handler);
      process.off('SIGTERM', handler);
    },
  };
}
