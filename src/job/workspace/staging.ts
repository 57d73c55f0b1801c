import { ErrorCode, WorkerError } from '../../shared/errors.js';
import type { Logger } from '../../shared/log.js';
import type { EngineConfig } from '../run-job.js';
import { type StageResult, stageJob } from './stage.js';

/** Stages the job folder into `workspace`: an overlay where --stage allows one and it mounts, else a copy. */
export async function stage(
  config: EngineConfig,
  jobDir: string,
  workspace: string,
  log: Logger,
): Promise<StageResult & { readonly upper?: string }> {
  const mode = config.stage ?? 'copy';
  if (mode !== 'copy') {
    const overlay = await import('./overlay.js');
    let why = overlay.overlayRefusal({ jobDir, workspace, runAs: config.runAs !== undefined });
    if (why === undefined) {
      const surveyed = await overlay.survey(jobDir);
      // A small folder copies faster than an overlay mounts: `auto` copies it, silently.
      if (mode === 'auto' && !overlay.overlayPays(surveyed)) return stageJob(jobDir, workspace, config.runAs);
      try {
        const mask = await overlay.ensureMask(config.workspacesDir);
        const layers = overlay.overlayLayers(config.workspacesDir, config.workerId);
        return await overlay.stageOverlay(jobDir, workspace, layers, surveyed, mask);
      } catch (error) {
        if (mode === 'overlay') throw error;
        why = (error as Error).message;
        await overlay.unmountUnder(workspace); // never copy into a half-made mount
      }
    }
    if (mode === 'overlay')
      throw new WorkerError(
        ErrorCode.STAGING_FAILED,
        `--stage overlay: cannot stage by overlay here: ${why}`,
      );
    log.info(`staging by copy: ${why}`);
  }
  return stageJob(jobDir, workspace, config.runAs);
}
