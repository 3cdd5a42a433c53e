// Headless browser check of fleetpipe's fleet console.
//
//   node tests/console/console_check.mjs --url http://127.0.0.1:PORT/ [--token TOKEN] \
//     --expect VAN-1,VAN-2 [--post-frame '<json frame>' --expect-after VAN-3] \
//     [--screenshot out.png] [--timeout-ms 20000]
//
// Drives Debian's Chromium (/usr/bin/chromium, or $CHROMIUM) with playwright-core, which is
// loaded from $FLEETPIPE_NODE_MODULES (default ~/.cache/fleetpipe/node/node_modules); install:
//   mkdir -p ~/.cache/fleetpipe/node && cp tests/console/package*.json ~/.cache/fleetpipe/node/ \
//     && npm ci --prefix ~/.cache/fleetpipe/node --ignore-scripts --no-audit --no-fund
//
// Prints one line of JSON: {"ok":..., "rows":[...], "snapshots":N, "console_errors":[...],
// "failed_requests":[...], "expected_responses":[...], "error"?:...}; exits 0 only when ok.
//
// Expected, not failures: a 501 from /v1/vehicles/{id}/track (no Postgres: the console falls
// back to its own trail) with Chromium's "Failed to load resource" line for it; when no
// --token is given, the first 401 (the page then shows its token form); and an end of the
// event stream that Chromium calls ERR_ABORTED (see the requestfailed handler).
import { createRequire } from 'node:module';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';

const { values: args } = parseArgs({
  options: {
    url: { type: 'string' },
    token: { type: 'string', default: '' },
    expect: { type: 'string', default: '' },
    'post-frame': { type: 'string' },
    'expect-after': { type: 'string' },
    screenshot: { type: 'string' },
    'timeout-ms': { type: 'string', default: '20000' },
  },
});

const result = { ok: false, rows: [], snapshots: 0, console_errors: [], failed_requests: [], expected_responses: [] };
function finish(error) {
  if (!error && (result.console_errors.length || result.failed_requests.length)) {
    error = 'console errors or failed requests';
  }
  result.ok = !error;
  if (error) result.error = error;
  process.stdout.write(`${JSON.stringify(result)}\n`);
  process.exitCode = result.ok ? 0 : 1;
}

if (!args.url) {
  finish('--url is required');
  process.exit(1);
}
const base = new URL(args.url);
const token = args.token || '';
const expect = args.expect.split(',').map((s) => s.trim()).filter(Boolean);
const expectAfter = args['expect-after'] || null;
const timeout = Number(args['timeout-ms']);

const modules = process.env.FLEETPIPE_NODE_MODULES || join(homedir(), '.cache/fleetpipe/node/node_modules');
let chromium;
try {
  ({ chromium } = createRequire(join(modules, 'noop.js'))('playwright-core'));
} catch (err) {
  finish(`cannot load playwright-core from ${modules} (${err.message.split('\n')[0]})`);
  process.exit(1);
}

// A response that the console expects and handles; anything else >= 400 is a failure.
let unauthorizedSeen = false;
function expectedStatus(url, status) {
  const path = new URL(url).pathname;
  if (status === 501 && /^\/v1\/vehicles\/[^/]+\/track$/.test(path)) return true;
  if (status === 401 && !token && !unauthorizedSeen) { unauthorizedSeen = true; return true; }
  return false;
}

const rowSel = (id) => `#vehicles tbody tr[data-vehicle-id=${JSON.stringify(id)}]`;
const step = { name: 'launch' };

let browser, page;
/** Reads the table's rows and the snapshot count into the result (also after a failure). */
async function readPage() {
  result.rows = await page.$$eval('#vehicles tbody tr[data-vehicle-id]', (trs) => trs.map((tr) => tr.dataset.vehicleId));
  result.snapshots = await page.evaluate(() => Number(document.body.dataset.snapshots || 0));
}

