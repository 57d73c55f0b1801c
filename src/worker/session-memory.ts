import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';

// Whether this slot had a persistent session on the broker before: a marker per worker id in the workspaces
// directory (the slot's own disk). A broker that answers "no session" to a slot that had one lost what was queued
// for it (ejabberd and Aedes keep sessions in memory; a Mosquitto without persistence; an expiry that passed), and
// nothing else would ever say so.

function markerOf(workspacesDir: string, id: string): string {
  return path.join(workspacesDir, '.mqtt-fs-worker', 'sessions', id);
}

/** True when the slot had a session before this connection and the broker has none now; records the session. */
export function sessionLost(
  workspacesDir: string,
  id: string,
  sessionPresent: boolean,
  persistent: boolean,
): boolean {
  const marker = markerOf(workspacesDir, id);
  const hadOne = existsSync(marker);
  try {
    if (persistent && !hadOne) {
      mkdirSync(path.dirname(marker), { recursive: true });
      writeFileSync(marker, '');
    }
  } catch {
    // Only a warning depends on it.
  }
  return persistent && hadOne && !sessionPresent;
}
