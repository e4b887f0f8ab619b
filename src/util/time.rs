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

/// `us` (µs since the Unix epoch) as UTC, e.g. `2024-05-01T10:00:00Z`
/// (seconds precision), for messages.
pub fn format_us(us: u64) -> String {
    let secs = us / 1_000_000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
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
