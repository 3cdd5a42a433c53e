// fleetpipe fleet console: plain ES2020, no dependencies, served from the binary.
//
// Data flow: one long fetch() of /v1/console/stream (Server-Sent Events, parsed by hand so
// that an Authorization header can be sent) delivers a snapshot every second; each one
// updates the table, the map and the panels in place. Selecting a vehicle asks
// /v1/vehicles/{id} and /v1/vehicles/{id}/track (falling back to the positions this page
// has seen when the server has no track store: 501).
'use strict';

const LIMIT = 500;            // vehicles asked for per snapshot
const TRAIL_MAX = 200;        // positions kept per vehicle for the local track
const STALE_MS = 60_000;      // a vehicle whose last fix is older than this is drawn dim
const WATCHDOG_MS = 10_000;   // no byte from the stream for this long: reconnect
const RATE_WINDOW = 5;        // rates: counter deltas summed over this many consecutive snapshots
const TOKEN_KEY = 'fleetpipe.token';

const $ = (sel) => document.querySelector(sel);

/** Creates an element; attrs may hold className, dataset, title, or any property. */
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'dataset') Object.assign(e.dataset, v);
    else if (v !== undefined && v !== null) e[k] = v;
  }
  for (const c of children.flat(Infinity)) if (c !== null && c !== undefined) e.append(c);
  return e;
}
const num = (v) => (typeof v === 'number' && Number.isFinite(v) ? v : null);
const fmtInt = (v) => (num(v) === null ? '–' : v.toLocaleString('en-US'));
const fmtFix = (v, d) => (num(v) === null ? '–' : v.toFixed(d));
const fmtRate = (v) => (v === null ? '–' : v < 10 ? v.toFixed(1) : Math.round(v).toLocaleString('en-US'));
const tsMs = (ts) => (typeof ts === 'number' ? ts : typeof ts === 'string' ? Date.parse(ts) : NaN);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** "16:59:59" (UTC), with the date in front when it is not the day of `nowMs`. */
function fmtTime(ts, nowMs) {
  const ms = tsMs(ts);
  if (!Number.isFinite(ms)) return ts === undefined || ts === null ? '–' : String(ts);
  const iso = new Date(ms).toISOString();
  const sameDay = Number.isFinite(nowMs) && new Date(nowMs).toISOString().slice(0, 10) === iso.slice(0, 10);
  return sameDay ? iso.slice(11, 19) : `${iso.slice(5, 10)} ${iso.slice(11, 19)}`;
}

const fmtDuration = (s) => (num(s) === null ? '–' : s < 60 ? `${Math.round(s)} s`
  : s < 3600 ? `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`
    : `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`);

/** Replaces a table's (or element's) content, or shows "none yet". */
function fill(target, rows, emptyCols = 1) {
  if (rows.length) target.replaceChildren(...rows);
  else target.replaceChildren(el('tr', {}, el('td', { className: 'empty', colSpan: emptyCols }, 'none yet')));
}

// Auth: token from #token=..., sessionStorage, or the form shown on a 401.
let waitingForToken = null;   // promise resolved when the user submits the form

function takeFragmentToken() {
  const params = new URLSearchParams(location.hash.slice(1));
  if (!params.has('token')) return;
  sessionStorage.setItem(TOKEN_KEY, params.get('token'));
  params.delete('token');
  const rest = params.toString();
  history.replaceState(null, '', location.pathname + location.search + (rest ? `#${rest}` : ''));
}

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

/** Shows the token form and resolves once a token has been entered. */
function needToken() {
  if (waitingForToken) return waitingForToken;
  const hadToken = sessionStorage.getItem(TOKEN_KEY) !== null;
  sessionStorage.removeItem(TOKEN_KEY);
  setStatus('token needed', 'auth');
  const form = $('#auth');
  $('#auth-msg').textContent = hadToken ? 'The token was refused.' : '';
  form.hidden = false;
  $('#token-input').focus();
  waitingForToken = new Promise((resolve) => {
    form.onsubmit = (ev) => {
      ev.preventDefault();
      const token = $('#token-input').value.trim();
      if (!token) return;
      sessionStorage.setItem(TOKEN_KEY, token);
      form.hidden = true;
      waitingForToken = null;
      resolve();
    };
  });
  return waitingForToken;
}

