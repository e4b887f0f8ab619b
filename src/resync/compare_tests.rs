//! Tests of `diff`.

use std::collections::BTreeSet;

use proptest::prelude::*;

use super::*;
use crate::resync::digest::BlockDigest::{Absent, Hash, Zero};

#[test]
fn diff_merges_runs_and_treats_absent_as_zero() {
    let h = |b| Hash([b; 32]);
    let src = [Absent, Zero, h(1), h(2), h(3), Zero, h(5), Absent];
    let dst = [Zero, Absent, h(9), h(9), h(3), h(0), h(5), h(7)];
    assert_eq!(
        diff(100, &src, &dst).unwrap(),
        vec![102..104, 105..106, 107..108]
    );
    assert_eq!(diff(0, &src, &src).unwrap(), vec![]);
    assert_eq!(diff(0, &[], &[]).unwrap(), vec![]);
    assert_eq!(diff(5, &[h(1); 4], &[Zero; 4]).unwrap(), vec![5..9]);
}

#[test]
fn diff_refuses_mismatched_lengths_and_overflow() {
    assert_eq!(
        diff(0, &[Zero], &[]),
        Err(DiffError::LengthMismatch {
            source_len: 1,
            target_len: 0
        })
    );
    assert!(matches!(
        diff(u64::MAX, &[Zero, Zero], &[Zero, Zero]),
        Err(DiffError::Overflow { .. })
    ));
    assert_eq!(diff(u64::MAX, &[], &[]).unwrap(), vec![]);
}

fn digest_strategy() -> impl Strategy<Value = BlockDigest> {
    prop_oneof![
        Just(Absent),
        Just(Zero),
        (0u8..3).prop_map(|b| Hash([b; 32])),
    ]
}

proptest! {
    /// The runs are exactly the differing blocks (Absent = Zero), sorted,
    /// disjoint and merged (no two runs touch).
    #[test]
    fn runs_are_exactly_the_differing_blocks(
        first in 0u64..1 << 40,
        pairs in proptest::collection::vec((digest_strategy(), digest_strategy()), 0..200),
    ) {
        let (src, dst): (Vec<_>, Vec<_>) = pairs.into_iter().unzip();
        let runs = diff(first, &src, &dst).unwrap();
        let want: BTreeSet<u64> = (0..src.len())
            .filter(|&i| !src[i].same_data(&dst[i]))
            .map(|i| first + i as u64)
            .collect();
        let got: BTreeSet<u64> = runs.iter().flat_map(|r| r.clone()).collect();
        prop_assert_eq!(got, want);
        for w in runs.windows(2) {
            prop_assert!(w[0].end < w[1].start, "runs {:?} touch or overlap", w);
        }
        prop_assert!(runs.iter().all(|r| r.start < r.end));
    }
}
