// k6: HTTP ingest, one frame per request (a vehicle or gateway posting as it goes).
//
//   k6 run load-tests/http_single.js                       # against http://127.0.0.1:8080
//   FLEETPIPE_URL=http://host:8080 K6_VUS=64 K6_DURATION=60s k6 run load-tests/http_single.js
//
// Every request must be answered 200 with {"accepted":1} (the frame is durable then). Thresholds:
// no failed request, p95 and p99 latency. The end-of-test summary goes to stdout and, as JSON, to
// $K6_SUMMARY (default k6-http_single.json) for scripts and CI to read.
import http from 'k6/http';
import { check } from 'k6';
import { summarize } from './k6/summary.js';
import { FRAMES_URL, ingestOptions } from './k6/ingest.js';

export const options = ingestOptions(32, 50, 100);

let seq = 0;

export default function () {
  seq += 1;
  const vehicle = `K6S${String(__VU).padStart(5, '0')}`;
  const frame = {
    vehicle_id: vehicle, ts: Date.now(), seq, kind: 'location',
    lat: 56.1 + (__VU % 100) * 1e-3, lon: 10.2 + (seq % 1000) * 1e-5, speed_kmh: 42.5,
  };
  const res = http.post(FRAMES_URL, JSON.stringify(frame), { headers: { 'Content-Type': 'application/json' } });
  check(res, {
    '200': (r) => r.status === 200,
    'accepted 1': (r) => r.status === 200 && r.json('accepted') === 1,
  });
}

export function handleSummary(data) {
  return summarize(data, 'http_single', 1);
}
