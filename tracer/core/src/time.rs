//! Time as the tool shows and reads it: RFC 3339 in UTC (with
//! milliseconds, or microseconds through `Stamp` without allocating), the
//! compact stamp in segment names, and parsing what users type (`Z` or an
//! offset, a plain date, or seconds since the epoch). Proleptic Gregorian
//! calendar, from days since 1970-01-01 (Howard Hinnant's algorithm).

/// `YYYYMMDDTHHMMSSZ` for seconds since the epoch (UTC).
pub fn utc_compact(secs: u64) -> String {
    let (y, mo, d, h, mi, s) = civil(secs);
    format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z")
}

/// RFC 3339 UTC with microseconds for nanoseconds since the epoch.
/// What every record line of the log carries besides its own fields: its
/// wall-clock time (RFC 3339, UTC, to the millisecond, from `ts_ns` and the
/// clock pair) and the host, so that a line shipped alone (Vector, Fluent
/// Bit) still says when and where. Allocation-free: the date and time of
/// the current second are formatted once per second.
#[derive(Clone, Debug)]
pub struct Stamp {
    pub clock: crate::log::ClockPair,
    /// The hostname as a JSON string, quotes included.
    host: String,
    /// `YYYY-MM-DDTHH:MM:SS` of `second`.
    prefix: [u8; 19],
    second: Option<u64>,
}

