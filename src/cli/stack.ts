// The shipped CLI is one minified bundle; its source map lies beside it (dist/bundle/cli.cjs.map) without the
// comment that would make Node read it at every start. Only when an unexpected error is printed are the bundle's
// positions in its stack trace mapped back to src/ (file:line:column), so a bug report points at the code.

const FRAME = /([^\s(]*cli\.cjs):(\d+):(\d+)/g;

/** `stack` with every position in the bundle replaced by its place in src/; unchanged if no map can be read. */
export function readableStack(stack: string): string {
  try {
    const { readFileSync } = process.getBuiltinModule('node:fs');
    const { SourceMap, Module } = process.getBuiltinModule('node:module') as typeof import('node:module') & {
      Module: { wrapper: readonly string[] };
    };
    const maps = new Map<string, InstanceType<typeof SourceMap> | undefined>();
    // The launcher compiles the bundle inside the CommonJS wrapper (launch.ts): line 1 is shifted by its head.
    const shift = Module.wrapper[0]?.length ?? 0;
    return stack.replace(FRAME, (frame, file: string, line: string, column: string) => {
      if (!maps.has(file)) maps.set(file, load(file, readFileSync, SourceMap));
      const map = maps.get(file);
      const lineIndex = Number(line) - 1;
      const columnIndex = Number(column) - 1 - (lineIndex === 0 ? shift : 0);
      const entry = map?.findEntry(lineIndex, Math.max(0, columnIndex)) as
        | { originalSource?: string; originalLine?: number; originalColumn?: number }
        | undefined;
      if (!entry?.originalSource || entry.originalLine === undefined) return frame;
      const source = entry.originalSource.replace(/^(\.\.\/)+/, '');
      return `${source}:${entry.originalLine + 1}:${(entry.originalColumn ?? 0) + 1}`;
    });
  } catch {
    return stack;
  }
}

function load(
  file: string,
  readFileSync: typeof import('node:fs').readFileSync,
  SourceMap: typeof import('node:module').SourceMap,
): InstanceType<typeof SourceMap> | undefined {
  try {
    return new SourceMap(JSON.parse(readFileSync(`${file}.map`, 'utf8')));
  } catch {
    return undefined;
  }
}
