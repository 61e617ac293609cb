// Training runs (operators): status live, queue a round, and a run's per-step curves: reward, KL
// against the gates' budget, entropy, value loss, and the reward model's loss and accuracy.
import { get, post } from './api.js';
import { lineChart } from './chart.js';
import { badge, busy, clear, every, field, h, notify, num, showError, when } from './ui.js';

// Curves drawn first, each with what it is; the rest of a run's curves follow under "More curves".
const MAIN = [
  { title: 'Reward (reward-model score of the answers)', keys: ['reward/score', 'reward/total'] },
  { title: 'KL to the reference (nats per answer)', keys: ['ppo/kl'], limits: true },
  { title: 'Entropy (per token)', keys: ['ppo/entropy'] },
  { title: 'Value loss', keys: ['ppo/vf_loss'] },
  { title: 'Reward model accuracy (per step)', keys: ['reward/curve_accuracy'] },
  { title: 'Reward model loss (per step)', keys: ['reward/curve'] },
];

function duration(run) {
  if (!run.started_at) return '';
  const end = run.finished_at ? new Date(run.finished_at) : new Date();
  const s = Math.round((end - new Date(run.started_at)) / 1000);
  return s < 120 ? `${s} s` : `${Math.floor(s / 60)} min ${s % 60} s`;
}

function charts(run) {
  const curves = run.curves || {};
  const cfg = run.config || {};
  const limits = [];
  if (cfg.gates && typeof cfg.gates.kl_budget === 'number') limits.push({ label: 'budget', value: cfg.gates.kl_budget, kind: 'budget' });
  if (cfg.ppo && typeof cfg.ppo.target_kl === 'number') limits.push({ label: 'target', value: cfg.ppo.target_kl, kind: 'target' });
  const used = new Set();
  const main = MAIN.map(c => {
    c.keys.forEach(k => used.add(k));
    return lineChart({ title: c.title, series: c.keys.map(k => ({ name: k, values: curves[k] })), limits: c.limits ? limits : [] });
  });
  const rest = Object.keys(curves).filter(k => !used.has(k)).sort()
    .map(k => lineChart({ title: k, series: [{ name: k, values: curves[k] }] }));
  return [h('div', { class: 'charts' }, main),
          rest.length ? h('details', { class: 'more-curves' }, h('summary', { text: `More curves (${rest.length})` }), h('div', { class: 'charts' }, rest)) : null];
}

function detail(run) {
  const metrics = Object.keys(run.metrics || {}).filter(k => k !== 'gates/samples').sort();
  return h('section', { class: 'run-detail', dataset: { run: run.id, status: run.status } },
    h('h2', {}, `Run ${run.id} `, badge(run.status)),
    h('p', {}, `${run.kind}, ${run.trigger}${run.requested_by ? ` by ${run.requested_by}` : ''}; queued ${when(run.created_at)}`,
      run.started_at ? `, started ${when(run.started_at)}` : '', run.finished_at ? `, finished ${when(run.finished_at)} (${duration(run)})` : '',
      run.produced_version_id ? [', made ', h('a', { href: '#/models', text: `v${run.produced_version_id}` })] : ''),
    run.error ? h('pre', { class: 'error-text', text: run.error }) : null,
    run.metrics && run.metrics.skip_reason ? h('p', { class: 'muted', text: `skipped: ${run.metrics.skip_reason}` }) : null,
    Object.keys(run.curves || {}).length ? charts(run) : h('p', { class: 'muted', text: run.status === 'running' || run.status === 'queued' ? 'Curves appear when the run finishes.' : 'No curves recorded.' }),
    metrics.length ? h('details', { class: 'metrics' }, h('summary', { text: `Metrics (${metrics.length})` }),
      h('dl', {}, metrics.map(k => [h('dt', { text: k }), h('dd', { text: typeof run.metrics[k] === 'object' ? JSON.stringify(run.metrics[k]) : num(run.metrics[k], 4) })]))) : null);
}

export function render(main, ctx) {
  let selected = ctx.param ? Number(ctx.param) : null;
  let alive = true;
  const list = h('div', { class: 'table-wrap' });
  const detailBox = h('div', {});
  const live = h('p', { class: 'progress', role: 'status' });
  const overrides = h('textarea', { rows: 3, placeholder: '{"ppo": {"steps": 20}}', 'aria-label': 'Round config overrides (JSON)' });
  const queue = h('button', { type: 'button', class: 'primary', text: 'Queue a round' });
  let lastStatuses = '';
  let running = false;  // a run queued or running: poll every 2 s, else every 10 s

  async function draw() {
    const runs = await get('/v1/admin/training/runs?limit=50');
    const statuses = runs.data.map(r => `${r.id}:${r.status}`).join(',');
    const busyRuns = runs.data.filter(r => r.status === 'queued' || r.status === 'running');
    live.textContent = busyRuns.length
      ? busyRuns.map(r => `run ${r.id} ${r.status}${r.status === 'running' ? ` for ${duration(r)}` : ''}`).join('; ') + ' (updating live)'
      : `${runs.count} run${runs.count === 1 ? '' : 's'}; none running.`;
    clear(list, h('table', { class: 'runs' }, h('caption', { text: 'Training runs, newest first' }),
      h('thead', {}, h('tr', {}, ['Run', 'Status', 'Kind', 'Trigger', 'Queued', 'Took', 'Version'].map(t => h('th', { scope: 'col', text: t })))),
      h('tbody', {}, runs.data.map(r => h('tr', { dataset: { run: r.id, status: r.status }, class: r.id === selected ? 'selected' : null },
        h('th', { scope: 'row' }, h('a', { href: `#/runs/${r.id}`, text: `run ${r.id}` })),
        h('td', {}, badge(r.status)), h('td', { text: r.kind }), h('td', { text: r.trigger }),
        h('td', { text: when(r.created_at) }), h('td', { text: duration(r) }),
        h('td', { text: r.produced_version_id ? `v${r.produced_version_id}` : '' }))))));
    if (selected === null && runs.data.length) selected = runs.data[0].id;
    if (selected !== null && (statuses !== lastStatuses || !detailBox.firstChild)) {
      const run = runs.data.find(r => r.id === selected) || await get(`/v1/admin/training/runs/${selected}`);
      clear(detailBox, detail(run));
    }
    lastStatuses = statuses;
    running = busyRuns.length > 0;
  }

  queue.addEventListener('click', () => busy(queue, 'Queueing…', async () => {
    let config = {};
    if (overrides.value.trim()) {
      try { config = JSON.parse(overrides.value); } catch (e) { throw new Error(`The overrides are not JSON: ${e.message}`); }
    }
    const run = await post('/v1/admin/training/runs', { kind: 'round', config });
    selected = run.id;
    notify(`Run ${run.id} is queued; a trainer takes it within seconds (its status updates here).`);
    location.hash = `#/runs/${run.id}`;
  }, 'Queueing a round'));

  main.append(h('h1', { text: 'Training runs' }),
    h('div', { class: 'queue' }, queue, h('details', {}, h('summary', { text: 'Config overrides' }), field('JSON overrides of the round config', overrides))),
    live, list, detailBox);
  draw().catch(e => showError(e, 'Loading the runs'));
  const stop = every(() => (running ? 2000 : 10000), draw, () => alive, 'Refreshing the runs');
  return () => { alive = false; stop(); };
}
