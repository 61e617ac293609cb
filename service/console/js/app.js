// The console's shell: sign in with an API key, the pages a key's role may use, hash routing.
import { currentKey, forgetKey, get, onSignedOut, setKey } from './api.js';
import { clear, clearNotices, field, h, showError } from './ui.js';
import * as chat from './chat.js';
import * as compare from './compare.js';
import * as arena from './arena.js';
import * as models from './models.js';
import * as runs from './runs.js';
import * as live from './live.js';
import * as exchanges from './exchanges.js';
import * as keys from './keys.js';
import * as data from './data.js';

const PAGES = [
  { path: 'chat', title: 'Chat', page: chat },
  { path: 'compare', title: 'Compare', page: compare },
  { path: 'arena', title: 'Arena', page: arena, operator: true },
  { path: 'models', title: 'Models', page: models, operator: true },
  { path: 'runs', title: 'Runs', page: runs, operator: true },
  { path: 'feedback', title: 'Feedback', page: live, operator: true },
  { path: 'exchanges', title: 'Exchanges', page: exchanges, operator: true },
  { path: 'keys', title: 'Keys', page: keys, operator: true },
  { path: 'export', title: 'Export', page: data, operator: true },
];

const main = document.getElementById('main');
const nav = document.getElementById('nav');
const who = document.getElementById('who');
const signOut = document.getElementById('signout');
let me = null;
let leave = null;  // the current page's clean-up (stops its polling)

function allowed() { return PAGES.filter(p => !p.operator || (me && me.role === 'operator')); }

function drawNav(active) {
  clear(nav, h('ul', {}, allowed().map(p => h('li', {},
    h('a', { href: `#/${p.path}`, 'aria-current': p.path === active ? 'page' : null, text: p.title })))));
}

function signInPage(message) {
  const input = h('input', { type: 'password', name: 'key', autocomplete: 'current-password', required: true, placeholder: 'fl-…', spellcheck: 'false' });
  const remember = h('input', { type: 'checkbox', id: 'remember' });
  const button = h('button', { type: 'submit', class: 'primary', text: 'Sign in' });
  const form = h('form', { class: 'signin', 'aria-label': 'Sign in' },
    h('h1', { text: 'Sign in' }),
    h('p', { text: 'With an API key: a user key chats and gives feedback; an operator key also runs the registry, training and keys. `make run` prints an operator key when it creates one.' }),
    field('API key', input),
    h('div', { class: 'field inline' }, remember, h('label', { for: 'remember', text: 'Remember on this device' })),
    button);
  form.addEventListener('submit', async ev => {
    ev.preventDefault();
    clearNotices();
    button.disabled = true;
    setKey(input.value.trim(), remember.checked);
    try {
      me = await get('/v1/me');
      if (!location.hash || location.hash === '#/signin') location.hash = '#/chat'; else route();
    } catch (e) {
      forgetKey();
      showError(e, 'Signing in');
      input.select();
    } finally {
      button.disabled = false;
    }
  });
  nav.hidden = true; who.textContent = ''; signOut.hidden = true;
  clear(main, form);
  if (message) showError(message, 'Signed out');
  input.focus();
}

async function route() {
  if (leave) { try { leave(); } catch { /* a page's clean-up failing must not stop the next page */ } leave = null; }
  if (!currentKey()) return signInPage();
  if (!me) {
    try { me = await get('/v1/me'); } catch (e) { forgetKey(); return signInPage(e.status === 401 ? null : e); }
  }
  const [path, ...rest] = location.hash.replace(/^#\/?/, '').split('/');
  const entry = allowed().find(p => p.path === path) || allowed()[0];
  if (entry.path !== path) { location.hash = `#/${entry.path}`; return; }
  nav.hidden = false; signOut.hidden = false;
  who.textContent = `${me.name} (${me.role})`;
  drawNav(entry.path);
  document.title = `${entry.title} · feedloop`;
  clear(main);
  main.dataset.page = entry.path;
  const cleanUp = entry.page.render(main, { me, param: rest.length ? decodeURIComponent(rest.join('/')) : null });
  if (typeof cleanUp === 'function') leave = cleanUp;
}

signOut.addEventListener('click', () => { forgetKey(); me = null; location.hash = '#/signin'; signInPage(); });
onSignedOut(e => {  // a key revoked while signed in; a wrong key at sign-in is the form's to say
  if (!me) return;
  forgetKey(); me = null; signInPage(e);
});
window.addEventListener('hashchange', route);
route();
