//! Replica sets and the balancing algorithms that pick from them.

use super::replica::Replica;
use crate::config::Balance;
use pingora_ketama::{Bucket, Continuum};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The replicas an upstream knows at one moment, with the precomputed tables the algorithms
/// use. Replaced as a whole (never mutated) when discovery changes the membership.
pub struct ReplicaSet {
    /// Replicas, sorted by address.
    pub replicas: Vec<Arc<Replica>>,
    /// Smooth weighted round-robin order of replica indices (nginx's algorithm, unrolled once).
    schedule: Vec<u16>,
    /// Ketama ring, only for `consistent_hash`.
    continuum: Option<Continuum>,
    /// Round-robin cursor.
    cursor: AtomicUsize,
}

/// The most entries a weighted round-robin schedule may have (weights are 1..=100 each).
const MAX_SCHEDULE: usize = 1 << 16;

impl ReplicaSet {
    /// Builds a set; `replicas` must be sorted by address and unique.
    pub fn new(replicas: Vec<Arc<Replica>>, balance: Balance) -> ReplicaSet {
        let schedule = smooth_wrr_schedule(&replicas);
        let continuum = (balance == Balance::ConsistentHash).then(|| {
            let buckets: Vec<Bucket> = replicas
                .iter()
                .map(|r| Bucket::new(r.addr, r.weight))
                .collect();
            Continuum::new(&buckets)
        });
        ReplicaSet {
            replicas,
            schedule,
            continuum,
            cursor: AtomicUsize::new(fastrand::usize(..usize::MAX / 2)),
        }
    }

    /// An empty set (nothing resolved yet).
    pub fn empty() -> ReplicaSet {
        ReplicaSet::new(Vec::new(), Balance::RoundRobin)
    }

    /// The addresses in this set, in order.
    pub fn addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.replicas.iter().map(|r| r.addr)
    }

    /// Picks a replica that is available now and not in `exclude` (ids of replicas already
    /// tried for this request). `hash` is the request's hash key for `consistent_hash`.
    /// The flag is true when the request is the single probe of a resting replica; the caller
    /// must then report its outcome (or [`Replica::release_probe`]).
    pub fn pick(
        &self,
        balance: Balance,
        hash: Option<&[u8]>,
        exclude: &[u64],
        now_ms: u64,
    ) -> Option<(Arc<Replica>, bool)> {
        let n = self.replicas.len();
        if n == 0 {
            return None;
        }
        let usable = |r: &Replica| !exclude.contains(&r.id) && r.is_available(now_ms);
        let chosen = match balance {
            Balance::RoundRobin => {
                let len = self.schedule.len();
                let start = self.cursor.fetch_add(1, Ordering::Relaxed);
                (0..len)
                    .map(|k| &self.replicas[usize::from(self.schedule[(start + k) % len])])
                    .find(|r| usable(r))
            }
            Balance::Random => {
                let len = self.schedule.len();
                let start = fastrand::usize(..len);
                (0..len)
                    .map(|k| &self.replicas[usize::from(self.schedule[(start + k) % len])])
                    .find(|r| usable(r))
            }
            Balance::LeastRequests => {
                // Two distinct replicas (drawing with replacement would compare a replica
                // with itself a 1/n of the time, and send a busy one traffic regardless).
                let i = fastrand::usize(..n);
                let j = if n > 1 {
                    (i + 1 + fastrand::usize(..n - 1)) % n
                } else {
                    i
                };
                let (a, b) = (&self.replicas[i], &self.replicas[j]);
                match (usable(a), usable(b)) {
                    (true, true) => Some(if b.load_score() < a.load_score() {
                        b
                    } else {
                        a
                    }),
                    (true, false) => Some(a),
                    (false, true) => Some(b),
                    // Both drawn replicas are out: take the least loaded usable one.
                    (false, false) => self
                        .replicas
                        .iter()
                        .filter(|r| usable(r))
                        .min_by_key(|r| r.load_score()),
                }
            }
            Balance::ConsistentHash => match (&self.continuum, hash) {
                (Some(ring), Some(key)) => {
                    let mut idx = ring.node_idx(key);
                    let mut found = None;
                    // Walk the ring from the key's point; each step is the next node clockwise.
                    for _ in 0..ring_walk_limit(n) {
                        let Some(addr) = ring.get_addr(&mut idx) else {
                            break;
                        };
                        if let Ok(i) = self.replicas.binary_search_by(|r| r.addr.cmp(addr)) {
                            if usable(&self.replicas[i]) {
                                found = Some(&self.replicas[i]);
                                break;
                            }
                        }
                    }
                    found
                }
                // No key in this request: spread like round robin.
                _ => {
                    let start = self.cursor.fetch_add(1, Ordering::Relaxed);
                    (0..n)
                        .map(|k| &self.replicas[(start + k) % n])
                        .find(|r| usable(r))
                }
            },
        };
        let chosen = chosen?;
        // A replica resting after ejection takes exactly one probe request.
        if chosen.is_resting(now_ms) {
            if chosen.try_begin_probe() {
                return Some((chosen.clone(), true));
            }
            return self
                .replicas
                .iter()
                .find(|r| {
                    !exclude.contains(&r.id) && r.is_available(now_ms) && !r.is_resting(now_ms)
                })
                .map(|r| (r.clone(), false));
        }
        Some((chosen.clone(), false))
    }

    /// Whether any replica outside `exclude` could take a request now.
    pub fn has_alternative(&self, exclude: &[u64], now_ms: u64) -> bool {
        self.replicas
            .iter()
            .any(|r| !exclude.contains(&r.id) && r.is_available(now_ms))
    }
}

