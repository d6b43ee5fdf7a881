//! Load balancing over a cluster's hosts.
//!
//! An [`LbState`] is an immutable snapshot built from the host set whenever membership or
//! ejections change; picking from it is lock-free. It holds one [`Level`] per priority, each
//! with the hosts eligible there and the precomputed structure of the policy (round-robin
//! schedule, weight table, hash ring, Maglev table).
//!
//! Health and panic follow Envoy: a host is healthy when its EDS health is UNKNOWN, HEALTHY or
//! DEGRADED and outlier detection has not ejected it; DRAINING hosts never get new requests.
//! If the healthy share of a priority falls below `healthy_panic_threshold` percent, that
//! priority balances across all its hosts (panic mode). Load spills from a priority to the
//! next by Envoy's formula (each priority's health is `min(100, 1.4 × healthy%)`). Where Envoy
//! decides panic from the *normalized total* health across priorities, Sluice decides it per
//! priority; with a single priority, the common case, they agree.

mod maglev;
mod picker;
mod ring_hash;

use std::collections::BTreeMap;
use std::sync::Arc;

use sluice_config::model::LbPolicy;

use crate::upstream::host::Host;
use crate::upstream::stats::{ClusterStats, inc};

pub(crate) use picker::Picker;

/// Envoy's default overprovisioning factor (1.4), in percent.
const OVERPROVISIONING: u64 = 140;

/// How many times a pick is repeated to avoid hosts a retry already tried.
const RETRY_PICKS: u32 = 3;

pub(crate) struct LbState {
    /// The detector epoch this state was built for.
    pub epoch: u64,
    levels: Vec<Level>,
    /// Cumulative share of traffic per level, in percent; the last one is 100.
    cumulative_load: Vec<u32>,
}

struct Level {
    hosts: Vec<Arc<Host>>,
    picker: Picker,
    panic: bool,
}

/// What a pick needs from the request.
pub(crate) struct PickInput<'a> {
    pub hash: Option<u64>,
    pub tried: &'a [Arc<Host>],
}

impl LbState {
    pub(crate) fn empty() -> Self {
        LbState { epoch: u64::MAX, levels: Vec::new(), cumulative_load: Vec::new() }
    }

    /// Builds the balancer for `hosts` and updates the membership gauges.
    pub(crate) fn build(
        policy: &LbPolicy,
        hosts: &[Arc<Host>],
        panic_threshold: f64,
        epoch: u64,
        stats: &ClusterStats,
    ) -> Self {
        let mut by_priority: BTreeMap<u32, Vec<Arc<Host>>> = BTreeMap::new();
        let mut healthy_total = 0u64;
        for host in hosts {
            if host.is_healthy() {
                healthy_total += 1;
            }
            if !host.is_excluded() {
                by_priority.entry(host.priority()).or_default().push(host.clone());
            }
        }
        stats.membership_total.store(hosts.len() as u64, std::sync::atomic::Ordering::Relaxed);
        stats.membership_healthy.store(healthy_total, std::sync::atomic::Ordering::Relaxed);

        let mut levels = Vec::with_capacity(by_priority.len());
        let mut health = Vec::with_capacity(by_priority.len());
        for (_, all) in by_priority {
            let healthy: Vec<Arc<Host>> = all.iter().filter(|h| h.is_healthy()).cloned().collect();
            let total = all.len() as u64;
            let healthy_count = healthy.len() as u64;
            let healthy_percent = 100.0 * healthy_count as f64 / total as f64;
            let panic = panic_threshold > 0.0 && healthy_percent < panic_threshold;
            health.push((healthy_count * OVERPROVISIONING / total).min(100));
            let members = if panic { all } else { healthy };
            let picker = Picker::build(policy, &members);
            levels.push(Level { hosts: members, picker, panic });
        }
        let cumulative_load = priority_load(&health);
        LbState { epoch, levels, cumulative_load }
    }

    /// Picks a host, preferring one not in `input.tried`.
    pub(crate) fn pick(&self, input: &PickInput<'_>, stats: &ClusterStats) -> Option<Arc<Host>> {
        let level = match self.levels.len() {
            0 => return None,
            1 => &self.levels[0],
            _ => {
                let roll = rand::random_range(0..100u32);
                let i = self.cumulative_load.iter().position(|&c| roll < c).unwrap_or(0);
                &self.levels[i]
            }
        };
        if level.hosts.is_empty() {
            return None;
        }
        if level.panic {
            inc(&stats.lb_healthy_panic);
        }
        Some(level.pick(input).clone())
    }
}

impl Level {
    fn pick(&self, input: &PickInput<'_>) -> &Arc<Host> {
        let hosts = &self.hosts;
        if hosts.len() == 1 {
            return &hosts[0];
        }
        let tried = |h: &Arc<Host>| input.tried.iter().any(|t| Arc::ptr_eq(t, h));
        let mut last = 0;
        for attempt in 0..RETRY_PICKS {
            last = self.picker.pick(hosts, input.hash, attempt);
            if !tried(&hosts[last]) {
                return &hosts[last];
            }
        }
        // Every pick hit a host already tried: take the next one that was not, if any.
        (1..hosts.len()).map(|d| &hosts[(last + d) % hosts.len()]).find(|h| !tried(h)).unwrap_or(&hosts[last])
    }
}

/// Envoy's priority load: each level takes up to its health (overprovisioned), the rest
/// spills to the next; when total health is below 100 the loads are scaled up to sum to 100.
/// Returns cumulative percentages.
fn priority_load(health: &[u64]) -> Vec<u32> {
    if health.is_empty() {
        return Vec::new();
    }
    let total: u64 = health.iter().sum::<u64>().min(100);
    let mut loads = vec![0u64; health.len()];
    let shares: Option<Vec<u64>> = health.iter().map(|&h| (h * 100).checked_div(total)).collect();
    match shares {
        // Nothing healthy anywhere: everything goes to the first priority (in panic).
        None => loads[0] = 100,
        Some(shares) => {
            let mut remaining = 100u64;
            for (load, share) in loads.iter_mut().zip(shares) {
                *load = share.min(remaining);
                remaining -= *load;
            }
            if remaining > 0 {
                let last_healthy = health.iter().rposition(|&h| h > 0).unwrap_or(0);
                loads[last_healthy] += remaining;
            }
        }
    }
    let mut acc = 0u64;
    loads
        .iter()
        .map(|l| {
            acc += l;
            u32::try_from(acc).unwrap_or(100)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_load_spills_like_envoy() {
        // P0 fully healthy takes everything.
        assert_eq!(priority_load(&[100, 100]), vec![100, 100]);
        // P0 at 50% healthy -> health 70; P1 healthy -> takes the remaining 30.
        assert_eq!(priority_load(&[70, 100]), vec![70, 100]);
        // P0 dead: all to P1.
        assert_eq!(priority_load(&[0, 100]), vec![0, 100]);
        // Total health 60 < 100: scaled up (35 -> 58, 25 -> 41, remainder to the last).
        assert_eq!(priority_load(&[35, 25]), vec![58, 100]);
        // Nothing healthy: all to P0.
        assert_eq!(priority_load(&[0, 0]), vec![100, 100]);
    }
}
