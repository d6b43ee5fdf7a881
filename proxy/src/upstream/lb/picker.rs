//! The per-policy pick over one priority level's hosts.
//!
//! - ROUND_ROBIN: a precomputed schedule over one weight cycle, in earliest-deadline-first
//!   order (host `i` with weight `w` appears at deadlines `1/w, 2/w, ..., w/w`), so that
//!   weights are exact over every full cycle and picks of a heavy host are spread out rather
//!   than bunched. The position is one shared atomic counter, started at a random offset so
//!   that independent proxies (and schedule rebuilds) do not hit hosts in lockstep.
//! - LEAST_REQUEST: `choice_count` random candidates (weighted by host weight when weights
//!   differ), keep the one with the fewest active requests per unit of weight. Envoy uses
//!   this "power of two choices" when weights are equal and a dynamic EDF otherwise; the
//!   weighted sampling here approximates the latter without shared mutable state.
//! - RANDOM: uniform, or weighted by host weight.
//! - RING_HASH / MAGLEV: see their modules; without a hash they behave like RANDOM.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use sluice_config::model::LbPolicy;

use crate::upstream::host::Host;
use crate::upstream::lb::maglev::Maglev;
use crate::upstream::lb::ring_hash::Ring;

/// Upper bound on the round-robin schedule length; larger weight sums are scaled down.
const MAX_SCHEDULE: u64 = 1 << 16;

pub(crate) enum Picker {
    RoundRobin { schedule: Box<[u32]>, next: AtomicUsize },
    LeastRequest { choices: u32, weights: Option<WeightTable> },
    Random { weights: Option<WeightTable> },
    Ring(Ring),
    Maglev(Maglev),
}

impl Picker {
    pub(crate) fn build(policy: &LbPolicy, hosts: &[Arc<Host>]) -> Picker {
        let weights: Vec<u32> = hosts.iter().map(|h| h.weight().max(1)).collect();
        match policy {
            LbPolicy::RoundRobin | LbPolicy::ClusterProvided => Picker::RoundRobin {
                schedule: round_robin_schedule(&weights),
                next: AtomicUsize::new(rand::random::<u32>() as usize),
            },
            LbPolicy::LeastRequest { choice_count } => {
                Picker::LeastRequest { choices: (*choice_count).max(2), weights: WeightTable::new(&weights) }
            }
            LbPolicy::Random => Picker::Random { weights: WeightTable::new(&weights) },
            LbPolicy::RingHash { minimum_ring_size, maximum_ring_size } => {
                Picker::Ring(Ring::build(hosts, &weights, *minimum_ring_size, *maximum_ring_size))
            }
            LbPolicy::Maglev { table_size } => Picker::Maglev(Maglev::build(hosts, &weights, *table_size)),
        }
    }

    /// Index of the chosen host. `attempt` > 0 asks for an alternative to an earlier pick
    /// (retries); hash-based policies then move away from the hash's host.
    pub(crate) fn pick(&self, hosts: &[Arc<Host>], hash: Option<u64>, attempt: u32) -> usize {
        let n = hosts.len();
        match self {
            Picker::RoundRobin { schedule, next } => {
                let i = next.fetch_add(1, Ordering::Relaxed);
                schedule[i % schedule.len()] as usize
            }
            Picker::Random { weights } => random_index(n, weights.as_ref()),
            Picker::LeastRequest { choices, weights } => {
                let mut best = random_index(n, weights.as_ref());
                for _ in 1..*choices {
                    let candidate = random_index(n, weights.as_ref());
                    if fewer_requests(&hosts[candidate], &hosts[best]) {
                        best = candidate;
                    }
                }
                best
            }
            Picker::Ring(ring) => ring.pick(hash.unwrap_or_else(rand::random), attempt),
            Picker::Maglev(table) => table.pick(hash.unwrap_or_else(rand::random), attempt),
        }
    }
}

/// `a` has fewer active requests than `b` per unit of weight: `(a+1)/wa < (b+1)/wb`.
fn fewer_requests(a: &Host, b: &Host) -> bool {
    let (ra, rb) = (u128::from(a.active_requests()) + 1, u128::from(b.active_requests()) + 1);
    ra * u128::from(b.weight().max(1)) < rb * u128::from(a.weight().max(1))
}

