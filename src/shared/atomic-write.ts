import { constants } from 'node:fs';
import { open, rename, unlink } from 'node:fs/promises';
import path from 'node:path';

/**
 * Writes `data` as `{dir}/{name}` atomically: a temp file created without following links, then a rename, so a
 * reader sees the old file or the new one and never half of one. `durable: false` skips the fsync, for a file
 * whose loss in a crash costs nothing (a slot's presence, rewritten every 30 s).
 */
export async function writeFileAtomic(
  dir: string,
  name: string,
  data: string,
  { durable = true }: { durable?: boolean } = {},
): Promise<void> {
  const temp = path.join(dir, `.${name}.${process.pid}.${Math.random().toString(36).slice(2, 10)}.tmp`);
  const handle = await open(
    temp,
    constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW,
    0o644,
  );
  try {
    await handle.writeFile(data);
    if (durable) await handle.sync();
  } catch (error) {
    await handle.close().catch(() => {});
    await unlink(temp).catch(() => {});
    throw error;
  }
  await handle.close();
  await rename(temp, path.join(dir, name)).catch(async (error: unknown) => {
    await unlink(temp).catch(() => {});
    throw error;
  });
}