fn ring_walk_limit(n: usize) -> usize {
    // Ketama places 160 points per unit of weight; enough steps to visit every node.
    n.saturating_mul(160 * 4).max(160)
}

/// nginx's smooth weighted round robin, run for one full cycle and recorded, so that picking
/// is a lock-free counter increment. Weights 2,1,1 give a,b,a,c (not a,a,b,c).
fn smooth_wrr_schedule(replicas: &[Arc<Replica>]) -> Vec<u16> {
    if replicas.is_empty() {
        return Vec::new();
    }
    let weights: Vec<i64> = replicas
        .iter()
        .map(|r| i64::from(r.weight.max(1)))
        .collect();
    let total: i64 = weights.iter().sum();
    if weights.iter().all(|w| *w == weights[0]) {
        return (0..replicas.len().min(MAX_SCHEDULE))
            .map(|i| i as u16)
            .collect();
    }
    let len = (total as usize).min(MAX_SCHEDULE);
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(len);
    for _ in 0..len {
        let mut best = 0;
        for i in 0..weights.len() {
            current[i] += weights[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best as u16);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(weights: &[u32], balance: Balance) -> ReplicaSet {
        let replicas = weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                Arc::new(Replica::new(
                    format!("127.0.0.{}:80", i + 1).parse().unwrap(),
                    *w,
                    None,
                ))
            })
            .collect();
        ReplicaSet::new(replicas, balance)
    }

    fn counts(s: &ReplicaSet, balance: Balance, n: usize) -> Vec<usize> {
        let mut c = vec![0; s.replicas.len()];
        for i in 0..n {
            let key = format!("k{i}");
            let r = s.pick(balance, Some(key.as_bytes()), &[], 0).unwrap().0;
            c[s.replicas.iter().position(|x| x.id == r.id).unwrap()] += 1;
        }
        c
    }

    #[test]
    fn smooth_schedule_interleaves() {
        let s = set(&[2, 1, 1], Balance::RoundRobin);
        assert_eq!(
            s.schedule,
            vec![0u16, 1, 2, 0],
            "a,b,c,a rather than a,a,b,c"
        );
    }

    #[test]
    fn weighted_round_robin_is_exact() {
        let s = set(&[3, 1], Balance::RoundRobin);
        assert_eq!(counts(&s, Balance::RoundRobin, 400), vec![300, 100]);
    }

    #[test]
    fn random_and_p2c_spread() {
        for b in [Balance::Random, Balance::LeastRequests] {
            let s = set(&[1, 1, 1], b);
            let c = counts(&s, b, 3000);
            assert!(c.iter().all(|&x| x > 700), "{b:?}: {c:?}");
        }
    }

    #[test]
    fn least_requests_avoids_busy() {
        let s = set(&[1, 1], Balance::LeastRequests);
        let busy = &s.replicas[0];
        for _ in 0..50 {
            busy.begin_request();
        }
        let c = counts(&s, Balance::LeastRequests, 400);
        assert!(c[1] > 290, "{c:?}");
    }

    #[test]
    fn consistent_hash_is_stable_and_moves_little() {
        let s = set(&[1, 1, 1, 1], Balance::ConsistentHash);
        let a = s
            .pick(Balance::ConsistentHash, Some(b"user-7"), &[], 0)
            .unwrap()
            .0;
        for _ in 0..10 {
            assert_eq!(
                s.pick(Balance::ConsistentHash, Some(b"user-7"), &[], 0)
                    .unwrap()
                    .0
                    .id,
                a.id
            );
        }
        // Excluding the owner moves the key to another replica, deterministically.
        let b = s
            .pick(Balance::ConsistentHash, Some(b"user-7"), &[a.id], 0)
            .unwrap()
            .0;
        assert_ne!(a.id, b.id);
        let c = counts(&s, Balance::ConsistentHash, 4000);
        assert!(c.iter().all(|&x| x > 500), "{c:?}");
    }

    #[test]
    fn exclusion_and_empty() {
        let s = set(&[1, 1], Balance::RoundRobin);
        let ids: Vec<u64> = s.replicas.iter().map(|r| r.id).collect();
        assert!(s.pick(Balance::RoundRobin, None, &ids, 0).is_none());
        assert!(!s.has_alternative(&ids, 0));
        assert!(s.has_alternative(&ids[..1], 0));
        assert!(ReplicaSet::empty()
            .pick(Balance::RoundRobin, None, &[], 0)
            .is_none());
    }
}
