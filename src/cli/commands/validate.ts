import path from 'node:path';
import { ExitCode } from '../../shared/errors.js';
import { writeStdio } from '../stdio.js';

export async function runValidate(target: string): Promise<number> {
  const { validateJobDefinition } = await import('../../job/validate.js');
  const report = await validateJobDefinition(path.resolve(target));
  if (report.ok) {
    writeStdio(
      1,
      `${report.file}: valid (${report.spec.steps.length} step${report.spec.steps.length === 1 ? '' : 's'})\n`,
    );
    return ExitCode.OK;
  }
  writeStdio(
    1,
    `${report.file}: ${report.problems.length} problem${report.problems.length === 1 ? '' : 's'}\n`,
  );
  for (const problem of report.problems) writeStdio(1, `  - ${problem}\n`);
  return ExitCode.JOB_NOT_SUCCESSFUL;
}
