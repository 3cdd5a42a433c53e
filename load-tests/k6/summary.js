// The summary both k6 scripts print: a few lines on stdout, the whole of k6's data as JSON in
// $K6_SUMMARY (default k6-<name>.json), with `fleetpipe` added: frames/s, latency percentiles
// and whether every threshold passed.
export function summarize(data, name, framesPerRequest) {
  const m = data.metrics;
  const reqs = m.http_reqs ? m.http_reqs.values : { count: 0, rate: 0 };
  const dur = m.http_req_duration ? m.http_req_duration.values : {};
  const failed = m.http_req_failed ? m.http_req_failed.values.rate : 1;
  let thresholdsOk = true;
  for (const k of Object.keys(m)) {
    for (const t of Object.values(m[k].thresholds || {})) {
      if (!t.ok) thresholdsOk = false;
    }
  }
  const out = {
    script: name,
    requests: reqs.count,
    requests_per_s: reqs.rate,
    frames: reqs.count * framesPerRequest,
    frames_per_s: reqs.rate * framesPerRequest,
    failed_rate: failed,
    p50_ms: dur.med, p95_ms: dur['p(95)'], p99_ms: dur['p(99)'], max_ms: dur.max,
    thresholds_ok: thresholdsOk,
  };
  data.fleetpipe = out;
  const text =
    `${name}: ${out.requests} requests, ${out.requests_per_s.toFixed(0)} req/s, ` +
    `${out.frames_per_s.toFixed(0)} frames/s, failed ${(failed * 100).toFixed(2)} %, ` +
    `p50 ${(dur.med || 0).toFixed(2)} ms, p95 ${(dur['p(95)'] || 0).toFixed(2)} ms, ` +
    `p99 ${(dur['p(99)'] || 0).toFixed(2)} ms, thresholds ${thresholdsOk ? 'passed' : 'FAILED'}\n`;
  const file = __ENV.K6_SUMMARY || `k6-${name}.json`;
  return { stdout: text, [file]: JSON.stringify(data, null, 2) };
}
