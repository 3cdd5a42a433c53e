//! The JSON wire types: one frame as it appears on the wire, deserialized straight from the
//! payload (strings borrow from it, `ts` is parsed in its visitor). Values whose type is wrong in
//! a way the contract names a reason for are captured as "invalid" variants, not serde errors.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::frame::snippet;
use crate::frame::Micros;
use crate::json_util::{skip_map, skip_seq, Str};
use crate::signals::Signals;
use crate::time;

/// `ts`: an RFC 3339 string or integer epoch milliseconds, already converted to micros.
pub(crate) enum Ts {
    Micros(Micros),
    /// Present but unusable; the detail says why.
    Invalid(String),
}

impl<'de> Deserialize<'de> for Ts {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl V {
            fn millis(ms: Option<i64>, shown: &dyn fmt::Display) -> Ts {
                match ms.and_then(|ms| ms.checked_mul(1000)) {
                    Some(us) => Ts::Micros(us),
                    None => Ts::Invalid(format!("ts {shown} ms is out of range")),
                }
            }
            fn wrong(what: &str) -> Ts {
                Ts::Invalid(format!(
                    "ts must be an RFC 3339 string or integer epoch milliseconds, got {what}"
                ))
            }
        }
        impl<'de> Visitor<'de> for V {
            type Value = Ts;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an RFC 3339 string or integer epoch milliseconds")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Ts, E> {
                Ok(match time::parse_rfc3339(v) {
                    Some(us) => Ts::Micros(us),
                    None => Ts::Invalid(format!("ts {} is not an RFC 3339 timestamp", snippet(v))),
                })
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Ts, E> {
                Ok(V::millis(i64::try_from(v).ok(), &v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Ts, E> {
                Ok(V::millis(Some(v), &v))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Ts, E> {
                Ok(V::wrong(&format!("the non-integer number {v}")))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Ts, E> {
                Ok(V::wrong(&format!("the boolean {v}")))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Ts, E> {
                Ok(V::wrong("null"))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Ts, A::Error> {
                skip_map(map)?;
                Ok(V::wrong("an object"))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Ts, A::Error> {
                skip_seq(seq)?;
                Ok(V::wrong("an array"))
            }
        }
        d.deserialize_any(V)
    }
}

/// An unsigned integer inside a J1939 object, or why it is not one.
struct UInt(Result<u64, String>);

impl<'de> Deserialize<'de> for UInt {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = UInt;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an unsigned integer")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<UInt, E> {
                Ok(UInt(Ok(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<UInt, E> {
                Ok(UInt(u64::try_from(v).map_err(|_| format!("{v} is negative"))))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<UInt, E> {
                Ok(UInt(Err(format!("{v} is not an integer"))))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<UInt, E> {
                Ok(UInt(Err(format!("{} is a string", snippet(v)))))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<UInt, E> {
                Ok(UInt(Err(format!("{v} is a boolean"))))
            }
            fn visit_unit<E: de::Error>(self) -> Result<UInt, E> {
                Ok(UInt(Err("is null".to_owned())))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<UInt, A::Error> {
                skip_map(map)?;
                Ok(UInt(Err("is an object".to_owned())))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<UInt, A::Error> {
                skip_seq(seq)?;
                Ok(UInt(Err("is an array".to_owned())))
            }
        }
        d.deserialize_any(V)
    }
}

/// One `dtcs` item: an OBD code string or a J1939 object, not yet range-checked.
pub(crate) enum WireDtc<'a> {
    Obd(Cow<'a, str>),
    J1939 { spn: u64, fmi: u64, oc: u64, sa: u64 },
    Invalid(String),
}

impl<'de: 'a, 'a> Deserialize<'de> for WireDtc<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        fn wrong<'a>(what: &str) -> WireDtc<'a> {
            WireDtc::Invalid(format!(
                "dtc must be a code string or a J1939 object {{spn, fmi, oc, sa}}, got {what}"
            ))
        }
        impl<'de> Visitor<'de> for V {
            type Value = WireDtc<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a DTC string or J1939 object")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(WireDtc::Obd(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(WireDtc::Obd(Cow::Owned(v.to_owned())))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields: [Option<u64>; 4] = [None; 4];
                let mut problem = None;
                while let Some(key) = map.next_key::<Str<'de>>()? {
                    let slot = match &*key.0 {
                        "spn" => 0,
                        "fmi" => 1,
                        "oc" => 2,
                        "sa" => 3,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    match map.next_value::<UInt>()?.0 {
                        Ok(v) => {
                            if let Some(f) = fields.get_mut(slot) {
                                *f = Some(v);
                            }
                        }
                        Err(e) => {
                            problem.get_or_insert_with(|| format!("J1939 {} {e}", key.0));
                        }
                    }
                }
                if let Some(p) = problem {
                    return Ok(WireDtc::Invalid(p));
                }
                Ok(match fields {
                    [Some(spn), Some(fmi), Some(oc), Some(sa)] => WireDtc::J1939 { spn, fmi, oc, sa },
                    _ => WireDtc::Invalid("J1939 dtc needs all of spn, fmi, oc and sa".to_owned()),
                })
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(wrong(&format!("the number {v}")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(wrong(&format!("the number {v}")))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Ok(wrong(&format!("the number {v}")))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(wrong(&format!("the boolean {v}")))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(wrong("null"))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                skip_seq(seq)?;
                Ok(wrong("an array"))
            }
        }
        d.deserialize_any(V)
    }
}

/// An optional JSON number; NaN stands for absent or `null` (JSON has no NaN). Half the size of
/// `Option<f64>`, which keeps [`Wire`] small and cheap to move.
#[derive(Clone, Copy)]
pub(crate) struct Num(f64);

impl Default for Num {
    fn default() -> Self {
        Num(f64::NAN)
    }
}

impl Num {
    pub(super) fn get(self) -> Option<f64> {
        (!self.0.is_nan()).then_some(self.0)
    }
}

impl<'de> Deserialize<'de> for Num {
    #[inline]
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Option::<f64>::deserialize(d).map(|v| Num(v.unwrap_or(f64::NAN)))
    }
}

/// One frame as it appears on the wire. Every field is optional here so that a missing one is
/// reported with its own reason (`missing_field`), and `null` reads as absent.
#[derive(serde::Deserialize)]
pub(super) struct Wire<'a> {
    #[serde(borrow, default)]
    pub(super) vehicle_id: Option<Str<'a>>,
    #[serde(default)]
    pub(super) ts: Option<Ts>,
    #[serde(default)]
    pub(super) seq: Option<u64>,
    /// Read only from what fleetpipe stored itself (the stored path); input's is ignored.
    #[serde(default)]
    pub(super) received_at: Option<Ts>,
    #[serde(borrow, default)]
    pub(super) kind: Option<Str<'a>>,
    // Location
    #[serde(default)]
    pub(super) lat: Num,
    #[serde(default)]
    pub(super) lon: Num,
    #[serde(default)]
    pub(super) speed_kmh: Num,
    #[serde(default)]
    pub(super) heading_deg: Num,
    #[serde(default)]
    pub(super) alt_m: Num,
    #[serde(default)]
    pub(super) accuracy_m: Num,
    #[serde(default)]
    pub(super) satellites: Option<u32>,
    #[serde(default)]
    pub(super) odometer_m: Num,
    #[serde(default)]
    pub(super) ignition: Option<bool>,
    // Diagnostic
    #[serde(default)]
    pub(super) engine_rpm: Num,
    #[serde(default)]
    pub(super) coolant_temp_c: Num,
    #[serde(default)]
    pub(super) engine_load_pct: Num,
    #[serde(default)]
    pub(super) fuel_level_pct: Num,
    #[serde(default)]
    pub(super) battery_soc_pct: Num,
    #[serde(default)]
    pub(super) battery_v: Num,
    #[serde(default)]
    pub(super) engine_hours: Num,
    #[serde(default)]
    pub(super) mil_on: Option<bool>,
    #[serde(borrow, default)]
    pub(super) dtcs: Option<Vec<WireDtc<'a>>>,
    #[serde(default)]
    pub(super) signals: Option<Signals>,
}
