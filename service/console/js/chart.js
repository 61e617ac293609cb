// A small line chart in inline SVG: one or more series over training steps, an optional
// horizontal limit (a KL budget), the y range and the last value written out.
import { h, num } from './ui.js';

const W = 320, H = 150, PAD = { l: 44, r: 10, t: 10, b: 22 };
const SERIES_STYLES = 3;  // .s0 .s1 .s2 in console.css

export function lineChart({ title, series, limits = [], unit = '' }) {
  const shown = series.filter(s => Array.isArray(s.values) && s.values.some(v => typeof v === 'number'));
  const fig = h('figure', { class: 'chart', dataset: { title } });
  fig.append(h('figcaption', { text: title }));
  if (!shown.length) { fig.append(h('p', { class: 'muted', text: 'not recorded in this run' })); return fig; }
  const all = shown.flatMap(s => s.values.filter(v => typeof v === 'number')).concat(limits.map(l => l.value));
  let lo = Math.min(...all), hi = Math.max(...all);
  if (lo === hi) { lo -= Math.abs(lo) * 0.1 || 1; hi += Math.abs(hi) * 0.1 || 1; }
  const steps = Math.max(...shown.map(s => s.values.length));
  const x = i => PAD.l + (steps <= 1 ? 0 : (i / (steps - 1)) * (W - PAD.l - PAD.r));
  const y = v => PAD.t + (1 - (v - lo) / (hi - lo)) * (H - PAD.t - PAD.b);
  const label = shown.map(s => `${s.name}: last ${num(s.values[s.values.length - 1], 4)}`).join('; ');
  const svg = h('svg:svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': `${title}. ${label}` },
    h('svg:title', { text: `${title}. ${label}` }),
    h('svg:line', { class: 'axis', x1: PAD.l, y1: PAD.t, x2: PAD.l, y2: H - PAD.b }),
    h('svg:line', { class: 'axis', x1: PAD.l, y1: H - PAD.b, x2: W - PAD.r, y2: H - PAD.b }),
    h('svg:text', { class: 'tick', x: PAD.l - 4, y: PAD.t + 8, 'text-anchor': 'end', text: num(hi, 3) }),
    h('svg:text', { class: 'tick', x: PAD.l - 4, y: H - PAD.b, 'text-anchor': 'end', text: num(lo, 3) }),
    h('svg:text', { class: 'tick', x: PAD.l, y: H - 6, text: 'step 1' }),
    h('svg:text', { class: 'tick', x: W - PAD.r, y: H - 6, 'text-anchor': 'end', text: `step ${steps}` }));
  for (const l of limits) {
    svg.append(h('svg:line', { class: `limit ${l.kind || ''}`, x1: PAD.l, x2: W - PAD.r, y1: y(l.value), y2: y(l.value) }),
      h('svg:text', { class: `tick limit-label ${l.kind || ''}`, x: W - PAD.r - 2, y: y(l.value) - 3, 'text-anchor': 'end', text: `${l.label} ${num(l.value, 2)}` }));
  }
  shown.forEach((s, k) => {
    const points = s.values.map((v, i) => (typeof v === 'number' ? `${x(i).toFixed(1)},${y(v).toFixed(1)}` : null)).filter(Boolean);
    svg.append(h('svg:polyline', { class: `series s${k % SERIES_STYLES}`, points: points.join(' '),
                                   dataset: { series: s.name, points: points.length } }));
    if (points.length === 1) {
      const [px, py] = points[0].split(',');
      svg.append(h('svg:circle', { class: `dot s${k % SERIES_STYLES}`, cx: px, cy: py, r: 2.5 }));
    }
  });
  fig.append(svg, h('p', { class: 'legend' }, shown.map((s, k) =>
    h('span', { class: `key k${k % SERIES_STYLES}`, text: `${s.name}${unit}: ${num(s.values[s.values.length - 1], 4)}` }))));
  return fig;
}
