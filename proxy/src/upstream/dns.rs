//! STRICT_DNS and LOGICAL_DNS resolution.
//!
//! Resolution runs on the control-plane runtime (never a worker) through the system resolver
//! (`tokio::net::lookup_host`, i.e. getaddrinfo on a blocking thread), every
//! `dns_refresh_rate`:
//! - STRICT_DNS: every address of every name becomes a host. A name that fails to resolve
//!   keeps its previous addresses, as in Envoy.
//! - LOGICAL_DNS: the cluster has one host; new connections go to the first address of the
//!   latest resolution, existing ones are kept.
//!
//! The task holds only a weak reference to its cluster and stops when the cluster goes away
//! (it is also aborted when the cluster is retired).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use sluice_config::model::{Discovery, DnsLookupFamily, EndpointAddress};
use tokio::runtime::Handle;
use tokio::task::AbortHandle;

use crate::upstream::cluster::{ClusterRuntime, spec_from_endpoint};
use crate::upstream::host::{HostAddress, HostSpec};
use crate::upstream::stats::inc;

/// Guards against a zero refresh rate turning the loop into a busy one.
const MIN_REFRESH: Duration = Duration::from_millis(100);

pub(crate) fn spawn(rt: &Arc<ClusterRuntime>, handle: &Handle) -> AbortHandle {
    let weak = Arc::downgrade(rt);
    match rt.config().discovery {
        Discovery::LogicalDns => handle.spawn(logical_loop(weak)).abort_handle(),
        _ => handle.spawn(strict_loop(weak)).abort_handle(),
    }
}

/// Keeps the addresses of `family` the way Envoy's `dns_lookup_family` selects them.
pub(crate) fn filter_family(addrs: impl IntoIterator<Item = SocketAddr>, family: DnsLookupFamily) -> Vec<SocketAddr> {
    let (v4, v6): (Vec<SocketAddr>, Vec<SocketAddr>) = addrs.into_iter().partition(SocketAddr::is_ipv4);
    match family {
        DnsLookupFamily::V4Only => v4,
        DnsLookupFamily::V6Only => v6,
        DnsLookupFamily::Auto => {
            if v6.is_empty() {
                v4
            } else {
                v6
            }
        }
        DnsLookupFamily::V4Preferred => {
            if v4.is_empty() {
                v6
            } else {
                v4
            }
        }
        DnsLookupFamily::All => v4.into_iter().chain(v6).collect(),
    }
}

/// Resolves `name:port`, filtered by `family`, duplicates removed, order kept.
pub(crate) async fn resolve(name: &str, port: u16, family: DnsLookupFamily) -> Result<Vec<SocketAddr>, String> {
    let addrs = tokio::net::lookup_host((name, port)).await.map_err(|e| e.to_string())?;
    let mut out = filter_family(addrs, family);
    let mut seen = std::collections::HashSet::new();
    out.retain(|a| seen.insert(*a));
    if out.is_empty() {
        return Err(format!("no {family:?} address"));
    }
    Ok(out)
}

async fn strict_loop(weak: Weak<ClusterRuntime>) {
    let mut last_good: HashMap<(String, u16), Vec<SocketAddr>> = HashMap::new();
    loop {
        let (endpoints, family, refresh, stats) = {
            let Some(rt) = weak.upgrade() else { return };
            let config = rt.config();
            (rt.endpoints(), config.dns_lookup_family, config.dns_refresh_rate, rt.stats().clone())
        };
        let mut specs: Vec<HostSpec> = Vec::new();
        let mut failed = false;
        for endpoint in endpoints.iter() {
            let EndpointAddress::Dns { host, port } = &endpoint.address else {
                specs.push(spec_from_endpoint(endpoint));
                continue;
            };
            let key = (host.clone(), *port);
            match resolve(host, *port, family).await {
                Ok(addrs) => {
                    last_good.insert(key.clone(), addrs);
                }
                Err(error) => {
                    failed = true;
                    tracing::warn!(name = %host, %error, "STRICT_DNS resolution failed; keeping previous addresses");
                }
            }
            for addr in last_good.get(&key).into_iter().flatten() {
                specs.push(HostSpec {
                    address: HostAddress::Socket(*addr),
                    hostname: Some(endpoint.hostname.clone().unwrap_or_else(|| host.clone())),
                    weight: endpoint.weight,
                    health: endpoint.health,
                    priority: endpoint.priority,
                });
            }
        }
        inc(if failed { &stats.update_failure } else { &stats.update_success });
        {
            let Some(rt) = weak.upgrade() else { return };
            rt.set_hosts(specs);
            rt.mark_ready();
        }
        tokio::time::sleep(refresh.max(MIN_REFRESH)).await;
    }
}

async fn logical_loop(weak: Weak<ClusterRuntime>) {
    loop {
        let (host, family, refresh, stats) = {
            let Some(rt) = weak.upgrade() else { return };
            let config = rt.config();
            let Some(host) = rt.hosts().first().cloned() else {
                rt.mark_ready();
                return;
            };
            (host, config.dns_lookup_family, config.dns_refresh_rate, rt.stats().clone())
        };
        if let HostAddress::Dns { name, port } = host.address() {
            match resolve(name, *port, family).await {
                Ok(addrs) => {
                    if let Some(first) = addrs.first() {
                        host.set_resolved(*first);
                    }
                    inc(&stats.update_success);
                }
                Err(error) => {
                    inc(&stats.update_failure);
                    tracing::warn!(name = %name, %error, "LOGICAL_DNS resolution failed; keeping the previous address");
                }
            }
        }
        drop(host);
        {
            let Some(rt) = weak.upgrade() else { return };
            rt.mark_ready();
        }
        tokio::time::sleep(refresh.max(MIN_REFRESH)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_family_selection() {
        let v4: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let v6: SocketAddr = "[fd00::1]:80".parse().unwrap();
        let both = [v4, v6];
        assert_eq!(filter_family(both, DnsLookupFamily::V4Only), vec![v4]);
        assert_eq!(filter_family(both, DnsLookupFamily::V6Only), vec![v6]);
        assert_eq!(filter_family(both, DnsLookupFamily::Auto), vec![v6]);
        assert_eq!(filter_family([v4], DnsLookupFamily::Auto), vec![v4]);
        assert_eq!(filter_family(both, DnsLookupFamily::V4Preferred), vec![v4]);
        assert_eq!(filter_family([v6], DnsLookupFamily::V4Preferred), vec![v6]);
        assert_eq!(filter_family([v6, v4], DnsLookupFamily::All), vec![v4, v6]);
    }
}
