//! Circuit breakers with Envoy's semantics: cluster-wide limits on connections, pending
//! requests, active requests and active retries (or a retry budget), shared by all workers.
//!
//! Each `try_*` either takes a slot and returns a RAII [`BreakerGuard`] that gives it back on
//! drop, or counts an overflow and returns `None`. The counters are plain atomics; a slot is
//! taken with a compare-and-swap so that the limit is never exceeded, even transiently.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sluice_config::model::CircuitBreakers;

use crate::upstream::stats::{ClusterStats, inc};

/// Which limit was hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverflowKind {
    Connections,
    Pending,
    Requests,
    Retries,
}

impl fmt::Display for OverflowKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OverflowKind::Connections => "max_connections",
            OverflowKind::Pending => "max_pending_requests",
            OverflowKind::Requests => "max_requests",
            OverflowKind::Retries => "max_retries",
        })
    }
}

#[derive(Debug)]
struct State {
    limits: CircuitBreakers,
    connections: AtomicU64,
    pending: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
    stats: Arc<ClusterStats>,
}

impl State {
    fn counter(&self, kind: OverflowKind) -> &AtomicU64 {
        match kind {
            OverflowKind::Connections => &self.connections,
            OverflowKind::Pending => &self.pending,
            OverflowKind::Requests => &self.requests,
            OverflowKind::Retries => &self.retries,
        }
    }
}

/// The circuit breakers of one cluster (priority DEFAULT; Sluice has no HIGH priority routing).
#[derive(Debug, Clone)]
pub struct Breakers {
    state: Arc<State>,
}

/// Holds one slot of a breaker; dropping it frees the slot.
#[derive(Debug)]
#[must_use = "the slot is released when the guard is dropped"]
pub struct BreakerGuard {
    state: Arc<State>,
    kind: OverflowKind,
}

impl Drop for BreakerGuard {
    fn drop(&mut self) {
        self.state.counter(self.kind).fetch_sub(1, Ordering::AcqRel);
    }
}

impl BreakerGuard {
    pub fn kind(&self) -> OverflowKind {
        self.kind
    }
}

impl Breakers {
    pub(crate) fn new(limits: CircuitBreakers, stats: Arc<ClusterStats>) -> Self {
        Breakers {
            state: Arc::new(State {
                limits,
                connections: AtomicU64::new(0),
                pending: AtomicU64::new(0),
                requests: AtomicU64::new(0),
                retries: AtomicU64::new(0),
                stats,
            }),
        }
    }

    pub fn limits(&self) -> &CircuitBreakers {
        &self.state.limits
    }

    /// `max_requests`: one slot per upstream request in flight. Envoy counts this overflow in
    /// `upstream_rq_pending_overflow`, and so do we.
    pub fn try_request(&self) -> Option<BreakerGuard> {
        self.acquire(
            OverflowKind::Requests,
            u64::from(self.state.limits.max_requests),
            &self.state.stats.rq_pending_overflow,
        )
    }

    /// `max_pending_requests`: one slot per request waiting for a connection.
    pub fn try_pending(&self) -> Option<BreakerGuard> {
        self.acquire(
            OverflowKind::Pending,
            u64::from(self.state.limits.max_pending_requests),
            &self.state.stats.rq_pending_overflow,
        )
    }

    /// `max_retries`, or the retry budget when one is configured: one slot per retry in
    /// flight.
    pub fn try_retry(&self) -> Option<BreakerGuard> {
        self.acquire(OverflowKind::Retries, self.retry_limit(), &self.state.stats.rq_retry_overflow)
    }

    /// `max_connections`: one slot per upstream connection (connecting or open).
    pub fn try_connection(&self) -> Option<BreakerGuard> {
        self.acquire(
            OverflowKind::Connections,
            u64::from(self.state.limits.max_connections),
            &self.state.stats.cx_overflow,
        )
    }

    /// Takes a connection slot regardless of the limit. Envoy does this when a worker's pool
    /// for a host has no connection at all, so that its pending requests cannot starve because
    /// other workers or hosts hold every slot.
    pub(crate) fn force_connection(&self) -> BreakerGuard {
        self.state.connections.fetch_add(1, Ordering::AcqRel);
        BreakerGuard { state: self.state.clone(), kind: OverflowKind::Connections }
    }

