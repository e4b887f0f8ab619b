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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_and_floor_respected() {
        let a = now_us();
        let b = now_us();
        assert!(b >= a);
        clamp_floor(a + 1_000);
        assert!(now_us() >= a + 1_000);
    }
}
