//! Time: the one home of fleetpipe's calendar maths over [`Micros`] — RFC 3339 parsing and
//! formatting of timestamps on the wire, day and hour numbers, and the dates that name
//! partitions (`YYYY-MM-DD` directories, `YYYYMMDD` Postgres partitions).
//!
//! Hand-written rather than chrono-based because every JSON frame carries at least one timestamp
//! and both directions sit on the hot path. Parsing accepts any RFC 3339 date-time (`T`, `t` or a
//! space as separator, any number of fractional digits — truncated to microseconds —, `Z` or a
//! `±HH:MM` offset) and converts to UTC. Formatting writes UTC with millisecond precision
//! (`2026-11-25T21:00:00.250Z`), or six fractional digits when the value has sub-millisecond
//! microseconds, so that nothing is lost.

use crate::frame::Micros;

const US_PER_SEC: i64 = 1_000_000;
const US_PER_DAY: i64 = 86_400 * US_PER_SEC;

/// Microseconds in an hour.
pub const MICROS_PER_HOUR: Micros = 3_600 * US_PER_SEC;
/// Microseconds in a day.
pub const MICROS_PER_DAY: Micros = US_PER_DAY;

/// `0001-01-01T00:00:00Z`, the earliest timestamp fleetpipe stores (every store and client
/// library in the chain can represent it).
pub const MIN_TS: Micros = days_from_civil(1, 1, 1) * US_PER_DAY;

/// `9999-12-31T23:59:59.999999Z`, the latest timestamp RFC 3339 can write.
pub const MAX_TS: Micros = days_from_civil(10_000, 1, 1) * US_PER_DAY - 1;

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
pub const fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date `(year, month, day)` of a day number since 1970-01-01, total over every day a
/// [`Micros`] can reach.
pub fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// `n` ASCII digits at `at` as a number, or `None`.
fn digits(b: &[u8], at: usize, n: usize) -> Option<i64> {
    let s = b.get(at..at.checked_add(n)?)?;
    s.iter().try_fold(0i64, |acc, &c| c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0')))
}

/// Parses an RFC 3339 date-time into microseconds since the epoch, UTC.
///
/// Returns `None` for anything that is not one (including impossible dates like `02-30`).
/// Fractional digits beyond the sixth are truncated.
pub fn parse_rfc3339(s: &str) -> Option<Micros> {
    let b = s.as_bytes();
    let at = |i: usize| b.get(i).copied();
    let year = digits(b, 0, 4)?;
    let month = digits(b, 5, 2)?;
    let day = digits(b, 8, 2)?;
    let hour = digits(b, 11, 2)?;
    let minute = digits(b, 14, 2)?;
    let second = digits(b, 17, 2)?;
    if at(4) != Some(b'-')
        || at(7) != Some(b'-')
        || !matches!(at(10), Some(b'T' | b't' | b' '))
        || at(13) != Some(b':')
        || at(16) != Some(b':')
    {
        return None;
    }
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }

    let mut i = 19;
    let mut frac: i64 = 0;
    if at(i) == Some(b'.') {
        i += 1;
        let start = i;
        while let Some(c) = at(i).filter(u8::is_ascii_digit) {
            if i - start < 6 {
                frac = frac * 10 + i64::from(c - b'0');
            }
            i += 1;
        }
        let n = i - start;
        if n == 0 {
            return None;
        }
        for _ in n..6 {
            frac *= 10;
        }
    }

    let offset_s = match at(i) {
        Some(b'Z' | b'z') => {
            i += 1;
            0
        }
        Some(sign @ (b'+' | b'-')) => {
            let oh = digits(b, i + 1, 2)?;
            let om = digits(b, i + 4, 2)?;
            if at(i + 3) != Some(b':') || oh > 23 || om > 59 {
                return None;
            }
            i += 6;
            let off = oh * 3600 + om * 60;
            if sign == b'-' {
                -off
            } else {
                off
            }
        }
        _ => return None,
    };
    if i != b.len() {
        return None;
    }

    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_s;
    Some(secs * US_PER_SEC + frac)
}

