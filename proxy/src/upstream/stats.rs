//! Per-cluster counters and gauges, named after Envoy's `cluster.<name>.*` statistics so that
//! dashboards and alerts carry over.
//!
//! Plain relaxed atomics shared by all workers: an increment is one uncontended-in-practice
//! `fetch_add`. The exporter walks them with [`ClusterStats::visit`].

use std::sync::atomic::{AtomicU64, Ordering};

use crate::upstream::error::UpstreamError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatKind {
    Counter,
    Gauge,
}

/// Cluster statistics. Counters only grow; gauges (`*_active`, `membership_*`) go both ways.
///
/// The router reports what only it sees with [`record_status`](Self::record_status),
/// [`record_error`](Self::record_error), [`record_timeout`](Self::record_timeout),
/// [`record_retry`](Self::record_retry) and [`no_healthy_upstream`](Self::no_healthy_upstream);
/// connection, breaker, outlier and membership statistics are maintained by this module.
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// Upstream request attempts (each retry counts).
    pub rq_total: AtomicU64,
    /// Responses by status class: index 0 is 1xx, ..., 4 is 5xx.
    pub rq_xx: [AtomicU64; 5],
    pub rq_retry: AtomicU64,
    pub rq_retry_success: AtomicU64,
    pub rq_timeout: AtomicU64,
    pub rq_per_try_timeout: AtomicU64,
    /// Requests rejected by `max_pending_requests` or `max_requests` (Envoy counts both here).
    pub rq_pending_overflow: AtomicU64,
    /// Retries rejected by `max_retries` or the retry budget.
    pub rq_retry_overflow: AtomicU64,
    /// Requests re-sent on a fresh connection because the pooled one turned out to be closed
    /// before any byte of the request was written.
    pub rq_reuse_retry: AtomicU64,
    /// Requests for which no host could be chosen.
    pub cx_none_healthy: AtomicU64,
    /// Requests that failed because no connection could be established.
    pub rq_pending_failure_eject: AtomicU64,
    /// Requests whose upstream connection or stream was reset (or spoke invalid HTTP).
    pub rq_rx_reset: AtomicU64,
    pub cx_total: AtomicU64,
    pub cx_active: AtomicU64,
    pub cx_connect_fail: AtomicU64,
    pub cx_connect_timeout: AtomicU64,
    /// Connections that would exceed `max_connections`.
    pub cx_overflow: AtomicU64,
    pub cx_idle_timeout: AtomicU64,
    pub cx_max_requests: AtomicU64,
    pub cx_max_duration_reached: AtomicU64,
    /// Pooled connections found closed (or with unexpected bytes) by the peer at checkout and
    /// thrown away instead of being used.
    pub cx_closed_before_reuse: AtomicU64,
    pub ejections_active: AtomicU64,
    pub ejections_enforced_total: AtomicU64,
    pub ejections_enforced_consecutive_5xx: AtomicU64,
    pub ejections_enforced_consecutive_gateway_failure: AtomicU64,
    pub ejections_enforced_consecutive_local_origin_failure: AtomicU64,
    pub ejections_detected_consecutive_5xx: AtomicU64,
    pub ejections_detected_consecutive_gateway_failure: AtomicU64,
    pub ejections_detected_consecutive_local_origin_failure: AtomicU64,
    /// Ejections not performed because of `max_ejection_percent`.
    pub ejections_overflow: AtomicU64,
    /// Host picks made in panic mode (healthy share below `healthy_panic_threshold`).
    pub lb_healthy_panic: AtomicU64,
    pub membership_healthy: AtomicU64,
    pub membership_total: AtomicU64,
    pub membership_change: AtomicU64,
    pub update_success: AtomicU64,
    pub update_failure: AtomicU64,
}

pub(crate) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn dec(c: &AtomicU64) {
    c.fetch_sub(1, Ordering::Relaxed);
}

impl ClusterStats {
    /// Counts a response status in its `upstream_rq_<N>xx` class.
    pub fn record_status(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        inc(&self.rq_xx[class]);
    }

    /// Counts a failed upstream attempt by cause (overflows are already counted by the
    /// breakers).
    pub fn record_error(&self, error: &UpstreamError) {
        match error {
            e if e.is_connect_failure() => inc(&self.rq_pending_failure_eject),
            UpstreamError::Reset { .. } | UpstreamError::RefusedStream | UpstreamError::Protocol(_) => {
                inc(&self.rq_rx_reset)
            }
            UpstreamError::NoHealthyUpstream => inc(&self.cx_none_healthy),
            _ => {}
        }
    }

    /// A route timeout (`upstream_rq_timeout`).
    pub fn record_timeout(&self) {
        inc(&self.rq_timeout);
    }

    /// A per-try timeout (`upstream_rq_per_try_timeout`).
    pub fn record_per_try_timeout(&self) {
        inc(&self.rq_per_try_timeout);
    }

