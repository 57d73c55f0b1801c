// The dashboard's page: one document with its style and script, no library and nothing fetched from elsewhere (it
// works offline and has nothing to go stale). It asks the server for a snapshot, then follows its events
// (EventSource reconnects by itself), and shows slots, jobs and the selected job's output as it grows.

export const DASHBOARD_PAGE = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mqtt-fs-worker fleet</title>
<style>
  :root { color-scheme: light dark; font: 14px/1.4 system-ui, sans-serif; }
  body { margin: 0; padding: 12px; }
  h1 { font-size: 18px; margin: 0 0 12px; }
  h2 { font-size: 15px; margin: 16px 0 6px; }
  .panes { display: flex; flex-wrap: wrap; gap: 16px; }
  .pane { flex: 1 1 420px; min-width: 0; }
  table { border-collapse: collapse; width: 100%; }
  th, td { text-align: left; padding: 4px 6px; border-bottom: 1px solid #8884; white-space: nowrap; }
  tbody tr.job { cursor: pointer; }
  tbody tr.selected { background: #8882; }
  .idle { color: #2a2; } .busy { color: #c80; } .offline, .abandoned { color: #888; }
  .success { color: #2a2; } .failed, .error, .timeout { color: #d33; } .cancelled { color: #c80; }
  pre { background: #8881; padding: 8px; height: 50vh; overflow: auto; margin: 0; white-space: pre-wrap; }
  button { font: inherit; padding: 4px 12px; }
  #status { color: #888; font-size: 12px; }
</style>
</head>
<body>
<h1>mqtt-fs-worker fleet <span id="status">connecting…</span></h1>
<div class="panes">
  <div class="pane">
    <h2>Slots</h2>
    <table><thead><tr><th>Slot</th><th>State</th><th>Job</th><th>Step</th><th>Host</th></tr></thead>
    <tbody id="slots"></tbody></table>
    <h2>Jobs</h2>
    <table><thead><tr><th>Job</th><th>State</th><th>Status</th><th>Slot</th><th>Step</th></tr></thead>
    <tbody id="jobs"></tbody></table>
  </div>
  <div class="pane">
    <h2>Output <span id="selected"></span> <button id="cancel" hidden>Cancel</button></h2>
    <pre id="log">Select a job to see its output.</pre>
  </div>
</div>
<script>
  const slots = new Map();
  const jobs = new Map();
  let selected = null;
  let allowCancel = false;
  const $ = (id) => document.getElementById(id);
  const cell = (text, cls) => {
    const td = document.createElement('td');
    td.textContent = text == null ? '-' : String(text);
    if (cls) td.className = cls;
    return td;
  };
  function drawSlots() {
    const body = $('slots');
    body.replaceChildren(...[...slots.values()].sort((a, b) => a.id.localeCompare(b.id)).map((s) => {
      const tr = document.createElement('tr');
      tr.dataset.slot = s.id;
      const busy = s.state === 'busy';
      tr.append(cell(s.id), cell(s.state, s.state), cell(busy ? s.job : null),
        cell(busy && s.step != null ? s.step + ' ' + (s.stepName || '') : null), cell(s.host));
      return tr;
    }));
  }
  function drawJobs() {
    const body = $('jobs');
    body.replaceChildren(...[...jobs.values()].reverse().map((j) => {
      const tr = document.createElement('tr');
      tr.className = 'job' + (j.id === selected ? ' selected' : '');
      tr.dataset.job = j.id;
      tr.append(cell(j.id), cell(j.state), cell(j.status, j.status), cell(j.slot),
        cell(j.state === 'running' && j.step != null ? j.step + ' ' + (j.stepName || '') : null));
      tr.onclick = () => select(j.id);
      return tr;
    }));
    const job = selected && jobs.get(selected);
    $('cancel').hidden = !(allowCancel && job && job.state === 'running');
  }
  async function select(id) {
    selected = id;
    $('selected').textContent = id;
    const res = await fetch('/api/logs/' + encodeURIComponent(id));
    $('log').textContent = (await res.json()).text;
    drawJobs();
  }
  $('cancel').onclick = async () => {
    if (!selected) return;
    const res = await fetch('/api/cancel/' + encodeURIComponent(selected), { method: 'POST' });
    $('status').textContent = res.ok ? 'cancel sent for ' + selected : 'cancel refused (' + res.status + ')';
  };
  async function start() {
    const state = await (await fetch('/api/state')).json();
    allowCancel = state.allowCancel;
    for (const s of state.slots) slots.set(s.id, s);
    for (const j of state.jobs) jobs.set(j.id, j);
    drawSlots();
    drawJobs();
    const events = new EventSource('/api/events');
    events.onopen = () => { $('status').textContent = 'live'; };
    events.onerror = () => { $('status').textContent = 'reconnecting…'; };
    events.addEventListener('slot', (e) => {
      const s = JSON.parse(e.data);
      if (s.gone) slots.delete(s.id); else slots.set(s.id, s);
      drawSlots();
    });
    events.addEventListener('job', (e) => {
      const j = JSON.parse(e.data);
      jobs.delete(j.id);
      jobs.set(j.id, j);
      drawJobs();
    });
    events.addEventListener('log', (e) => {
      const chunk = JSON.parse(e.data);
      if (chunk.id !== selected) return;
      const log = $('log');
      const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
      log.textContent += chunk.text;
      if (atEnd) log.scrollTop = log.scrollHeight;
    });
  }
  start();
</script>
</body>
</html>
`;