fn push2(out: &mut Vec<u8>, v: i64) {
    out.push(b'0' + (v / 10 % 10) as u8);
    out.push(b'0' + (v % 10) as u8);
}

fn push_digits(out: &mut Vec<u8>, v: i64, n: u32) {
    let mut div = 10i64.pow(n.saturating_sub(1));
    while div > 0 {
        out.push(b'0' + (v / div % 10) as u8);
        div /= 10;
    }
}

/// Appends `micros` as RFC 3339 UTC (`2026-11-25T21:00:00.250Z`; six fractional digits when the
/// value is not a whole millisecond).
pub fn write_ts(out: &mut Vec<u8>, micros: Micros) {
    let days = micros.div_euclid(US_PER_DAY);
    let in_day = micros.rem_euclid(US_PER_DAY);
    let (year, month, day) = civil_from_days(days);
    if (0..=9999).contains(&year) {
        push_digits(out, year, 4);
    } else {
        // Outside RFC 3339; only reachable for frames that were never validated.
        out.extend_from_slice(format!("{year:+}").as_bytes());
    }
    out.push(b'-');
    push2(out, month);
    out.push(b'-');
    push2(out, day);
    out.push(b'T');
    let secs = in_day / US_PER_SEC;
    push2(out, secs / 3600);
    out.push(b':');
    push2(out, secs / 60 % 60);
    out.push(b':');
    push2(out, secs % 60);
    out.push(b'.');
    let frac = in_day % US_PER_SEC;
    if frac % 1000 == 0 {
        push_digits(out, frac / 1000, 3);
    } else {
        push_digits(out, frac, 6);
    }
    out.push(b'Z');
}

/// `micros` as RFC 3339 UTC with millisecond precision (`2026-11-25T21:00:00.250Z`), or six
/// fractional digits when the value has sub-millisecond microseconds.
pub fn format_ts(micros: Micros) -> String {
    let mut out = Vec::with_capacity(27);
    write_ts(&mut out, micros);
    // Only ASCII was written.
    String::from_utf8_lossy(&out).into_owned()
}

/// The day (since 1970-01-01, UTC) that `micros` falls on.
pub fn day_of(micros: Micros) -> i64 {
    micros.div_euclid(MICROS_PER_DAY)
}

/// The hour (since the epoch, UTC) that `micros` falls in.
pub fn hour_of(micros: Micros) -> i64 {
    micros.div_euclid(MICROS_PER_HOUR)
}

/// `YYYY-MM-DD` of a day number counted from 1970-01-01.
pub fn date_string(days: i64) -> String {
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}")
}

/// `YYYYMMDD` of a day number counted from 1970-01-01.
pub fn compact_date(days: i64) -> String {
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}{m:02}{d:02}")
}

/// The day of a `YYYYMMDD` date (a real calendar date), or `None`.
pub fn parse_compact_date(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 8 {
        return None;
    }
    let (y, m, d) = (digits(b, 0, 4)?, digits(b, 4, 2)?, digits(b, 6, 2)?);
    if !(1..=12).contains(&m) || d < 1 || d > days_in_month(y, m) {
        return None;
    }
    Some(days_from_civil(y, m, d))
}