/// Writes `n` as `buf.len()` decimal digits.
fn digits(buf: &mut [u8], mut n: u64) {
    for b in buf.iter_mut().rev() {
        *b = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

impl Stamp {
    pub fn new(clock: crate::log::ClockPair, host: &str) -> Self {
        Self {
            clock,
            host: serde_json::to_string(host).expect("a string serializes"),
            prefix: *b"0000-00-00T00:00:00",
            second: None,
        }
    }

    /// Adds `"time"` and `"host"` to the JSON object that ends `line`.
    pub fn apply(&mut self, line: &mut Vec<u8>, ts_ns: u64) {
        if line.last() != Some(&b'}') {
            return;
        }
        line.pop();
        let ns = self.clock.to_realtime(ts_ns);
        let second = ns / 1_000_000_000;
        if self.second != Some(second) {
            let (year, month, day, hour, minute, sec) = civil(second);
            let p = &mut self.prefix;
            digits(&mut p[0..4], year as u64);
            digits(&mut p[5..7], u64::from(month));
            digits(&mut p[8..10], u64::from(day));
            digits(&mut p[11..13], u64::from(hour));
            digits(&mut p[14..16], u64::from(minute));
            digits(&mut p[17..19], u64::from(sec));
            self.second = Some(second);
        }
        let mut ms = *b".000Z\"";
        digits(&mut ms[1..4], (ns % 1_000_000_000) / 1_000_000);
        line.extend_from_slice(b",\"time\":\"");
        line.extend_from_slice(&self.prefix);
        line.extend_from_slice(&ms);
        line.extend_from_slice(b",\"host\":");
        line.extend_from_slice(self.host.as_bytes());
        line.push(b'}');
    }
}

/// As [`utc_rfc3339`], to the millisecond: what a log line's `time` needs
/// (`ts_ns` keeps the nanoseconds), at a third less entropy to compress.
pub fn utc_rfc3339_millis(ns: u64) -> String {
    let (y, mo, d, h, mi, s) = civil(ns / 1_000_000_000);
    format!(
        "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{:03}Z",
        (ns % 1_000_000_000) / 1_000_000
    )
}

pub fn utc_rfc3339(ns: u64) -> String {
    let (y, mo, d, h, mi, s) = civil(ns / 1_000_000_000);
    format!(
        "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{:06}Z",
        (ns % 1_000_000_000) / 1000
    )
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction](Z|+00:00)` (UTC) or seconds
/// since the epoch, into nanoseconds since the epoch.
pub fn parse_time(text: &str) -> Result<u64, String> {
    if let Ok(secs) = text.parse::<f64>()
        && secs >= 0.0
        && secs.is_finite()
    {
        return Ok((secs * 1e9) as u64);
    }
    let err = || {
        format!(
            "{text:?} is not a time like 2026-11-28T04:14:21Z, 2026-11-28T05:14:21+01:00, \
             2026-11-28 or seconds since the epoch"
        )
    };
    // A plain date: its midnight, UTC.
    if text.len() == 10 && !text.contains(['T', ' ']) {
        return parse_time(&format!("{text}T00:00:00Z"));
    }
    // The zone: Z, or an offset ±HH:MM (±HHMM) east of UTC.
    let (utc, offset_s): (&str, i64) = if let Some(t) = text.strip_suffix('Z') {
        (t, 0)
    } else {
        let at = text.rfind(['+', '-']).filter(|&i| i > 10).ok_or_else(err)?;
        let (t, zone) = text.split_at(at);
        let sign = if zone.starts_with('-') { -1 } else { 1 };
        let hm = zone[1..].replace(':', "");
        if hm.len() != 4 || !hm.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        let (h, m): (i64, i64) = (
            hm[..2].parse().map_err(|_| err())?,
            hm[2..].parse().map_err(|_| err())?,
        );
        if h > 23 || m > 59 {
            return Err(err());
        }
        (t, sign * (h * 3600 + m * 60))
    };
    let (date, clock) = utc.split_once(['T', ' ']).ok_or_else(err)?;
    let mut parts = date.split('-').map(str::parse::<i64>);
    let (Some(Ok(year)), Some(Ok(month)), Some(Ok(day)), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(err());
    };
    let (hms, frac) = clock.split_once('.').unwrap_or((clock, ""));
    let mut parts = hms.split(':').map(str::parse::<u64>);
    let (Some(Ok(hour)), Some(Ok(minute)), Some(Ok(second)), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(err());
    };
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return Err(err());
    }
    let nanos = if frac.is_empty() {
        0
    } else {
        let digits: String = frac.chars().take(9).collect();
        let value: u64 = digits.parse().map_err(|_| err())?;
        value * 10u64.pow(9 - digits.len() as u32)
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + (hour * 3600 + minute * 60 + second) as i64 - offset_s;
    let secs = u64::try_from(secs).map_err(|_| err())?;
    Ok(secs * 1_000_000_000 + nanos)
}

/// Days since 1970-01-01 of a date (Howard Hinnant's days_from_civil).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Calendar fields of a UTC time (Howard Hinnant's civil_from_days).
fn civil(secs: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        m,
        d,
        (rem / 3600) as u32,
        ((rem % 3600) / 60) as u32,
        (rem % 60) as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_with_offsets_and_plain_dates() {
        let z = parse_time("2026-11-28T04:14:21Z").unwrap();
        assert_eq!(parse_time("2026-11-28T05:14:21+01:00").unwrap(), z);
        assert_eq!(parse_time("2026-11-27T23:14:21-05:00").unwrap(), z);
        assert_eq!(parse_time("2026-11-28T04:14:21+0000").unwrap(), z);
        assert_eq!(
            parse_time("2026-11-28").unwrap(),
            parse_time("2026-11-28T00:00:00Z").unwrap()
        );
        assert_eq!(
            parse_time("2026-11-28T04:14:21.5Z").unwrap(),
            z + 500_000_000
        );
        for bad in [
            "2026-11-28T04:14:21",
            "2026-11-28T04:14:21+25:00",
            "yesterday",
            "2026-13-01",
        ] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stamps_match_the_rfc3339_formatter_across_seconds() {
        let clock = crate::log::ClockPair {
            monotonic_ns: 1_000,
            realtime_ns: 1_795_894_160_999_000_000,
        };
        let mut stamp = Stamp::new(clock, "hv\"1");
        for ts in [1_000, 1_500_000, 2_000_000, 86_400_000_000_000, 1_000] {
            let mut line = b"{\"a\":1}".to_vec();
            stamp.apply(&mut line, ts);
            let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
            assert_eq!(v["time"], utc_rfc3339_millis(clock.to_realtime(ts)), "{ts}");
            assert_eq!(v["host"], "hv\"1");
            assert_eq!(v["a"], 1);
        }
    }

    #[test]
    fn utc_formatting() {
        assert_eq!(utc_compact(0), "19700101T000000Z");
        // 2026-11-28T04:14:21Z
        assert_eq!(utc_compact(1_795_839_261), "20261128T041421Z");
        assert_eq!(
            utc_rfc3339(1_795_839_261_123_456_789),
            "2026-11-28T04:14:21.123456Z"
        );
        // A leap day.
        assert_eq!(utc_compact(1_709_164_800), "20240229T000000Z");
    }

    #[test]
    fn time_parsing_round_trips() {
        for ns in [0, 1_709_164_800_000_000_000, 1_795_839_261_123_456_000] {
            assert_eq!(parse_time(&utc_rfc3339(ns)), Ok(ns));
        }
        assert_eq!(
            parse_time("2026-11-28T04:14:21Z"),
            Ok(1_795_839_261_000_000_000)
        );
        assert_eq!(parse_time("1795839261.5"), Ok(1_795_839_261_500_000_000));
        assert!(parse_time("yesterday").is_err());
        assert!(parse_time("2026-13-01T00:00:00Z").is_err());
    }
}