/** fetch() with the token; on 401 asks for a token and tries again. */
async function api(path, opts = {}) {
  for (;;) {
    const res = await fetch(path, { ...opts, headers: { Accept: 'application/json', ...authHeaders() } });
    if (res.status !== 401) return res;
    await needToken();
  }
}

// The stream: fetch + a hand-written Server-Sent Events parser, reconnecting with backoff.
function setStatus(text, state) { Object.assign($('#status'), { textContent: text }).dataset.state = state; }

/** Reads one SSE response, calling onEvent(type, data) per message; returns at its end. */
async function readSse(res, onEvent, onActivity) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = '', type = '', data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    onActivity();
    buf += decoder.decode(value, { stream: true });
    // Lines end in \r\n, \n or \r; a \r at the very end may be half of a \r\n: wait for more.
    const lines = buf.split(/\r\n|\n|\r(?=[^])/);
    buf = lines.pop();  // the last piece may be an incomplete line
    for (const line of lines) {
      if (line === '') {  // a blank line ends a message
        if (data.length) onEvent(type || 'message', data.join('\n'));
        [type, data] = ['', []];
        continue;
      }
      if (line.startsWith(':')) continue;  // a comment: keep-alive
      const i = line.indexOf(':');
      const field = i < 0 ? line : line.slice(0, i);
      const val = i < 0 ? '' : line.slice(i + 1).replace(/^ /, '');
      if (field === 'event') type = val;
      else if (field === 'data') data.push(val);
    }
  }
}

async function runStream() {
  let backoff = 500;
  for (;;) {
    const abort = new AbortController();
    let watchdog = 0;
    const kick = () => { clearTimeout(watchdog); watchdog = setTimeout(() => abort.abort(), WATCHDOG_MS); };
    try {
      kick();
      const res = await fetch(`/v1/console/stream?limit=${LIMIT}`, {
        headers: { Accept: 'text/event-stream', ...authHeaders() },
        signal: abort.signal,
        cache: 'no-store',
      });
      if (res.status === 401) { clearTimeout(watchdog); await needToken(); continue; }
      if (!res.ok || !res.body) throw new Error(`stream: HTTP ${res.status}`);
      await readSse(res, (type, data) => {
        if (type !== 'snapshot' && type !== 'message') return;
        onSnapshot(JSON.parse(data));
        setStatus('live', 'live');
        backoff = 500;
      }, kick);
    } catch (err) {
      abort.abort();  // network error, the watchdog, bad JSON: drop this stream and reconnect
    }
    clearTimeout(watchdog);
    setStatus('reconnecting…', 'reconnecting');
    await sleep(backoff);
    backoff = Math.min(backoff * 2, 5000);
  }
}

// State kept between snapshots
const state = {
  snapshots: 0,
  snap: null,        // the latest snapshot
  history: [],       // the last RATE_WINDOW + 1 snapshots, oldest first (for rates)
  vehicles: [],      // latest snapshot's vehicles
  trails: new Map(), // vehicle_id -> [{ts, lat, lon}] seen by this page
  selected: null,    // vehicle_id
  track: null,       // {id, source: 'server'|'local', points}
  detailBusy: false, detailAt: 0, detailTs: null, // detail fetch: in flight, when, for which ts
};

function onSnapshot(snap) {
  state.snap = snap;
  state.history.push(snap);
  if (state.history.length > RATE_WINDOW + 1) state.history.shift();
  state.vehicles = Array.isArray(snap.vehicles) ? snap.vehicles : [];
  state.snapshots += 1;

  // Keep a short trail per vehicle (only for vehicles in this snapshot).
  const seen = new Set();
  for (const v of state.vehicles) {
    seen.add(v.vehicle_id);
    if (num(v.lat) === null || num(v.lon) === null) continue;
    let trail = state.trails.get(v.vehicle_id);
    if (!trail) state.trails.set(v.vehicle_id, (trail = []));
    const last = trail[trail.length - 1];
    if (!last || last.ts !== v.ts) {
      trail.push({ ts: v.ts, lat: v.lat, lon: v.lon });
      if (trail.length > TRAIL_MAX) trail.shift();
    }
    // A track from the server grows with the live positions newer than its end.
    const t = state.track;
    if (t && t.source === 'server' && t.id === v.vehicle_id) {
      const end = t.points[t.points.length - 1];
      if (!end || tsMs(v.ts) > tsMs(end.ts)) t.points.push({ ts: v.ts, lat: v.lat, lon: v.lon });
    }
  }
  for (const id of state.trails.keys()) if (!seen.has(id)) state.trails.delete(id);

  renderHeader(snap); renderVehicles(); renderCounters();
  renderQueues(snap.queues || []); renderEvents(snap.events || []); renderTrips(snap.trips || []);
  drawMap(); refreshDetailIfChanged();
  document.body.dataset.snapshots = String(state.snapshots);
}

