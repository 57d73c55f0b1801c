import { randomBytes } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import {
  type BrokerClient,
  type BrokerSettings,
  connectBroker,
  disconnect,
  publish,
} from '../broker/client.js';
import { idProblem } from '../shared/ids.js';
import { jsonObject } from '../shared/json.js';
import type { Logger } from '../shared/log.js';
import { type Presence, parsePresence } from '../shared/presence.js';
import { drivePresence } from '../worker/presence-board.js';
import { DASHBOARD_PAGE } from './dashboard-page.js';
import { listJobs } from './jobs-list.js';

// `dashboard`: a local web page of the fleet. One broker connection watches presence, status events, results and
// step output; the shared drive, where reachable, adds the jobs already on it. The page gets a snapshot, then
// every change as a server-sent event. Bounded everywhere: 200 jobs, the last 64 KiB of each one's output, and a
// browser that reads too slowly misses events rather than growing this process.

export interface DashboardInput {
  readonly settings: BrokerSettings;
  readonly host: string;
  readonly port: number;
  readonly presenceTopic: string;
  readonly statusTopic: string;
  readonly resultsTopic: string;
  readonly logsTopic: string | undefined;
  readonly cancelTopic: string;
  /** Where job folders are, when this host reaches the drive. */
  readonly jobsDir: string | undefined;
  readonly leaseMs: number;
  /** Whether the page may cancel jobs (publish on `{cancel}/{id}`). */
  readonly allowCancel: boolean;
  readonly log: Logger;
  readonly signal: AbortSignal;
}

interface JobView {
  id: string;
  state: string;
  status: string | null;
  slot: string | null;
  attempt: number | null;
  step: number | null;
  stepName: string | null;
  at: string;
}

const MAX_JOBS = 200;
const MAX_LOG = 64 * 1024;
const MAX_CLIENT_BACKLOG = 1024 * 1024;

class Fleet {
  readonly slots = new Map<string, Presence>();
  /** Slots the broker told of: its word (and its will) wins over the drive's presence files. */
  readonly heard = new Set<string>();
  readonly jobs = new Map<string, JobView>();
  readonly logs = new Map<string, string>();

  job(id: string, change: Partial<JobView>): JobView {
    const job = { ...(this.jobs.get(id) ?? blankJob(id)), ...change, at: new Date().toISOString() };
    this.jobs.delete(id); // most recent last
    this.jobs.set(id, job);
    while (this.jobs.size > MAX_JOBS) {
      const oldest = this.jobs.keys().next().value as string;
      this.jobs.delete(oldest);
      this.logs.delete(oldest);
    }
    return job;
  }

  output(id: string, text: string): void {
    const log = (this.logs.get(id) ?? '') + text;
    this.logs.set(id, log.length > MAX_LOG ? log.slice(log.length - MAX_LOG) : log);
  }
}

function blankJob(id: string): JobView {
  return { id, state: 'queued', status: null, slot: null, attempt: null, step: null, stepName: null, at: '' };
}

