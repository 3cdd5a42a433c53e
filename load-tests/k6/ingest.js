// What both k6 ingest scripts share: the endpoint they post to, and their options (VUS virtual
// users for 30 s, which K6_VUS, K6_DURATION or --duration override; the trend stats the summary
// reads; thresholds: no failed request, every check passed, p95 and p99 latency under the given
// milliseconds).
export const FRAMES_URL = (__ENV.FLEETPIPE_URL || 'http://127.0.0.1:8080') + '/v1/frames';

export function ingestOptions(vus, p95Ms, p99Ms) {
  return {
    vus,
    duration: '30s',
    summaryTrendStats: ['avg', 'min', 'med', 'max', 'p(90)', 'p(95)', 'p(99)'],
    thresholds: {
      http_req_failed: ['rate==0'],
      checks: ['rate==1'],
      http_req_duration: [`p(95)<${p95Ms}`, `p(99)<${p99Ms}`],
    },
  };
}
