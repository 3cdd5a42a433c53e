// k6: HTTP ingest in batches (a gateway posting NDJSON for many vehicles at once).
//
//   k6 run load-tests/http_batch.js                        # against http://127.0.0.1:8080
//   FLEETPIPE_URL=http://host:8080 BATCH=500 K6_VUS=16 k6 run load-tests/http_batch.js
//
// Every request must be answered 200 with every frame accepted (durable). Thresholds: no failed
// request, p95 and p99 latency. Summary on stdout and, as JSON, in $K6_SUMMARY (default
// k6-http_batch.json); `frames/s` there counts accepted frames.
import http from 'k6/http';
import { check } from 'k6';
import { summarize } from './k6/summary.js';
import { FRAMES_URL, ingestOptions } from './k6/ingest.js';

const BATCH = parseInt(__ENV.BATCH || '100', 10);

export const options = ingestOptions(8, 200, 400);

let seq = 0;

export default function () {
  const lines = [];
  const ts = Date.now();
  seq += 1;
  for (let i = 0; i < BATCH; i++) {
    const vehicle = `K6B${String(__VU).padStart(3, '0')}${String(i).padStart(5, '0')}`;
    lines.push(JSON.stringify({
      vehicle_id: vehicle, ts, seq, kind: 'location',
      lat: 56.1 + (i % 100) * 1e-3, lon: 10.2 + (seq % 1000) * 1e-5, speed_kmh: 42.5,
    }));
  }
  const res = http.post(FRAMES_URL, lines.join('\n'), { headers: { 'Content-Type': 'application/x-ndjson' } });
  check(res, {
    '200': (r) => r.status === 200,
    'all accepted': (r) => r.status === 200 && r.json('accepted') === BATCH,
  });
}

export function handleSummary(data) {
  return summarize(data, 'http_batch', BATCH);
}
