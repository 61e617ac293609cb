// Exchanges (operators): what was asked and answered, newest first, with the feedback on each;
// one exchange in full as the server recorded it.
import { get } from './api.js';
import { feedbackBar } from './feedback.js';
import { busy, clear, field, h, num, showError, when } from './ui.js';

function counts(f) {
  const parts = [];
  if (f.thumbs_up) parts.push(`thumbs up ${f.thumbs_up}`);
  if (f.thumbs_down) parts.push(`thumbs down ${f.thumbs_down}`);
  for (const k of ['rating', 'comment', 'correction', 'ranking', 'preference']) if (f[k]) parts.push(`${k} ${f[k]}`);
  return parts.join(' · ') || '—';
}

function full(x) {
  const feedbackOn = i => x.feedback.filter(f => f.choice_index === i);
  return h('section', { class: 'exchange-detail', dataset: { responseId: x.response_id } },
    h('h2', { text: x.response_id }),
    h('p', { text: `v${x.model_version_id} · key ${x.api_key_id}${x.user ? ` · user ${x.user}` : ''} · ${when(x.created_at)} · ` +
                   `${x.prompt_tokens} prompt + ${x.completion_tokens} answer tokens · ${num(x.total_ms, 0)} ms` +
                   `${x.stream ? ' · streamed' : ''}` }),
    h('details', {}, h('summary', { text: 'Parameters used' }), h('pre', { text: JSON.stringify(x.params, null, 2) })),
    h('h3', { text: 'Conversation' }),
    h('ol', { class: 'messages' }, x.messages.map(m => h('li', { class: m.role }, h('strong', { text: `${m.role}: ` }),
      h('span', { class: 'text', text: typeof m.content === 'string' ? m.content : JSON.stringify(m.content) })))),
    h('h3', { text: 'Choices' }),
    x.choices.map(c => h('article', { class: 'answer', dataset: { choiceIndex: c.choice_index } },
      h('div', { class: 'meta' }, h('strong', { text: `choice ${c.choice_index}` }), h('span', { class: 'finish', text: `finish: ${c.finish_reason}, ${c.completion_tokens} tokens` })),
      h('div', { class: 'text', text: c.text }),
      feedbackOn(c.choice_index).length ? h('ul', { class: 'recorded' }, feedbackOn(c.choice_index).map(f =>
        h('li', { text: `${f.kind}: ${f.value ?? f.text} (key ${f.author_key_id}, ${when(f.updated_at)})` }))) : null,
      h('details', {}, h('summary', { text: 'Give feedback as operator' }), feedbackBar(x.response_id, c.choice_index, c.text)))),
    x.rankings.length ? [h('h3', { text: 'Rankings' }), h('ul', {}, x.rankings.map(r => h('li', { text: `${JSON.stringify(r.order)} by key ${r.author_key_id} (${r.pairs} pairs)` })))] : null,
    x.preferences.length ? [h('h3', { text: 'Preferences' }), h('ul', {}, x.preferences.map(p => h('li', {
      text: `${p.chosen.response_id}#${p.chosen.choice_index} over ${p.rejected.response_id}#${p.rejected.choice_index} (strength ${p.strength}, key ${p.author_key_id})` })))] : null);
}

export function render(main, ctx) {
  const version = h('select', { name: 'version' }, h('option', { value: '', text: 'all versions' }));
  const list = h('div', { class: 'table-wrap' });
  const more = h('button', { type: 'button', text: 'Older', hidden: true });
  const detail = h('div', {});
  let rows = [];

  get('/v1/admin/models').then(m => {
    for (const v of m.data.filter(v => v.kind === 'policy')) version.append(h('option', { value: v.id, text: v.name }));
  }).catch(e => showError(e, 'Listing the versions'));

  function table() {
    clear(list, h('table', { class: 'exchanges' }, h('caption', { text: 'Exchanges, newest first' }),
      h('thead', {}, h('tr', {}, ['When', 'Prompt', 'Version', 'Choices', 'Feedback'].map(t => h('th', { scope: 'col', text: t })))),
      h('tbody', {}, rows.map(r => h('tr', { dataset: { responseId: r.response_id } },
        h('td', { text: when(r.created_at) }),
        h('td', {}, h('a', { href: `#/exchanges/${encodeURIComponent(r.response_id)}`, text: r.prompt || '(empty)' })),
        h('td', { text: `v${r.model_version_id}` }), h('td', { text: String(r.choices) }), h('td', { text: counts(r.feedback) }))))));
  }

  async function load(append) {
    const q = new URLSearchParams({ limit: '25' });
    if (version.value) q.set('model_version_id', version.value);
    if (append && rows.length) q.set('before', rows[rows.length - 1].response_id);
    const page = await get(`/v1/admin/exchanges?${q}`);
    rows = append ? rows.concat(page.data) : page.data;
    more.hidden = page.count < 25;
    table();
  }

  version.addEventListener('change', () => load(false).catch(e => showError(e, 'Loading the exchanges')));
  more.addEventListener('click', () => busy(more, 'Loading…', () => load(true), 'Loading older exchanges'));
  const refresh = h('button', { type: 'button', text: 'Refresh' });
  refresh.addEventListener('click', () => busy(refresh, 'Refreshing…', () => load(false), 'Loading the exchanges'));
  main.append(h('h1', { text: 'Exchanges' }), h('div', { class: 'settings' }, field('Version', version), refresh), list, more, detail);
  load(false).catch(e => showError(e, 'Loading the exchanges'));
  if (ctx.param) {
    get(`/v1/admin/exchanges/${encodeURIComponent(ctx.param)}`).then(x => { clear(detail, full(x)); detail.scrollIntoView(); })
      .catch(e => showError(e, `Loading ${ctx.param}`));
  }
}
