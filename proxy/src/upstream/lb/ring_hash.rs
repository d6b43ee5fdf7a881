//! RING_HASH: Envoy's ketama-style consistent hash ring.
//!
//! Each host gets a number of ring entries proportional to its weight, hashed from
//! `"<address>_<i>"` with xxHash64, exactly as Envoy builds its ring; the ring size is the
//! smallest that gives the lightest host a whole number of entries for `minimum_ring_size`,
//! capped at `maximum_ring_size`. A request goes to the first entry at or after its hash.
//! Removing a host only moves the requests that were on it.

use std::sync::Arc;

use crate::upstream::hash::xxhash64;
use crate::upstream::host::Host;

pub(crate) struct Ring {
    /// (hash, host index), sorted by hash.
    entries: Box<[(u64, u32)]>,
}

impl Ring {
    pub(crate) fn build(hosts: &[Arc<Host>], weights: &[u32], min_size: u64, max_size: u64) -> Ring {
        let keys: Vec<&str> = hosts.iter().map(|h| h.hash_key()).collect();
        Ring::from_keys(&keys, weights, min_size, max_size)
    }

    pub(crate) fn from_keys(keys: &[&str], weights: &[u32], min_size: u64, max_size: u64) -> Ring {
        let total: f64 = weights.iter().map(|&w| f64::from(w.max(1))).sum();
        if keys.is_empty() || total <= 0.0 {
            return Ring { entries: Box::new([]) };
        }
        let max_size = max_size.max(1);
        let min_size = min_size.clamp(1, max_size);
        let normalized: Vec<f64> = weights.iter().map(|&w| f64::from(w.max(1)) / total).collect();
        let min_weight = normalized.iter().copied().fold(f64::INFINITY, f64::min);
        let scale = ((min_weight * min_size as f64).ceil() / min_weight).min(max_size as f64);
        let mut entries = Vec::with_capacity(scale.ceil() as usize);
        let (mut current, mut target) = (0.0f64, 0.0f64);
        let mut key = String::new();
        for (index, (name, weight)) in keys.iter().zip(&normalized).enumerate() {
            target += scale * weight;
            let mut i = 0u64;
            while current < target {
                key.clear();
                key.push_str(name);
                key.push('_');
                key.push_str(&i.to_string());
                entries.push((xxhash64(key.as_bytes(), 0), u32::try_from(index).unwrap_or(u32::MAX)));
                i += 1;
                current += 1.0;
            }
        }
        entries.sort_unstable_by_key(|e| e.0);
        Ring { entries: entries.into_boxed_slice() }
    }

    /// The host index for `hash`; `attempt` > 0 walks that many entries further, as Envoy does
    /// for retries that must avoid the previous host.
    pub(crate) fn pick(&self, hash: u64, attempt: u32) -> usize {
        let len = self.entries.len();
        if len == 0 {
            return 0;
        }
        let mut i = self.entries.partition_point(|e| e.0 < hash);
        if i == len {
            i = 0;
        }
        if attempt > 0 {
            i = (i + attempt as usize) % len;
        }
        self.entries[i].1 as usize
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:8080")).collect()
    }

    #[test]
    fn ring_size_follows_envoy_formula() {
        let k = keys(4);
        let refs: Vec<&str> = k.iter().map(String::as_str).collect();
        // Equal weights: min_ring 1024 -> 1024 entries, 256 per host.
        assert_eq!(Ring::from_keys(&refs, &[1, 1, 1, 1], 1024, 8_388_608).len(), 1024);
        // Capped by the maximum.
        assert_eq!(Ring::from_keys(&refs, &[1, 1, 1, 1], 1024, 6).len(), 6);
        // Weights 1:1:1:3: the lightest host gets ceil(1024 / 6) = 171 entries, the ring is
        // scaled to about 1026 and the heavy host has three times as many entries.
        let r = Ring::from_keys(&refs, &[1, 1, 1, 3], 1024, 8_388_608);
        let heavy = r.entries.iter().filter(|e| e.1 == 3).count();
        let light = r.entries.iter().filter(|e| e.1 == 0).count();
        assert!((171..=172).contains(&light), "{light}");
        assert!(heavy.abs_diff(3 * light) <= 3, "{heavy} vs {light}");
        assert!((1026..=1027).contains(&r.len()));
    }

    /// Requests not on a removed host stay where they were, provided every remaining host
    /// keeps its number of ring entries (Envoy rescales the ring to the host count, so with
    /// other sizes a few more requests move; see the next test).
    #[test]
    fn sticky_and_minimal_remapping() {
        let all = keys(10);
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        // 81 entries minimum: 9 per host with 10 hosts and with 9 hosts.
        let ring = Ring::from_keys(&refs, &[1; 10], 81, 8_388_608);
        let removed = 3usize;
        let rest: Vec<&str> = refs.iter().enumerate().filter(|(i, _)| *i != removed).map(|(_, k)| *k).collect();
        let smaller = Ring::from_keys(&rest, &[1; 9], 81, 8_388_608);
        assert_eq!((ring.len(), smaller.len()), (90, 81));
        let samples = 20_000u64;
        let mut moved = 0;
        for n in 0..samples {
            let h = xxhash64(format!("user-{n}").as_bytes(), 0);
            let before = refs[ring.pick(h, 0)];
            assert_eq!(before, refs[ring.pick(h, 0)], "same hash, same host");
            let after = rest[smaller.pick(h, 0)];
            if before == refs[removed] {
                moved += 1;
                assert_ne!(after, refs[removed]);
            } else {
                assert_eq!(before, after, "a request not on the removed host must stay where it was");
            }
        }
        let share = moved as f64 / samples as f64;
        assert!((0.03..0.2).contains(&share), "about a tenth of the requests move, got {share}");
    }

    #[test]
    fn most_requests_stay_when_the_ring_is_rescaled() {
        let all = keys(10);
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let ring = Ring::from_keys(&refs, &[1; 10], 1024, 8_388_608);
        let rest = &refs[..9];
        let smaller = Ring::from_keys(rest, &[1; 9], 1024, 8_388_608);
        let (mut survivors, mut disturbed) = (0, 0);
        for n in 0..20_000u64 {
            let h = xxhash64(format!("user-{n}").as_bytes(), 0);
            let before = refs[ring.pick(h, 0)];
            if before != refs[9] {
                survivors += 1;
                if before != rest[smaller.pick(h, 0)] {
                    disturbed += 1;
                }
            }
        }
        // 103 -> 114 entries per host: about a tenth of the ring is new.
        let share = disturbed as f64 / survivors as f64;
        assert!(share < 0.15, "{share}");
    }

    #[test]
    fn retry_attempt_moves_along_the_ring() {
        let all = keys(5);
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let ring = Ring::from_keys(&refs, &[1; 5], 16, 64);
        let h = 12345;
        let first = ring.pick(h, 0);
        let found_other = (1..ring.len() as u32).any(|a| ring.pick(h, a) != first);
        assert!(found_other);
    }
}