// Header and vehicles table
function renderHeader(snap) {
  $('#vehicles-total').textContent = fmtInt(snap.vehicles_total);
  $('#clock').textContent = snap.now ? `server time ${fmtTime(snap.now, NaN)} UTC` : '';
  const n = state.vehicles.length;
  $('#vehicles-shown').textContent = snap.vehicles_total > n ? `(first ${n} of ${fmtInt(snap.vehicles_total)})` : '';
}

const rows = new Map(); // vehicle_id -> <tr>

function renderVehicles() {
  const tbody = $('#vehicles tbody');
  const nowMs = tsMs(state.snap.now);
  const keep = new Set();
  state.vehicles.forEach((v, i) => {
    const id = v.vehicle_id;
    keep.add(id);
    let tr = rows.get(id);
    if (!tr) {
      tr = el('tr', { dataset: { vehicleId: id }, tabIndex: 0 },
        el('td', { className: 'id' }, id), el('td', { className: 'ts' }),
        el('td', { className: 'num' }), el('td', { className: 'num' }), el('td', { className: 'num' }));
      rows.set(id, tr);
    }
    const [, tsCell, latCell, lonCell, speedCell] = tr.cells;
    const text = (cell, t) => { if (cell.textContent !== t) cell.textContent = t; };
    text(tsCell, fmtTime(v.ts, nowMs));
    tsCell.dataset.ts = String(v.ts);
    tsCell.title = String(v.ts);
    text(latCell, fmtFix(v.lat, 5));
    text(lonCell, fmtFix(v.lon, 5));
    text(speedCell, fmtFix(v.speed_kmh, 1));
    tr.classList.toggle('stale', nowMs - tsMs(v.ts) > STALE_MS);
    tr.classList.toggle('selected', id === state.selected);
    if (tbody.children[i] !== tr) tbody.insertBefore(tr, tbody.children[i] || null);
  });
  for (const [id, tr] of rows) if (!keep.has(id)) { tr.remove(); rows.delete(id); }
  $('#vehicles-empty').hidden = state.vehicles.length > 0;
}

for (const type of ['click', 'keydown']) {  // a click, or Enter on a focused row, selects
  $('#vehicles tbody').addEventListener(type, (ev) => {
    const tr = ev.target.closest('tr[data-vehicle-id]');
    if (!tr || (type === 'keydown' && ev.key !== 'Enter')) return;
    select(tr.dataset.vehicleId);
  });
}

// Counters, rates, queues, events, trips
/**
 * Per-key rate (per second) of a counter group: the deltas between consecutive snapshots,
 * summed over the last RATE_WINDOW of them and divided by the time between their `now`s.
 * null without an earlier value; a counter that went back (a restart) starts over.
 */
function rates(group) {
  const h = state.history;
  const out = {};
  for (const [k, v] of Object.entries((state.snap.counters || {})[group] || {})) {
    let frames = 0, secs = 0;
    for (let i = h.length - 1; i > 0; i--) {
      const a = ((h[i - 1].counters || {})[group] || {})[k], b = ((h[i].counters || {})[group] || {})[k];
      const dt = (tsMs(h[i].now) - tsMs(h[i - 1].now)) / 1000;
      if (num(a) === null || num(b) === null || b < a || !(dt > 0)) break;
      frames += b - a;
      secs += dt;
    }
    out[k] = secs > 0 ? frames / secs : null;
  }
  return out;
}

function sum(obj) { return Object.values(obj).reduce((a, v) => a + (num(v) || 0), 0); }

