//! Which recovery points to keep: a pure function of the points, the newest
//! point's time and the policy, tested without I/O.
//!
//! Rule (docs/CONSISTENCY.md, "Retention"): the newest point is always kept;
//! every point within `window` of the newest is kept; older ones, up to
//! `window + hourly` back, keep one point per clock hour (the first tag of the
//! hour if there is one, else the first point); older ones, up to `daily_days`
//! days further back, keep one per day the same way; older points go. "Now" is
//! the newest point's source time, not the wall clock, so history is not thinned
//! away while the source is down (an outage is exactly when it is needed).

use serde::{Deserialize, Serialize};

use super::journal::PointKind;

/// One hour in µs.
pub const HOUR_US: u64 = 3_600_000_000;
/// One day in µs.
pub const DAY_US: u64 = 24 * HOUR_US;

/// The retention policy of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Keep before-images at all (otherwise only while M data is applied and
    /// while a reader pins a point): the newest point is then the only one.
    pub enabled: bool,
    /// At most one crash-consistent point per this much source time, µs.
    pub granularity_us: u64,
    /// Keep every point this long, µs.
    pub window_us: u64,
    /// Then one per hour for this long, µs.
    pub hourly_us: u64,
    /// Then one per day for this many days.
    pub daily_days: u32,
    /// Cap on the journal's bytes (0: none); the oldest points go first.
    pub max_bytes: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            enabled: false,
            granularity_us: 1_000_000,
            window_us: HOUR_US,
            hourly_us: 24 * HOUR_US,
            daily_days: 0,
            max_bytes: 0,
        }
    }
}

/// What the policy needs to know of a point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PointInfo {
    /// Identifies it (its frame number).
    pub frame_no: u64,
    /// Source time, µs.
    pub time_us: u64,
    /// Its kind (tags are preferred as an hour's or a day's representative).
    pub kind: PointKind,
}

/// The frame numbers of the points to drop from `points` (oldest first, as
/// given), under `policy`. Never the newest point.
pub fn to_drop(points: &[PointInfo], policy: &Policy) -> Vec<u64> {
    let Some(newest) = points.iter().max_by_key(|p| (p.time_us, p.frame_no)) else {
        return Vec::new();
    };
    let now = newest.time_us;
    if !policy.enabled {
        return points
            .iter()
            .filter(|p| p.frame_no != newest.frame_no)
            .map(|p| p.frame_no)
            .collect();
    }
    let window_start = now.saturating_sub(policy.window_us);
    let hourly_start = window_start.saturating_sub(policy.hourly_us);
    let daily_start =
        hourly_start.saturating_sub(u64::from(policy.daily_days).saturating_mul(DAY_US));
    // Representative of each bucket: the first tag, else the first point.
    let mut keep_bucket: std::collections::HashMap<(u8, u64), PointInfo> =
        std::collections::HashMap::new();
    for p in points {
        let bucket = if p.time_us >= window_start {
            continue;
        } else if p.time_us >= hourly_start {
            (0, p.time_us / HOUR_US)
        } else if p.time_us >= daily_start && policy.daily_days > 0 {
            (1, p.time_us / DAY_US)
        } else {
            continue;
        };
        let better = |cur: &PointInfo| {
            let tag = |k: PointKind| k != PointKind::Crash;
            (tag(p.kind) && !tag(cur.kind))
                || (tag(p.kind) == tag(cur.kind)
                    && (p.time_us, p.frame_no) < (cur.time_us, cur.frame_no))
        };
        match keep_bucket.get(&bucket) {
            Some(cur) if !better(cur) => {}
            _ => {
                keep_bucket.insert(bucket, *p);
            }
        }
    }
    points
        .iter()
        .filter(|p| {
            if p.frame_no == newest.frame_no || p.time_us >= window_start {
                return false;
            }
            !keep_bucket.values().any(|k| k.frame_no == p.frame_no)
        })
        .map(|p| p.frame_no)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pt(frame_no: u64, secs: u64, kind: PointKind) -> PointInfo {
        PointInfo {
            frame_no,
            time_us: secs * 1_000_000,
            kind,
        }
    }

    fn on() -> Policy {
        Policy {
            enabled: true,
            ..Policy::default()
        }
    }

    #[test]
    fn disabled_keeps_only_the_newest() {
        let pts = [
            pt(1, 10, PointKind::Crash),
            pt(2, 20, PointKind::App),
            pt(3, 30, PointKind::Crash),
        ];
        assert_eq!(to_drop(&pts, &Policy::default()), vec![1, 2]);
        assert!(to_drop(&[], &Policy::default()).is_empty());
    }

    #[test]
    fn the_window_keeps_everything() {
        let pts: Vec<_> = (0..100)
            .map(|i| pt(i + 1, 100_000 + i * 10, PointKind::Crash))
            .collect();
        assert!(to_drop(&pts, &on()).is_empty());
    }

    #[test]
    fn older_points_thin_to_one_per_hour_preferring_tags_then_per_day() {
        let h = 3600;
        let now = 40 * 24 * h;
        let mut pts = Vec::new();
        let mut n = 0;
        let mut add = |secs: u64, kind| {
            n += 1;
            pts.push(pt(n, secs, kind));
            n
        };
        // Two points in an hour two hours back (inside hourly): the tag wins.
        let a = add(now - 2 * h - 600, PointKind::Crash);
        let b = add(now - 2 * h - 300, PointKind::App);
        // Two points 30 hours back (beyond window + hourly = 25 h): dropped
        // with daily_days = 0, one kept per day with daily_days = 2.
        let c = add(now - 30 * h, PointKind::Crash);
        let d = add(now - 30 * h + 60, PointKind::Crash);
        // Within the window.
        let e = add(now - 60, PointKind::Crash);
        let f = add(now, PointKind::Crash);
        let drop = to_drop(&pts, &on());
        assert_eq!(drop, vec![a, c, d]);
        let daily = Policy {
            daily_days: 2,
            ..on()
        };
        let drop = to_drop(&pts, &daily);
        assert_eq!(drop, vec![a, d]);
        let _ = (b, e, f);
    }

    #[test]
    fn the_newest_point_is_never_dropped() {
        let pts = [pt(7, 1, PointKind::Crash)];
        let p = Policy {
            window_us: 0,
            hourly_us: 0,
            ..on()
        };
        assert!(to_drop(&pts, &p).is_empty());
    }
}