fn random_index(n: usize, weights: Option<&WeightTable>) -> usize {
    match weights {
        Some(t) => t.sample(rand::random_range(0..t.total())),
        None => rand::random_range(0..n),
    }
}

/// Cumulative weights for weighted random sampling; `None` from [`WeightTable::new`] when all
/// weights are equal (uniform sampling is then cheaper and identical).
pub(crate) struct WeightTable {
    cumulative: Box<[u64]>,
}

impl WeightTable {
    fn new(weights: &[u32]) -> Option<WeightTable> {
        let first = *weights.first()?;
        if weights.iter().all(|&w| w == first) {
            return None;
        }
        let mut acc = 0u64;
        let cumulative = weights
            .iter()
            .map(|&w| {
                acc += u64::from(w);
                acc
            })
            .collect();
        Some(WeightTable { cumulative })
    }

    fn total(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(1)
    }

    /// The index whose weight range contains `r` (in `0..total`).
    fn sample(&self, r: u64) -> usize {
        self.cumulative.partition_point(|&c| c <= r).min(self.cumulative.len() - 1)
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// One weight cycle of host indices in earliest-deadline-first order.
fn round_robin_schedule(weights: &[u32]) -> Box<[u32]> {
    if weights.is_empty() {
        return Box::new([0]);
    }
    let divisor = weights.iter().fold(0u64, |g, &w| gcd(g, u64::from(w))).max(1);
    let mut reduced: Vec<u64> = weights.iter().map(|&w| u64::from(w) / divisor).collect();
    let total: u64 = reduced.iter().sum();
    if total > MAX_SCHEDULE {
        // Keep proportions approximately; every host keeps at least one slot.
        for w in &mut reduced {
            *w = (*w * MAX_SCHEDULE / total).max(1);
        }
    }
    // (k, w, index): deadline k/w.
    let mut slots: Vec<(u64, u64, u32)> = Vec::with_capacity(reduced.iter().sum::<u64>() as usize);
    for (i, &w) in reduced.iter().enumerate() {
        let index = u32::try_from(i).unwrap_or(u32::MAX);
        slots.extend((1..=w).map(|k| (k, w, index)));
    }
    slots.sort_unstable_by(|a, b| {
        (u128::from(a.0) * u128::from(b.1)).cmp(&(u128::from(b.0) * u128::from(a.1))).then(a.2.cmp(&b.2))
    });
    slots.into_iter().map(|(_, _, i)| i).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_is_exact_and_smooth() {
        let s = round_robin_schedule(&[1, 2, 3]);
        assert_eq!(s.len(), 6);
        let count = |i| s.iter().filter(|&&x| x == i).count();
        assert_eq!((count(0), count(1), count(2)), (1, 2, 3));
        // The heaviest host is never picked three times in a row.
        assert!(!s.windows(3).any(|w| w.iter().all(|&x| x == 2)));
        // Equal weights: plain rotation; common factors are reduced away.
        assert_eq!(&*round_robin_schedule(&[5, 5, 5]), &[0, 1, 2]);
        assert_eq!(round_robin_schedule(&[100, 200]).len(), 3);
    }

    #[test]
    fn schedule_is_bounded_for_huge_weights() {
        let s = round_robin_schedule(&[1_000_000, 3_000_000, 1]);
        assert!(s.len() as u64 <= MAX_SCHEDULE + 1);
        assert!(s.contains(&2), "a tiny weight keeps a slot");
        let heavy = s.iter().filter(|&&x| x == 1).count();
        let light = s.iter().filter(|&&x| x == 0).count();
        assert!((2.9..3.1).contains(&(heavy as f64 / light as f64)));
    }

    #[test]
    fn weight_table_samples_ranges() {
        let t = WeightTable::new(&[1, 3]).expect("unequal weights");
        assert_eq!(t.total(), 4);
        assert_eq!(t.sample(0), 0);
        assert_eq!(t.sample(1), 1);
        assert_eq!(t.sample(3), 1);
        assert!(WeightTable::new(&[2, 2]).is_none());
    }
}
