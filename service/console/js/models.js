// The registry (operators): versions with lineage, status, gate results and metrics; promote,
// canary, reject and roll back, each confirmed and with a reason; the audit log.
import { get, post } from './api.js';
import { badge, busy, clear, confirmDialog, every, h, notify, num, pct, showError, when } from './ui.js';

function lineage(v, byId) {
  const chain = [];
  for (let cur = v, guard = 0; cur && guard < 50; cur = byId.get(cur.parent_id), guard++) chain.unshift(cur.name);
  return chain.join(' → ');
}

function budget(value) {
  return typeof value === 'number' ? ` of ${num(value)}` : '';
}

function gates(metrics) {
  if (!('gates/passed' in metrics)) return h('span', { class: 'muted', text: 'no gates run' });
  const reasons = metrics['gates/reasons'] || [];
  return h('div', { class: 'gates' },
    h('span', { class: `badge ${metrics['gates/passed'] ? 'passed' : 'failed'}`,
                text: metrics['gates/verdict'] || (metrics['gates/passed'] ? 'passed' : 'failed') }),
    h('span', { text: ` reward gain ${num(metrics['gates/reward_gain'])}, drift: this round KL ${num(metrics['gates/kl'])}`
                      + budget(metrics['gates/kl_budget']) + `, total KL ${num(metrics['gates/kl_total'] ?? metrics['gates/kl'])}`
                      + budget(metrics['gates/total_kl_budget']) }),
    reasons.length ? h('ul', { class: 'reasons' }, reasons.map(r => h('li', { text: r }))) : null);
}

function metricList(metrics) {
  const keys = Object.keys(metrics).filter(k => !k.startsWith('gates/samples')).sort();
  if (!keys.length) return null;
  return h('details', { class: 'metrics' }, h('summary', { text: `${keys.length} metrics` }),
    h('dl', {}, keys.map(k => [h('dt', { text: k }),
      h('dd', { text: typeof metrics[k] === 'object' ? JSON.stringify(metrics[k]) : num(metrics[k], 4) })])));
}

// After a change, wait until serving says it happened: /ready names the active version,
// /v1/models lists each version taking traffic.
async function waitForServing(version, status, progress) {
  const deadline = Date.now() + 120000;
  while (Date.now() < deadline) {
    if (status === 'active') {
      const r = await fetch('/ready');
      const body = await r.json().catch(() => ({}));
      if (r.ok && body.model === version) return true;
      progress.textContent = `waiting for serving to switch to ${version} (now ${body.model || 'not ready'})…`;
    } else {
      const models = await get('/v1/models');
      const listed = models.data.some(m => m.id === version);
      if ((status === 'canary') === listed) return true;
      progress.textContent = `waiting for serving to ${status === 'canary' ? 'load' : 'drop'} ${version}…`;
    }
    await new Promise(r => setTimeout(r, 500));
  }
  return false;
}

