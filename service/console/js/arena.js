// Arena (operators): the same prompt to two served versions (the active one and a canary),
// answers shown as Left and Right with the names hidden until the vote. A vote is an ordinary
// pairwise preference between the two completions; the Feedback page's win rates count them.
import { get, post } from './api.js';
import { busy, clear, field, h, pct, showError } from './ui.js';

const state = { a: null, b: null, prompt: '', temperature: '1', max_tokens: '', duel: null };

function winLine(s) {
  if (!s) return 'no votes yet';
  if (!s.arena_wins && !s.arena_losses) return 'no votes yet';
  const [lo, hi] = s.arena_win_rate_interval;
  return `won ${s.arena_wins} of ${s.arena_wins + s.arena_losses} (${pct(s.arena_win_rate)}, 95 % CI ${pct(lo)}–${pct(hi)})`;
}

export function render(main) {
  const a = h('select', { name: 'a' });
  const b = h('select', { name: 'b' });
  const prompt = h('textarea', { name: 'prompt', rows: 3, value: state.prompt, 'aria-label': 'Prompt', placeholder: 'One prompt to both versions' });
  const temperature = h('input', { name: 'temperature', type: 'number', min: 0, max: 2, step: 0.1, value: state.temperature });
  const maxTokens = h('input', { name: 'max_tokens', type: 'number', min: 1, max: 4096, value: state.max_tokens, placeholder: 'server default' });
  const ask = h('button', { type: 'submit', class: 'primary', text: 'Ask both' });
  const progress = h('span', { class: 'progress', role: 'status' });
  const note = h('p', { class: 'hint' });
  const form = h('form', { class: 'arena-form' },
    h('div', { class: 'settings' }, field('Version', a), field('against', b), field('Temperature', temperature), field('Max tokens', maxTokens)),
    note, prompt, h('div', { class: 'actions' }, ask, progress));
  const duelBox = h('div', { class: 'duel' });

  async function loadVersions() {
    const models = await get('/v1/admin/models');
    const served = models.data.filter(v => v.kind === 'policy' && (v.status === 'active' || v.status === 'canary'));
    const option = v => h('option', { value: v.name, text: `${v.name} (${v.status}${v.canary_fraction ? ` ${pct(v.canary_fraction)}` : ''})` });
    clear(a, served.map(option));
    clear(b, served.map(option));
    const active = served.find(v => v.status === 'active');
    const other = served.find(v => v.status !== 'active');
    a.value = state.a || (active ? active.name : '');
    b.value = state.b || (other ? other.name : (active ? active.name : ''));
    note.textContent = served.length < 2
      ? 'Only one version is served now. Put a candidate on canary (Models page, even at 1 %) to compare it here: only served versions can answer.'
      : 'Both versions answer the same prompt; their names stay hidden until you vote.';
  }
  loadVersions().catch(e => showError(e, 'Listing the versions'));

  function drawDuel() {
    const d = state.duel;
    if (!d) { clear(duelBox); return; }
    const sides = d.sides.map((side, k) => {
      const label = k === 0 ? 'Left' : 'Right';
      const name = d.voted !== undefined ? h('span', { class: 'version revealed', text: side.version }) : h('span', { class: 'version hidden', text: 'hidden until you vote' });
      const vote = h('button', { type: 'button', class: 'primary vote', disabled: d.voted !== undefined, text: `${label} is better` });
      vote.addEventListener('click', () => busy(vote, 'Saving…', async () => {
        const loser = d.sides[1 - k];
        await post('/v1/preferences', { chosen: { response_id: side.id, choice_index: 0 }, rejected: { response_id: loser.id, choice_index: 0 } });
        d.voted = k;
        const stats = await get('/v1/admin/stats');
        d.stats = Object.fromEntries(stats.data.map(s => [s.model_version, s]));
        drawDuel();
      }, 'Saving the vote'));
      return h('article', { class: `answer column ${d.voted === k ? 'winner' : ''}`, dataset: { side: label.toLowerCase(), responseId: d.voted !== undefined ? side.id : '' } },
        h('div', { class: 'meta' }, h('strong', { text: label }), name),
        h('div', { class: 'text', text: side.text }), vote);
    });
    const skip = h('button', { type: 'button', text: 'Neither: skip', disabled: d.voted !== undefined });
    skip.addEventListener('click', () => { d.voted = null; drawDuel(); });
    clear(duelBox, h('div', { class: 'columns', dataset: { n: 2 } }, sides), h('div', { class: 'actions' }, skip));
    if (d.voted !== undefined) {
      const lines = d.sides.map((side, k) => h('li', {}, h('strong', { text: `${k === 0 ? 'Left' : 'Right'} was ${side.version}` }),
        d.stats ? `: ${winLine(d.stats[side.version])}` : ''));
      duelBox.append(h('div', { class: 'reveal', role: 'status' }, h('ul', {}, lines)));
    }
  }

  form.addEventListener('submit', async ev => {
    ev.preventDefault();
    const text = prompt.value.trim();
    if (!text) { prompt.focus(); return; }
    if (!a.value || !b.value || a.value === b.value) { showError(new Error('Choose two different served versions.')); return; }
    Object.assign(state, { a: a.value, b: b.value, prompt: text, temperature: temperature.value, max_tokens: maxTokens.value, duel: null });
    drawDuel();
    const base = { messages: [{ role: 'user', content: text }], temperature: Number(temperature.value) };
    if (maxTokens.value) base.max_tokens = Number(maxTokens.value);
    ask.disabled = true;
    progress.textContent = 'both versions are answering…';
    try {
      const answers = await Promise.all([a.value, b.value].map(m => post('/v1/chat/completions', { ...base, model: m })));
      const sides = answers.map(r => ({ id: r.id, version: r.system_fingerprint, text: r.choices[0].message.content }));
      if (Math.random() < 0.5) sides.reverse();  // which side is which is not a hint either
      state.duel = { sides };
      progress.textContent = 'Which answer is better?';
    } catch (e) {
      progress.textContent = '';
      showError(e, 'Arena');
    } finally {
      ask.disabled = false;
      drawDuel();
    }
  });

  drawDuel();
  main.append(h('h1', { text: 'Arena' }), form, duelBox);
}
