import { readFileSync } from 'node:fs';
import { Module } from 'node:module';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { readableStack } from '../../src/cli/stack.js';

// The shipped bundle is minified: an unexpected error's stack trace is mapped back to src/ when it is printed,
// from the source map that ships beside the bundle.

const BUNDLE = fileURLToPath(new URL('../../dist/bundle/cli.cjs', import.meta.url));

/** The 1-based line and column of `text` in `source`. */
function positionOf(source: string, text: string): { line: number; column: number } {
  const at = source.indexOf(text);
  expect(at, text).toBeGreaterThanOrEqual(0);
  const before = source.slice(0, at).split('\n');
  return { line: before.length, column: (before.at(-1)?.length ?? 0) + 1 };
}

describe('stack traces from the installed bundle', () => {
  it('maps a position in the bundle back to its file, line and column in src/', () => {
    const bundle = readFileSync(BUNDLE, 'utf8');
    const literal = 'Cannot write result.json: ';
    const inBundle = positionOf(bundle, literal);
    const source = readFileSync(fileURLToPath(new URL('../../src/job/run-job.ts', import.meta.url)), 'utf8');
    const inSource = positionOf(source, literal);
    // As the launcher compiles it: inside the CommonJS wrapper, which shifts line 1.
    const column =
      inBundle.column +
      (inBundle.line === 1 ? ((Module as unknown as { wrapper: string[] }).wrapper[0]?.length ?? 0) : 0);
    const stack = `Error: boom\n    at writeResult (${BUNDLE}:${inBundle.line}:${column})\n    at node:internal/x:1:1`;
    const mapped = readableStack(stack);
    expect(mapped).toContain(`at writeResult (src/job/run-job.ts:${inSource.line}:`);
    expect(mapped).toContain('at node:internal/x:1:1');
  });

  it('leaves a stack alone when there is no map to read', () => {
    const stack = 'Error: boom\n    at f (/nowhere/cli.cjs:1:100)';
    expect(readableStack(stack)).toBe(stack);
  });
});
