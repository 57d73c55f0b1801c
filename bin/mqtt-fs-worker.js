#!/usr/bin/env node
'use strict';
// CommonJS (see bin/package.json): starting Node's ES module loader would add ~10 ms to every job.
const { launch } = require('../dist/bundle/launch.cjs');

// process.exit skips tearing down the heap (~2 ms per job); by then the CLI has written all of its output (see
// src/cli/stdio.ts) and closed its connections.
launch(require.resolve('../dist/bundle/cli.cjs'), process.argv, process.env).then((code) => {
  process.exit(code);
});
