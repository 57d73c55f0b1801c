import { readdirSync, readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

// The folders of src/ in the order a job goes through them (docs/development.md), the programs that drive a fleet
// from outside (`control/`) above the slot: a module may import its own folder and the folders after its own, never
// one before it. `launch.ts` and `index.ts` stand apart.
const LAYERS = ['cli', 'control', 'worker', 'broker', 'config', 'job', 'limits', 'step', 'shared'];
const SRC = fileURLToPath(new URL('../../src', import.meta.url));

function sources(dir: string): string[] {
  return readdirSync(dir).flatMap((name) => {
    const file = path.join(dir, name);
    return statSync(file).isDirectory() ? sources(file) : file.endsWith('.ts') ? [file] : [];
  });
}

function folderOf(file: string): string {
  return path.relative(SRC, file).split(path.sep)[0] ?? '';
}

describe('the layout of src/', () => {
  it('has every module in one of the pipeline folders, but launch.ts and index.ts', () => {
    const loose = sources(SRC).filter((file) => !LAYERS.includes(folderOf(file)));
    expect(loose.map((file) => path.relative(SRC, file)).sort()).toEqual(['index.ts', 'launch.ts']);
  });

  it('imports only downwards: a folder never imports one before it in the pipeline', () => {
    const upwards: string[] = [];
    for (const file of sources(SRC)) {
      const from = folderOf(file);
      if (!LAYERS.includes(from)) continue;
      const text = readFileSync(file, 'utf8');
      for (const [, spec] of text.matchAll(/(?:from|import\(|import)\s*'(\.[^']+)'/g)) {
        const to = folderOf(path.resolve(path.dirname(file), spec as string));
        if (LAYERS.indexOf(to) < LAYERS.indexOf(from)) upwards.push(`${path.relative(SRC, file)} -> ${spec}`);
      }
    }
    expect(upwards).toEqual([]);
  });
});

/** The modules a module loads when it runs: static and dynamic imports and re-exports, type-only ones aside. */
function runtimeImports(file: string): string[] {
  const text = readFileSync(file, 'utf8');
  const found: string[] = [];
  for (const [, keyword, names, spec] of text.matchAll(
    /^\s*(import|export)\s+(type\s+[\s\S]*?|\{[\s\S]*?\}|\*[^;]*?|[\w$]+(?:\s*,\s*\{[\s\S]*?\})?)\s+from\s+'(\.[^']+)'/gm,
  )) {
    const named = (names ?? '')
      .replace(/^\{|\}$/g, '')
      .split(',')
      .map((n) => n.trim())
      .filter(Boolean);
    const typeOnly =
      (names ?? '').startsWith('type ') || (named.length > 0 && named.every((n) => n.startsWith('type ')));
    if (!typeOnly && keyword) found.push(spec as string);
  }
  for (const [, spec] of text.matchAll(/import\(\s*'(\.[^']+)'\s*\)/g)) found.push(spec as string);
  return found.map((spec) => path.resolve(path.dirname(file), spec).replace(/\.js$/, '.ts'));
}

describe('the modules of src/', () => {
  it('have no runtime import cycle (type-only imports aside)', () => {
    const graph = new Map(sources(SRC).map((file) => [file, runtimeImports(file)]));
    const cycles: string[] = [];
    const state = new Map<string, 'open' | 'done'>();
    const walk = (file: string, trail: string[]): void => {
      if (state.get(file) === 'done') return;
      if (state.get(file) === 'open') {
        const loop = trail.slice(trail.indexOf(file));
        cycles.push([...loop, file].map((f) => path.relative(SRC, f)).join(' -> '));
        return;
      }
      state.set(file, 'open');
      for (const next of graph.get(file) ?? []) if (graph.has(next)) walk(next, [...trail, file]);
      state.set(file, 'done');
    };
    for (const file of graph.keys()) walk(file, []);
    expect(cycles).toEqual([]);
  });
});
