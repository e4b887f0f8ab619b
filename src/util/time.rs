//! Wall-clock time as microseconds since the Unix epoch, clamped so that the
//! values one process hands out never go backwards (invariant 7), even if the
//! system clock is stepped back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

static LAST: AtomicU64 = AtomicU64::new(0);

/// Current time in µs since the Unix epoch, never less than a value returned before.
pub fn now_us() -> u64 {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    let prev = LAST.fetch_max(wall, Ordering::Relaxed);
    wall.max(prev)
}

/// Raise the floor below which [`now_us`] will not go (e.g. to a timestamp
/// persisted before a restart).
pub fn clamp_floor(us: u64) {
    LAST.fetch_max(us, Ordering::Relaxed);
}

/// Civil UTC date and time of `secs` since the Unix epoch (Howard Hinnant's
/// algorithm): (year, month, day, hour, minute, second).
fn civil(secs: u64) -> (i64, i64, i64, u64, u64, u64) {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day, rem / 3600, rem % 3600 / 60, rem % 60)
}

/// `us` (µs since the Unix epoch) as UTC, e.g. `2024-05-01T10:00:00Z`
/// (seconds precision), for messages.
pub fn format_us(us: u64) -> String {
    let (y, mo, d, h, mi, s) = civil(us / 1_000_000);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// `us` as UTC with microseconds, e.g. `2024-05-01T10:00:00.000123Z`: exact,
/// so [`parse_utc`] gives `us` back.
pub fn format_us_exact(us: u64) -> String {
    let (y, mo, d, h, mi, s) = civil(us / 1_000_000);
    format!(
        "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{:06}Z",
        us % 1_000_000
    )
}

/// Parse `YYYY-MM-DDTHH:MM:SS[.fraction][Z]` (UTC) into µs since the Unix
/// epoch; `None` when it is not such a time (or before 1970).
pub fn parse_utc(s: &str) -> Option<u64> {
    let t = s.strip_suffix('Z').unwrap_or(s);
    let (date, time) = t.split_once('T')?;
    let d: Vec<&str> = date.split('-').collect();
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let h: Vec<&str> = hms.split(':').collect();
    if d.len() != 3 || h.len() != 3 {
        return None;
    }
    let num = |x: &str, lo: i64, hi: i64| -> Option<i64> {
        let v: i64 = x.parse().ok()?;
        (lo..=hi).contains(&v).then_some(v)
    };
    let (y, mo, da) = (num(d[0], 1970, 9999)?, num(d[1], 1, 12)?, num(d[2], 1, 31)?);
    let (hh, mi, ss) = (num(h[0], 0, 23)?, num(h[1], 0, 59)?, num(h[2], 0, 60)?);
    // Days from the civil date (the inverse of `civil`).
    let yy = if mo <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + da - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let mut us = u64::try_from(days * 86_400 + hh * 3600 + mi * 60 + ss).ok()? * 1_000_000;
    if !frac.is_empty() {
        if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        us += format!("{frac:0<6}")[..6].parse::<u64>().ok()?;
    }
    Some(us)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc() {
        assert_eq!(format_us(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_us(951_782_400_000_000), "2000-02-29T00:00:00Z");
        assert_eq!(format_us(1_700_000_000_123_456), "2023-11-14T22:13:20Z");
        assert_eq!(format_us(4_102_444_799_000_000), "2099-12-31T23:59:59Z");
        for us in [0u64, 1_796_534_518_123_456, 951_782_400_000_000] {
            assert_eq!(parse_utc(&format_us_exact(us)), Some(us));
        }
        assert_eq!(
            parse_utc("2026-12-06T05:21:58Z"),
            Some(1_796_534_518_000_000)
        );
        assert_eq!(parse_utc("2026-13-06T05:21:58Z"), None);
        assert_eq!(parse_utc("yesterday"), None);
    }

    #[test]
    fn monotonic_and_floor_respected() {
        let a = now_us();
        let b = now_us();
        assert!(b >= a);
        clamp_floor(a + 1_000);
        assert!(now_us() >= a + 1_000);
    }
}
