// Live feedback per version, side by side (operators): is the canary better than the active
// version? Thumbs-up rate, mean rating, and head-to-head win rate in arena votes with its
// 95 % Wilson interval, refreshed every few seconds.
import { get } from './api.js';
import { badge, clear, every, h, num, pct, showError } from './ui.js';

// The interval as a bar on 0-100 %: the estimate as a dot, 50 % marked.
function intervalBar(rate, interval) {
  const W = 200, H = 18, x = v => 4 + v * (W - 8);
  const svg = h('svg:svg', { viewBox: `0 0 ${W} ${H}`, class: 'ci', role: 'img',
                             'aria-label': interval ? `win rate ${pct(rate)}, 95 % interval ${pct(interval[0])} to ${pct(interval[1])}` : 'no votes' },
    h('svg:line', { class: 'axis', x1: x(0), x2: x(1), y1: H / 2, y2: H / 2 }),
    h('svg:line', { class: 'half', x1: x(0.5), x2: x(0.5), y1: 2, y2: H - 2 }));
  if (interval) {
    svg.append(h('svg:line', { class: 'range', x1: x(interval[0]), x2: x(interval[1]), y1: H / 2, y2: H / 2 }),
               h('svg:circle', { class: 'estimate', cx: x(rate), cy: H / 2, r: 4 }));
  }
  return svg;
}

function card(s) {
  const votes = s.arena_wins + s.arena_losses;
  const judged = s.thumbs_up + s.thumbs_down;
  return h('article', { class: `version-card ${s.status}`, dataset: { version: s.model_version } },
    h('h2', {}, `${s.model_version} `, badge(s.status)),
    h('dl', { class: 'figures' },
      h('dt', { text: 'Requests' }), h('dd', { text: String(s.requests) }),
      h('dt', { text: 'Thumbs-up rate' }), h('dd', { class: 'thumbs-rate', text: judged ? `${pct(s.thumbs_up_rate)} (${s.thumbs_up} up, ${s.thumbs_down} down)` : '— (no thumbs)' }),
      h('dt', { text: 'Mean rating (1–7)' }), h('dd', { class: 'mean-rating', text: s.mean_rating === null ? `— (no ratings)` : `${num(s.mean_rating, 2)} (${s.feedback.rating} ratings)` }),
      h('dt', { text: 'Arena win rate' }),
      h('dd', {}, h('span', { class: 'win-rate', text: votes ? `${pct(s.arena_win_rate)} of ${votes} votes, 95 % CI ${pct(s.arena_win_rate_interval[0])}–${pct(s.arena_win_rate_interval[1])}` : '— (no arena votes)' }),
        h('br'), intervalBar(s.arena_win_rate, s.arena_win_rate_interval)),
      h('dt', { text: 'Feedback' }), h('dd', { text: Object.entries(s.feedback).map(([k, v]) => `${k} ${v}`).join(', ') }),
      h('dt', { text: 'New pairs since the last round' }), h('dd', { text: String(s.pairs_since_last_round) })));
}

export function render(main) {
  let alive = true;
  const head = h('p', { class: 'progress', role: 'status' });
  const grid = h('div', { class: 'cards' });
  const showAll = h('input', { type: 'checkbox', id: 'all-versions' });

  async function draw() {
    const stats = await get('/v1/admin/stats');
    const serving = s => s.status === 'active' || s.status === 'canary';
    const shown = stats.data.filter(s => showAll.checked || serving(s) || s.requests > 0)
      .sort((a, b) => (serving(b) - serving(a)) || (b.model_version_id - a.model_version_id));
    head.textContent = `Feedback events so far: ${stats.watermark}; since the last round: ${stats.pairs_since_last_round} new pairs, ` +
      `${stats.demonstrations_since_last_round} demonstrations. Updated ${new Date().toLocaleTimeString()}.`;
    clear(grid, shown.length ? shown.map(card) : h('p', { class: 'muted', text: 'No version has served a request yet.' }));
  }
  showAll.addEventListener('change', () => draw().catch(e => showError(e, 'Loading the stats')));
  main.append(h('h1', { text: 'Live feedback per version' }),
    h('p', { class: 'hint', text: 'Serving versions first. The win rate counts arena votes: preferences between two versions\u2019 answers to the same prompt.' }),
    h('div', { class: 'field inline' }, showAll, h('label', { for: 'all-versions', text: 'Show versions that never served' })),
    head, grid);
  draw().catch(e => showError(e, 'Loading the stats'));
  const stop = every(5000, draw, () => alive, 'Refreshing the stats');
  return () => { alive = false; stop(); };
}
