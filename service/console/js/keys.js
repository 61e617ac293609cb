// API keys (operators): list, create (the secret is shown once), revoke.
import { del, get, post } from './api.js';
import { badge, busy, clear, confirmDialog, field, h, notify, showError, when } from './ui.js';

export function render(main) {
  const list = h('div', { class: 'table-wrap' });
  const name = h('input', { name: 'name', required: true, maxlength: 200, placeholder: 'alice' });
  const role = h('select', { name: 'role' }, h('option', { value: 'user', text: 'user: chat and feedback' }),
                 h('option', { value: 'operator', text: 'operator: also runs the system' }));
  const rate = h('input', { name: 'rate_limit', type: 'number', min: 1, step: 1, placeholder: 'unlimited' });
  const create = h('button', { type: 'submit', class: 'primary', text: 'Create key' });
  const secret = h('div', { class: 'secret', role: 'status' });
  const form = h('form', { class: 'settings' }, field('Name', name), field('Role', role), field('Requests per minute', rate), create);

  async function draw() {
    const keys = await get('/v1/admin/keys');
    clear(list, h('table', { class: 'keys' }, h('caption', { text: 'API keys (only a prefix of each is kept in the clear)' }),
      h('thead', {}, h('tr', {}, ['Id', 'Prefix', 'Name', 'Role', 'Rate limit', 'Created', 'State', ''].map(t => h('th', { scope: 'col', text: t })))),
      h('tbody', {}, keys.data.map(k => {
        const revoke = k.revoked_at ? null : h('button', { type: 'button', class: 'danger', text: 'Revoke' });
        if (revoke) revoke.addEventListener('click', async () => {
          const ok = await confirmDialog({ title: `Revoke key ${k.id} (${k.name})?`, message: 'It stops working at once; its history stays.',
                                           confirmLabel: 'Revoke', reason: null, danger: true });
          if (ok) await busy(revoke, 'Revoking…', async () => { await del(`/v1/admin/keys/${k.id}`); notify(`Key ${k.id} revoked.`); await draw(); }, 'Revoking the key');
        });
        return h('tr', { dataset: { key: k.id } }, h('td', { text: String(k.id) }), h('td', {}, h('code', { text: `${k.prefix}…` })),
          h('td', { text: k.name }), h('td', {}, badge(k.role)), h('td', { text: k.rate_limit ? `${k.rate_limit}/min` : '—' }),
          h('td', { text: when(k.created_at) }), h('td', {}, k.revoked_at ? badge('revoked') : badge('live')), h('td', {}, revoke));
      }))));
  }

  form.addEventListener('submit', ev => {
    ev.preventDefault();
    busy(create, 'Creating…', async () => {
      const body = { name: name.value.trim(), role: role.value };
      if (rate.value) body.rate_limit = Number(rate.value);
      const k = await post('/v1/admin/keys', body);
      const code = h('code', { class: 'new-key', text: k.key });
      const copy = h('button', { type: 'button', text: 'Copy' });
      copy.addEventListener('click', () => navigator.clipboard.writeText(k.key).then(() => notify('Copied.'), e => showError(e, 'Copying')));
      clear(secret, h('p', {}, `New ${k.role} key “${k.name}”: `, code, ' ', copy),
        h('p', { class: 'hint', text: 'Shown this once: only its hash is stored. Hand it over now.' }));
      name.value = '';
      await draw();
    }, 'Creating the key');
  });
  main.append(h('h1', { text: 'Keys' }), form, secret, list);
  draw().catch(e => showError(e, 'Loading the keys'));
}
