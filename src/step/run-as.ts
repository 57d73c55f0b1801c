import { ErrorCode, WorkerError } from '../shared/errors.js';

/** The account steps run as (`--run-as`): ids for setpriv, and the variables a login would set. */
export interface RunAsUser {
  readonly name: string;
  readonly uid: number;
  readonly gid: number;
  readonly groups: readonly number[];
  readonly home: string;
}

/**
 * Looks a user up through the system's name service (getent, so LDAP and the like work as for `su`). The worker
 * must be root to switch users.
 */
export async function resolveRunAs(name: string, isRoot: boolean): Promise<RunAsUser> {
  if (!isRoot)
    throw new WorkerError(
      ErrorCode.INVALID_OPTION,
      `--run-as: the worker must run as root to run steps as ${name}`,
    );
  let passwd: string;
  let groups: string;
  // Loaded here, not at the top: execa is a large module and most workers never switch users.
  const { execa } = await import('execa');
  try {
    passwd = (await execa('getent', ['passwd', name])).stdout.trim();
    groups = (await execa('id', ['-G', name])).stdout.trim();
  } catch {
    throw new WorkerError(ErrorCode.INVALID_OPTION, `--run-as: no user ${JSON.stringify(name)} on this host`);
  }
  const [, , uid, gid, , home] = passwd.split(':');
  return {
    name,
    uid: Number(uid),
    gid: Number(gid),
    groups: groups.split(/\s+/).filter(Boolean).map(Number),
    home: home || '/',
  };
}

/** setpriv arguments that become `user` with its groups (the gate runs them after joining the cgroup). */
export function setprivArgs(user: RunAsUser): string[] {
  const groups = user.groups.length > 0 ? [`--groups=${user.groups.join(',')}`] : ['--clear-groups'];
  return [`--reuid=${user.uid}`, `--regid=${user.gid}`, ...groups];
}
