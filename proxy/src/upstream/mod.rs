//! Upstream clusters: endpoints, load balancing, circuit breakers, outlier detection, pools.
