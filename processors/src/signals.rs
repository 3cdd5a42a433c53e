//! The `signals` bag (CONTRACT.md §1): an object of VSS path → number | bool | string, kept as
//! canonical JSON text (keys sorted, compact) so that every store holds the same bytes.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::frame::snippet;
use crate::json_util::{skip_map, skip_seq, Str};

/// A `signals` value: number, bool or string.
struct SignalValue(Result<serde_json::Value, &'static str>);

impl<'de> Deserialize<'de> for SignalValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde_json::Value;
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SignalValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number, boolean or string")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<SignalValue, E> {
                Ok(SignalValue(Ok(Value::Bool(v))))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<SignalValue, E> {
                Ok(SignalValue(Ok(Value::from(v))))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<SignalValue, E> {
                Ok(SignalValue(Ok(Value::from(v))))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<SignalValue, E> {
                Ok(SignalValue(
                    serde_json::Number::from_f64(v).map(Value::Number).ok_or("is not a finite number"),
                ))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SignalValue, E> {
                Ok(SignalValue(Ok(Value::String(v.to_owned()))))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<SignalValue, E> {
                Ok(SignalValue(Ok(Value::String(v))))
            }
            fn visit_unit<E: de::Error>(self) -> Result<SignalValue, E> {
                Ok(SignalValue(Err("is null")))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<SignalValue, A::Error> {
                skip_map(map)?;
                Ok(SignalValue(Err("is an object")))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<SignalValue, A::Error> {
                skip_seq(seq)?;
                Ok(SignalValue(Err("is an array")))
            }
        }
        d.deserialize_any(V)
    }
}

/// `signals`: canonical JSON text of the object (keys sorted, compact), or why it is invalid.
pub(crate) struct Signals(pub(crate) Result<String, String>);

impl<'de> Deserialize<'de> for Signals {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        fn wrong(what: &str) -> Signals {
            Signals(Err(format!("signals must be an object of path -> number | bool | string, got {what}")))
        }
        impl<'de> Visitor<'de> for V {
            type Value = Signals;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a signals object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Signals, A::Error> {
                let mut out = serde_json::Map::new();
                let mut problem = None;
                while let Some(key) = map.next_key::<Str<'de>>()? {
                    match map.next_value::<SignalValue>()?.0 {
                        Ok(v) if problem.is_none() => {
                            out.insert(key.0.into_owned(), v);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            problem.get_or_insert_with(|| {
                                format!(
                                    "signals {} {e}; values must be number, bool or string",
                                    snippet(&key.0)
                                )
                            });
                        }
                    }
                }
                if let Some(p) = problem {
                    return Ok(Signals(Err(p)));
                }
                Ok(Signals(serde_json::to_string(&out).map_err(|e| format!("signals: {e}"))))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Signals, E> {
                Ok(wrong(&format!("the number {v}")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Signals, E> {
                Ok(wrong(&format!("the number {v}")))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Signals, E> {
                Ok(wrong(&format!("the number {v}")))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Signals, E> {
                Ok(wrong(&format!("the boolean {v}")))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Signals, E> {
                Ok(wrong("a string"))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Signals, E> {
                Ok(wrong("null"))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Signals, A::Error> {
                skip_seq(seq)?;
                Ok(wrong("an array"))
            }
        }
        d.deserialize_any(V)
    }
}

/// Canonical text of a `signals` object given as JSON text (Protobuf's `signals_json`, and
/// [`crate::validate::signals`]).
pub(crate) fn canonical(text: &str) -> Result<String, String> {
    match serde_json::from_str::<Signals>(text) {
        Ok(Signals(r)) => r,
        Err(e) => Err(format!("signals is not valid JSON: {e}")),
    }
}
