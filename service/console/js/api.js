// The public HTTP API, as every client calls it: Bearer key, JSON bodies, OpenAI's error shape.
// Errors are thrown as ApiError carrying the server's own message, type, code and param.

const STORE = 'feedloop.key';

export class ApiError extends Error {
  constructor(status, error) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.type = error.type || null;
    this.code = error.code || null;
    this.param = error.param || null;
  }
}

let key = sessionStorage.getItem(STORE) || localStorage.getItem(STORE);
const signedOut = new Set();

export function currentKey() { return key; }

export function setKey(value, remember) {
  key = value;
  sessionStorage.setItem(STORE, value);
  if (remember) localStorage.setItem(STORE, value);
}

export function forgetKey() {
  key = null;
  sessionStorage.removeItem(STORE);
  localStorage.removeItem(STORE);
}

// Called when the server says the key is no longer good (revoked): the app signs out.
export function onSignedOut(fn) { signedOut.add(fn); }

async function errorFrom(r) {
  let body = null;
  try { body = await r.json(); } catch { /* not JSON: say what HTTP said */ }
  const error = body && body.error ? body.error : { message: `${r.status} ${r.statusText || 'error'} from ${r.url}` };
  const e = new ApiError(r.status, error);
  const retry = r.headers.get('retry-after');
  if (retry) e.message += ` (retry after ${retry} s)`;
  return e;
}

// method, path, JSON body; {raw: true} returns the Response (for streams and downloads).
export async function api(method, path, body, { signal, raw = false, auth = true } = {}) {
  const headers = {};
  if (auth) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let r;
  try {
    r = await fetch(path, { method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError(0, { message: `The server could not be reached (${e.message}).`, type: 'network_error' });
  }
  if (!r.ok) {
    const e = await errorFrom(r);
    if (r.status === 401 && auth) signedOut.forEach(fn => fn(e));
    throw e;
  }
  if (raw) return r;
  return r.status === 204 ? null : r.json();
}

export const get = (path, opts) => api('GET', path, undefined, opts);
export const post = (path, body, opts) => api('POST', path, body, opts);
export const del = (path, opts) => api('DELETE', path, undefined, opts);

// POST /v1/chat/completions with stream=true: yields each chunk (OpenAI's chat.completion.chunk)
// as it arrives over server-sent events; ends at `data: [DONE]`. A JSON error line mid-stream is
// thrown as an ApiError; a stream cut off before [DONE] is an error too, never a quiet half answer.
export async function* streamChat(body, signal) {
  const r = await api('POST', '/v1/chat/completions', { ...body, stream: true }, { signal, raw: true });
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, '\n');
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split('\n').filter(l => l.startsWith('data:')).map(l => l.slice(5).trimStart()).join('\n');
      if (!data) continue;
      if (data === '[DONE]') return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(500, chunk.error);
      yield chunk;
    }
  }
  throw new ApiError(0, { message: 'The answer stream ended before it was complete (no [DONE]).', type: 'stream_error' });
}

// Everything a streamed request produced: {id, fingerprint, texts[], finish[]}; `onDelta(index, text, state)`
// sees each piece as it arrives.
export async function chatStreamed(body, { signal, onStart, onDelta } = {}) {
  const state = { id: null, fingerprint: null, texts: [], finish: [] };
  for await (const chunk of streamChat(body, signal)) {
    if (!state.id) {
      state.id = chunk.id;
      state.fingerprint = chunk.system_fingerprint;
      if (onStart) onStart(state);
    }
    for (const c of chunk.choices) {
      state.texts[c.index] = (state.texts[c.index] || '') + (c.delta.content || '');
      if (c.finish_reason) state.finish[c.index] = c.finish_reason;
      if (onDelta && c.delta.content) onDelta(c.index, c.delta.content, state);
    }
  }
  return state;
}

// One piece of feedback on one completion: thumbs (+1/-1), rating (1-7), comment or correction.
export function giveFeedback(responseId, choiceIndex, kind, valueOrText) {
  const body = { response_id: responseId, choice_index: choiceIndex, kind };
  if (kind === 'thumbs' || kind === 'rating') body.value = valueOrText; else body.text = valueOrText;
  return post('/v1/feedback', body);
}
