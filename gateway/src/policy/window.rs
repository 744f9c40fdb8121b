//! A sliding window of two counters (requests and failures, or requests and retries) in
//! one-second buckets, lock-free: what the circuit breaker and the retry budget count over.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

struct Bucket {
    /// The second this bucket counts (0: never used).
    second: AtomicU64,
    a: AtomicU32,
    b: AtomicU32,
}

/// Counts over the last `len` seconds.
pub struct Window {
    buckets: Box<[Bucket]>,
}

impl Window {
    /// A window of `seconds` (at least 1).
    pub fn new(seconds: u64) -> Window {
        let len = seconds.max(1) as usize;
        Window {
            buckets: (0..len)
                .map(|_| Bucket {
                    second: AtomicU64::new(0),
                    a: AtomicU32::new(0),
                    b: AtomicU32::new(0),
                })
                .collect(),
        }
    }

    /// Adds `a` and `b` to the bucket of `now_ms`.
    pub fn add(&self, now_ms: u64, a: u32, b: u32) {
        let second = now_ms / 1000 + 1;
        let bucket = &self.buckets[(second % self.buckets.len() as u64) as usize];
        let seen = bucket.second.load(Ordering::Acquire);
        if seen != second
            && bucket
                .second
                .compare_exchange(seen, second, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // This thread moved the bucket to a new second: it starts from zero. A count
            // made by another thread in between may be lost, never doubled.
            bucket.a.store(0, Ordering::Release);
            bucket.b.store(0, Ordering::Release);
        }
        bucket.a.fetch_add(a, Ordering::AcqRel);
        bucket.b.fetch_add(b, Ordering::AcqRel);
    }

    /// The sums of `a` and `b` over the window ending at `now_ms`.
    pub fn sums(&self, now_ms: u64) -> (u64, u64) {
        let second = now_ms / 1000 + 1;
        let oldest = second.saturating_sub(self.buckets.len() as u64 - 1);
        self.buckets
            .iter()
            .filter(|b| {
                let s = b.second.load(Ordering::Acquire);
                s >= oldest && s <= second
            })
            .fold((0, 0), |(a, b), bucket| {
                (
                    a + u64::from(bucket.a.load(Ordering::Acquire)),
                    b + u64::from(bucket.b.load(Ordering::Acquire)),
                )
            })
    }

    /// Forgets everything.
    pub fn clear(&self) {
        for b in self.buckets.iter() {
            b.second.store(0, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_slide_out_of_the_window() {
        let w = Window::new(3);
        w.add(0, 1, 0);
        w.add(1_500, 1, 1);
        w.add(2_900, 1, 1);
        assert_eq!(w.sums(2_900), (3, 2));
        // At 3.0 s the bucket of second 0 has left the window.
        assert_eq!(w.sums(3_000), (2, 2));
        w.add(3_100, 5, 0);
        assert_eq!(w.sums(3_100), (7, 2));
        assert_eq!(w.sums(10_000), (0, 0));
        w.clear();
        assert_eq!(w.sums(3_100), (0, 0));
    }
}
