// What a person can say about one answer: thumbs, a 1-7 rating, a comment, a better answer.
// Each is one POST /v1/feedback; a second one of the same kind replaces the first.
import { giveFeedback } from './api.js';
import { h, showError } from './ui.js';

const LABELS = { thumbs: 'thumbs', rating: 'rating', comment: 'comment', correction: 'better answer' };
// Feather's thumbs-up and thumbs-down (MIT licence, feathericons.com): drawn, so no emoji font is needed.
const THUMB = {
  up: 'M14 9V5a3 3 0 0 0-3-3l-4 9v11h11.28a2 2 0 0 0 2-1.7l1.38-9a2 2 0 0 0-2-2.3zM7 22H4a2 2 0 0 1-2-2v-7a2 2 0 0 1 2-2h3',
  down: 'M10 15v4a3 3 0 0 0 3 3l4-9V2H5.72a2 2 0 0 0-2 1.7l-1.38 9a2 2 0 0 0 2 2.3zm7-13h2.67A2.31 2.31 0 0 1 22 4v7a2.31 2.31 0 0 1-2.33 2H17',
};
const icon = d => h('svg:svg', { viewBox: '0 0 24 24', 'aria-hidden': 'true', class: 'icon' }, h('svg:path', { d }));

// What this tab has saved per completion, so a bar drawn again (the chat redraws) shows it.
const given = new Map();

export function feedbackBar(responseId, choiceIndex, answerText) {
  const status = h('span', { class: 'saved', role: 'status' });
  const bar = h('div', { class: 'feedback', dataset: { responseId, choiceIndex } });
  const mine = given.get(`${responseId}:${choiceIndex}`) || {};
  given.set(`${responseId}:${choiceIndex}`, mine);
  for (const kind of ['thumbs', 'rating']) if (mine[kind] !== undefined) bar.dataset[kind] = String(mine[kind]);

  async function send(kind, value, control) {
    status.textContent = `saving ${LABELS[kind]}…`;
    status.dataset.state = 'saving';
    if (control) control.disabled = true;
    try {
      await giveFeedback(responseId, choiceIndex, kind, value);
      status.textContent = `${LABELS[kind]} saved`;
      status.dataset.state = `saved-${kind}`;
      mine[kind] = value;
      if (kind === 'thumbs' || kind === 'rating') bar.dataset[kind] = String(value);
      return true;
    } catch (e) {
      status.textContent = `${LABELS[kind]} not saved`;
      status.dataset.state = 'error';
      showError(e, `Saving the ${LABELS[kind]}`);
      return false;
    } finally {
      if (control) control.disabled = false;
    }
  }

  const up = h('button', { type: 'button', class: 'thumb up', 'aria-pressed': String(mine.thumbs === 1), title: 'Good answer',
                           'aria-label': 'Thumbs up' }, icon(THUMB.up));
  const down = h('button', { type: 'button', class: 'thumb down', 'aria-pressed': String(mine.thumbs === -1), title: 'Bad answer',
                             'aria-label': 'Thumbs down' }, icon(THUMB.down));
  for (const [button, value, other] of [[up, 1, down], [down, -1, up]]) {
    button.addEventListener('click', async () => {
      if (await send('thumbs', value, button)) {
        button.setAttribute('aria-pressed', 'true');
        other.setAttribute('aria-pressed', 'false');
      }
    });
  }

  const stars = [];
  const rating = h('div', { class: 'rating', role: 'group', 'aria-label': 'Rating from 1 (worst) to 7 (best)' },
    h('span', { class: 'rating-label', text: 'Rate' }));
  for (let v = 1; v <= 7; v++) {
    const b = h('button', { type: 'button', class: 'rate', 'aria-pressed': String(mine.rating === v), 'aria-label': `Rate ${v} of 7`,
                            title: `${v} of 7`, text: String(v) });
    b.addEventListener('click', async () => {
      if (await send('rating', v, b)) stars.forEach((s, i) => s.setAttribute('aria-pressed', String(i + 1 === v)));
    });
    stars.push(b);
    rating.append(b);
  }

  function textBox(kind, summary, initial, placeholder) {
    const area = h('textarea', { rows: kind === 'correction' ? 5 : 2, placeholder, 'aria-label': summary, value: mine[kind] ?? initial ?? '' });
    const save = h('button', { type: 'button', class: 'primary', text: `Save ${LABELS[kind]}` });
    save.addEventListener('click', () => {
      if (!area.value.trim()) { showError(new Error(`The ${LABELS[kind]} is empty.`)); area.focus(); return; }
      send(kind, area.value, save);
    });
    return h('details', { class: `more ${kind}` }, h('summary', { text: mine[kind] !== undefined ? `${summary} (saved)` : summary }), area, save);
  }

  bar.append(
    h('div', { class: 'quick' }, up, down, rating, status),
    textBox('comment', 'Comment', '', 'What do you think of this answer?'),
    textBox('correction', 'Write a better answer', answerText, ''));
  return bar;
}
