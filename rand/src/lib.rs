//! Randomness from the operating system's secure source, through aws-lc-rs (the one
//! crypto library of the project): proofs, IDs, decision IDs and jitter all come from
//! here, so there is one place that says how.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

/// Fills `buf` with secure random bytes.
pub fn fill(buf: &mut [u8]) {
    rustls::crypto::aws_lc_rs::default_provider().secure_random.fill(buf).expect("the system random source works");
}

/// `N` secure random bytes.
pub fn bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    fill(&mut buf);
    buf
}

/// `len` secure random bytes, hex-encoded (`2 * len` characters).
pub fn hex(len: usize) -> String {
    use std::fmt::Write;
    let mut buf = vec![0u8; len];
    fill(&mut buf);
    buf.iter().fold(String::with_capacity(2 * len), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// A uniformly random fraction in `[0, 1)`, for jitter.
pub fn fraction() -> f64 {
    (u64::from_le_bytes(bytes::<8>()) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_differ_and_have_their_shape() {
        assert_ne!(bytes::<16>(), bytes::<16>());
        let h = hex(12);
        assert_eq!(h.len(), 24);
        assert!(h.bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(h, hex(12));
        let f = fraction();
        assert!((0.0..1.0).contains(&f));
    }
}
