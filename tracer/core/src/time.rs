//! Time as the tool shows and reads it: RFC 3339 in UTC (with
//! milliseconds, or microseconds through `Stamp` without allocating), the
//! compact stamp in segment names, and parsing what users type (`Z` or an
//! offset, a plain date, or seconds since the epoch). The calendar is
//! jiff's.

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

/// Parses an RFC 3339 time (`Z` or an offset east of UTC, `T` or a space),
/// a plain date (its midnight, UTC) or seconds since the epoch, into
/// nanoseconds since the epoch. The calendar is jiff's: a date that doesn't
/// exist (February 31st) is refused, not rolled over.
pub fn parse_time(text: &str) -> Result<u64, String> {
    use jiff::fmt::temporal::{Pieces, PiecesOffset};

    if let Ok(secs) = text.parse::<f64>()
        && secs >= 0.0
        && secs.is_finite()
    {
        return Ok((secs * 1e9) as u64);
    }
    let err = |why: &dyn std::fmt::Display| {
        format!(
            "{text:?} is not a time like 2026-11-28T04:14:21Z, 2026-11-28T05:14:21+01:00, \
             2026-11-28 or seconds since the epoch: {why}"
        )
    };
    let ts = if text.len() == 10 && !text.contains(['T', 't', ' ']) {
        let date: jiff::civil::Date = text.parse().map_err(|e| err(&e))?;
        date.to_zoned(jiff::tz::TimeZone::UTC)
            .map_err(|e| err(&e))?
            .timestamp()
    } else {
        // An offset is required (a time without one means nothing here),
        // and must be one RFC 3339 allows: under 24 hours.
        let pieces = Pieces::parse(text).map_err(|e| err(&e))?;
        match pieces.offset() {
            Some(PiecesOffset::Zulu) => {}
            Some(PiecesOffset::Numeric(n)) if n.offset().seconds().abs() < 24 * 3600 => {}
            _ => return Err(err(&"it needs Z or an offset from -23:59 to +23:59")),
        }
        text.parse::<jiff::Timestamp>().map_err(|e| err(&e))?
    };
    u64::try_from(ts.as_nanosecond()).map_err(|_| err(&"it is before 1970"))
}

/// Calendar fields of a UTC time, from jiff (times beyond year 9999, which
/// only a corrupt record carries, show as jiff's last instant).
fn civil(secs: u64) -> (i64, u32, u32, u32, u32, u32) {
    let ts = i64::try_from(secs)
        .ok()
        .and_then(|s| jiff::Timestamp::from_second(s).ok())
        .unwrap_or(jiff::Timestamp::MAX);
    let dt = jiff::tz::Offset::UTC.to_datetime(ts);
    (
        i64::from(dt.year()),
        u32::from(dt.month().unsigned_abs()),
        u32::from(dt.day().unsigned_abs()),
        u32::from(dt.hour().unsigned_abs()),
        u32::from(dt.minute().unsigned_abs()),
        u32::from(dt.second().unsigned_abs()),
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

    /// The hand-written calendar took any day up to 31 in any month, so
    /// `--since 2026-02-31` meant March 3rd.
    #[test]
    fn days_that_dont_exist_are_refused() {
        for bad in [
            "2026-02-31",
            "2026-02-29T00:00:00Z",
            "2026-04-31T12:00:00+02:00",
        ] {
            let e = parse_time(bad).unwrap_err();
            assert!(e.contains("is not a time like"), "{bad}: {e}");
        }
        assert!(parse_time("2024-02-29").is_ok());
    }

    /// A corrupt record's time (any u64) formats without a panic.
    #[test]
    fn any_time_formats() {
        assert_eq!(utc_rfc3339(u64::MAX), "2554-07-21T23:34:33.709551Z");
        for secs in [u64::MAX, 253_402_300_800] {
            assert_eq!(utc_compact(secs), "99991230T220000Z", "{secs}");
        }
    }
}