/** Serves the page until the signal aborts; resolves with the address it listened on once it listens. */
export async function serveDashboard(input: DashboardInput): Promise<{ url: string; closed: Promise<void> }> {
  const fleet = new Fleet();
  const clients = new Set<ServerResponse>();
  const send = (event: string, data: unknown): void => {
    const text = `event: ${event}\ndata: ${JSON.stringify(data)}\n\n`;
    for (const client of clients) if (client.writableLength < MAX_CLIENT_BACKLOG) client.write(text);
  };
  const client = await connectBroker({
    settings: input.settings,
    clientId: `dashboard-${randomBytes(6).toString('hex')}`,
    clean: true,
  });
  watchFleet(client, input, fleet, send);
  const refresh = input.jobsDir ? () => loadDrive(input, fleet, send) : undefined;
  await refresh?.();
  const timer = refresh ? setInterval(() => void refresh(), 5000) : undefined;
  const server = createServer((req, res) => {
    handle(req, res, input, fleet, clients, client).catch((error: Error) => {
      input.log.warn(`dashboard request failed: ${error.message}`);
      if (!res.headersSent) res.writeHead(500);
      res.end();
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(input.port, input.host, () => resolve());
  });
  const { port } = server.address() as { port: number };
  const shown = input.host.includes(':') ? `[${input.host}]` : input.host;
  const closed = (async () => {
    await new Promise<void>((resolve) => {
      if (input.signal.aborted) resolve();
      else input.signal.addEventListener('abort', () => resolve(), { once: true });
    });
    clearInterval(timer);
    for (const res of clients) res.end();
    await closeServer(server);
    await disconnect(client);
  })();
  return { url: `http://${shown}:${port}/`, closed };
}

function closeServer(server: Server): Promise<void> {
  return new Promise((resolve) => {
    server.close(() => resolve());
    server.closeAllConnections();
  });
}

function watchFleet(
  client: BrokerClient,
  input: DashboardInput,
  fleet: Fleet,
  send: (e: string, d: unknown) => void,
) {
  const roots = {
    presence: `${input.presenceTopic}/`,
    status: `${input.statusTopic}/`,
    results: `${input.resultsTopic}/`,
    logs: input.logsTopic ? `${input.logsTopic}/` : undefined,
  };
  client.on('message', (topic, payload) => {
    if (topic.startsWith(roots.presence)) {
      const id = topic.slice(roots.presence.length);
      const presence = parsePresence(payload);
      fleet.heard.add(id);
      if (presence) fleet.slots.set(id, presence);
      else fleet.slots.delete(id);
      send('slot', presence ?? { id, gone: true });
      return;
    }
    const body = jsonObject(payload);
    const id = typeof body?.id === 'string' && idProblem(body.id) === undefined ? body.id : undefined;
    if (!body || !id) return;
    if (roots.logs && topic === `${roots.logs}${id}` && typeof body.text === 'string') {
      fleet.output(id, body.text);
      send('log', { id, step: body.step, name: body.name, text: body.text });
    } else if (topic === `${roots.status}${id}`) {
      const change: Partial<JobView> = { state: body.event === 'done' ? 'finished' : 'running' };
      if (typeof body.workerId === 'string') change.slot = body.workerId;
      if (typeof body.attempt === 'number') change.attempt = body.attempt;
      if (body.event === 'step-started') {
        change.step = Number(body.step);
        change.stepName = String(body.name);
      }
      if (body.event === 'claimed') fleet.logs.delete(id); // a new run: its output starts afresh
      send('job', fleet.job(id, change));
    } else if (topic === `${roots.results}${id}`) {
      send(
        'job',
        fleet.job(id, {
          state: 'finished',
          status: String(body.status),
          ...(typeof body.workerId === 'string' ? { slot: body.workerId } : {}),
          ...(typeof body.attempt === 'number' ? { attempt: body.attempt } : {}),
        }),
      );
    }
  });
  const topics = [
    `${roots.presence}+`,
    `${roots.status}+`,
    `${roots.results}+`,
    ...(roots.logs ? [`${roots.logs}+`] : []),
  ];
  client.subscribe(topics, { qos: 0 });
}

/** The jobs the drive shows (state, status, slot), merged into what the broker said. */
async function loadDrive(
  input: DashboardInput,
  fleet: Fleet,
  send: (e: string, d: unknown) => void,
): Promise<void> {
  const jobsDir = input.jobsDir as string;
  // Brokers that send no retained message to a wildcard (RabbitMQ) show slots only through their files.
  for (const slot of await drivePresence(jobsDir, Date.now(), input.log)) {
    const known = fleet.slots.get(slot.id);
    if (fleet.heard.has(slot.id) || (known?.at === slot.at && known.state === slot.state)) continue;
    fleet.slots.set(slot.id, slot);
    send('slot', slot);
  }
  const rows = await listJobs({ jobsDir, leaseMs: input.leaseMs }).catch(() => []);
  const recent = rows.sort((a, b) =>
    String(a.endedAt ?? a.claimedAt).localeCompare(String(b.endedAt ?? b.claimedAt)),
  );
  for (const row of recent.slice(-MAX_JOBS)) {
    const known = fleet.jobs.get(row.id);
    // The broker's word is newer for a job it has told of; the drive fills in the rest.
    if (known && known.state !== 'queued' && row.state !== 'finished') continue;
    if (known && known.state === row.state && known.status === row.status) continue;
    send(
      'job',
      fleet.job(row.id, { state: row.state, status: row.status, slot: row.slot, attempt: row.attempt }),
    );
  }
}

async function handle(
  req: IncomingMessage,
  res: ServerResponse,
  input: DashboardInput,
  fleet: Fleet,
  clients: Set<ServerResponse>,
  client: BrokerClient,
): Promise<void> {
  const url = new URL(req.url ?? '/', 'http://dashboard');
  const route = `${req.method} ${url.pathname}`;
  if (route === 'GET /') {
    res.writeHead(200, {
      'content-type': 'text/html; charset=utf-8',
      // Everything the page needs is in it: nothing is fetched from anywhere else.
      'content-security-policy': "default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'",
    });
    res.end(DASHBOARD_PAGE);
    return;
  }
  if (route === 'GET /api/state') {
    json(res, 200, {
      slots: [...fleet.slots.values()],
      jobs: [...fleet.jobs.values()],
      allowCancel: input.allowCancel,
    });
    return;
  }
  if (route === 'GET /api/events') {
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-store' });
    res.write(': connected\n\n');
    clients.add(res);
    req.on('close', () => clients.delete(res));
    return;
  }
  const logs = /^GET \/api\/logs\/([^/]+)$/.exec(route);
  if (logs) {
    json(res, 200, { id: logs[1], text: fleet.logs.get(decodeURIComponent(logs[1] as string)) ?? '' });
    return;
  }
  const cancel = /^POST \/api\/cancel\/([^/]+)$/.exec(route);
  if (cancel) {
    const id = decodeURIComponent(cancel[1] as string);
    if (!input.allowCancel)
      return json(res, 403, { error: 'cancel is off: start the dashboard with --allow-cancel' });
    if (idProblem(id) !== undefined) return json(res, 400, { error: 'not a job id' });
    // A page on another origin cannot read this answer, but could still post: only this page's own origin may.
    const origin = req.headers.origin;
    if (origin !== undefined && origin !== `http://${req.headers.host}`)
      return json(res, 403, { error: 'cross-origin' });
    const code = await publish(client, `${input.cancelTopic}/${id}`, '{}', { qos: 1 });
    input.log.info(`cancel requested for ${id} from the dashboard`);
    return json(res, code < 0x80 ? 202 : 502, { id, code });
  }
  json(res, 404, { error: 'not found' });
}

function json(res: ServerResponse, status: number, body: unknown): void {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body));
}
