//! MAGLEV: Google's Maglev consistent hashing, built the way Envoy builds it (same host keys,
//! same xxHash64 offsets and skips, same weighted fill order), so that a hash maps to the same
//! host as in Envoy for the same endpoint list.
//!
//! Every host fills table slots along its own permutation until the table (a prime size,
//! 65537 by default) is full; lookups are one modulo. Hosts get table shares proportional to
//! their weights, and removing a host disturbs few requests of the others.

use std::sync::Arc;

use crate::upstream::hash::xxhash64;
use crate::upstream::host::Host;

pub(crate) struct Maglev {
    table: Box<[u32]>,
}

struct BuildEntry {
    offset: u64,
    skip: u64,
    weight: f64,
    target: f64,
    next: u64,
}

impl Maglev {
    pub(crate) fn build(hosts: &[Arc<Host>], weights: &[u32], table_size: u64) -> Maglev {
        let keys: Vec<&str> = hosts.iter().map(|h| h.hash_key()).collect();
        Maglev::from_keys(&keys, weights, table_size)
    }

    pub(crate) fn from_keys(keys: &[&str], weights: &[u32], table_size: u64) -> Maglev {
        let size = table_size.max(2);
        let total: f64 = weights.iter().map(|&w| f64::from(w.max(1))).sum();
        if keys.is_empty() || total <= 0.0 {
            return Maglev { table: Box::new([]) };
        }
        let mut entries: Vec<BuildEntry> = keys
            .iter()
            .zip(weights)
            .map(|(key, &w)| BuildEntry {
                offset: xxhash64(key.as_bytes(), 0) % size,
                skip: xxhash64(key.as_bytes(), 1) % (size - 1) + 1,
                weight: f64::from(w.max(1)) / total,
                target: 0.0,
                next: 0,
            })
            .collect();
        let max_weight = entries.iter().map(|e| e.weight).fold(0.0, f64::max);
        let slot = |e: &BuildEntry| {
            ((u128::from(e.offset) + u128::from(e.skip) * u128::from(e.next)) % u128::from(size)) as usize
        };
        let mut table = vec![u32::MAX; usize::try_from(size).unwrap_or(usize::MAX)];
        let mut filled = 0u64;
        let mut iteration = 1u64;
        while filled < size {
            for (index, entry) in entries.iter_mut().enumerate() {
                if filled >= size {
                    break;
                }
                // A host of maximum weight fills a slot every iteration; one of a third of
                // that weight every third iteration.
                if (iteration as f64) * entry.weight < entry.target {
                    continue;
                }
                entry.target += max_weight;
                let mut c = slot(entry);
                while table[c] != u32::MAX {
                    entry.next += 1;
                    c = slot(entry);
                }
                table[c] = u32::try_from(index).unwrap_or(u32::MAX);
                entry.next += 1;
                filled += 1;
            }
            iteration += 1;
        }
        Maglev { table: table.into_boxed_slice() }
    }

    /// The host index for `hash`; for `attempt` > 0 the hash is perturbed as in Envoy.
    pub(crate) fn pick(&self, hash: u64, attempt: u32) -> usize {
        if self.table.is_empty() {
            return 0;
        }
        let hash = if attempt > 0 { hash ^ 0u64.wrapping_sub(u64::from(attempt)) } else { hash };
        self.table[(hash % self.table.len() as u64) as usize] as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.1.{i}:9000")).collect()
    }

    fn shares(m: &Maglev, n: usize) -> Vec<usize> {
        let mut counts = vec![0; n];
        for &i in m.table.iter() {
            counts[i as usize] += 1;
        }
        counts
    }

    #[test]
    fn equal_weights_fill_the_table_evenly() {
        let k = keys(7);
        let refs: Vec<&str> = k.iter().map(String::as_str).collect();
        let m = Maglev::from_keys(&refs, &[1; 7], 65537);
        let counts = shares(&m, 7);
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(max - min <= 1, "slots per host differ by at most one: {counts:?}");
        assert_eq!(counts.iter().sum::<usize>(), 65537);
    }

    #[test]
    fn weights_give_proportional_shares() {
        let k = keys(2);
        let refs: Vec<&str> = k.iter().map(String::as_str).collect();
        let m = Maglev::from_keys(&refs, &[1, 3], 65537);
        let counts = shares(&m, 2);
        let ratio = counts[1] as f64 / counts[0] as f64;
        assert!((2.9..3.1).contains(&ratio), "{counts:?}");
    }

    #[test]
    fn consistent_under_host_removal() {
        let all = keys(10);
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let m = Maglev::from_keys(&refs, &[1; 10], 65537);
        let removed = 6usize;
        let rest: Vec<&str> = refs.iter().enumerate().filter(|(i, _)| *i != removed).map(|(_, k)| *k).collect();
        let smaller = Maglev::from_keys(&rest, &[1; 9], 65537);
        let (mut survivors, mut disturbed) = (0, 0);
        for n in 0..20_000u64 {
            let h = xxhash64(format!("session-{n}").as_bytes(), 0);
            let before = refs[m.pick(h, 0)];
            assert_eq!(before, refs[m.pick(h, 0)]);
            let after = rest[smaller.pick(h, 0)];
            if before != refs[removed] {
                survivors += 1;
                if before != after {
                    disturbed += 1;
                }
            }
        }
        let share = disturbed as f64 / survivors as f64;
        assert!(share < 0.05, "few requests of the remaining hosts move, got {share}");
    }

    #[test]
    fn retry_attempt_changes_slot() {
        let k = keys(3);
        let refs: Vec<&str> = k.iter().map(String::as_str).collect();
        let m = Maglev::from_keys(&refs, &[1; 3], 65537);
        let h = 987_654_321;
        assert!((1..10).any(|a| m.pick(h, a) != m.pick(h, 0)));
    }
}
