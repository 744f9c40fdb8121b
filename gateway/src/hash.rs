//! Hashing helpers: keyed-by-value hashes for rate-limit keys and fingerprints, and a plain
//! content hash for change detection. Request-keyed hash maps use `ahash` directly.

/// Hashes header and claim values into keys. Fixed seeds: the same value is the same key in
/// every runtime, so a reload that keeps a policy keeps its buckets.
pub(crate) static HASHER: std::sync::LazyLock<ahash::RandomState> =
    std::sync::LazyLock::new(|| {
        ahash::RandomState::with_seeds(
            0x5851_f42d_4c95_7f2d,
            0x1405_7b7e_f767_814f,
            0x9e37_79b9_7f4a_7c15,
            0xbf58_476d_1ce4_e5b9,
        )
    });

/// The key of a header or claim value (the same in every runtime of the process).
pub fn value(bytes: &[u8]) -> u64 {
    HASHER.hash_one(bytes)
}

/// FNV-1a, for change detection of file contents (not security).
pub fn content(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

#[cfg(test)]
mod tests {
    #[test]
    fn hashes_are_stable_within_a_process() {
        assert_eq!(super::value(b"abc"), super::value(b"abc"));
        assert_ne!(super::value(b"abc"), super::value(b"abd"));
        assert_eq!(super::content(b""), 0xcbf29ce484222325);
    }
}