    /// A retry was started (`upstream_rq_retry`).
    pub fn record_retry(&self) {
        inc(&self.rq_retry);
    }

    /// No host could be chosen for a request (`upstream_cx_none_healthy`).
    pub fn no_healthy_upstream(&self) {
        inc(&self.cx_none_healthy);
    }

    /// Calls `f(name, value, kind)` for every statistic, with Envoy's names (without the
    /// `cluster.<name>.` prefix).
    pub fn visit(&self, mut f: impl FnMut(&'static str, u64, StatKind)) {
        use StatKind::{Counter, Gauge};
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let stats: &[(&'static str, &AtomicU64, StatKind)] = &[
            ("upstream_rq_total", &self.rq_total, Counter),
            ("upstream_rq_1xx", &self.rq_xx[0], Counter),
            ("upstream_rq_2xx", &self.rq_xx[1], Counter),
            ("upstream_rq_3xx", &self.rq_xx[2], Counter),
            ("upstream_rq_4xx", &self.rq_xx[3], Counter),
            ("upstream_rq_5xx", &self.rq_xx[4], Counter),
            ("upstream_rq_retry", &self.rq_retry, Counter),
            ("upstream_rq_retry_success", &self.rq_retry_success, Counter),
            ("upstream_rq_timeout", &self.rq_timeout, Counter),
            ("upstream_rq_per_try_timeout", &self.rq_per_try_timeout, Counter),
            ("upstream_rq_pending_overflow", &self.rq_pending_overflow, Counter),
            ("upstream_rq_retry_overflow", &self.rq_retry_overflow, Counter),
            ("upstream_rq_reuse_retry", &self.rq_reuse_retry, Counter),
            ("upstream_cx_none_healthy", &self.cx_none_healthy, Counter),
            ("upstream_rq_pending_failure_eject", &self.rq_pending_failure_eject, Counter),
            ("upstream_rq_rx_reset", &self.rq_rx_reset, Counter),
            ("upstream_cx_total", &self.cx_total, Counter),
            ("upstream_cx_active", &self.cx_active, Gauge),
            ("upstream_cx_connect_fail", &self.cx_connect_fail, Counter),
            ("upstream_cx_connect_timeout", &self.cx_connect_timeout, Counter),
            ("upstream_cx_overflow", &self.cx_overflow, Counter),
            ("upstream_cx_idle_timeout", &self.cx_idle_timeout, Counter),
            ("upstream_cx_max_requests", &self.cx_max_requests, Counter),
            ("upstream_cx_max_duration_reached", &self.cx_max_duration_reached, Counter),
            ("upstream_cx_closed_before_reuse", &self.cx_closed_before_reuse, Counter),
            ("outlier_detection.ejections_active", &self.ejections_active, Gauge),
            ("outlier_detection.ejections_enforced_total", &self.ejections_enforced_total, Counter),
            ("outlier_detection.ejections_enforced_consecutive_5xx", &self.ejections_enforced_consecutive_5xx, Counter),
            (
                "outlier_detection.ejections_enforced_consecutive_gateway_failure",
                &self.ejections_enforced_consecutive_gateway_failure,
                Counter,
            ),
            (
                "outlier_detection.ejections_enforced_consecutive_local_origin_failure",
                &self.ejections_enforced_consecutive_local_origin_failure,
                Counter,
            ),
            ("outlier_detection.ejections_overflow", &self.ejections_overflow, Counter),
            ("lb_healthy_panic", &self.lb_healthy_panic, Counter),
            ("membership_healthy", &self.membership_healthy, Gauge),
            ("membership_total", &self.membership_total, Gauge),
            ("membership_change", &self.membership_change, Counter),
            ("update_success", &self.update_success, Counter),
            ("update_failure", &self.update_failure, Counter),
            ("outlier_detection.ejections_detected_consecutive_5xx", &self.ejections_detected_consecutive_5xx, Counter),
            (
                "outlier_detection.ejections_detected_consecutive_gateway_failure",
                &self.ejections_detected_consecutive_gateway_failure,
                Counter,
            ),
            (
                "outlier_detection.ejections_detected_consecutive_local_origin_failure",
                &self.ejections_detected_consecutive_local_origin_failure,
                Counter,
            ),
        ];
        for &(name, value, kind) in stats {
            f(name, load(value), kind);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes_and_visit() {
        let s = ClusterStats::default();
        s.record_status(200);
        s.record_status(204);
        s.record_status(503);
        s.record_status(101);
        let mut seen = std::collections::HashMap::new();
        s.visit(|name, v, _| {
            assert!(seen.insert(name, v).is_none(), "duplicate stat name {name}");
        });
        assert_eq!(seen["upstream_rq_2xx"], 2);
        assert_eq!(seen["upstream_rq_5xx"], 1);
        assert_eq!(seen["upstream_rq_1xx"], 1);
        assert_eq!(seen["upstream_rq_4xx"], 0);
    }
}
