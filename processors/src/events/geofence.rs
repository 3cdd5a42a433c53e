//! Geofences from a GeoJSON FeatureCollection (CONTRACT.md §9): polygons (and multipolygons,
//! with holes) and points with a radius, each with an id and an optional dwell time; and the
//! test the event stage asks of each fix, with a margin around the boundary so that a track
//! running along it does not flap.

use serde_json::Value;

use crate::latest::haversine_m;
use crate::Micros;

/// Metres per degree of latitude (mean Earth radius).
const M_PER_DEG: f64 = 6_371_008.8 * std::f64::consts::PI / 180.0;

/// The area of a geofence.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    /// Polygons, each an outer ring and its holes; rings as `(lon, lat)` vertices.
    Polygons(Vec<Vec<Vec<(f64, f64)>>>),
    Circle {
        lat: f64,
        lon: f64,
        radius_m: f64,
    },
}

/// One geofence.
#[derive(Debug, Clone, PartialEq)]
pub struct Geofence {
    pub id: String,
    pub shape: Shape,
    /// Inside (or outside) this long before `geofence_entered` (`exited`) is emitted.
    pub dwell_us: Micros,
}

/// Where a fix lies with respect to a geofence, given a margin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Inside by more than the margin.
    Inside,
    /// Outside by more than the margin.
    Outside,
    /// Within the margin of the boundary: no change.
    Boundary,
}

impl Geofence {
    /// Which side of the boundary `(lat, lon)` is on, `margin_m` counting as the boundary.
    pub fn side(&self, lat: f64, lon: f64, margin_m: f64) -> Side {
        let (inside, distance_m) = match &self.shape {
            Shape::Circle { lat: clat, lon: clon, radius_m } => {
                let d = haversine_m(*clat, *clon, lat, lon);
                (d <= *radius_m, (d - radius_m).abs())
            }
            Shape::Polygons(polys) => {
                let inside = polys.iter().any(|rings| {
                    rings.first().is_some_and(|outer| in_ring(outer, lon, lat))
                        && !rings.iter().skip(1).any(|hole| in_ring(hole, lon, lat))
                });
                let d = polys
                    .iter()
                    .flatten()
                    .map(|ring| ring_distance_m(ring, lon, lat))
                    .fold(f64::INFINITY, f64::min);
                (inside, d)
            }
        };
        if distance_m <= margin_m {
            Side::Boundary
        } else if inside {
            Side::Inside
        } else {
            Side::Outside
        }
    }
}

/// Even-odd ray casting on `(lon, lat)` vertices.
fn in_ring(ring: &[(f64, f64)], x: f64, y: f64) -> bool {
    let mut inside = false;
    let n = ring.len();
    for i in 0..n {
        let (xi, yi) = ring[i];
        let (xj, yj) = ring[(i + n - 1) % n];
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
    }
    inside
}

