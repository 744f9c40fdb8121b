//! One replica (an address behind an upstream) and its health state.
//!
//! Everything here is lock-free: request handling reads and updates atomics only.

use pingora::upstreams::peer::HttpPeer;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Milliseconds since the process started (monotonic); the time base of health state.
pub fn now_ms() -> u64 {
    ms_at(Instant::now())
}

/// [`now_ms`] for an instant already read (one clock read serves two uses).
pub fn ms_at(at: Instant) -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    at.saturating_duration_since(*START.get_or_init(Instant::now))
        .as_millis() as u64
}

fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Passive ejection policy (nginx's `max_fails` / `fail_timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassivePolicy {
    /// Failures within the window that eject the replica.
    pub max_fails: u32,
    /// Window length, and the rest time after ejection.
    pub fail_timeout: Duration,
}

/// One replica of an upstream.
pub struct Replica {
    /// Unique for the life of the process; used to exclude already-tried replicas.
    pub id: u64,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Balancing weight.
    pub weight: u32,
    /// Connection settings for this replica (address and upstream timeouts).
    pub peer: HttpPeer,
    /// Verdict of active health checks: true until a check says otherwise for a replica of
    /// the start (or of a set with no healthy replica), false until `rise` checks pass for one
    /// that joins a set that has healthy replicas.
    active_healthy: AtomicBool,
    /// No check has given a verdict yet and the first one decides alone (a start-up replica).
    first_check_decides: AtomicBool,
    /// Consecutive check results that disagree with `active_healthy`.
    active_streak: AtomicU32,
    /// Failures in the current passive window.
    fails: AtomicU32,
    window_start_ms: AtomicU64,
    /// 0 when not ejected; otherwise when the rest ends and one probe may go.
    ejected_until_ms: AtomicU64,
    /// A probe request is in flight.
    probing: AtomicBool,
    /// Requests in flight.
    outstanding: AtomicU32,
}

impl Replica {
    /// A healthy replica. `template` carries the upstream's connection options.
    pub fn new(addr: SocketAddr, weight: u32, template: Option<&HttpPeer>) -> Replica {
        Replica::with_state(addr, weight, template, true)
    }

    /// A replica that joins a set whose other replicas are checked and healthy: it takes no
    /// traffic until `rise` active checks pass.
    pub fn joining(addr: SocketAddr, weight: u32, template: Option<&HttpPeer>) -> Replica {
        Replica::with_state(addr, weight, template, false)
    }

    fn with_state(
        addr: SocketAddr,
        weight: u32,
        template: Option<&HttpPeer>,
        healthy: bool,
    ) -> Replica {
        let peer = match template {
            Some(t) => {
                let mut p = t.clone();
                p._address = pingora::protocols::l4::socket::SocketAddr::Inet(addr);
                p
            }
            None => HttpPeer::new(addr, false, String::new()),
        };
        Replica {
            id: next_id(),
            addr,
            weight: weight.max(1),
            peer,
            active_healthy: AtomicBool::new(healthy),
            first_check_decides: AtomicBool::new(healthy),
            active_streak: AtomicU32::new(0),
            fails: AtomicU32::new(0),
            window_start_ms: AtomicU64::new(0),
            ejected_until_ms: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            outstanding: AtomicU32::new(0),
        }
    }

    /// Can take a request now (healthy, or resting with no probe in flight).
    pub fn is_available(&self, now_ms: u64) -> bool {
        if !self.active_healthy.load(Ordering::Relaxed) {
            return false;
        }
        match self.ejected_until_ms.load(Ordering::Relaxed) {
            0 => true,
            until => now_ms >= until && !self.probing.load(Ordering::Relaxed),
        }
    }

    /// Ejected, rest over: the next request is a probe.
    pub fn is_resting(&self, now_ms: u64) -> bool {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        until != 0 && now_ms >= until
    }

    /// Ejected by passive checks and still resting.
    pub fn is_ejected(&self, now_ms: u64) -> bool {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        until != 0 && (now_ms < until || self.probing.load(Ordering::Relaxed))
    }

