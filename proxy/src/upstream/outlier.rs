//! Outlier detection: Envoy's consecutive-failure detectors.
//!
//! - `consecutive_5xx`: N 5xx in a row (local-origin failures count as 503/504 unless
//!   `split_external_local_origin_errors`).
//! - `consecutive_gateway_failure`: N of 502/503/504 in a row.
//! - `consecutive_local_origin_failure`: N connect failures/timeouts/resets in a row, only
//!   when `split_external_local_origin_errors` is set.
//!
//! Any non-5xx response resets the HTTP counters; a successful connect (or any response)
//! resets the local-origin counter. Reaching a threshold resets that counter and, with probability `enforcing_*`%,
//! ejects the host for `base_ejection_time × k` (capped by `max(base_ejection_time,
//! max_ejection_time)`), where `k` grows by one with each ejection and shrinks by one for each
//! `interval` the host spends back in service, as in Envoy. At most `max_ejection_percent` of
//! the cluster's hosts are ejected at once, but one host can always be ejected ("will eject
//! at least one host regardless of the value").
//!
//! Differences from Envoy, both deliberate: a host returns to service exactly when its
//! ejection time has passed (checked lazily by the next pick) instead of at the next
//! `interval` tick; and a counter is reset whenever its threshold is reached, even when the
//! host was already ejected, so that a host in panic-mode rotation can be ejected again after
//! it returns. Success-rate and failure-percentage detectors are not implemented.
//!
//! Per-host counters are atomics updated by every worker. The cluster-wide part (how many
//! hosts are ejected, when the next one returns, and an epoch that tells the load balancer to
//! rebuild) lives in [`DetectorShared`].

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use sluice_config::model::OutlierDetection;

use crate::upstream::cluster::ClusterCore;
use crate::upstream::host::Outcome;
use crate::upstream::stats::inc;

/// Nanoseconds since a cluster-local epoch: what the atomics store.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    epoch: Instant,
}

impl Clock {
    pub(crate) fn new() -> Self {
        Clock { epoch: Instant::now() }
    }

    pub(crate) fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }
}

/// Cluster-wide outlier state.
#[derive(Debug)]
pub(crate) struct DetectorShared {
    /// Hosts currently ejected.
    pub ejected: AtomicU64,
    /// Hosts in the cluster (the denominator of `max_ejection_percent`).
    pub total_hosts: AtomicU64,
    /// Earliest `ejected_until` of any ejected host (`u64::MAX`: none).
    pub next_unejection: AtomicU64,
    /// Bumped whenever the set of hosts eligible for load balancing may have changed.
    pub epoch: AtomicU64,
}

