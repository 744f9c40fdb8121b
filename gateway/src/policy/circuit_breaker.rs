//! Circuit breaking per upstream (`upstreams.NAME.circuit_breaker`): when the share of failed
//! attempts (connect errors, timeouts, chosen statuses) over a sliding window passes a
//! threshold, the upstream fails fast with 503 for `open_for`, then lets `trial_requests`
//! through (half open): all of them succeeding closes it, one failing opens it again.
//! Lock-free: the state is an atomic, the counts a [`Window`].

use super::window::Window;
use crate::proxy::answer::Answer;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

/// The settings, as compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerSpec {
    /// Failed attempts, in percent of attempts, at which the circuit opens (1-100).
    pub failure_percent: u32,
    /// Attempts the window must hold before the ratio counts.
    pub min_requests: u32,
    /// The window, in seconds.
    pub window_secs: u64,
    /// How long it stays open before trials.
    pub open_for: Duration,
    /// Trial requests let through when half open.
    pub trial_requests: u32,
    /// Upstream statuses that count as failures.
    pub statuses: Vec<u16>,
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// One upstream's breaker.
pub struct CircuitBreaker {
    pub spec: BreakerSpec,
    state: AtomicU8,
    opened_at_ms: AtomicU64,
    trials_left: AtomicU32,
    trial_successes: AtomicU32,
    window: Window,
    metrics: crate::metrics::BreakerMetrics,
}

/// What the breaker let a request do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Closed: counted in the window.
    Normal,
    /// Half open: one of the trials.
    Trial,
}

impl CircuitBreaker {
    /// A closed breaker for `upstream`.
    pub fn new(upstream: &str, spec: BreakerSpec) -> CircuitBreaker {
        let metrics = crate::metrics::BreakerMetrics::new(upstream);
        metrics.state.set(0);
        CircuitBreaker {
            window: Window::new(spec.window_secs),
            spec,
            state: AtomicU8::new(CLOSED),
            opened_at_ms: AtomicU64::new(0),
            trials_left: AtomicU32::new(0),
            trial_successes: AtomicU32::new(0),
            metrics,
        }
    }

    /// Lets a request through, or fails it fast.
    pub fn admit(&self, now_ms: u64) -> Result<Admission, Answer> {
        match self.state.load(Ordering::Acquire) {
            CLOSED => Ok(Admission::Normal),
            OPEN => {
                let opened = self.opened_at_ms.load(Ordering::Acquire);
                let until = opened + self.spec.open_for.as_millis() as u64;
                if now_ms < until {
                    return Err(self.reject((until - now_ms).div_ceil(1000)));
                }
                // The cool-down is over: one thread moves it to half open with fresh trials.
                if self
                    .state
                    .compare_exchange(OPEN, HALF_OPEN, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    self.trial_successes.store(0, Ordering::Release);
                    self.trials_left
                        .store(self.spec.trial_requests, Ordering::Release);
                    self.metrics.state.set(i64::from(HALF_OPEN));
                }
                self.admit(now_ms)
            }
            _ => {
                let took =
                    self.trials_left
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
                match took {
                    Ok(_) => Ok(Admission::Trial),
                    Err(_) => Err(self.reject(1)),
                }
            }
        }
    }

    /// Counts an attempt's outcome.
    pub fn record(&self, admission: Admission, failed: bool, now_ms: u64) {
        match admission {
            Admission::Trial => {
                if failed {
                    self.open(HALF_OPEN, now_ms);
                } else if self.trial_successes.fetch_add(1, Ordering::AcqRel) + 1
                    >= self.spec.trial_requests
                    && self
                        .state
                        .compare_exchange(HALF_OPEN, CLOSED, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                {
                    self.window.clear();
                    self.metrics.state.set(i64::from(CLOSED));
                }
            }
            Admission::Normal => {
                self.window.add(now_ms, 1, u32::from(failed));
                if failed && self.state.load(Ordering::Acquire) == CLOSED {
                    let (attempts, failures) = self.window.sums(now_ms);
                    if attempts >= u64::from(self.spec.min_requests)
                        && failures * 100 >= u64::from(self.spec.failure_percent) * attempts
                    {
                        self.open(CLOSED, now_ms);
                    }
                }
            }
        }
    }

    /// Whether an upstream status counts as a failure.
    pub fn is_failure(&self, status: u16) -> bool {
        self.spec.statuses.contains(&status)
    }

    /// `closed`, `open` or `half_open`, for `/upstreams`.
    pub fn state_name(&self) -> &'static str {
        match self.state.load(Ordering::Acquire) {
            CLOSED => "closed",
            OPEN => "open",
            _ => "half_open",
        }
    }

    fn open(&self, from: u8, now_ms: u64) {
        if self
            .state
            .compare_exchange(from, OPEN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.opened_at_ms.store(now_ms, Ordering::Release);
            self.metrics.opened.inc();
            self.metrics.state.set(i64::from(OPEN));
            tracing::warn!("circuit opened: failing fast for {:?}", self.spec.open_for);
        }
    }

    fn reject(&self, retry_after: u64) -> Answer {
        self.metrics.rejected.inc();
        Answer::error(503, "upstream circuit open").with_header(
            http::header::RETRY_AFTER,
            http::HeaderValue::from(retry_after.max(1)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> CircuitBreaker {
        CircuitBreaker::new(
            "unit-breaker",
            BreakerSpec {
                failure_percent: 50,
                min_requests: 4,
                window_secs: 10,
                open_for: Duration::from_secs(5),
                trial_requests: 2,
                statuses: vec![502, 503, 504],
            },
        )
    }

    #[test]
    fn opens_on_the_failure_ratio_then_closes_after_good_trials() {
        let b = breaker();
        let t = 1_000_000;
        // Three failures of three: under min_requests, still closed.
        for _ in 0..3 {
            b.record(b.admit(t).unwrap(), true, t);
        }
        assert_eq!(b.state_name(), "closed");
        b.record(b.admit(t).unwrap(), true, t);
        assert_eq!(b.state_name(), "open");
        assert!(b.admit(t + 4_999).is_err());
        // After open_for: two trials, a third request waits for their verdict.
        let first = b.admit(t + 5_000).unwrap();
        let second = b.admit(t + 5_001).unwrap();
        assert_eq!((first, second), (Admission::Trial, Admission::Trial));
        assert!(b.admit(t + 5_002).is_err());
        b.record(first, false, t + 5_010);
        assert_eq!(b.state_name(), "half_open");
        b.record(second, false, t + 5_020);
        assert_eq!(b.state_name(), "closed");
        assert_eq!(b.admit(t + 5_030).unwrap(), Admission::Normal);
    }

    #[test]
    fn a_failed_trial_opens_it_again() {
        let b = breaker();
        let t = 2_000_000;
        for _ in 0..4 {
            b.record(Admission::Normal, true, t);
        }
        let trial = b.admit(t + 6_000).unwrap();
        b.record(trial, true, t + 6_001);
        assert_eq!(b.state_name(), "open");
        assert!(b.admit(t + 6_002).is_err());
        // Successes keep it closed when the ratio stays under the threshold.
        let c = breaker();
        for i in 0..10 {
            c.record(Admission::Normal, i % 4 == 1, t);
        }
        assert_eq!(c.state_name(), "closed");
    }
}