/// RFC 3339 in UTC with millisecond precision, truncating finer digits:
/// `2026-11-25T21:00:00.250Z` (what API answers and the dead-letter store show).
pub fn format_millis(micros: Micros) -> String {
    format_ts(micros - micros.rem_euclid(1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Micros = 1_795_640_400_250_000; // 2026-11-25T21:00:00.250Z

    #[test]
    fn utc_with_millis_parses() {
        assert_eq!(parse_rfc3339("2026-11-25T21:00:00.250Z"), Some(T));
    }

    #[test]
    fn offsets_are_converted_to_utc() {
        assert_eq!(parse_rfc3339("2026-11-25T23:00:00.250+02:00"), Some(T));
        assert_eq!(parse_rfc3339("2026-11-25T16:30:00.25-04:30"), Some(T));
        assert_eq!(parse_rfc3339("2026-11-25t21:00:00.250z"), Some(T));
        assert_eq!(parse_rfc3339("2026-11-25 21:00:00.250-00:00"), Some(T));
    }

    #[test]
    fn a_timestamp_without_fraction_parses() {
        assert_eq!(parse_rfc3339("2026-11-25T21:00:00Z"), Some(T - 250_000));
    }

    #[test]
    fn fractions_beyond_micros_are_truncated() {
        assert_eq!(parse_rfc3339("2026-11-25T21:00:00.250000999Z"), Some(T));
        assert_eq!(parse_rfc3339("2026-11-25T21:00:00.000001Z"), Some(T - 249_999));
    }

    #[test]
    fn malformed_timestamps_are_refused() {
        for s in [
            "",
            "2026-11-25",
            "2026-11-25T21:00:00",
            "2026-11-25T21:00:00.Z",
            "2026-11-25T21:00:00.250",
            "2026-02-30T21:00:00Z",
            "2025-02-29T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-11-25T24:00:00Z",
            "2026-11-25T21:00:00+2:00",
            "2026-11-25T21:00:00+02:00 ",
            "2026-11-25T21:00:00+0200",
            "２026-11-25T21:00:00Z",
            "yesterday",
        ] {
            assert_eq!(parse_rfc3339(s), None, "{s:?}");
        }
        assert!(parse_rfc3339("2024-02-29T00:00:00Z").is_some());
    }

    #[test]
    fn format_uses_millis_unless_micros_are_present() {
        assert_eq!(format_ts(T), "2026-11-25T21:00:00.250Z");
        assert_eq!(format_ts(T - 250_000), "2026-11-25T21:00:00.000Z");
        assert_eq!(format_ts(T + 1), "2026-11-25T21:00:00.250001Z");
        assert_eq!(format_ts(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_ts(-1), "1969-12-31T23:59:59.999999Z");
    }

    #[test]
    fn bounds_format_and_parse_back() {
        assert_eq!(format_ts(MIN_TS), "0001-01-01T00:00:00.000Z");
        assert_eq!(format_ts(MAX_TS), "9999-12-31T23:59:59.999999Z");
        assert_eq!(parse_rfc3339(&format_ts(MIN_TS)), Some(MIN_TS));
        assert_eq!(parse_rfc3339(&format_ts(MAX_TS)), Some(MAX_TS));
    }

    #[test]
    fn format_never_panics_on_extreme_values() {
        for v in [i64::MIN, i64::MAX, i64::MIN + 1, MIN_TS - 1, MAX_TS + 1] {
            let s = format_ts(v);
            assert!(s.ends_with('Z'), "{s}");
        }
    }

    #[test]
    fn format_then_parse_round_trips() {
        let mut t = MIN_TS;
        while t < MAX_TS {
            assert_eq!(parse_rfc3339(&format_ts(t)), Some(t));
            t += 86_399_999_997 * 13;
        }
    }

    #[test]
    fn civil_dates_match_known_days() {
        assert_eq!(date_string(0), "1970-01-01");
        assert_eq!(date_string(-1), "1969-12-31");
        assert_eq!(date_string(11_016), "2000-02-29");
        assert_eq!(date_string(20_782), "2026-11-25");
        assert_eq!(format_millis(1_795_640_400_250_000), "2026-11-25T21:00:00.250Z");
        assert_eq!(format_millis(1_795_640_400_250_999), "2026-11-25T21:00:00.250Z");
        assert_eq!(format_millis(-1_000), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn compact_dates_round_trip_over_every_storable_year() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(compact_date(days_from_civil(2026, 1, 25)), "20260125");
        for day in [days_from_civil(1, 1, 1), -1, 0, 20_000, days_from_civil(9999, 12, 31)] {
            assert_eq!(parse_compact_date(&compact_date(day)), Some(day));
        }
        assert_eq!(parse_compact_date("20250229"), None);
        assert_eq!(parse_compact_date("2025022"), None);
        assert_eq!(parse_compact_date("2025-2-1"), None);
    }
}
