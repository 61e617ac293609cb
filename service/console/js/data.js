// Training data out (operators): the derived pairs, KTO examples or demonstrations as JSONL in
// TRL's formats, exactly what GET /v1/admin/export serves.
import { api } from './api.js';
import { busy, field, h, notify } from './ui.js';

export function render(main) {
  const format = h('select', { name: 'format' },
    h('option', { value: 'preference', text: 'preference pairs (reward model, DPO)' }),
    h('option', { value: 'kto', text: 'KTO (thumbs as desirable or not)' }),
    h('option', { value: 'sft', text: 'SFT demonstrations (corrections and imports)' }));
  const after = h('input', { name: 'after', type: 'number', min: 0, step: 1, value: '0' });
  const go = h('button', { type: 'submit', class: 'primary', text: 'Export' });
  const result = h('p', { class: 'progress', role: 'status' });
  const form = h('form', { class: 'settings' }, field('Format', format),
    field('After watermark', after, 'only data newer than this; 0: everything'), go);
  form.addEventListener('submit', ev => {
    ev.preventDefault();
    busy(go, 'Exporting…', async () => {
      const r = await api('GET', `/v1/admin/export?format=${format.value}&after=${Number(after.value) || 0}`, undefined, { raw: true });
      const blob = await r.blob();
      const rows = r.headers.get('x-feedloop-rows'), mark = r.headers.get('x-feedloop-watermark');
      const link = h('a', { href: URL.createObjectURL(blob), download: `feedloop-${format.value}.jsonl`, text: `feedloop-${format.value}.jsonl` });
      result.replaceChildren(`${rows} rows up to watermark ${mark} (pass it as "after" next time): `, link);
      result.dataset.rows = rows;
      link.click();
      notify(`Exported ${rows} ${format.value} rows.`);
    }, 'Exporting');
  });
  main.append(h('h1', { text: 'Export training data' }),
    h('p', { class: 'hint', text: 'JSONL in TRL\u2019s formats, loadable with datasets.load_dataset("json", data_files=...). The same derivation the trainer reads.' }),
    form, result);
}
