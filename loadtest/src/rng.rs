//! The generator's one PRNG (splitmix64) and the clock-seeded values drawn from it: default
//! seeds and run ids. Not cryptographic: it picks senders, recipients and masking keys.

/// One splitmix64 step: a well-mixed 64-bit value from `x` (feed the result back for a stream).
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The clock and the pid, hashed: unpredictable enough for run ids and default seeds, and no
/// RNG crate needed.
pub fn random_u64() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    splitmix64(t ^ (u64::from(std::process::id()) << 32))
}

/// 8 hex digits that tell this run's messages from earlier runs'.
pub fn run_id() -> String {
    format!("{:08x}", random_u64() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_reference_stream() {
        // Reference values of splitmix64 seeded with 0 (Vigna's C implementation).
        let mut x = 0u64;
        let mut next = || {
            let v = splitmix64(x);
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            v
        };
        assert_eq!(next(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(next(), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(run_id().len(), 8);
    }
}
