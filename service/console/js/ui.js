// Small DOM helpers. Text from the server is only ever set as text, never parsed as HTML.

const SVG = 'http://www.w3.org/2000/svg';

export function h(tag, props, ...children) {
  const svg = tag.startsWith('svg:');
  const el = svg ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'text') el.textContent = v;
    else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k === 'value' && !svg) el.value = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export function clear(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

// --- notices: errors as the API said them, and short confirmations ---------------------------

const notices = () => document.getElementById('notices');

export function showError(e, context) {
  if (e && e.name === 'AbortError') return;
  const parts = [e && e.message ? e.message : String(e)];
  const detail = [e.status ? `HTTP ${e.status}` : null, e.type, e.code, e.param ? `param: ${e.param}` : null]
    .filter(Boolean).join(' · ');
  const note = h('div', { class: 'notice error', role: 'alert' },
    h('strong', { text: context ? `${context}: ` : 'Error: ' }), parts.join(' '),
    detail ? h('small', { class: 'detail', text: ` (${detail})` }) : null,
    h('button', { class: 'dismiss', type: 'button', 'aria-label': 'Dismiss', text: '×',
                  onclick: () => note.remove() }));
  notices().append(note);
  return note;
}

export function notify(message) {
  const note = h('div', { class: 'notice ok', role: 'status' }, message,
    h('button', { class: 'dismiss', type: 'button', 'aria-label': 'Dismiss', text: '×', onclick: () => note.remove() }));
  notices().append(note);
  setTimeout(() => note.remove(), 6000);
  return note;
}

export function clearNotices() { notices().replaceChildren(); }

// Run `work` with `button` disabled and saying `busyText`; errors become notices. Returns the result or undefined.
export async function busy(button, busyText, work, context) {
  const label = button ? button.textContent : null;
  if (button) { button.disabled = true; button.setAttribute('aria-busy', 'true'); if (busyText) button.textContent = busyText; }
  try {
    return await work();
  } catch (e) {
    showError(e, context);
    return undefined;
  } finally {
    if (button) { button.disabled = false; button.removeAttribute('aria-busy'); if (busyText) button.textContent = label; }
  }
}

// --- confirmation: a modal dialog with an optional reason and extra fields -------------------
// fields: [{name, label, type, value, min, max, step, required}]; resolves to their values or null.

export function confirmDialog({ title, message, confirmLabel = 'Confirm', reason = 'optional', fields = [], danger = false }) {
  return new Promise(resolve => {
    const inputs = {};
    const rows = fields.map(f => {
      const id = `dlg-${f.name}`;
      inputs[f.name] = h('input', { id, name: f.name, type: f.type || 'text', value: f.value ?? '', min: f.min, max: f.max,
                                    step: f.step, required: f.required });
      return h('p', {}, h('label', { for: id, text: f.label }), inputs[f.name]);
    });
    if (reason) {
      inputs.reason = h('textarea', { id: 'dlg-reason', name: 'reason', rows: 3, maxlength: 2000, required: reason === 'required' });
      rows.push(h('p', {}, h('label', { for: 'dlg-reason', text: reason === 'required' ? 'Reason (required)' : 'Reason (optional)' }),
                  inputs.reason));
    }
    const dialog = h('dialog', { class: 'confirm', 'aria-labelledby': 'dlg-title' });
    const form = h('form', { method: 'dialog' },
      h('h2', { id: 'dlg-title', text: title }),
      message ? h('p', { text: message }) : null, rows,
      h('div', { class: 'actions' },
        h('button', { type: 'button', value: 'cancel', text: 'Cancel', onclick: () => dialog.close('cancel') }),
        h('button', { type: 'submit', value: 'ok', class: danger ? 'danger' : 'primary', text: confirmLabel })));
    form.addEventListener('submit', ev => {
      ev.preventDefault();
      if (!form.reportValidity()) return;
      dialog.close('ok');
    });
    dialog.append(form);
    dialog.addEventListener('close', () => {
      const ok = dialog.returnValue === 'ok';
      const values = {};
      for (const [k, el] of Object.entries(inputs)) values[k] = el.value.trim();
      dialog.remove();
      resolve(ok ? values : null);
    });
    document.body.append(dialog);
    dialog.showModal();
    (Object.values(inputs)[0] || form.querySelector('button[type=submit]')).focus();
  });
}

// --- formatting ------------------------------------------------------------------------------

export function when(iso) {
  if (!iso) return '—';
  const d = new Date(iso);
  return d.toLocaleString(undefined, { year: 'numeric', month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit', second: '2-digit' });
}

export function pct(x, digits = 0) { return x === null || x === undefined ? '—' : `${(100 * x).toFixed(digits)} %`; }

export function num(x, digits = 3) {
  if (x === null || x === undefined) return '—';
  if (typeof x !== 'number') return String(x);
  return Number.isInteger(x) ? String(x) : x.toFixed(digits);
}

export function badge(status) { return h('span', { class: `badge ${status}`, text: status }); }

// A labelled form control: <label> + control, ids tied together.
let ids = 0;
export function field(label, control, hint) {
  const id = control.id || `f${++ids}`;
  control.id = id;
  return h('div', { class: 'field' }, h('label', { for: id, text: label }), control,
           hint ? h('small', { class: 'hint', text: hint }) : null);
}

// Poll `fn` every `ms` (a number, or a function giving the next delay) while `alive()` says the
// page is still shown; returns a stop function.
// A failing poll is shown once (not every few seconds) and cleared when a poll succeeds again.
export function every(ms, fn, alive, context = 'Live update') {
  let timer = null, stopped = false, shown = null;
  const tick = async () => {
    if (stopped || !alive()) return;
    if (!document.hidden) {
      try {
        await fn();
        if (shown) { shown.remove(); shown = null; }
      } catch (e) {
        if (!shown || !shown.isConnected) shown = showError(e, context);
      }
    }
    if (!stopped && alive()) timer = setTimeout(tick, typeof ms === 'function' ? ms() : ms);
  };
  timer = setTimeout(tick, typeof ms === 'function' ? ms() : ms);
  return () => { stopped = true; clearTimeout(timer); };
}
