/** One line of /proc/self/mountinfo. */
export interface MountEntry {
  /** The root of the mount within its filesystem. */
  readonly root: string;
  readonly mountPoint: string;
  /** Per-mount options (`rw,nosuid,…`). */
  readonly mountOptions: readonly string[];
  readonly fsType: string;
  readonly source: string;
  /** Per-filesystem options (`rw,actimeo=3,…`, the cgroup v1 controllers). */
  readonly superOptions: readonly string[];
}

// "36 35 98:0 /root /mount/point rw,opts [optional fields] - fstype source superopts". Paths escape space, tab,
// newline and backslash as octal (\040).
const decode = (value: string): string =>
  value.replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(Number.parseInt(octal, 8)));

/** The mounts of a /proc/self/mountinfo text, in its order. */
export function parseMountinfo(text: string): MountEntry[] {
  const mounts: MountEntry[] = [];
  for (const line of text.split('\n')) {
    const [before, after] = line.split(' - ');
    if (!before || !after) continue;
    const fields = before.split(' ');
    const [fsType, source, superOpts] = after.split(' ');
    if (fields.length < 6 || !fsType) continue;
    mounts.push({
      root: decode(fields[3] as string),
      mountPoint: decode(fields[4] as string),
      mountOptions: (fields[5] as string).split(','),
      fsType,
      source: decode(source ?? ''),
      superOptions: (superOpts ?? '').split(','),
    });
  }
  return mounts;
}
