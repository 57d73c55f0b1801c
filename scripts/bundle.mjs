// Bundles the CLI for start-up speed: the worker starts once per job, and resolving and compiling hundreds of
// small module files cost more than the job itself for short jobs. The CLI becomes one CommonJS file (three rarely
// used libraries ship beside it, see VENDORED), which the
// binary loads through a V8 code cache (src/launch.ts): code that is never called (other commands, rare
// transports) is never compiled, and what a run did compile is reused by the next. `tsc` builds only the types
// for the library API (dist/**/*.d.ts): per-module JavaScript would ship and never be loaded.
import { readFileSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';

// MQTT.js and its packet library are written for browsers too. On Node, two of their dependencies are dead
// weight that every job would compile and initialise: readable-stream is a copy of node:stream (the real one is
// used instead), and worker-timers only serves browsers' background tabs (MQTT.js picks native timers on Node).
const nodeOnly = {
  name: 'node-only',
  setup(bundle) {
    bundle.onResolve({ filter: /^readable-stream$/ }, () => ({ path: 'node:stream', external: true }));
    bundle.onResolve({ filter: /^worker-timers$/ }, () => ({
      path: 'worker-timers',
      namespace: 'node-only',
    }));
    bundle.onLoad({ filter: /.*/, namespace: 'node-only' }, () => ({
      contents: 'module.exports = { setInterval, clearInterval, setTimeout, clearTimeout };',
      loader: 'js',
    }));
  },
};

// MQTT.js traces through `debug`, whose loading probes the terminal (tty, a missing supports-color looked up
// through every node_modules folder up to /): ~1.3 ms of every connection's start. The real one loads only when
// DEBUG asks for output; otherwise each namespace gets a function that does nothing.
const debugOnDemand = {
  name: 'debug-on-demand',
  setup(bundle) {
    bundle.onResolve({ filter: /^debug$/ }, () => ({ path: 'debug', namespace: 'debug-on-demand' }));
    bundle.onLoad({ filter: /.*/, namespace: 'debug-on-demand' }, () => ({
      contents: `module.exports = process.env.DEBUG
        ? require('debug/src/index.js')
        : (namespace) => Object.assign(() => {}, { namespace, enabled: false });`,
      loader: 'js',
      resolveDir: path.dirname(createRequire(import.meta.url).resolve('mqtt')),
    }));
  },
};

// commander loads node:child_process when it loads (~4 ms), for subcommands run as separate executables, which this
// CLI has none of. Commands that run steps load it anyway; `--version`, `--help` and `validate` need not.
const lazyChildProcess = {
  name: 'lazy-child-process',
  setup(bundle) {
    bundle.onResolve({ filter: /^node:child_process$/ }, (args) =>
      args.importer.includes(`${path.sep}commander${path.sep}`)
        ? { path: 'child_process', namespace: 'lazy-child-process' }
        : undefined,
    );
    bundle.onLoad({ filter: /.*/, namespace: 'lazy-child-process' }, () => ({
      contents: "module.exports = new Proxy({}, { get: (_, key) => require('node:child_process')[key] });",
      loader: 'js',
    }));
  },
};

// Code that only some runs need stays out of the CLI bundle: every job reads all of the bundle, and its code cache
// carries the outline of every module in it (vendoring these three shrank the bundle by 40% and a dry run's cache
// by 14%). ws and socks serve ws:// URLs (through mqtt.connect; TCP and TLS build their own stream, see broker/client.ts)
// and execa serves --run-as. Each becomes a file of its own next to the bundle, loaded by a plain require. Each is
// resolved as its importer loads it: MQTT.js requires ws and socks (CommonJS), run-as.ts imports execa (ESM only).
const fromMqtt = createRequire(createRequire(import.meta.url).resolve('mqtt'));
const VENDORED = {
  ws: fromMqtt.resolve('ws'),
  socks: fromMqtt.resolve('socks'),
  execa: fileURLToPath(import.meta.resolve('execa')),
};
const vendored = {
  name: 'vendored',
  setup(bundle) {
    const names = new RegExp(`^(${Object.keys(VENDORED).join('|')})$`);
    bundle.onResolve({ filter: names }, (args) => ({ path: `./vendor/${args.path}.cjs`, external: true }));
  },
};

// Each patch must still find what it patches: a dependency update that moves it fails the build here instead of
// shipping a bundle that quietly lost the saving. (The lru-cache clock patch, which saved ~1.3 ms of a broker
// connection's start, is gone: under the ~2 ms that is worth a patch of someone else's code.)
function mustApply(plugin) {
  return {
    name: plugin.name,
    setup(bundle) {
      let applied = 0;
      const counted = (register) => (options, callback) =>
        register(options, async (args) => {
          const result = await callback(args);
          if (result) applied++;
          return result;
        });
      plugin.setup({ ...bundle, onResolve: counted(bundle.onResolve), onLoad: counted(bundle.onLoad) });
      bundle.onEnd((result) => {
        if (result.errors.length === 0 && applied === 0)
          throw new Error(
            `${plugin.name}: the patch found nothing to patch; review it against the dependency`,
          );
      });
    },
  };
}

const { version } = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8'));

rmSync(new URL('../dist/bundle', import.meta.url), { recursive: true, force: true });
const common = {
  outdir: 'dist/bundle',
  outExtension: { '.js': '.cjs' },
  bundle: true,
  format: 'cjs',
  platform: 'node',
  target: 'node20',
  minify: true,
  legalComments: 'linked',
  logLevel: 'warning',
};
await build({
  ...common,
  entryPoints: { cli: 'src/cli/main.ts' },
  // A source map beside the bundle, with no comment pointing to it (Node would look it up at every start): an
  // INTERNAL error's stack trace is mapped back to src/ when it is printed (src/cli/stack.ts).
  sourcemap: 'external',
  sourcesContent: false,
  define: { __MFW_VERSION__: JSON.stringify(version) },
  // The launcher compiles the bundle as a plain script, which has no loader for import(): dynamic imports
  // become lazy require()s (they still run only when reached).
  supported: { 'dynamic-import': false },
  plugins: [nodeOnly, debugOnDemand, lazyChildProcess, vendored].map(mustApply),
});
await build({
  ...common,
  entryPoints: Object.fromEntries(Object.entries(VENDORED).map(([name, file]) => [`vendor/${name}`, file])),
  plugins: [nodeOnly],
});
await build({ ...common, entryPoints: { launch: 'src/launch.ts' } });
// The library API (`exports["."]`) as one ES module too, so that the package needs no runtime dependencies:
// everything it uses is in dist/. Its CommonJS parts (picomatch, commander…) require Node's modules through a
// require made for the bundle.
await build({
  entryPoints: { index: 'src/index.ts' },
  outdir: 'dist',
  bundle: true,
  format: 'esm',
  platform: 'node',
  target: 'node20',
  logLevel: 'warning',
  banner: {
    js: "import { createRequire as __mfwRequire } from 'node:module'; const require = __mfwRequire(import.meta.url);",
  },
  plugins: [nodeOnly],
});