    /// How many retries may be in flight right now. With a `retry_budget` this is
    /// `max(budget_percent% of (active + pending requests), min_retry_concurrency)` and
    /// `max_retries` is ignored, as in Envoy.
    pub fn retry_limit(&self) -> u64 {
        match &self.state.limits.retry_budget {
            None => u64::from(self.state.limits.max_retries),
            Some(budget) => {
                let active = self.active_requests() + self.pending_requests();
                let allowed = (budget.budget_percent / 100.0 * active as f64) as u64;
                allowed.max(u64::from(budget.min_retry_concurrency))
            }
        }
    }

    pub fn active_requests(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }

    pub fn pending_requests(&self) -> u64 {
        self.state.pending.load(Ordering::Relaxed)
    }

    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::Relaxed)
    }

    pub fn active_retries(&self) -> u64 {
        self.state.retries.load(Ordering::Relaxed)
    }

    fn acquire(&self, kind: OverflowKind, limit: u64, overflow: &AtomicU64) -> Option<BreakerGuard> {
        let counter = self.state.counter(kind);
        let mut current = counter.load(Ordering::Relaxed);
        loop {
            if current >= limit {
                inc(overflow);
                return None;
            }
            match counter.compare_exchange_weak(current, current + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(BreakerGuard { state: self.state.clone(), kind }),
                Err(now) => current = now,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_config::model::RetryBudget;

    fn limits(max: u32) -> CircuitBreakers {
        CircuitBreakers {
            max_connections: max,
            max_pending_requests: max,
            max_requests: max,
            max_retries: max,
            retry_budget: None,
            explicit: true,
        }
    }

    #[test]
    fn overflow_and_release() {
        let stats = Arc::new(ClusterStats::default());
        let b = Breakers::new(limits(2), stats.clone());
        let g1 = b.try_request().expect("first slot");
        let g2 = b.try_request().expect("second slot");
        assert!(b.try_request().is_none());
        assert_eq!(stats.rq_pending_overflow.load(Ordering::Relaxed), 1);
        assert_eq!(b.active_requests(), 2);
        drop(g1);
        assert_eq!(b.active_requests(), 1);
        let _g3 = b.try_request().expect("slot freed by the drop");
        drop(g2);

        let _c1 = b.try_connection().unwrap();
        let _c2 = b.try_connection().unwrap();
        assert!(b.try_connection().is_none());
        assert_eq!(stats.cx_overflow.load(Ordering::Relaxed), 1);
        let forced = b.force_connection();
        assert_eq!(b.connections(), 3);
        drop(forced);
        assert_eq!(b.connections(), 2);

        let _p1 = b.try_pending().unwrap();
        let _p2 = b.try_pending().unwrap();
        assert!(b.try_pending().is_none());
        assert_eq!(stats.rq_pending_overflow.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn max_retries_without_budget() {
        let stats = Arc::new(ClusterStats::default());
        let b = Breakers::new(CircuitBreakers { max_retries: 1, ..limits(100) }, stats.clone());
        let r = b.try_retry().unwrap();
        assert!(b.try_retry().is_none());
        assert_eq!(stats.rq_retry_overflow.load(Ordering::Relaxed), 1);
        drop(r);
        assert!(b.try_retry().is_some());
    }

    #[test]
    fn retry_budget_math() {
        let stats = Arc::new(ClusterStats::default());
        let b = Breakers::new(
            CircuitBreakers {
                max_retries: 1000,
                retry_budget: Some(RetryBudget { budget_percent: 20.0, min_retry_concurrency: 3 }),
                ..limits(1000)
            },
            stats,
        );
        // No traffic: the floor applies, and max_retries (1000) is ignored.
        assert_eq!(b.retry_limit(), 3);
        let active: Vec<_> = (0..50).map(|_| b.try_request().unwrap()).collect();
        let pending: Vec<_> = (0..50).map(|_| b.try_pending().unwrap()).collect();
        // 20% of 100 active + pending.
        assert_eq!(b.retry_limit(), 20);
        let retries: Vec<_> = (0..20).map(|_| b.try_retry().unwrap()).collect();
        assert!(b.try_retry().is_none());
        drop(pending);
        // 20% of 50 = 10 < 20 in flight: no new retry until enough finish.
        assert_eq!(b.retry_limit(), 10);
        assert!(b.try_retry().is_none());
        drop(retries);
        drop(active);
        assert_eq!(b.retry_limit(), 3);
    }
}
