//! A sliding window of two counters (requests and failures, or requests and retries) in
//! one-second buckets, lock-free: what the circuit breaker and the retry budget count over.

use std::sync::atomic::{AtomicU64, Ordering};

/// One counter of one bucket: the second it counts in the high 32 bits (0: never used), the
/// count in the low 32. One atomic word, so a bucket moved on to a new second starts from
/// zero without losing a count made at the same moment by another thread.
struct Counter(AtomicU64);

impl Counter {
    fn new() -> Counter {
        Counter(AtomicU64::new(0))
    }

    fn pack(second: u64, count: u32) -> u64 {
        (second << 32) | u64::from(count)
    }

    fn unpack(v: u64) -> (u64, u32) {
        (v >> 32, v as u32)
    }

    /// Counts `n` in `second`. A counter already on a later second (a thread whose clock
    /// reading is a little old) counts it there: a counter never moves back.
    fn add(&self, second: u64, n: u32) {
        if n == 0 {
            return;
        }
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(match Self::unpack(v) {
                    (at, count) if at >= second => Self::pack(at, count.saturating_add(n)),
                    _ => Self::pack(second, n),
                })
            });
    }

    /// Takes `n` back from `second`, never below zero; nothing once the counter has moved on.
    fn take_back(&self, second: u64, n: u32) {
        if n == 0 {
            return;
        }
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                let (at, count) = Self::unpack(v);
                (at == second).then(|| Self::pack(second, count.saturating_sub(n)))
            });
    }

    /// The count, when it is of a second from `oldest` to `newest`.
    fn within(&self, oldest: u64, newest: u64) -> u64 {
        let (at, count) = Self::unpack(self.0.load(Ordering::Acquire));
        if (oldest..=newest).contains(&at) {
            u64::from(count)
        } else {
            0
        }
    }

    fn clear(&self) {
        self.0.store(0, Ordering::Release);
    }
}

struct Bucket {
    a: Counter,
    b: Counter,
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
                    a: Counter::new(),
                    b: Counter::new(),
                })
                .collect(),
        }
    }

    /// The second of `now_ms` (from 1, so that 0 marks a bucket never used; the clock starts
    /// with the process, and 32 bits of seconds last 136 years), and its bucket.
    fn bucket(&self, now_ms: u64) -> (u64, &Bucket) {
        let second = (now_ms / 1000 + 1) & u64::from(u32::MAX);
        (
            second,
            &self.buckets[(second % self.buckets.len() as u64) as usize],
        )
    }

    /// Adds `a` and `b` to the bucket of `now_ms`.
    pub fn add(&self, now_ms: u64, a: u32, b: u32) {
        let (second, bucket) = self.bucket(now_ms);
        bucket.a.add(second, a);
        bucket.b.add(second, b);
    }

    /// Takes `a` and `b` back from the bucket of `now_ms`, never below zero; nothing when the
    /// bucket has moved on to a later second.
    pub fn take_back(&self, now_ms: u64, a: u32, b: u32) {
        let (second, bucket) = self.bucket(now_ms);
        bucket.a.take_back(second, a);
        bucket.b.take_back(second, b);
    }

    /// The sums of `a` and `b` over the window ending at `now_ms`.
    pub fn sums(&self, now_ms: u64) -> (u64, u64) {
        let (second, _) = self.bucket(now_ms);
        let oldest = second.saturating_sub(self.buckets.len() as u64 - 1);
        self.buckets.iter().fold((0, 0), |(a, b), bucket| {
            (
                a + bucket.a.within(oldest, second),
                b + bucket.b.within(oldest, second),
            )
        })
    }

    /// Forgets everything.
    pub fn clear(&self) {
        for b in self.buckets.iter() {
            b.a.clear();
            b.b.clear();
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
        // Taken back from its own second only, and never below zero.
        w.take_back(3_200, 1, 3);
        assert_eq!(w.sums(3_200), (6, 2));
        w.take_back(3_200, 10, 0);
        assert_eq!(w.sums(3_200), (2, 2));
        w.take_back(13_200, 1, 1);
        assert_eq!(w.sums(3_200), (2, 2));
        // A late count (a clock read a window ago) goes to the later second it finds, which
        // stays whole.
        w.add(4_000, 1, 0);
        assert_eq!(w.sums(4_000), (2, 1));
        w.add(1_000, 1, 0);
        assert_eq!(w.sums(4_000), (3, 1));
        assert_eq!(w.sums(10_000), (0, 0));
        w.clear();
        assert_eq!(w.sums(3_100), (0, 0));
    }
}
