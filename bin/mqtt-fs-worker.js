#!/usr/bin/env node
import module from 'node:module';

// Cached compiled code makes the start, paid once per job, cheaper (Node >= 22.1; a no-op before).
module.enableCompileCache?.();
const { main } = await import('../dist/bundle/cli.js');
process.exitCode = await main(process.argv);
