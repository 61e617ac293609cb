// Chat: a streamed, multi-turn conversation with the served model, its sampling settings, and
// feedback on every answer. The conversation is kept until the page is reloaded (the server keeps each exchange).
import { chatStreamed, get } from './api.js';
import { feedbackBar } from './feedback.js';
import { clear, field, h, showError } from './ui.js';

const state = {
  turns: [],  // {user, answer: {id, fingerprint, texts, finish, selected}}
  settings: { model: 'feedloop', temperature: '1', top_p: '1', max_tokens: '', n: '1', seed: '' },
};

export function samplingBody(settings) {
  const body = { model: settings.model, temperature: Number(settings.temperature), n: Number(settings.n) };
  if (settings.top_p !== '' && Number(settings.top_p) !== 1) body.top_p = Number(settings.top_p);
  if (settings.max_tokens !== '') body.max_tokens = Number(settings.max_tokens);
  if (settings.seed !== '') body.seed = Number(settings.seed);
  return body;
}

function messages(upto) {
  const out = [];
  for (const t of state.turns.slice(0, upto)) {
    if (!t.answer || !t.answer.texts.length) continue;  // a turn that got no answer is not part of the conversation
    out.push({ role: 'user', content: t.user });
    out.push({ role: 'assistant', content: t.answer.texts[t.answer.selected] || '' });
  }
  return out;
}

export async function modelOptions(select, current) {
  const list = await get('/v1/models');
  clear(select, list.data.map(m => h('option', { value: m.id, text: m.id === 'feedloop' ? 'feedloop (the served version)' : m.id })));
  if (list.data.some(m => m.id === current)) select.value = current;
}

// One answer (all its choices), as cards with the version that wrote it and feedback under each.
export function answerCards(answer, { hideVersion = false } = {}) {
  const wrap = h('div', { class: 'choices', dataset: { responseId: answer.id || '' } });
  const cards = answer.texts.map((text, i) => {
    const body = h('div', { class: 'text', text });
    const meta = h('div', { class: 'meta' },
      hideVersion ? null : h('span', { class: 'version', title: 'the model version that wrote it (system_fingerprint)', text: answer.fingerprint || '' }),
      answer.texts.length > 1 ? h('span', { class: 'choice-label', text: `choice ${i + 1} of ${answer.texts.length}` }) : null,
      h('span', { class: 'finish', text: answer.finish[i] ? `finish: ${answer.finish[i]}` : 'writing…' }));
    const card = h('article', { class: 'answer', dataset: { responseId: answer.id || '', choiceIndex: i } }, meta, body);
    return card;
  });
  wrap.append(...cards);
  return { wrap, cards };
}

function finishCards(answer, cards, onSelect) {
  cards.forEach((card, i) => {
    card.dataset.done = 'true';
    card.querySelector('.finish').textContent = `finish: ${answer.finish[i] || 'cut off'}`;
    card.append(feedbackBar(answer.id, i, answer.texts[i] || ''));
    if (answer.texts.length > 1 && onSelect) {
      const keep = h('button', { type: 'button', class: 'keep', 'aria-pressed': String(answer.selected === i),
                                 text: 'Continue with this answer' });
      keep.addEventListener('click', () => onSelect(i));
      card.querySelector('.meta').append(keep);
    }
    card.querySelector('.meta').append(h('small', { class: 'rid', text: answer.id }));
  });
}

