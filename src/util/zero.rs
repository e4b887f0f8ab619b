//! All-zero detection, shared by the capture copy (zero blocks are sent as
//! zero ranges) and the target's retention journal (zero before-images are
//! stored without data).

/// True when every byte of `b` is zero.
pub fn is_zero(b: &[u8]) -> bool {
    let (pre, mid, post) = bytemuck::pod_align_to::<u8, u64>(b);
    pre.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && post.iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::is_zero;

    #[test]
    fn zero_and_not_zero_at_any_alignment() {
        let mut v = vec![0u8; 4099];
        for start in 0..8 {
            assert!(is_zero(&v[start..]));
        }
        for i in [0usize, 7, 8, 4095, 4098] {
            v[i] = 1;
            assert!(!is_zero(&v), "byte {i}");
            v[i] = 0;
        }
        assert!(is_zero(&[]));
    }
}
