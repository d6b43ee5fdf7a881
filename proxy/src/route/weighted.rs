//! Weighted cluster choice (`WeightedClusterSpecifierPlugin::pickWeightedCluster` in
//! `source/common/router/weighted_cluster_specifier.cc`): `sample % total` falls into one of
//! the half-open intervals `[0, w1)`, `[w1, w1 + w2)`, … laid out in configuration order, so a
//! cluster of weight 0 is never chosen.
//!
//! Sluice choice: newer Envoy versions also zero the weight of clusters without healthy hosts
//! ("health-aware" weighted clusters). That needs cluster health and belongs to the upstream
//! layer; this function is the configuration-only choice.

use sluice_config::model::{WeightedCluster, WeightedClusters};

/// The cluster for `sample` (any uniformly distributed value; Envoy uses the stream's random
/// value, the same one as the route's `runtime_fraction`). `None` only for a configuration
/// whose weights sum to 0, which the translator rejects.
pub fn pick_weighted(w: &WeightedClusters, sample: u64) -> Option<&WeightedCluster> {
    // The sum is recomputed rather than trusting `total_weight`, so a hand-built model whose
    // total disagrees with its weights still picks within the configured intervals. Cluster
    // lists are short; this is a handful of additions.
    let total: u64 = w.clusters.iter().map(|c| u64::from(c.weight)).sum();
    if total == 0 {
        return None;
    }
    let selected = sample % total;
    let mut end = 0u64;
    w.clusters.iter().find(|c| {
        end += u64::from(c.weight);
        selected < end
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clusters(weights: &[u32]) -> WeightedClusters {
        WeightedClusters {
            clusters: weights
                .iter()
                .enumerate()
                .map(|(i, &weight)| WeightedCluster {
                    name: format!("c{i}"),
                    weight,
                    request_headers: Default::default(),
                    response_headers: Default::default(),
                    host_rewrite_literal: None,
                })
                .collect(),
            total_weight: weights.iter().sum(),
        }
    }

    fn pick(w: &WeightedClusters, s: u64) -> &str {
        pick_weighted(w, s).map(|c| c.name.as_str()).unwrap_or("none")
    }

    #[test]
    fn cumulative_boundaries() {
        let w = clusters(&[90, 10]);
        assert_eq!(pick(&w, 0), "c0");
        assert_eq!(pick(&w, 89), "c0");
        assert_eq!(pick(&w, 90), "c1");
        assert_eq!(pick(&w, 99), "c1");
        // The sample wraps modulo the total.
        assert_eq!(pick(&w, 100), "c0");
        assert_eq!(pick(&w, 190), "c1");
        assert_eq!(pick(&w, u64::MAX), pick(&w, u64::MAX % 100));
    }

    #[test]
    fn zero_weight_clusters_are_never_chosen() {
        let w = clusters(&[0, 3, 0, 1, 0]);
        let picked: Vec<&str> = (0..8).map(|s| pick(&w, s)).collect();
        assert_eq!(picked, ["c1", "c1", "c1", "c3", "c1", "c1", "c1", "c3"]);
        assert_eq!(pick(&clusters(&[0, 0]), 5), "none");
        assert_eq!(pick(&clusters(&[]), 5), "none");
    }

    #[test]
    fn distribution_over_a_full_cycle_is_exact() {
        let w = clusters(&[50, 30, 20]);
        let mut counts = [0u32; 3];
        for s in 0..1000u64 {
            let name = pick(&w, s);
            counts[name[1..].parse::<usize>().unwrap()] += 1;
        }
        assert_eq!(counts, [500, 300, 200]);
    }

    #[test]
    fn stale_total_weight_is_ignored() {
        let mut w = clusters(&[1, 1]);
        w.total_weight = 1000;
        assert_eq!(pick(&w, 3), "c1");
    }
}
