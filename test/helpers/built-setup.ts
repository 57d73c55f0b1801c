import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

// The engine tests run the built modules (dist/bundle/launch.cjs, the CLI for dry runs): dist/ must exist.
// Nothing is packed or installed for them (test/helpers/global-setup.ts does that for e2e).
export default function setup(): void {
  const cli = fileURLToPath(new URL('../../dist/bundle/cli.cjs', import.meta.url));
  if (!existsSync(cli))
    throw new Error('dist/ is missing: run `npm run build` (npm test does) before the tests');
}
