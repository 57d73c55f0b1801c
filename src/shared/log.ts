export type Level = 'debug' | 'info' | 'warn' | 'error';

export interface Logger {
  debug(message: string, fields?: Record<string, unknown>): void;
  info(message: string, fields?: Record<string, unknown>): void;
  warn(message: string, fields?: Record<string, unknown>): void;
  error(message: string, fields?: Record<string, unknown>): void;
  /** A logger whose lines also carry `fields` (a job id, say). */
  child(fields: Record<string, unknown>): Logger;
}

export interface LoggerOptions {
  readonly format: 'text' | 'json';
  readonly level: Level;
  /** Where lines go; the CLI passes stderr. */
  readonly write: (line: string) => void;
  readonly now?: () => Date;
  /** Applied to every line before it is written (secret masking). */
  readonly redact?: (line: string) => string;
}

const ORDER: Record<Level, number> = { debug: 10, info: 20, warn: 30, error: 40 };

/** The worker's own log: one line per event, human-readable or JSON, each with the worker and job ids. */
export function createLogger(options: LoggerOptions, base: Record<string, unknown> = {}): Logger {
  const now = options.now ?? (() => new Date());
  const redact = options.redact ?? ((line: string) => line);
  const emit = (level: Level, message: string, fields: Record<string, unknown> = {}): void => {
    if (ORDER[level] < ORDER[options.level]) return;
    const all = { ...base, ...fields };
    let line: string;
    if (options.format === 'json') {
      line = JSON.stringify({ time: now().toISOString(), level, msg: message, ...all });
    } else {
      const context = ['worker', 'job'].map((key) => all[key]).filter((value) => value !== undefined);
      const extra = Object.entries(all)
        .filter(([key, value]) => key !== 'worker' && key !== 'job' && value !== undefined)
        .map(([key, value]) => `${key}=${typeof value === 'string' ? value : JSON.stringify(value)}`);
      line = `${now().toISOString()} ${level.toUpperCase().padEnd(5)} [${context.join(' ')}] ${message}${extra.length ? ` ${extra.join(' ')}` : ''}`;
    }
    options.write(`${redact(line)}\n`);
  };
  return {
    debug: (message, fields) => emit('debug', message, fields),
    info: (message, fields) => emit('info', message, fields),
    warn: (message, fields) => emit('warn', message, fields),
    error: (message, fields) => emit('error', message, fields),
    child: (fields) => createLogger(options, { ...base, ...fields }),
  };
}

/** A logger that drops everything (tests, library callers that do not care). */
export const silentLogger: Logger = {
  debug() {},
  info() {},
  warn() {},
  error() {},
  child: () => silentLogger,
};