function kvRows(counts, rate, badges = {}) {
  const keys = [...new Set([...Object.keys(counts), ...Object.keys(badges)])].sort();
  return keys.map((k) => el('tr', {},
    el('th', {}, k, badges[k] ? el('span', { className: 'badge warn', title: 'catching up from the log' }, 'behind') : null),
    el('td', { className: 'num' }, fmtInt(counts[k])),
    el('td', { className: 'num rate' }, `${fmtRate(rate[k] ?? null)}/s`)));
}

function totalRow(counts, rate) {
  const known = Object.values(rate).filter((v) => v !== null);
  return el('tr', { className: 'total' }, el('th', {}, 'total'),
    el('td', { className: 'num' }, fmtInt(sum(counts))),
    el('td', { className: 'num rate' }, `${fmtRate(known.length ? sum(rate) : null)}/s`));
}

function renderCounters() {
  const c = state.snap.counters || {};
  const received = c.received || {}, rejected = c.rejected || {};
  const written = { ...(c.written || {}) };  // a copy: sinks without a count are added below
  const inRate = rates('received'), outRate = rates('written'), rejRate = rates('rejected');

  const inRows = kvRows(received, inRate);
  fill($('#in-table'), inRows.length ? [...inRows, totalRow(received, inRate)] : [], 3);
  const accepted = Object.entries(c.accepted || {}).map(([k, v]) => `${k} ${fmtInt(v)}`).join(' · ');
  $('#accepted').textContent = accepted ? `accepted: ${accepted}` : '';

  const behind = {};
  for (const s of state.snap.sinks || []) behind[s.sink] = !!s.behind;
  for (const k of Object.keys(behind)) if (!(k in written)) written[k] = null;
  const outRows = kvRows(written, outRate, behind);
  fill($('#out-table'), outRows.length ? [...outRows, totalRow(written, outRate)] : [], 3);

  fill($('#rejections'), kvRows(rejected, rejRate), 3);
  $('#duplicates').textContent = `duplicates folded: ${fmtInt(c.duplicates ?? 0)}`;
}

function renderQueues(queues) {
  const items = queues.map((q) => {
    const frac = num(q.capacity) && q.capacity > 0 ? Math.min(1, (q.depth || 0) / q.capacity) : 0;
    const level = frac > 0.8 ? 'high' : frac > 0.5 ? 'mid' : '';
    return el('div', { className: 'queue' },
      el('span', { className: 'qname' }, q.stage),
      el('span', { className: 'bar' }, el('span', { className: `fill ${level}`, style: `width:${(frac * 100).toFixed(1)}%` })),
      el('span', { className: 'num small' }, `${fmtInt(q.depth)} / ${fmtInt(q.capacity)}`));
  });
  $('#queues').replaceChildren(...(items.length ? items : [el('p', { className: 'empty' }, 'none yet')]));
}

const EVENT_BASE = new Set(['event_id', 'vehicle_id', 'type', 'ts', 'detected_at', 'trip', 'start']);

function eventDetail(e) {
  const parts = [];
  if (e.trip && num(e.trip.distance_m) !== null) parts.push(`${(e.trip.distance_m / 1000).toFixed(2)} km`);
  for (const [k, v] of Object.entries(e)) {
    if (EVENT_BASE.has(k) || v === null || v === undefined) continue;
    parts.push(`${k}=${typeof v === 'object' ? JSON.stringify(v) : v}`);
  }
  return parts.join(' ');
}

function renderEvents(events) {
  const nowMs = tsMs(state.snap.now);
  const head = el('tr', {}, el('th', {}, 'time'), el('th', {}, 'vehicle'), el('th', {}, 'type'), el('th', {}, 'detail'));
  const body = events.map((e) => el('tr', {},
    el('td', { className: 'ts', title: String(e.ts) }, fmtTime(e.ts, nowMs)),
    el('td', { className: 'id' }, e.vehicle_id ?? '–'),
    el('td', {}, el('span', { className: `etype ${String(e.type).replace(/[^a-z_]/gi, '')}` }, e.type ?? '?')),
    el('td', { className: 'detail', title: JSON.stringify(e) }, eventDetail(e))));
  fill($('#events'), body.length ? [head, ...body] : []);
}

