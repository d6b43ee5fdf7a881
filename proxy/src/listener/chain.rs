//! Filter chain selection with Envoy's precedence (`filter_chain_match`): destination port,
//! destination IP, server name, transport protocol, application protocols, source IP, source
//! port. At every stage the most specific match wins; chains that leave the criterion empty
//! are the fallback; if none remains the listener's default chain applies.

use std::net::IpAddr;

use sluice_config::model::{CidrRange, FilterChain, FilterChainMatch, Listener};

/// What is known about a connection when its chain is chosen.
#[derive(Debug, Default, Clone)]
pub struct ChainInput<'a> {
    pub destination_port: u16,
    pub destination_ip: Option<IpAddr>,
    /// SNI, lower-case; `None` when the connection is not TLS or sent no SNI.
    pub server_name: Option<&'a str>,
    /// "tls" or "raw_buffer".
    pub transport_protocol: &'a str,
    pub application_protocols: &'a [String],
    pub source_ip: Option<IpAddr>,
    pub source_port: u16,
}

/// Whether any chain needs the ClientHello (SNI, ALPN, or the transport protocol) to decide.
pub fn needs_tls_inspection(l: &Listener) -> bool {
    l.filter_chains.iter().chain(l.default_filter_chain.iter()).any(|c| {
        c.tls.is_some()
            || !c.matcher.server_names.is_empty()
            || c.matcher.transport_protocol.is_some()
            || !c.matcher.application_protocols.is_empty()
    })
}

pub fn select<'l>(l: &'l Listener, input: &ChainInput<'_>) -> Option<&'l FilterChain> {
    let mut cands: Vec<&FilterChain> = l.filter_chains.iter().collect();
    // Fast path: a single chain that matches anything.
    if cands.len() == 1 && cands[0].matcher == FilterChainMatch::default() {
        return Some(cands[0]);
    }
    narrow(&mut cands, |m| m.destination_port.map(|p| (p == input.destination_port).then_some(0)));
    narrow(&mut cands, |m| cidr_specificity(&m.prefix_ranges, input.destination_ip));
    narrow(&mut cands, |m| server_name_specificity(&m.server_names, input.server_name));
    narrow(&mut cands, |m| m.transport_protocol.as_ref().map(|t| (t == input.transport_protocol).then_some(0)));
    narrow(&mut cands, |m| {
        if m.application_protocols.is_empty() {
            None
        } else {
            Some(m.application_protocols.iter().any(|p| input.application_protocols.contains(p)).then_some(0))
        }
    });
    narrow(&mut cands, |m| cidr_specificity(&m.source_prefix_ranges, input.source_ip));
    narrow(&mut cands, |m| {
        if m.source_ports.is_empty() { None } else { Some(m.source_ports.contains(&input.source_port).then_some(0)) }
    });
    cands.first().copied().or(l.default_filter_chain.as_ref())
}

/// One stage: `rank` returns `None` when the chain leaves the criterion empty, `Some(None)`
/// when it sets it and does not match, and `Some(Some(score))` when it matches (lower is
/// more specific). Keeps the best-scoring matching chains, or else the empty ones.
fn narrow(cands: &mut Vec<&FilterChain>, rank: impl Fn(&FilterChainMatch) -> Option<Option<u32>>) {
    let ranks: Vec<Option<Option<u32>>> = cands.iter().map(|c| rank(&c.matcher)).collect();
    let best = ranks.iter().filter_map(|r| r.flatten()).min();
    let keep: Vec<bool> = match best {
        Some(b) => ranks.iter().map(|r| *r == Some(Some(b))).collect(),
        None => ranks.iter().map(|r| r.is_none()).collect(),
    };
    let mut i = 0;
    cands.retain(|_| {
        let k = keep[i];
        i += 1;
        k
    });
}

fn cidr_specificity(ranges: &[CidrRange], ip: Option<IpAddr>) -> Option<Option<u32>> {
    if ranges.is_empty() {
        return None;
    }
    let Some(ip) = ip else { return Some(None) };
    Some(ranges.iter().filter(|r| r.contains(ip)).map(|r| 128 - u32::from(r.prefix_len)).min())
}