try {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox'],
    headless: true,
  });
  page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  const expectedUrls = new Set(); // url + status of the expected error responses

  page.on('response', (res) => {
    if (res.status() < 400) return;
    const entry = { url: res.url(), status: res.status() };
    if (expectedStatus(res.url(), res.status())) {
      expectedUrls.add(`${res.url()} ${res.status()}`);
      result.expected_responses.push(entry);
    } else {
      result.failed_requests.push(entry);
    }
  });
  page.on('requestfailed', (req) => {
    const entry = { url: req.url(), failure: req.failure()?.errorText ?? 'failed' };
    // Chromium reports a streamed response with Cache-Control: no-store that the server ends
    // as ERR_ABORTED; the console just reconnects (and the final "live" check still applies).
    if (entry.failure === 'net::ERR_ABORTED' && new URL(entry.url).pathname === '/v1/console/stream') {
      result.expected_responses.push(entry);
    } else {
      result.failed_requests.push(entry);
    }
  });
  page.on('pageerror', (err) => result.console_errors.push({ type: 'pageerror', text: String(err) }));
  page.on('console', (msg) => {
    if (msg.type() !== 'error' && msg.type() !== 'warning') return;
    const { url } = msg.location();
    const status = /status of (\d{3})/.exec(msg.text());
    // Chromium's own line for an expected error response (the response event comes first).
    if (status && expectedUrls.has(`${url} ${status[1]}`)) return;
    result.console_errors.push({ type: msg.type(), text: msg.text(), url });
  });

  // 1. Open the page, with the token in the fragment (never in the query string).
  step.name = 'open page';
  const url = new URL(base);
  if (token) url.hash = `token=${encodeURIComponent(token)}`;
  await page.goto(url.href, { waitUntil: 'domcontentloaded', timeout });

  // 2. Every expected vehicle has a row.
  step.name = `rows for ${expect.join(',')}`;
  await page.waitForFunction(
    (sels) => sels.every((s) => document.querySelector(s)),
    expect.map(rowSel), { timeout, polling: 100 });

  // 3. POST a frame; its vehicle appears (or, when already shown, its ts changes).
  if (args['post-frame']) {
    step.name = 'post frame';
    const before = expectAfter
      ? await page.$eval(rowSel(expectAfter), (tr) => tr.cells[1].dataset.ts).catch(() => null)
      : null;
    const res = await fetch(new URL('/v1/frames', base), {
      method: 'POST',
      headers: { 'content-type': 'application/json', ...(token ? { authorization: `Bearer ${token}` } : {}) },
      body: args['post-frame'],
    });
    const text = await res.text();
    if (!res.ok) throw new Error(`POST /v1/frames answered ${res.status}: ${text.slice(0, 300)}`);
    const answer = JSON.parse(text);
    if (answer.accepted === 0) throw new Error(`POST /v1/frames accepted nothing: ${text.slice(0, 300)}`);
    if (expectAfter) {
      step.name = `row for ${expectAfter} after the POST`;
      await page.waitForFunction(([sel, old]) => {
        const tr = document.querySelector(sel);
        return tr && (old === null || tr.cells[1].dataset.ts !== old);
      }, [rowSel(expectAfter), before], { timeout, polling: 100 });
    }
  }

  // 4. Select the first expected vehicle: the detail panel shows it, and its track is drawn.
  if (expect.length) {
    step.name = `detail of ${expect[0]}`;
    await page.locator(rowSel(expect[0])).click({ timeout });
    await page.waitForFunction((id) => {
      const d = document.querySelector('#vehicle-detail');
      return d && d.dataset.state === 'loaded' && d.dataset.vehicleId === id && d.dataset.track
        && d.textContent.includes(id);
    }, expect[0], { timeout, polling: 100 });
    // one more snapshot after the selection, so the screenshot shows live data with the track
    const n = await page.evaluate(() => Number(document.body.dataset.snapshots));
    await page.waitForFunction((k) => Number(document.body.dataset.snapshots) > k, n, { timeout, polling: 100 });
  }

  // 5. Screenshot.
  if (args.screenshot) {
    step.name = 'screenshot';
    await page.screenshot({ path: args.screenshot, fullPage: true });
  }

  step.name = 'read result';
  await readPage();
  if ((await page.textContent('#status')) !== 'live') throw new Error('status is not "live"');
  step.name = 'done';
} catch (err) {
  step.error = `${step.name}: ${String(err.message || err).split('\n')[0]}`;
} finally {
  if (step.error && page) await readPage().catch(() => {});
  // Take the verdict before closing: closing cancels the open stream request.
  finish(step.error);
  if (browser) await browser.close().catch(() => {});
}
