// What the worker is told, resolved (config/resolve.ts), and what the command line gave. The table of every option
// (flag, environment variable, kind, default) is config/option-table.ts.

/** Everything the worker can be told, after defaults and validation. Frozen. */
export interface Options {
  readonly url: string;
  readonly username: string | undefined;
  readonly password: string | undefined;
  /** A file holding the password (Docker secrets); read when connecting. */
  readonly passwordFile: string | undefined;
  readonly caFile: string | undefined;
  readonly certFile: string | undefined;
  readonly keyFile: string | undefined;
  readonly protocol: '5' | '3.1.1';
  readonly id: string;
  readonly jobsDir: string;
  readonly workspacesDir: string;
  /** The first of `topics`: where `submit` publishes, what `drain` assumes. */
  readonly topic: string;
  /** Every subscription of the slot (`--topic` given several times, or comma-separated): one session, one claim per job. */
  readonly topics: readonly string[];
  /**
   * Bounded fan-out: each request reaches this many slots (one in each of K share groups) instead of every slot;
   * undefined: all (pull dispatch). `topics` are then the `$share/mqtt-fs-worker-fanout-{g}/…` subscriptions.
   */
  readonly fanout: number | undefined;
  readonly clean: boolean;
  readonly keepaliveMs: number;
  readonly connectTimeoutMs: number;
  /** Seconds the broker keeps this worker's session (and its queued jobs) while it is away; undefined: never expires. */
  readonly sessionExpirySeconds: number | undefined;
  /** Run each job in a fresh worker process under this one, which never exits between jobs. */
  readonly respawn: boolean;
  /** Exit 0 when no job came within this time; undefined: wait forever. */
  readonly idleTimeoutMs: number | undefined;
  /** A claim whose heartbeat is older than this belongs to a dead worker. */
  readonly claimLeaseMs: number;
  readonly resultsTopic: string;
  readonly statusTopic: string;
  readonly cancelTopic: string;
  readonly presenceTopic: string;
  readonly rejectedTopic: string;
  /** Where each step's output goes as it comes, `{root}/{id}`; undefined: off. */
  readonly logsTopic: string | undefined;
  /** MQTT 5 response topics are honoured only under this prefix; undefined: never. */
  readonly responseTopicPrefix: string | undefined;
  /** Grace between SIGTERM and SIGKILL when a step is stopped. */
  readonly killGraceMs: number;
  /** Per-step log cap; past it the step keeps running and its log ends with a marker line. */
  readonly maxLogBytes: number;
  readonly logFormat: 'text' | 'json';
  /** Default limits of every job, and ceilings no job may ask to exceed (undefined: none). */
  readonly cpus: number | undefined;
  readonly memoryBytes: number | undefined;
  readonly pids: number | undefined;
  readonly maxCpus: number | undefined;
  readonly maxMemoryBytes: number | undefined;
  readonly maxPids: number | undefined;
  /** Default and ceiling of a job's I/O bandwidth, bytes per second in each direction. */
  readonly ioBps: number | undefined;
  readonly maxIoBps: number | undefined;
  readonly limits: 'auto' | 'required' | 'optional' | 'off';
  readonly stage: 'auto' | 'copy' | 'overlay';
  /** Run steps as this user (the worker must be root). */
  readonly runAs: string | undefined;
  /** Values masked as `***` in step logs and the worker's log. */
  readonly mask: readonly string[];
  /** Shared secret for signed requests (or a file holding it); undefined: requests are not signed. */
  readonly secret: string | undefined;
  readonly secretFile: string | undefined;
  /** A signed request older than this is refused. */
  readonly maxAgeMs: number;
  /** Refuse requests that carry their own steps. */
  readonly noPayloadSteps: boolean;
}

/** What the command line gave (commander's parsed flags, by option key): strings and booleans, all optional. */
export type OptionFlags = Partial<Record<keyof Options, string | boolean>>;

export type Kind =
  | { type: 'text'; fallback: string }
  | { type: 'optional' }
  | { type: 'file' }
  | { type: 'boolean' }
  | { type: 'duration'; fallback: string; off?: boolean }
  | { type: 'size'; fallback: string }
  | { type: 'choice'; fallback: string; choices: readonly string[] }
  | { type: 'dir'; fallback: string }
  | { type: 'topic'; fallback: string; filter?: boolean }
  | { type: 'limit'; parse: (value: string) => number | undefined; expected: string }
  | { type: 'list' };

export interface OptionDef {
  readonly key: keyof Options;
  readonly flags: string;
  readonly env: string;
  readonly description: string;
  readonly kind: Kind;
  /** Shown in help where the default is not a plain value. */
  readonly defaultText?: string;
  /** Given several times, its values are joined with commas (as its environment variable takes them). */
  readonly repeatable?: boolean;
}