function renderTrips(trips) {
  const nowMs = tsMs(state.snap.now);
  const head = el('tr', {}, el('th', {}, 'vehicle'), el('th', {}, 'start → end'),
    el('th', { className: 'num' }, 'distance'), el('th', { className: 'num' }, 'duration'));
  const body = trips.map((t) => {
    const start = t.start || {}, end = t.end || {};
    const dur = num(t.duration_s) ?? (tsMs(end.ts) - tsMs(start.ts)) / 1000;
    return el('tr', { title: JSON.stringify(t) },
      el('td', { className: 'id' }, t.vehicle_id ?? '–'),
      el('td', { className: 'ts' }, `${fmtTime(start.ts, nowMs)} → ${fmtTime(end.ts, nowMs)}`),
      el('td', { className: 'num' }, num(t.distance_m) === null ? '–' : `${(t.distance_m / 1000).toFixed(2)} km`),
      el('td', { className: 'num' }, Number.isFinite(dur) ? fmtDuration(dur) : '–'));
  });
  fill($('#trips'), body.length ? [head, ...body] : []);
}

// Vehicle detail and track
async function select(id) {
  state.selected = id;
  state.track = null;
  state.detailTs = null;
  for (const [vid, tr] of rows) tr.classList.toggle('selected', vid === id);
  const panel = $('#vehicle-detail');
  panel.dataset.vehicleId = id;
  panel.dataset.state = 'loading';
  delete panel.dataset.track;
  panel.replaceChildren(el('h2', {}, id), el('p', { className: 'muted' }, 'loading…'));
  drawMap();
  await Promise.all([loadDetail(id), loadTrack(id)]);
}

async function loadTrack(id) {
  const panel = $('#vehicle-detail');
  let track = { id, source: 'local', points: null };
  // Snapshots may say outright that no track store is configured; then do not ask.
  if (!(state.snap && state.snap.track_available === false)) {
    try {
      const res = await api(`/v1/vehicles/${encodeURIComponent(id)}/track?limit=200`);
      if (res.ok) {
        const body = await res.json();
        if (Array.isArray(body.track)) track = { id, source: 'server', points: body.track.filter((p) => num(p.lat) !== null && num(p.lon) !== null) };
      } // 501 not_configured (or any other failure): the local trail
    } catch (err) { /* network failure: the local trail */ }
  }
  if (state.selected !== id) return;
  state.track = track;
  panel.dataset.track = track.source;
  const note = panel.querySelector('.track-note');
  if (note) note.textContent = trackNote();
  drawMap();
}

const trackPoints = (t = state.track) => (!t ? [] : t.source === 'server' ? t.points : state.trails.get(t.id) || []);
const trackNote = (t = state.track) => (!t ? 'track: loading…' : t.source === 'server'
  ? `track: ${trackPoints().length} points (server)` : `track: ${trackPoints().length} points seen by this page (server keeps no track)`);

function refreshDetailIfChanged() {
  const id = state.selected;
  if (!id) return;
  const note = $('#vehicle-detail .track-note');
  if (note) note.textContent = trackNote();
  const v = state.vehicles.find((x) => x.vehicle_id === id);
  if (v && v.ts !== state.detailTs && !state.detailBusy && Date.now() - state.detailAt > 2000) loadDetail(id);
}

function dl(obj) {
  const show = (v) => (v !== null && typeof v === 'object' ? JSON.stringify(v)
    : typeof v === 'number' && !Number.isInteger(v) ? String(+v.toFixed(6)) : String(v));
  return el('dl', {}, Object.entries(obj).map(([k, v]) => [el('dt', {}, k), el('dd', { title: String(v) }, show(v))]));
}

async function loadDetail(id) {
  const panel = $('#vehicle-detail');
  state.detailBusy = true;
  state.detailAt = Date.now();
  let body = null, error = null;
  try {
    const res = await api(`/v1/vehicles/${encodeURIComponent(id)}`);
    if (res.status === 404) error = 'unknown vehicle (404)';
    else if (!res.ok) error = `HTTP ${res.status}`;
    else body = await res.json();
  } catch (err) {
    error = String(err.message || err);
  } finally {
    state.detailBusy = false;
  }
  if (state.selected !== id) return;
  const v = state.vehicles.find((x) => x.vehicle_id === id);
  state.detailTs = v ? v.ts : null;
  const head = el('div', { className: 'detail-head' }, el('h2', {}, id),
    el('button', { type: 'button', className: 'close', title: 'deselect', onclick: deselect }, '×'));
  if (error) {
    panel.replaceChildren(head, el('p', { className: 'error' }, error));
    panel.dataset.state = 'error';
    return;
  }
  const open = panel.querySelector('details') && panel.querySelector('details').open;
  panel.replaceChildren(head,
    el('p', { className: 'muted small' }, `served from ${body.served_from ?? '?'} · `, el('span', { className: 'track-note' }, trackNote())),
    el('h3', {}, 'location'), body.location ? dl(body.location) : el('p', { className: 'empty' }, 'none yet'),
    el('h3', {}, 'diagnostic'), body.diagnostic ? dl(body.diagnostic) : el('p', { className: 'empty' }, 'none yet'),
    el('details', { open }, el('summary', {}, 'raw JSON'), el('pre', {}, JSON.stringify(body, null, 2))));
  panel.dataset.state = 'loaded';
}

