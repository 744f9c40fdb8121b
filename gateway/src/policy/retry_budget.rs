//! Retry budget per upstream (`upstreams.NAME.retry_budget`), as Envoy has it: retries may be
//! at most `budget_percent` of the requests over a sliding window (and always `min_retries`),
//! so that retries cannot multiply an overload.

use super::window::Window;

/// The settings, as compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetSpec {
    pub budget_percent: u32,
    pub min_retries: u32,
    pub window_secs: u64,
}

/// One upstream's budget: requests and retries over the window.
pub struct RetryBudget {
    pub spec: BudgetSpec,
    window: Window,
    exhausted: prometheus::IntCounter,
}

impl RetryBudget {
    /// A budget for `upstream`.
    pub fn new(upstream: &str, spec: BudgetSpec) -> RetryBudget {
        RetryBudget {
            window: Window::new(spec.window_secs),
            spec,
            exhausted: crate::metrics::METRICS.retry_budget_exhausted(upstream),
        }
    }

    /// Counts a request.
    pub fn request(&self, now_ms: u64) {
        self.window.add(now_ms, 1, 0);
    }

    /// Takes a retry from the budget, if it has one left. The place is taken before the
    /// budget is checked and given back when over it, so retries racing for the last places
    /// never overdraw it (they may all be refused: a refusal errs on the budget's side).
    pub fn try_retry(&self, now_ms: u64) -> bool {
        self.window.add(now_ms, 0, 1);
        let (requests, retries) = self.window.sums(now_ms);
        let allowed = (requests * u64::from(self.spec.budget_percent) / 100)
            .max(u64::from(self.spec.min_retries));
        if retries <= allowed {
            true
        } else {
            self.window.take_back(now_ms, 0, 1);
            self.exhausted.inc();
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_stay_within_the_share_of_requests() {
        let b = RetryBudget::new(
            "unit-budget",
            BudgetSpec {
                budget_percent: 20,
                min_retries: 2,
                window_secs: 10,
            },
        );
        let t = 5_000_000;
        // Few requests: the floor of 2 retries.
        b.request(t);
        assert!(b.try_retry(t) && b.try_retry(t) && !b.try_retry(t));
        // 50 requests: 20 % is 10 retries in all.
        for _ in 0..49 {
            b.request(t);
        }
        let granted = (0..20).filter(|_| b.try_retry(t)).count();
        assert_eq!(granted, 8);
        // Once the window has passed, the budget is whole again.
        assert!(b.try_retry(t + 11_000));
    }

    #[test]
    fn retries_racing_for_the_last_places_never_exceed_the_budget() {
        // Threads asking at once must not all be granted the same place: whatever the
        // interleaving, no more than `min_retries` retries are granted without requests, and
        // none of the places is lost.
        let threads = 4;
        for trial in 0..300 {
            let b = RetryBudget::new(
                "unit-budget-race",
                BudgetSpec {
                    budget_percent: 20,
                    min_retries: 3,
                    window_secs: 10,
                },
            );
            let start = std::sync::Barrier::new(threads);
            let granted: usize = std::thread::scope(|scope| {
                let asking: Vec<_> = (0..threads)
                    .map(|_| {
                        scope.spawn(|| {
                            start.wait();
                            (0..4).filter(|_| b.try_retry(5_000_000)).count()
                        })
                    })
                    .collect();
                asking.into_iter().map(|t| t.join().unwrap()).sum()
            });
            assert!(granted <= 3, "trial {trial}: {granted} granted, budget 3");
            // A place refused in a race is given back: the budget ends with exactly three.
            let later = (0..4).filter(|_| b.try_retry(5_000_000)).count();
            assert_eq!(
                granted + later,
                3,
                "trial {trial}: {granted} + {later} granted"
            );
        }
    }
}
