//! Deterministic random inputs for benchmarks.

/// `len` values uniform in `[-1, 1)` from a SplitMix64 stream seeded by `seed`.
pub fn random_f32(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            // 24 random bits: k / 2^23 in [0, 2), exactly representable.
            (z >> 40) as f32 * (1.0 / (1u32 << 23) as f32) - 1.0
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_in_range_deterministic_and_spread() {
        let v = random_f32(10_000, 7);
        assert!(v.iter().all(|x| (-1.0..1.0).contains(x)));
        assert_eq!(v, random_f32(10_000, 7));
        assert_ne!(v, random_f32(10_000, 8));
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.05, "mean {mean}");
        assert!(v.iter().any(|&x| x < -0.9) && v.iter().any(|&x| x > 0.9));
    }
}
