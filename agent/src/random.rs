//! Randomness from the operating system's secure source: the AWS authorization token and
//! the jitter of refreshes and retries.

/// Bytes from the operating system's secure random source (through aws-lc-rs, the one
/// crypto library of the project).
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut buf)
        .expect("the system random source is available");
    buf
}

/// A uniformly random fraction in `[0, 1)`, for jitter.
pub fn random_fraction() -> f64 {
    (u64::from_le_bytes(random_bytes::<8>()) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn randomness() {
        assert_ne!(random_bytes::<16>(), random_bytes::<16>());
        let f = random_fraction();
        assert!((0.0..1.0).contains(&f));
    }
}