const detailHint = $('#vehicle-detail').innerHTML;  // "Select a vehicle..."
function deselect() {
  state.selected = state.track = null;
  const panel = $('#vehicle-detail');
  panel.dataset.state = 'none';
  delete panel.dataset.vehicleId;
  delete panel.dataset.track;
  panel.innerHTML = detailHint;
  for (const tr of rows.values()) tr.classList.remove('selected');
  drawMap();
}

// Map: Web Mercator on a canvas, fitted to the vehicles shown (world view when none).
const canvas = $('#map');
const ctx = canvas.getContext('2d');
let land = [];        // rings of [lon, lat]
let projected = [];   // [{id, x, y}] of the dots last drawn, for hit-testing

fetch('/console/land.json').then((r) => r.json()).then((d) => { land = d.rings || []; drawMap(); })
  .catch(() => { $('#map-note').textContent = 'coastline not available'; });

const mercY = (lat) => (180 / Math.PI) * Math.log(Math.tan(Math.PI / 4 + (Math.max(-85, Math.min(85, lat)) * Math.PI) / 360));

/** Computes the view: a function from lon/lat to canvas pixels, plus the visible bounds. */
function view(w, h) {
  const pts = state.vehicles.filter((v) => num(v.lat) !== null && num(v.lon) !== null);
  pts.push(...trackPoints());
  let x0 = -180, x1 = 180, y0 = mercY(-58), y1 = mercY(78);
  if (pts.length) {
    x0 = Math.min(...pts.map((p) => p.lon)); x1 = Math.max(...pts.map((p) => p.lon));
    y0 = Math.min(...pts.map((p) => mercY(p.lat))); y1 = Math.max(...pts.map((p) => mercY(p.lat)));
    const span = Math.max(x1 - x0, y1 - y0, 0.05) * 1.2;  // padding, and some context for one dot
    const cx = (x0 + x1) / 2, cy = (y0 + y1) / 2;
    x0 = cx - span / 2; x1 = cx + span / 2; y0 = cy - span / 2; y1 = cy + span / 2;
  }
  const k = Math.min((w - 32) / (x1 - x0), (h - 32) / (y1 - y0));  // 16 px margin
  const cx = (x0 + x1) / 2, cy = (y0 + y1) / 2;
  const px = (lon, lat) => [w / 2 + (lon - cx) * k, h / 2 - (mercY(lat) - cy) * k];
  return { px, k, lonMin: cx - w / 2 / k, lonMax: cx + w / 2 / k, yMin: cy - h / 2 / k, yMax: cy + h / 2 / k };
}

/** A "nice" grid step (degrees) giving at most 8 lines across `span`. */
const gridStep = (span) => [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30].find((s) => span / s <= 8) || 30;
const invMercY = (y) => (360 / Math.PI) * Math.atan(Math.exp((y * Math.PI) / 180)) - 90;

const line = (xys) => xys.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
function circle(x, y, r, fill, stroke) {
  ctx.beginPath();
  ctx.arc(x, y, r, 0, 2 * Math.PI);
  if (fill) { ctx.fillStyle = fill; ctx.fill(); }
  if (stroke) { ctx.strokeStyle = stroke; ctx.lineWidth = 2; ctx.stroke(); }
}

