// Builds land.json (the fleet console's map outline) from Natural Earth 1:110m land.
//
// Source: npm package world-atlas@2.0.2, file land-110m.json (TopoJSON).
//   Natural Earth data: public domain. world-atlas: ISC licence (c) Michael Bostock.
//   See LICENSE-data.md.
//
// Re-run (needs only Node, no dependencies):
//   cd /tmp && npm pack world-atlas@2.0.2 && tar xzf world-atlas-2.0.2.tgz
//   node /path/to/ingest/console/make_land.mjs package/land-110m.json > land.json
//
// Output: {"source": "...", "rings": [[[lon, lat], ...], ...]} with coordinates rounded to
// 2 decimals, consecutive duplicates dropped. Outer rings and holes are all plain rings; the
// console fills them with the even-odd rule, so holes (e.g. the Caspian Sea) come out right.
// The TopoJSON is spherical: a few rings cross the antimeridian (Chukotka, Fiji, Wrangel) or
// go round a pole (Antarctica). For a flat map each is made continuous in longitude (values
// may pass ±180; a copy shifted by 360° is added so both sides of the map show it), and a
// ring round a pole is closed along that pole.
import { readFileSync } from 'node:fs';

const SOURCE = 'Natural Earth 1:110m land, public domain, via world-atlas 2.0.2 (ISC)';
const file = process.argv[2];
if (!file) {
  console.error('usage: node make_land.mjs land-110m.json > land.json');
  process.exit(2);
}
const topo = JSON.parse(readFileSync(file, 'utf8'));
const { scale, translate } = topo.transform;

// Decode the quantized, delta-encoded arcs into absolute [lon, lat] positions.
const arcs = topo.arcs.map((arc) => {
  let x = 0;
  let y = 0;
  return arc.map(([dx, dy]) => {
    x += dx;
    y += dy;
    return [x * scale[0] + translate[0], y * scale[1] + translate[1]];
  });
});

// Arc index i means arcs[i]; ~i (negative) means arcs[~i] reversed.
function arcPoints(i) {
  return i >= 0 ? arcs[i] : arcs[~i].slice().reverse();
}

// A ring is a list of arc indices; consecutive arcs share their joint point.
function ring(indices) {
  const pts = [];
  for (const i of indices) {
    const a = arcPoints(i);
    pts.push(...(pts.length ? a.slice(1) : a));
  }
  return pts;
}

/** The ring with longitudes made continuous (no jump over 180°), closed round a pole if it goes round one. */
function flatten(pts) {
  const out = [pts[0].slice()];
  let offset = 0;
  for (let i = 1; i < pts.length; i++) {
    const d = pts[i][0] - pts[i - 1][0];
    if (d > 180) offset -= 360;
    else if (d < -180) offset += 360;
    out.push([pts[i][0] + offset, pts[i][1]]);
  }
  if (offset !== 0) {  // went once round a pole: close it along that pole
    const pole = out.reduce((a, p) => a + p[1], 0) < 0 ? -90 : 90;
    const first = out[0];
    out.push([out[out.length - 1][0], pole], [first[0], pole], first.slice());
  }
  return out;
}

const r2 = (v) => Math.round(v * 100) / 100;
const rings = [];
function addRing(pts) {
  const out = [];
  for (const [lon, lat] of pts) {
    const p = [r2(lon), r2(lat)];
    const last = out[out.length - 1];
    if (!last || last[0] !== p[0] || last[1] !== p[1]) out.push(p);
  }
  if (out.length >= 4) rings.push(out);
}
function addPolygon(polygon) {
  for (const indices of polygon) {
    const pts = flatten(ring(indices));
    addRing(pts);
    const lons = pts.map((p) => p[0]);
    if (Math.max(...lons) > 180) addRing(pts.map(([lon, lat]) => [lon - 360, lat]));
    if (Math.min(...lons) < -180) addRing(pts.map(([lon, lat]) => [lon + 360, lat]));
  }
}

function addGeometry(g) {
  if (g.type === 'GeometryCollection') g.geometries.forEach(addGeometry);
  else if (g.type === 'Polygon') addPolygon(g.arcs);
  else if (g.type === 'MultiPolygon') g.arcs.forEach(addPolygon);
}
addGeometry(topo.objects.land);

process.stdout.write(JSON.stringify({ source: SOURCE, rings }) + '\n');