impl Default for DetectorShared {
    fn default() -> Self {
        DetectorShared {
            ejected: AtomicU64::new(0),
            total_hosts: AtomicU64::new(0),
            next_unejection: AtomicU64::new(u64::MAX),
            epoch: AtomicU64::new(0),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Detector {
    Consecutive5xx,
    GatewayFailure,
    LocalOrigin,
}

/// Per-host outlier state.
#[derive(Debug, Default)]
pub(crate) struct HostMonitor {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    consecutive_local: AtomicU32,
    /// Clock nanos at which the ejection ends; 0 when not ejected.
    ejected_until: AtomicU64,
    /// The ejection-time multiplier `k`.
    backoff: AtomicU32,
    /// Clock nanos of the last return to service.
    last_unejected: AtomicU64,
    num_ejections: AtomicU64,
}

/// Increments a consecutive counter; true when it reached `threshold` (and was reset).
fn bump(counter: &AtomicU32, threshold: u32) -> bool {
    if threshold == 0 {
        return false;
    }
    let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
    if n >= threshold {
        counter.store(0, Ordering::Relaxed);
        true
    } else {
        false
    }
}

/// Resets a counter without writing to its cache line when it is already zero (the common
/// case on the success path).
fn reset(counter: &AtomicU32) {
    if counter.load(Ordering::Relaxed) != 0 {
        counter.store(0, Ordering::Relaxed);
    }
}

fn enforce(percent: u32) -> bool {
    percent >= 100 || (percent > 0 && rand::random_range(0..100u32) < percent)
}

impl HostMonitor {
    pub(crate) fn is_ejected(&self) -> bool {
        self.ejected_until.load(Ordering::Relaxed) != 0
    }

    pub(crate) fn ejected_until(&self) -> u64 {
        self.ejected_until.load(Ordering::Relaxed)
    }

    pub(crate) fn num_ejections(&self) -> u64 {
        self.num_ejections.load(Ordering::Relaxed)
    }

    pub(crate) fn record(&self, od: &OutlierDetection, core: &ClusterCore, outcome: Outcome, now: u64) {
        let split = od.split_external_local_origin_errors;
        match outcome {
            Outcome::Status(code) => {
                if split {
                    reset(&self.consecutive_local);
                }
                self.http_code(od, core, code, now)
            }
            Outcome::LocalOriginSuccess => {
                if split {
                    reset(&self.consecutive_local);
                }
            }
            Outcome::ConnectFailed | Outcome::LocalOriginFailure | Outcome::Reset | Outcome::Timeout if split => {
                if bump(&self.consecutive_local, od.consecutive_local_origin_failure) {
                    self.detected(od, core, Detector::LocalOrigin, now);
                }
            }
            Outcome::ConnectFailed | Outcome::LocalOriginFailure | Outcome::Reset => self.http_code(od, core, 503, now),
            Outcome::Timeout => self.http_code(od, core, 504, now),
        }
    }

    fn http_code(&self, od: &OutlierDetection, core: &ClusterCore, code: u16, now: u64) {
        if !(500..600).contains(&code) {
            reset(&self.consecutive_5xx);
            reset(&self.consecutive_gateway);
            return;
        }
        if matches!(code, 502..=504) {
            if bump(&self.consecutive_gateway, od.consecutive_gateway_failure) {
                self.detected(od, core, Detector::GatewayFailure, now);
            }
        } else {
            reset(&self.consecutive_gateway);
        }
        if bump(&self.consecutive_5xx, od.consecutive_5xx) {
            self.detected(od, core, Detector::Consecutive5xx, now);
        }
    }

    fn detected(&self, od: &OutlierDetection, core: &ClusterCore, detector: Detector, now: u64) {
        let stats = &core.stats;
        let (detected, enforced, enforcing) = match detector {
            Detector::Consecutive5xx => (
                &stats.ejections_detected_consecutive_5xx,
                &stats.ejections_enforced_consecutive_5xx,
                od.enforcing_consecutive_5xx,
            ),
            Detector::GatewayFailure => (
                &stats.ejections_detected_consecutive_gateway_failure,
                &stats.ejections_enforced_consecutive_gateway_failure,
                od.enforcing_consecutive_gateway_failure,
            ),
            Detector::LocalOrigin => (
                &stats.ejections_detected_consecutive_local_origin_failure,
                &stats.ejections_enforced_consecutive_local_origin_failure,
                od.enforcing_consecutive_local_origin_failure,
            ),
        };
        inc(detected);
        if self.is_ejected() {
            return;
        }
        let shared = &core.outlier;
        let total = shared.total_hosts.load(Ordering::Relaxed);
        let max_percent = u64::from(od.max_ejection_percent.min(100));
        let mut ejected = shared.ejected.load(Ordering::Relaxed);
        let allowed = |ejected: u64| ejected == 0 || (ejected + 1) * 100 <= max_percent * total;
        if !allowed(ejected) {
            inc(&stats.ejections_overflow);
            return;
        }
        if !enforce(enforcing) {
            return;
        }
        loop {
            if !allowed(ejected) {
                inc(&stats.ejections_overflow);
                return;
            }
            match shared.ejected.compare_exchange_weak(ejected, ejected + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => break,
                Err(now) => ejected = now,
            }
        }
        let until = now.saturating_add(self.ejection_time(od, now)).max(1);
        if self.ejected_until.compare_exchange(0, until, Ordering::AcqRel, Ordering::Relaxed).is_err() {
            // Another worker ejected the host at the same moment.
            shared.ejected.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        self.num_ejections.fetch_add(1, Ordering::Relaxed);
        inc(&stats.ejections_enforced_total);
        inc(enforced);
        stats.ejections_active.store(shared.ejected.load(Ordering::Relaxed), Ordering::Relaxed);
        shared.next_unejection.fetch_min(until, Ordering::AcqRel);
        shared.epoch.fetch_add(1, Ordering::AcqRel);
        tracing::info!(cluster = %core.config.name, ?detector, "outlier detection ejected a host");
    }

    /// `base_ejection_time × k`, with `k` first decayed by the intervals spent in service and
    /// then incremented for this ejection.
    fn ejection_time(&self, od: &OutlierDetection, now: u64) -> u64 {
        let base = u64::try_from(od.base_ejection_time.as_nanos()).unwrap_or(u64::MAX);
        let max = u64::try_from(od.max_ejection_time.as_nanos()).unwrap_or(u64::MAX).max(base);
        let interval = u64::try_from(od.interval.as_nanos()).unwrap_or(u64::MAX).max(1);
        let mut k = self.backoff.load(Ordering::Relaxed);
        let last = self.last_unejected.load(Ordering::Relaxed);
        if k > 0 && last > 0 {
            let intervals = now.saturating_sub(last) / interval;
            k = k.saturating_sub(u32::try_from(intervals).unwrap_or(u32::MAX));
        }
        // Envoy stops growing the multiplier once the cap is reached.
        if base.saturating_mul(u64::from(k)) < max {
            k += 1;
        }
        let k = k.max(1);
        self.backoff.store(k, Ordering::Relaxed);
        base.saturating_mul(u64::from(k)).min(max)
    }

    /// Returns the host to service if its ejection ended by `now`; true if it did. The caller
    /// holds the cluster's rebuild lock and recounts [`DetectorShared::ejected`].
    pub(crate) fn try_uneject(&self, now: u64) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        if until == 0 || until > now {
            return false;
        }
        if self.ejected_until.compare_exchange(until, 0, Ordering::AcqRel, Ordering::Relaxed).is_err() {
            return false;
        }
        self.last_unejected.store(now.max(1), Ordering::Relaxed);
        reset(&self.consecutive_5xx);
        reset(&self.consecutive_gateway);
        reset(&self.consecutive_local);
        true
    }

    /// Clears an ejection when the host leaves the cluster.
    pub(crate) fn clear(&self) -> bool {
        self.ejected_until.swap(0, Ordering::AcqRel) != 0
    }
}