export function render(main, ctx) {
  const s = state.settings;
  const model = h('select', { name: 'model' }, h('option', { value: s.model, text: s.model }));
  const temperature = h('input', { name: 'temperature', type: 'number', min: 0, max: 2, step: 0.1, value: s.temperature });
  const topP = h('input', { name: 'top_p', type: 'number', min: 0.01, max: 1, step: 0.05, value: s.top_p });
  const maxTokens = h('input', { name: 'max_tokens', type: 'number', min: 1, max: 4096, step: 1, value: s.max_tokens, placeholder: 'server default' });
  const n = h('input', { name: 'n', type: 'number', min: 1, max: 8, step: 1, value: s.n });
  const seed = h('input', { name: 'seed', type: 'number', step: 1, value: s.seed, placeholder: 'random' });
  const settings = h('form', { class: 'settings', 'aria-label': 'Sampling settings' },
    field('Model', model), field('Temperature', temperature), field('Top p', topP),
    field('Max tokens', maxTokens), field('Answers (n)', n), field('Seed', seed));
  settings.addEventListener('input', () => {
    Object.assign(s, { model: model.value, temperature: temperature.value, top_p: topP.value,
                       max_tokens: maxTokens.value, n: n.value, seed: seed.value });
  });
  settings.addEventListener('submit', ev => ev.preventDefault());
  modelOptions(model, s.model).catch(e => showError(e, 'Listing the models'));

  const transcript = h('div', { class: 'transcript', 'aria-live': 'polite' });
  const input = h('textarea', { name: 'message', rows: 3, placeholder: 'Message (Enter sends, Shift+Enter for a new line)',
                                'aria-label': 'Message' });
  const send = h('button', { type: 'submit', class: 'primary', text: 'Send' });
  const stop = h('button', { type: 'button', text: 'Stop', hidden: true });
  const reset = h('button', { type: 'button', text: 'New chat' });
  const progress = h('span', { class: 'progress', role: 'status' });
  const composer = h('form', { class: 'composer' }, input, h('div', { class: 'actions' }, send, stop, reset, progress));
  let controller = null;

  function drawTurn(t, index) {
    const user = h('div', { class: 'turn user' }, h('div', { class: 'who', text: 'You' }), h('div', { class: 'text', text: t.user }));
    const box = h('div', { class: 'turn assistant' }, h('div', { class: 'who', text: 'feedloop' }));
    if (t.answer) {
      const { wrap, cards } = answerCards(t.answer);
      box.append(wrap);
      if (t.answer.done) finishCards(t.answer, cards, i => { t.answer.selected = i; redraw(); });
      t.cards = cards;
    }
    if (t.error) box.append(h('div', { class: 'failed', text: `No answer: ${t.error}` }));
    return h('section', { class: 'exchange', 'aria-label': `Turn ${index + 1}` }, user, box);
  }

  function redraw() {
    clear(transcript, state.turns.map(drawTurn));
    if (!state.turns.length) transcript.append(h('p', { class: 'empty', text: 'Say something to the model. Every answer can be judged: thumbs, a rating, a comment, or a better answer.' }));
  }

  async function ask(text) {
    const turn = { user: text, answer: null };
    state.turns.push(turn);
    const index = state.turns.length - 1;
    const body = { ...samplingBody(s), messages: messages(index).concat([{ role: 'user', content: text }]) };
    controller = new AbortController();
    send.disabled = true; stop.hidden = false; progress.textContent = 'waiting for the model…';
    redraw();
    let received = 0;
    try {
      const answer = await chatStreamed(body, {
        signal: controller.signal,
        onStart: st => { turn.answer = Object.assign(st, { selected: 0 }); redraw(); },
        onDelta: (i, piece, st) => {
          received += piece.length;
          progress.textContent = `streaming… ${received} characters`;
          const card = turn.cards && turn.cards[i];
          if (card) card.querySelector('.text').textContent = st.texts[i];
          else redraw();
          composer.scrollIntoView({ block: 'nearest' });
        },
      });
      turn.answer = Object.assign(answer, { selected: 0, done: true });
      progress.textContent = `answered by ${answer.fingerprint}`;
    } catch (e) {
      if (e.name === 'AbortError') {
        progress.textContent = 'stopped';
        if (turn.answer) turn.answer.done = false;
        turn.error = 'stopped before the end';
      } else {
        turn.error = e.message;
        progress.textContent = '';
        showError(e, 'Chat');
      }
    } finally {
      controller = null;
      send.disabled = false; stop.hidden = true;
      redraw();
    }
  }

  composer.addEventListener('submit', ev => {
    ev.preventDefault();
    const text = input.value.trim();
    if (!text || controller) return;
    input.value = '';
    ask(text);
  });
  input.addEventListener('keydown', ev => {
    if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); composer.requestSubmit(); }
  });
  stop.addEventListener('click', () => controller && controller.abort());
  reset.addEventListener('click', () => { if (controller) controller.abort(); state.turns = []; redraw(); input.focus(); });

  redraw();
  main.append(h('h1', { text: 'Chat' }),
    h('details', { class: 'settings-box', open: window.innerWidth > 700 }, h('summary', { text: 'Sampling settings' }), settings),
    transcript, composer);
  input.focus();
  return () => controller && controller.abort();
}
