#!/usr/bin/env node
'use strict';
// CommonJS (see bin/package.json): starting Node's ES module loader would add ~10 ms to every job.
const { launch } = require('../dist/bundle/launch.cjs');

launch(require.resolve('../dist/bundle/cli.cjs'), process.argv, process.env).then((code) => {
  process.exitCode = code;
});
