import { readdirSync, readFileSync } from 'node:fs';

// Without a cgroup, nothing the kernel offers Node keeps a setsid or double-forked daemon tied to its step (a child
// subreaper needs prctl, which Node does not expose). What does follow every descendant is the environment: each
// step gets a tag of its own, and when the step ends every process still carrying it is killed. A process that
// clears its environment, or runs as a user whose /proc entries the worker cannot read, escapes: result.json says so.
export const TAG_VARIABLE = 'MQTT_FS_WORKER_STEP_TAG';
// A fork loop can outrun one pass; each pass kills what the last one missed.
const PASSES = 5;

let tags = 0;

/** A tag no other step on this host carries (node:crypto is not loaded for it: the tag guards nothing secret). */
export function newStepTag(): string {
  tags++;
  return `${process.pid}.${Date.now().toString(36)}.${tags}.${Math.random().toString(36).slice(2)}`;
}

/**
 * SIGKILLs every process whose environment carries `tag`; returns how many it killed outside process group
 * `group` (the step's own group was killed already: its members may still be on their way out).
 */
export function killTagged(tag: string, group: number): number {
  const needle = Buffer.from(`\0${TAG_VARIABLE}=${tag}\0`);
  // A killed process stays readable until the kernel has torn it down: each one is signalled and counted once.
  const signalled = new Set<number>();
  const killed = new Set<number>();
  for (let pass = 0; pass < PASSES; pass++) {
    let found = 0;
    for (const pid of processIds()) {
      if (pid === process.pid || signalled.has(pid) || !carries(pid, needle)) continue;
      const outside = processGroup(pid) !== group;
      try {
        process.kill(pid, 'SIGKILL');
        signalled.add(pid);
        found++;
        if (outside) killed.add(pid);
      } catch {
        // ESRCH: it ended on its own.
      }
    }
    if (found === 0) break;
  }
  return killed.size;
}

function processIds(): number[] {
  try {
    return readdirSync('/proc')
      .filter((name) => name.charCodeAt(0) <= 57)
      .map(Number)
      .filter(Number.isInteger);
  } catch {
    return []; // no /proc: nothing to find
  }
}

function processGroup(pid: number): number | undefined {
  try {
    // /proc/PID/stat: "pid (comm) state ppid pgrp …"; comm can hold spaces and parentheses, so read after the last ')'.
    const stat = readFileSync(`/proc/${pid}/stat`, 'latin1');
    return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[2]);
  } catch {
    return undefined;
  }
}

function carries(pid: number, needle: Buffer): boolean {
  try {
    const environ = readFileSync(`/proc/${pid}/environ`);
    // Matched with the NUL before it, so that no other variable's value can end in it (or the first variable).
    return environ.includes(needle) || environ.subarray(0, needle.length - 1).equals(needle.subarray(1));
  } catch {
    return false; // gone, a kernel thread, or another user's
  }
}
