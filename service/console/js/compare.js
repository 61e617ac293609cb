// Compare: ask once for n = 2-4 answers and see them side by side; pick the best (pairwise
// preferences: the best over each of the others) or put them in order with ties (a ranking).
import { chatStreamed, post } from './api.js';
import { feedbackBar } from './feedback.js';
import { busy, clear, field, h, notify, showError } from './ui.js';
import { modelOptions, samplingBody } from './chat.js';

const LETTERS = 'ABCDEFGH';
const ORDINALS = ['1st', '2nd', '3rd', '4th', '5th', '6th', '7th', '8th'];

const state = { prompt: '', n: '3', temperature: '1', max_tokens: '', seed: '', model: 'feedloop', answer: null, tiers: null };

// tiers: one array of choice indices per place, best first (empty places allowed) -> the API's order
export function orderFromTiers(tiers) {
  return tiers.filter(t => t.length).map(t => (t.length === 1 ? t[0] : [...t].sort((a, b) => a - b)));
}

function rankingBoard(answer, onSaved) {
  const n = answer.texts.length;
  if (!state.tiers) state.tiers = answer.texts.map((_, i) => [i]);
  const board = h('div', { class: 'board', 'aria-label': 'Ranking: drag answers into places, or choose a place for each' });
  const summary = h('p', { class: 'order', role: 'status' });
  const save = h('button', { type: 'button', class: 'primary', text: 'Save ranking' });

  function move(choice, place) {
    state.tiers = state.tiers.map(t => t.filter(i => i !== choice));
    state.tiers[place].push(choice);
    draw();
  }

  function draw() {
    const rows = state.tiers.map((tier, place) => {
      const zone = h('ol', { class: 'tier', dataset: { place }, 'aria-label': `${ORDINALS[place]} place` });
      zone.addEventListener('dragover', ev => { ev.preventDefault(); zone.classList.add('over'); });
      zone.addEventListener('dragleave', () => zone.classList.remove('over'));
      zone.addEventListener('drop', ev => {
        ev.preventDefault();
        zone.classList.remove('over');
        const choice = Number(ev.dataTransfer.getData('text/plain'));
        if (!Number.isNaN(choice)) move(choice, place);
      });
      for (const i of tier) {
        const select = h('select', { 'aria-label': `Place of answer ${LETTERS[i]}` },
          ORDINALS.slice(0, n).map((o, p) => h('option', { value: p, text: o })));
        select.value = String(place);
        select.addEventListener('change', () => move(i, Number(select.value)));
        const chip = h('li', { class: 'chip', draggable: 'true', dataset: { choice: i } },
          h('span', { class: 'grip', 'aria-hidden': 'true', text: '⠿' }),
          h('strong', { text: LETTERS[i] }), h('span', { class: 'preview', text: answer.texts[i].slice(0, 80) }), select);
        chip.addEventListener('dragstart', ev => { ev.dataTransfer.setData('text/plain', String(i)); ev.dataTransfer.effectAllowed = 'move'; });
        zone.append(chip);
      }
      if (!tier.length) zone.append(h('li', { class: 'drop-hint', text: 'drop here' }));
      return h('div', { class: 'place' }, h('span', { class: 'place-label', text: ORDINALS[place] }), zone);
    });
    clear(board, rows);
    const order = orderFromTiers(state.tiers);
    summary.textContent = 'Order: ' + order.map(t => (Array.isArray(t) ? `(${t.map(i => LETTERS[i]).join(' = ')})` : LETTERS[t])).join(' > ');
  }

  save.addEventListener('click', () => busy(save, 'Saving…', async () => {
    const order = orderFromTiers(state.tiers);
    const saved = await post('/v1/rankings', { response_id: answer.id, order });
    onSaved(saved);
  }, 'Saving the ranking'));
  draw();
  return h('section', { class: 'ranking' }, h('h2', { text: 'Rank them' }),
    h('p', { class: 'hint', text: 'Best first. Answers in the same place are a tie. Drag an answer to a place, or choose its place from its list.' }),
    board, summary, save);
}