function drawMap() {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (!w || !h) return;
  if (canvas.width !== Math.round(w * dpr)) canvas.width = Math.round(w * dpr);
  if (canvas.height !== Math.round(h * dpr)) canvas.height = Math.round(h * dpr);
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.fillStyle = '#0b1622';  // sea
  ctx.fillRect(0, 0, w, h);
  const { px, lonMin, lonMax, yMin, yMax } = view(w, h);

  // Land: every ring in one path, even-odd so holes (lakes) stay water.
  ctx.beginPath();
  for (const ring of land) { line(ring.map(([lon, lat]) => px(lon, lat))); ctx.closePath(); }
  Object.assign(ctx, { fillStyle: '#1f3143', strokeStyle: '#44627f', lineWidth: 1 });
  ctx.fill('evenodd');
  ctx.stroke();

  // Graticule with labels.
  const latMin = invMercY(yMin), latMax = invMercY(yMax);
  const step = gridStep(Math.max(lonMax - lonMin, latMax - latMin));
  const dec = step < 0.1 ? 2 : step < 1 ? 1 : 0;
  Object.assign(ctx, { strokeStyle: 'rgba(140,170,200,0.12)', fillStyle: 'rgba(160,185,210,0.55)', font: '10px system-ui, sans-serif' });
  ctx.beginPath();
  for (let lon = Math.ceil(Math.max(-180, lonMin) / step) * step; lon <= Math.min(180, lonMax); lon += step) {
    const [x] = px(lon, 0);
    ctx.moveTo(x, 0); ctx.lineTo(x, h);
    ctx.fillText(`${lon.toFixed(dec)}°`, x + 3, h - 4);
  }
  for (let lat = Math.ceil(Math.max(-85, latMin) / step) * step; lat <= Math.min(85, latMax); lat += step) {
    const [, y] = px(0, lat);
    ctx.moveTo(0, y); ctx.lineTo(w, y);
    ctx.fillText(`${lat.toFixed(dec)}°`, 3, y - 3);
  }
  ctx.stroke();

  // Selected vehicle's track.
  const track = trackPoints();
  if (track.length > 1) {
    ctx.beginPath();
    line(track.map((p) => px(p.lon, p.lat)));
    Object.assign(ctx, { strokeStyle: 'rgba(255,196,87,0.85)', lineWidth: 2, lineJoin: 'round' });
    ctx.stroke();
  }

  // Vehicles.
  const nowMs = state.snap ? tsMs(state.snap.now) : NaN;
  const labels = state.vehicles.length <= 30;
  projected = [];
  let sel = null;
  for (const v of state.vehicles) {
    if (num(v.lat) === null || num(v.lon) === null) continue;
    const [x, y] = px(v.lon, v.lat);
    projected.push({ id: v.vehicle_id, x, y });
    if (v.vehicle_id === state.selected) { sel = { v, x, y }; continue; }
    // grey: no fix for a minute; green: moving; blue: standing
    const colour = nowMs - tsMs(v.ts) > STALE_MS ? '#5d6b78' : (v.speed_kmh || 0) >= 5 ? '#3fd08a' : '#6aa8ff';
    circle(x, y, 4, colour);
    if (labels) { ctx.fillStyle = '#a9b8c6'; ctx.fillText(v.vehicle_id, x + 7, y + 3); }
  }
  if (sel) {  // drawn last, on top
    circle(sel.x, sel.y, 9, null, '#ffc457');
    circle(sel.x, sel.y, 5, '#ffc457');
    ctx.font = 'bold 11px system-ui, sans-serif';
    ctx.fillText(sel.v.vehicle_id, sel.x + 12, sel.y + 4);
  }
  $('#map-note').textContent = state.vehicles.length ? '' : state.snap ? 'no vehicles yet' : '';
}

/** The dot nearest to a mouse event, within 10 px, or null. */
function dotAt(ev) {
  const r = canvas.getBoundingClientRect();
  const x = ev.clientX - r.left, y = ev.clientY - r.top;
  let best = null, bestD = 10 * 10;
  for (const p of projected) {
    const d = (p.x - x) ** 2 + (p.y - y) ** 2;
    if (d <= bestD) { best = p; bestD = d; }
  }
  return best;
}
canvas.addEventListener('click', (ev) => { const p = dotAt(ev); if (p) select(p.id); });
canvas.addEventListener('mousemove', (ev) => { canvas.style.cursor = dotAt(ev) ? 'pointer' : ''; });
new ResizeObserver(() => drawMap()).observe(canvas);

takeFragmentToken();
drawMap();
runStream();
