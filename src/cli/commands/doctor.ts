import { engineConfig } from '../../config/engine-config.js';
import type { OptionFlags } from '../../config/options.js';
import { ExitCode } from '../../shared/errors.js';
import { resolve, VERSION } from '../context.js';
import { writeStdio } from '../stdio.js';

export async function runDoctor(flags: OptionFlags): Promise<number> {
  const options = await resolve(flags);
  const { doctor } = await import('../../control/doctor.js');
  const checks = await doctor(options, await engineConfig(options, process.env, VERSION));
  for (const check of checks)
    writeStdio(
      1,
      `${check.ok ? (check.warn ? 'warn' : 'ok  ') : 'FAIL'}  ${check.name.padEnd(20)} ${check.detail}\n`,
    );
  return checks.every((check) => check.ok) ? ExitCode.OK : ExitCode.JOB_NOT_SUCCESSFUL;
}