export function render(main) {
  const prompt = h('textarea', { name: 'prompt', rows: 3, value: state.prompt, 'aria-label': 'Prompt', placeholder: 'Ask once, see several answers' });
  const n = h('select', { name: 'n' }, [2, 3, 4].map(k => h('option', { value: k, text: String(k) })));
  n.value = state.n;
  const model = h('select', { name: 'model' }, h('option', { value: state.model, text: state.model }));
  const temperature = h('input', { name: 'temperature', type: 'number', min: 0, max: 2, step: 0.1, value: state.temperature });
  const maxTokens = h('input', { name: 'max_tokens', type: 'number', min: 1, max: 4096, value: state.max_tokens, placeholder: 'server default' });
  const seed = h('input', { name: 'seed', type: 'number', step: 1, value: state.seed, placeholder: 'random' });
  const ask = h('button', { type: 'submit', class: 'primary', text: 'Ask' });
  const progress = h('span', { class: 'progress', role: 'status' });
  const form = h('form', { class: 'compare-form' }, prompt,
    h('div', { class: 'settings' }, field('Answers (n)', n), field('Model', model), field('Temperature', temperature),
      field('Max tokens', maxTokens), field('Seed', seed)),
    h('div', { class: 'actions' }, ask, progress));
  modelOptions(model, state.model).catch(e => showError(e, 'Listing the models'));
  const results = h('div', { class: 'compare-results' });

  function drawResults() {
    const a = state.answer;
    if (!a) { clear(results); return; }
    const columns = a.texts.map((text, i) => {
      const col = h('article', { class: 'answer column', dataset: { responseId: a.id, choiceIndex: i, done: a.done ? 'true' : null } },
        h('div', { class: 'meta' }, h('strong', { class: 'letter', text: `Answer ${LETTERS[i]}` }),
          h('span', { class: 'version', text: a.fingerprint || '' }),
          h('span', { class: 'finish', text: a.finish[i] ? `finish: ${a.finish[i]}` : 'writing…' })),
        h('div', { class: 'text', text }));
      if (a.done) {
        const best = h('button', { type: 'button', class: 'best', 'aria-pressed': String(a.best === i), text: `${LETTERS[i]} is best` });
        best.addEventListener('click', () => busy(best, 'Saving…', async () => {
          // "best" = preferred over each of the others: one pairwise preference per other answer
          for (let j = 0; j < a.texts.length; j++) {
            if (j === i) continue;
            await post('/v1/preferences', { chosen: { response_id: a.id, choice_index: i }, rejected: { response_id: a.id, choice_index: j } });
          }
          a.best = i;
          drawResults();
          notify(`Saved: ${LETTERS[i]} preferred over ${a.texts.map((_, j) => LETTERS[j]).filter((_, j) => j !== i).join(', ')}.`);
        }, 'Saving the preference'));
        col.append(best, feedbackBar(a.id, i, text));
      }
      return col;
    });
    clear(results, h('div', { class: 'columns', style: null, dataset: { n: a.texts.length } }, columns));
    if (a.done) {
      results.append(rankingBoard(a, saved => {
        a.ranked = saved.order;
        notify(`Ranking saved: ${saved.pairs} training pairs.`);
        results.querySelector('.ranking').dataset.saved = JSON.stringify(saved.order);
      }));
      if (a.ranked) results.querySelector('.ranking').dataset.saved = JSON.stringify(a.ranked);
    }
  }

  form.addEventListener('submit', async ev => {
    ev.preventDefault();
    const text = prompt.value.trim();
    if (!text) { prompt.focus(); return; }
    Object.assign(state, { prompt: text, n: n.value, model: model.value, temperature: temperature.value, max_tokens: maxTokens.value,
                           seed: seed.value, answer: null, tiers: null });
    const body = { ...samplingBody({ ...state, top_p: '' }), messages: [{ role: 'user', content: text }] };
    ask.disabled = true;
    progress.textContent = 'waiting for the model…';
    let received = 0;
    try {
      const answer = await chatStreamed(body, {
        onStart: st => { state.answer = st; drawResults(); },
        onDelta: (i, piece, st) => {
          received += piece.length;
          progress.textContent = `streaming ${st.texts.length} answers… ${received} characters`;
          const col = results.querySelector(`.column[data-choice-index="${i}"] .text`);
          if (col) col.textContent = st.texts[i]; else drawResults();
        },
      });
      state.answer = Object.assign(answer, { done: true });
      progress.textContent = `${answer.texts.length} answers from ${answer.fingerprint}`;
    } catch (e) {
      progress.textContent = '';
      showError(e, 'Compare');
    } finally {
      ask.disabled = false;
      drawResults();
    }
  });
  prompt.addEventListener('keydown', ev => {
    if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); form.requestSubmit(); }
  });

  drawResults();
  main.append(h('h1', { text: 'Compare' }), form, results);
  prompt.focus();
}