export function render(main) {
  const table = h('div', { class: 'table-wrap' });
  const log = h('div', { class: 'table-wrap' });
  const progress = h('p', { class: 'progress', role: 'status' });
  const refresh = h('button', { type: 'button', text: 'Refresh' });
  let alive = true;
  let drawn = '';

  async function act(v, action, button) {
    const fields = action === 'canary'
      ? [{ name: 'fraction', label: 'Share of `feedloop` traffic (%)', type: 'number', min: 1, max: 99, step: 1, required: true,
           value: v.canary_fraction ? Math.round(v.canary_fraction * 100) : 10 }] : [];
    const words = {
      promote: [`Promote ${v.name}?`, `${v.name} becomes the active version: every replica switches to it.`, 'Promote'],
      canary: [`Put ${v.name} on canary?`, `${v.name} answers this share of the requests for the served model.`, 'Start canary'],
      reject: [`Reject ${v.name}?`, `${v.name} is taken out of consideration and stops serving.`, 'Reject'],
      rollback: [`Roll back from ${v.name}?`, 'Serving returns to the version that was active before it.', 'Roll back'],
    }[action];
    const answer = await confirmDialog({ title: words[0], message: words[1], confirmLabel: words[2], fields,
                                         reason: action === 'reject' || action === 'rollback' ? 'required' : 'optional',
                                         danger: action === 'reject' || action === 'rollback' });
    if (!answer) return;
    const body = answer.reason ? { reason: answer.reason } : {};
    if (action === 'canary') body.fraction = Number(answer.fraction) / 100;
    await busy(button, 'Working…', async () => {
      progress.textContent = `${action} ${v.name}…`;
      const changed = await post(`/v1/admin/models/${v.id}/${action}`, body);
      await draw();
      const target = action === 'rollback' ? changed.name : v.name;
      const ok = await waitForServing(target, changed.status, progress);
      progress.textContent = ok ? `${target} is ${changed.status}${changed.status === 'active' || changed.status === 'canary' ? ' and serving' : ''}.`
                                : `${target} is ${changed.status} in the registry, but serving has not caught up after two minutes: see the server log.`;
      progress.dataset.done = `${target}:${changed.status}`;
      if (ok) notify(progress.textContent);
      await draw();
    }, `${action[0].toUpperCase()}${action.slice(1)} ${v.name}`);
  }

  async function draw() {
    const [models, history] = await Promise.all([get('/v1/admin/models'), get('/v1/admin/models/history')]);
    const seen = JSON.stringify([models, history]);
    if (seen === drawn) return;
    drawn = seen;
    const byId = new Map(models.data.map(v => [v.id, v]));
    const rows = models.data.map(v => {
      const actions = [];
      const button = (action, label) => {
        const b = h('button', { type: 'button', class: `act ${action}`, dataset: { action, version: v.name }, text: label });
        b.addEventListener('click', () => act(v, action, b));
        actions.push(b);
      };
      if (v.kind === 'policy') {
        if (['candidate', 'canary', 'archived'].includes(v.status)) button('promote', 'Promote');
        if (['candidate', 'canary', 'archived'].includes(v.status)) button('canary', v.status === 'canary' ? 'Change canary' : 'Canary');
        if (['candidate', 'canary'].includes(v.status)) button('reject', 'Reject');
        if (v.status === 'active') button('rollback', 'Roll back');
      }
      return h('tr', { dataset: { version: v.name, status: v.status } },
        h('th', { scope: 'row' }, h('span', { text: v.name }), h('small', { class: 'muted', text: ` ${v.kind}` })),
        h('td', {}, badge(v.status), v.canary_fraction ? h('small', { text: ` ${pct(v.canary_fraction)} of traffic` }) : null),
        h('td', { text: lineage(v, byId) }, v.reference_id ? h('small', { class: 'muted', text: ` (reference v${v.reference_id})` }) : null),
        h('td', {}, v.training_run_id ? h('a', { href: `#/runs/${v.training_run_id}`, text: `run ${v.training_run_id}` }) : h('span', { class: 'muted', text: '—' })),
        h('td', {}, gates(v.metrics), metricList(v.metrics)),
        h('td', { text: String(v.requests) }),
        h('td', {}, h('div', { text: when(v.created_at) }), v.promoted_at ? h('small', { class: 'muted', text: `promoted ${when(v.promoted_at)} by ${v.promoted_by}` }) : null),
        h('td', {}, h('div', { class: 'row-actions' }, actions)));
    });
    clear(table, h('table', { class: 'models' },
      h('caption', { text: 'Model versions, newest first' }),
      h('thead', {}, h('tr', {}, ['Version', 'Status', 'Lineage', 'Run', 'Gates and metrics', 'Requests', 'Created', 'Actions'].map(t => h('th', { scope: 'col', text: t })))),
      h('tbody', {}, rows)));
    clear(log, h('table', { class: 'audit' },
      h('caption', { text: 'Audit log: what was registered, promoted, rolled back, rejected or failed' }),
      h('thead', {}, h('tr', {}, ['When', 'Version', 'Action', 'By', 'Reason'].map(t => h('th', { scope: 'col', text: t })))),
      h('tbody', {}, history.data.map(e => h('tr', {},
        h('td', { text: when(e.created_at) }), h('td', { text: `v${e.version_id}` }), h('td', {}, badge(e.action)),
        h('td', { text: e.actor }), h('td', { text: e.reason || '' }))))));
  }

  refresh.addEventListener('click', () => busy(refresh, 'Refreshing…', draw, 'Loading the registry'));
  main.append(h('h1', { text: 'Models' }), h('div', { class: 'actions' }, refresh), progress, table,
              h('h2', { text: 'Audit log' }), log);
  draw().catch(e => showError(e, 'Loading the registry'));
  const stop = every(10000, draw, () => alive, 'Refreshing the registry');
  return () => { alive = false; stop(); };
}
