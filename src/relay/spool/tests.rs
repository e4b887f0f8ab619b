//! Spool tests: round trips, group commit, chain rules, recovery.