/// Exact server names beat wildcards; longer wildcards beat shorter ones.
fn server_name_specificity(names: &[String], sni: Option<&str>) -> Option<Option<u32>> {
    if names.is_empty() {
        return None;
    }
    let Some(sni) = sni else { return Some(None) };
    let mut best: Option<u32> = None;
    for n in names {
        let score = if n == sni {
            Some(0)
        } else if let Some(suffix) = n.strip_prefix('*') {
            // `*.example.com` matches `a.example.com` (and deeper names, as Envoy does).
            (sni.len() > suffix.len() && sni.ends_with(suffix)).then(|| 1000 - suffix.len().min(999) as u32)
        } else {
            None
        };
        if let Some(s) = score {
            best = Some(best.map_or(s, |b| b.min(s)));
        }
    }
    Some(best)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_config::{Options, Snapshot, parse_documents, translate};

    fn listener(yaml_chains: &str) -> Snapshot {
        let doc = format!(
            r#"
apiVersion: cilium.io/v2
kind: CiliumEnvoyConfig
metadata: {{name: l, namespace: default}}
spec:
  resources:
  - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
    name: l
    address: {{socket_address: {{address: 127.0.0.1, port_value: 10443}}}}
    filter_chains:
{yaml_chains}
  - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
    name: c
    type: STATIC
"#
        );
        let docs = parse_documents("t", &doc).unwrap();
        let s = translate(&docs, &Options::default()).snapshot;
        assert!(!s.has_errors(), "{:#?}", s.diagnostics);
        s
    }

    fn chain(name: &str, m: &str) -> String {
        format!(
            "    - name: {name}\n      filter_chain_match: {m}\n      filters:\n      - name: tcp\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy\n          stat_prefix: s\n          cluster: c\n"
        )
    }

    fn pick(s: &Snapshot, sni: Option<&str>, tp: &str, port: u16) -> Option<String> {
        let input =
            ChainInput { destination_port: port, server_name: sni, transport_protocol: tp, ..Default::default() };
        select(&s.listeners[0], &input).map(|c| c.name.clone())
    }

    #[test]
    fn server_name_precedence() {
        let chains = [
            chain("exact", "{server_names: [a.example.com], transport_protocol: tls}"),
            chain("wild", "{server_names: ['*.example.com'], transport_protocol: tls}"),
            chain("deeper", "{server_names: ['*.b.example.com'], transport_protocol: tls}"),
            chain("tls", "{transport_protocol: tls}"),
            chain("plain", "{transport_protocol: raw_buffer}"),
        ]
        .concat();
        let s = listener(&chains);
        assert_eq!(pick(&s, Some("a.example.com"), "tls", 10443).as_deref(), Some("exact"));
        assert_eq!(pick(&s, Some("x.example.com"), "tls", 10443).as_deref(), Some("wild"));
        assert_eq!(pick(&s, Some("x.b.example.com"), "tls", 10443).as_deref(), Some("deeper"));
        assert_eq!(pick(&s, Some("other.org"), "tls", 10443).as_deref(), Some("tls"));
        assert_eq!(pick(&s, None, "tls", 10443).as_deref(), Some("tls"));
        assert_eq!(pick(&s, None, "raw_buffer", 10443).as_deref(), Some("plain"));
    }

    #[test]
    fn destination_port_first() {
        let chains = [chain("p80", "{destination_port: 80}"), chain("any", "{}")].concat();
        let s = listener(&chains);
        assert_eq!(pick(&s, None, "raw_buffer", 80).as_deref(), Some("p80"));
        assert_eq!(pick(&s, None, "raw_buffer", 81).as_deref(), Some("any"));
    }

    #[test]
    fn no_match_without_default() {
        let s = listener(&chain("tls", "{transport_protocol: tls}"));
        assert_eq!(pick(&s, None, "raw_buffer", 1), None);
    }
}
