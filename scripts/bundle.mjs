// Bundles the CLI for start-up speed: the worker starts once per job, and resolving and compiling hundreds of
// small module files cost more than the job itself for short jobs. Each command's code stays in its own chunk,
// loaded only when that command runs. `tsc` still builds dist/*.js and the types for the library API.
import { readFileSync, rmSync } from 'node:fs';
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

const { version } = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8'));

rmSync(new URL('../dist/bundle', import.meta.url), { recursive: true, force: true });
await build({
  entryPoints: { cli: 'src/cli.ts' },
  outdir: 'dist/bundle',
  bundle: true,
  splitting: true,
  format: 'esm',
  platform: 'node',
  target: 'node20',
  minify: true,
  legalComments: 'linked',
  define: { __MFW_VERSION__: JSON.stringify(version) },
  // CommonJS dependencies call require() for Node's own modules; give the ES module bundle one.
  banner: {
    js: "import { createRequire as __mfwRequire } from 'node:module'; const require = __mfwRequire(import.meta.url);",
  },
  plugins: [nodeOnly],
  logLevel: 'warning',
});
