import { defineConfig } from 'vitest/config';

// Three projects: `unit` (pure functions: no build, no broker, seconds), `engine` (real files, processes,
// cgroups and mounts against the built dist/), `e2e` (the packed, installed command and real brokers).
// `npx vitest run --project unit` runs the first alone.
export default defineConfig({
  test: {
    pool: 'forks',
    testTimeout: 30_000,
    hookTimeout: 60_000,
    reporters: ['default'],
    projects: [
      { extends: true, test: { name: 'unit', include: ['test/unit/**/*.test.ts'] } },
      {
        extends: true,
        test: {
          name: 'engine',
          include: ['test/engine/**/*.test.ts'],
          globalSetup: ['test/helpers/built-setup.ts'],
        },
      },
      {
        extends: true,
        test: {
          name: 'e2e',
          include: ['test/e2e/**/*.test.ts'],
          globalSetup: ['test/helpers/global-setup.ts'],
        },
      },
    ],
  },
});