    /// Claims the single probe of a resting replica.
    pub fn try_begin_probe(&self) -> bool {
        self.probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    /// Gives back a probe that ended with no verdict (the client went away).
    pub fn release_probe(&self) {
        self.probing.store(false, Ordering::Release);
    }

    /// The active health verdict.
    pub fn is_active_healthy(&self) -> bool {
        self.active_healthy.load(Ordering::Relaxed)
    }

    /// A request got a response from this replica: ends an ejection.
    pub fn report_success(&self) {
        if self.ejected_until_ms.load(Ordering::Relaxed) != 0 {
            self.fails.store(0, Ordering::Relaxed);
            self.ejected_until_ms.store(0, Ordering::Relaxed);
            self.probing.store(false, Ordering::Release);
        }
    }

    /// A request to this replica failed (connect error, timeout, broken response).
    /// `may_eject` is false when no other replica could take over. Returns true when this
    /// failure ejected the replica.
    pub fn report_failure(&self, policy: &PassivePolicy, now_ms: u64, may_eject: bool) -> bool {
        let rest = policy.fail_timeout.as_millis() as u64;
        if self.ejected_until_ms.load(Ordering::Relaxed) != 0 {
            // A failed probe (or a straggler): rest again.
            self.ejected_until_ms
                .store(now_ms + rest, Ordering::Relaxed);
            self.probing.store(false, Ordering::Release);
            return false;
        }
        let start = self.window_start_ms.load(Ordering::Relaxed);
        let fails = if start == 0 || now_ms.saturating_sub(start) > rest {
            self.window_start_ms.store(now_ms.max(1), Ordering::Relaxed);
            self.fails.store(1, Ordering::Relaxed);
            1
        } else {
            self.fails.fetch_add(1, Ordering::Relaxed) + 1
        };
        if fails >= policy.max_fails && may_eject {
            self.ejected_until_ms
                .store((now_ms + rest).max(1), Ordering::Relaxed);
            self.window_start_ms.store(0, Ordering::Relaxed);
            self.fails.store(0, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// The replica's state for the admin views, and why: `healthy`, `waiting` (for its first
    /// check, or for `rise` passes), `unhealthy` (failing active checks), `ejected` (passive
    /// checks, resting), `probing` (its rest is over; the next request tests it).
    /// `active_checks` says whether its upstream runs active checks at all.
    pub fn state(&self, now_ms: u64, active_checks: bool) -> (&'static str, &'static str) {
        if active_checks && self.awaiting_first_check() {
            return ("waiting", "waiting for its first active check");
        }
        if !self.is_active_healthy() {
            return match self.active_streak.load(Ordering::Relaxed) {
                0 => ("unhealthy", "failing active checks"),
                _ => ("waiting", "passing active checks, not yet `rise` in a row"),
            };
        }
        if self.is_ejected(now_ms) {
            return match self.is_resting(now_ms) {
                true => ("probing", "rest over: one probe request is in flight"),
                false => ("ejected", "ejected by passive checks, resting"),
            };
        }
        if self.is_resting(now_ms) {
            return ("probing", "rest over: the next request is a probe");
        }
        ("healthy", "")
    }

    /// A start-up replica whose first active check has not answered yet.
    pub fn awaiting_first_check(&self) -> bool {
        self.first_check_decides.load(Ordering::Relaxed)
    }

    /// Records one active check result with rise/fall thresholds; the first check of a
    /// start-up replica decides alone. Returns `Some(new_state)` when the verdict flips.
    pub fn record_check(&self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        if self.first_check_decides.swap(false, Ordering::Relaxed) {
            self.active_healthy.store(ok, Ordering::Relaxed);
            self.active_streak.store(0, Ordering::Relaxed);
            return (!ok).then_some(false);
        }
        let healthy = self.active_healthy.load(Ordering::Relaxed);
        if ok == healthy {
            self.active_streak.store(0, Ordering::Relaxed);
            return None;
        }
        let streak = self.active_streak.fetch_add(1, Ordering::Relaxed) + 1;
        if streak >= if ok { rise } else { fall } {
            self.active_healthy.store(ok, Ordering::Relaxed);
            self.active_streak.store(0, Ordering::Relaxed);
            if ok {
                // A replica that passes checks again also leaves passive ejection.
                self.report_success();
            }
            return Some(ok);
        }
        None
    }

    /// A request starts on this replica.
    pub fn begin_request(&self) {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
    }

    /// A request on this replica ended.
    pub fn end_request(&self) {
        self.outstanding.fetch_sub(1, Ordering::Relaxed);
    }

    /// Requests in flight.
    pub fn outstanding(&self) -> u32 {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Load relative to weight, for least-requests comparison (scaled to stay integral).
    pub fn load_score(&self) -> u64 {
        u64::from(self.outstanding()) * 10_000 / u64::from(self.weight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: PassivePolicy = PassivePolicy {
        max_fails: 2,
        fail_timeout: Duration::from_secs(10),
    };

    #[test]
    fn passive_ejection_then_one_probe() {
        let r = Replica::new("127.0.0.1:1".parse().unwrap(), 1, None);
        assert!(!r.report_failure(&POLICY, 1_000, true));
        assert!(r.is_available(1_000));
        assert!(
            r.report_failure(&POLICY, 2_000, true),
            "second failure in the window ejects"
        );
        assert!(!r.is_available(5_000));
        // After the rest, one probe is allowed.
        assert!(r.is_available(12_001));
        assert!(r.try_begin_probe());
        assert!(!r.is_available(12_002), "only one probe at a time");
        assert!(!r.try_begin_probe());
        // Probe fails: rest again.
        r.report_failure(&POLICY, 12_100, true);
        assert!(!r.is_available(15_000));
        assert!(r.is_available(22_101));
        assert!(r.try_begin_probe());
        r.report_success();
        assert!(r.is_available(22_200));
        assert!(!r.is_resting(22_200));
    }

    #[test]
    fn the_last_replica_is_not_ejected() {
        let r = Replica::new("127.0.0.1:1".parse().unwrap(), 1, None);
        assert!(!r.report_failure(&POLICY, 1_000, false));
        assert!(!r.report_failure(&POLICY, 1_001, false));
        assert!(r.is_available(1_002));
    }

    #[test]
    fn failures_outside_window_do_not_add_up() {
        let r = Replica::new("127.0.0.1:1".parse().unwrap(), 1, None);
        assert!(!r.report_failure(&POLICY, 1_000, true));
        assert!(
            !r.report_failure(&POLICY, 20_000, true),
            "window expired, count restarts"
        );
        assert!(r.is_available(20_000));
    }

    #[test]
    fn the_first_check_of_a_start_up_replica_decides_alone() {
        let up = Replica::new("127.0.0.1:1".parse().unwrap(), 1, None);
        assert!(up.awaiting_first_check() && up.is_available(0));
        assert_eq!(up.record_check(false, 2, 3), Some(false));
        assert!(!up.awaiting_first_check() && !up.is_available(0));
        let fine = Replica::new("127.0.0.1:2".parse().unwrap(), 1, None);
        assert_eq!(fine.record_check(true, 2, 3), None);
        assert!(fine.is_available(0));
    }

    #[test]
    fn a_joining_replica_waits_for_rise_passes() {
        let r = Replica::joining("127.0.0.1:1".parse().unwrap(), 1, None);
        assert!(!r.is_available(0) && !r.awaiting_first_check());
        assert_eq!(r.record_check(true, 2, 3), None);
        assert!(!r.is_available(0));
        assert_eq!(r.record_check(true, 2, 3), Some(true));
        assert!(r.is_available(0));
    }

    #[test]
    fn rise_and_fall() {
        let r = Replica::new("127.0.0.1:1".parse().unwrap(), 1, None);
        // The first check decides alone; thresholds apply from the second.
        assert_eq!(r.record_check(true, 2, 3), None);
        assert_eq!(r.record_check(false, 2, 3), None);
        assert_eq!(r.record_check(false, 2, 3), None);
        assert_eq!(
            r.record_check(true, 2, 3),
            None,
            "a success resets the streak"
        );
        assert_eq!(r.record_check(false, 2, 3), None);
        assert_eq!(r.record_check(false, 2, 3), None);
        assert_eq!(r.record_check(false, 2, 3), Some(false));
        assert!(!r.is_available(0));
        assert_eq!(r.record_check(true, 2, 3), None);
        assert_eq!(r.record_check(true, 2, 3), Some(true));
        assert!(r.is_available(0));
    }
}