/// Shortest distance in metres from the point to the ring's edges, on a local equirectangular
/// projection (geofences are small against the Earth).
fn ring_distance_m(ring: &[(f64, f64)], lon: f64, lat: f64) -> f64 {
    let kx = M_PER_DEG * lat.to_radians().cos();
    let project = |(x, y): (f64, f64)| ((x - lon) * kx, (y - lat) * M_PER_DEG);
    let n = ring.len();
    (0..n)
        .map(|i| {
            let (ax, ay) = project(ring[(i + n - 1) % n]);
            let (bx, by) = project(ring[i]);
            let (dx, dy) = (bx - ax, by - ay);
            let len2 = dx * dx + dy * dy;
            let t = if len2 > 0.0 { (-(ax * dx + ay * dy) / len2).clamp(0.0, 1.0) } else { 0.0 };
            let (px, py) = (ax + t * dx, ay + t * dy);
            (px * px + py * py).sqrt()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Parses a GeoJSON FeatureCollection. Each feature needs `properties.id`; a Point needs
/// `properties.radius_m`; `properties.dwell_s` is optional (default 0).
pub fn parse_geojson(text: &str) -> Result<Vec<Geofence>, String> {
    let doc: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let features = doc
        .get("features")
        .and_then(Value::as_array)
        .ok_or("not a FeatureCollection (no \"features\" array)")?;
    let mut out = Vec::with_capacity(features.len());
    for (i, f) in features.iter().enumerate() {
        let props = f.get("properties");
        let id = match props.and_then(|p| p.get("id")) {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => return Err(format!("feature {i}: properties.id is missing")),
        };
        let number = |key: &str| props.and_then(|p| p.get(key)).and_then(Value::as_f64);
        let dwell_s = number("dwell_s").unwrap_or(0.0);
        if !(0.0..=1e7).contains(&dwell_s) {
            return Err(format!("feature {id:?}: dwell_s must be between 0 and 10^7"));
        }
        let geometry = f.get("geometry").ok_or_else(|| format!("feature {id:?}: no geometry"))?;
        let kind = geometry.get("type").and_then(Value::as_str).unwrap_or_default();
        let coords = geometry.get("coordinates").ok_or_else(|| format!("feature {id:?}: no coordinates"))?;
        let bad = |what: &str| format!("feature {id:?}: {what}");
        let shape = match kind {
            "Point" => {
                let (lon, lat) = position(coords).ok_or_else(|| bad("a Point needs [lon, lat]"))?;
                let radius_m = number("radius_m")
                    .filter(|r| *r > 0.0 && r.is_finite())
                    .ok_or_else(|| bad("a Point needs properties.radius_m > 0"))?;
                Shape::Circle { lat, lon, radius_m }
            }
            "Polygon" => Shape::Polygons(vec![
                polygon(coords).ok_or_else(|| bad("a Polygon needs rings of [lon, lat]"))?
            ]),
            "MultiPolygon" => Shape::Polygons(
                coords
                    .as_array()
                    .ok_or_else(|| bad("a MultiPolygon needs polygons"))?
                    .iter()
                    .map(|p| polygon(p).ok_or_else(|| bad("a MultiPolygon needs rings of [lon, lat]")))
                    .collect::<Result<_, _>>()?,
            ),
            other => return Err(bad(&format!("geometry {other:?} is not Point, Polygon or MultiPolygon"))),
        };
        out.push(Geofence { id, shape, dwell_us: (dwell_s * 1e6) as Micros });
    }
    Ok(out)
}

fn position(v: &Value) -> Option<(f64, f64)> {
    let a = v.as_array()?;
    let (lon, lat) = (a.first()?.as_f64()?, a.get(1)?.as_f64()?);
    ((-180.0..=180.0).contains(&lon) && (-90.0..=90.0).contains(&lat)).then_some((lon, lat))
}

fn polygon(v: &Value) -> Option<Vec<Vec<(f64, f64)>>> {
    let rings: Vec<Vec<(f64, f64)>> = v
        .as_array()?
        .iter()
        .map(|ring| ring.as_array()?.iter().map(position).collect::<Option<Vec<_>>>())
        .collect::<Option<_>>()?;
    (!rings.is_empty() && rings.iter().all(|r| r.len() >= 3)).then_some(rings)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const FENCES: &str = r#"{"type":"FeatureCollection","features":[
      {"type":"Feature","properties":{"id":"depot","dwell_s":30},
       "geometry":{"type":"Polygon","coordinates":[[[10.0,56.0],[10.1,56.0],[10.1,56.1],[10.0,56.1],[10.0,56.0]],
                                                   [[10.04,56.04],[10.06,56.04],[10.06,56.06],[10.04,56.06],[10.04,56.04]]]}},
      {"type":"Feature","properties":{"id":7,"radius_m":500},
       "geometry":{"type":"Point","coordinates":[9.9,55.9]}}]}"#;

    #[test]
    fn polygons_with_holes_and_circles_with_a_margin() {
        let fences = parse_geojson(FENCES).unwrap();
        assert_eq!(fences.len(), 2);
        let (depot, seven) = (&fences[0], &fences[1]);
        assert_eq!((depot.id.as_str(), depot.dwell_us, seven.id.as_str()), ("depot", 30_000_000, "7"));
        assert_eq!(depot.side(56.02, 10.02, 20.0), Side::Inside);
        assert_eq!(depot.side(56.05, 10.05, 20.0), Side::Outside, "in the hole");
        assert_eq!(depot.side(56.2, 10.05, 20.0), Side::Outside);
        // 10 m inside the southern edge (56.0): the boundary, given a 20 m margin.
        assert_eq!(depot.side(56.0 + 10.0 / M_PER_DEG, 10.05, 20.0), Side::Boundary);
        assert_eq!(depot.side(56.0 + 30.0 / M_PER_DEG, 10.05, 20.0), Side::Inside);
        assert_eq!(seven.side(55.9, 9.9, 20.0), Side::Inside);
        assert_eq!(seven.side(55.9 + 490.0 / M_PER_DEG, 9.9, 20.0), Side::Boundary);
        assert_eq!(seven.side(55.9 + 600.0 / M_PER_DEG, 9.9, 20.0), Side::Outside);
    }

    #[test]
    fn a_bad_file_says_which_feature_and_why() {
        assert!(parse_geojson("[]").unwrap_err().contains("FeatureCollection"));
        let no_radius =
            r#"{"features":[{"properties":{"id":"a"},"geometry":{"type":"Point","coordinates":[1,2]}}]}"#;
        assert!(parse_geojson(no_radius).unwrap_err().contains("\"a\": a Point needs properties.radius_m"));
        let no_id = r#"{"features":[{"properties":{},"geometry":{"type":"Point","coordinates":[1,2]}}]}"#;
        assert!(parse_geojson(no_id).unwrap_err().contains("feature 0: properties.id"));
        let line = r#"{"features":[{"properties":{"id":"l"},"geometry":{"type":"LineString","coordinates":[[1,2],[3,4]]}}]}"#;
        assert!(parse_geojson(line).unwrap_err().contains("LineString"));
    }
}
