//! Kubernetes objects the translator needs beside CECs: Services and EndpointSlices (to
//! publish EDS endpoints exactly as Cilium's agent does) and TLS Secrets (for SDS).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use serde::Deserialize;
use serde_json::Value;

use crate::diag::Sink;
use crate::model::{DataSource, Endpoint, EndpointAddress, EndpointHealth, Secret, TlsCertificate, ValidationContext};

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

// ---------------------------------------------------------------------------------------------
// Services

#[derive(Debug, Clone, Deserialize)]
pub struct Service {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ServiceSpec,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    // Kubernetes spells it `clusterIP`, which camelCase renaming would not produce.
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(default, rename = "clusterIPs")]
    pub cluster_ips: Vec<String>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default)]
    pub name: String,
    pub port: u16,
    #[serde(default)]
    pub protocol: Option<String>,
}

impl Service {
    pub fn key(&self) -> String {
        format!("{}/{}", self.metadata.namespace.as_deref().unwrap_or("default"), self.metadata.name)
    }

    /// Cluster IPs that are real addresses (`None` and headless Services have none).
    pub fn cluster_ips(&self) -> Vec<IpAddr> {
        let mut ips: Vec<&String> = self.spec.cluster_ips.iter().collect();
        if ips.is_empty()
            && let Some(ip) = &self.spec.cluster_ip
        {
            ips.push(ip);
        }
        ips.into_iter().filter_map(|s| s.parse().ok()).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// EndpointSlices

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub address_type: Option<String>,
    #[serde(default)]
    pub endpoints: Vec<SliceEndpoint>,
    #[serde(default)]
    pub ports: Vec<SlicePort>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SliceEndpoint {
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub conditions: Conditions,
    #[serde(default)]
    pub hostname: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct Conditions {
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SlicePort {
    #[serde(default)]
    pub name: Option<String>,
    pub port: Option<u16>,
    #[serde(default)]
    pub protocol: Option<String>,
}

impl EndpointSlice {
    /// `namespace/service` this slice belongs to (label `kubernetes.io/service-name`).
    pub fn service_key(&self) -> Option<String> {
        let svc = self.metadata.labels.get("kubernetes.io/service-name")?;
        Some(format!("{}/{svc}", self.metadata.namespace.as_deref().unwrap_or("default")))
    }
}

/// One backend address with its port name, after Cilium's backend rules.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Backend {
    addr: SocketAddr,
    port_name: String,
    hostname: Option<String>,
}

/// Backends of a Service: only active ones (ready, not terminating); terminating-but-serving
/// ones only when no active backend exists, as Cilium does. TCP ports only.
fn backends(slices: &[&EndpointSlice]) -> Vec<Backend> {
    let mut active = BTreeSet::new();
    let mut terminating = BTreeSet::new();
    for slice in slices {
        if matches!(slice.address_type.as_deref(), Some("FQDN")) {
            continue;
        }
        for ep in &slice.endpoints {
            let c = &ep.conditions;
            let is_terminating = c.terminating.unwrap_or(false);
            let ready = c.ready.unwrap_or(true);
            let serving = c.serving.unwrap_or(ready);
            let set = if ready && !is_terminating {
                &mut active
            } else if is_terminating && serving {
                &mut terminating
            } else {
                continue;
            };
            for a in &ep.addresses {
                let Ok(ip) = a.parse::<IpAddr>() else {
                    continue;
                };
                for p in &slice.ports {
                    if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
                        continue;
                    }
                    let Some(port) = p.port else { continue };
                    set.insert(Backend {
                        addr: SocketAddr::new(ip, port),
                        port_name: p.name.clone().unwrap_or_default(),
                        hostname: ep.hostname.clone(),
                    });
                }
            }
        }
    }
    if active.is_empty() { terminating.into_iter().collect() } else { active.into_iter().collect() }
}

/// Whether a backend port satisfies one entry of a CEC port filter (a port name, or a
/// Service port number as a string), following Cilium's `computeLoadAssignments`.
fn port_matches(entry: &str, backend_port_name: &str, svc: Option<&Service>) -> bool {
    if !backend_port_name.is_empty() && backend_port_name == entry {
        return true;
    }
    let Some(svc) = svc else { return false };
    svc.spec.ports.iter().any(|sp| sp.name == backend_port_name && sp.port.to_string() == entry)
}

/// The EDS resources (ClusterLoadAssignments) Cilium's agent publishes for the Services that
/// CECs name, keyed by EDS name: `ns/svc:port` for each port filter entry, or `ns/svc:*`
/// and `ns/svc` (all ports) when no CEC filters the Service's ports.
pub fn load_assignments(
    referenced: &BTreeMap<String, BTreeSet<String>>,
    services: &BTreeMap<String, Service>,
    slices: &[EndpointSlice],
) -> BTreeMap<String, Vec<Endpoint>> {
    let mut by_service: BTreeMap<String, Vec<&EndpointSlice>> = BTreeMap::new();
    for s in slices {
        if let Some(key) = s.service_key() {
            by_service.entry(key).or_default().push(s);
        }
    }
    let mut out = BTreeMap::new();
    for (svc_key, filter) in referenced {
        let svc = services.get(svc_key);
        let slices = by_service.get(svc_key).map(Vec::as_slice).unwrap_or(&[]);
        let backends = backends(slices);
        let to_endpoints = |bs: Vec<&Backend>| -> Vec<Endpoint> {
            let mut addrs: Vec<&Backend> = bs;
            addrs.sort();
            addrs.dedup_by(|a, b| a.addr == b.addr);
            addrs
                .into_iter()
                .map(|b| Endpoint {
                    address: EndpointAddress::Socket(b.addr),
                    weight: 1,
                    health: EndpointHealth::Unknown,
                    priority: 0,
                    hostname: b.hostname.clone(),
                })
                .collect()
        };
        if filter.is_empty() {
            let all = to_endpoints(backends.iter().collect());
            out.insert(format!("{svc_key}:*"), all.clone());
            out.insert(svc_key.clone(), all);
        } else {
            for entry in filter {
                let matching = backends.iter().filter(|b| port_matches(entry, &b.port_name, svc)).collect();
                out.insert(format!("{svc_key}:{entry}"), to_endpoints(matching));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Secrets

#[derive(Debug, Clone, Deserialize)]
pub struct K8sSecret {
    pub metadata: ObjectMeta,
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    #[serde(default)]
    pub data: BTreeMap<String, String>,
    #[serde(default, rename = "stringData")]
    pub string_data: BTreeMap<String, String>,
}

impl K8sSecret {
    pub fn key(&self) -> String {
        format!("{}/{}", self.metadata.namespace.as_deref().unwrap_or("default"), self.metadata.name)
    }

    fn get(&self, sink: &mut Sink, k: &str) -> Option<Vec<u8>> {
        if let Some(s) = self.string_data.get(k) {
            return Some(s.as_bytes().to_vec());
        }
        let b64 = self.data.get(k)?;
        match base64_decode(b64) {
            Some(v) => Some(v),
            None => {
                sink.error(&format!("data[\"{k}\"]"), "is not valid base64");
                None
            }
        }
    }

    /// Cilium's secret sync: `tls.crt`+`tls.key` -> a TLS certificate, `ca.crt` -> a
    /// validation context (when there is no key pair), anything else -> a generic secret.
    pub fn to_secret(&self, sink: &mut Sink) -> Option<Secret> {
        let crt = self.get(sink, "tls.crt");
        let key = self.get(sink, "tls.key");
        if let (Some(crt), Some(key)) = (crt, key) {
            return Some(Secret::TlsCertificate(TlsCertificate {
                certificate_chain: DataSource::Inline(crt),
                private_key: DataSource::Inline(key),
            }));
        }
        if let Some(ca) = self.get(sink, "ca.crt") {
            return Some(Secret::ValidationContext(ValidationContext {
                trusted_ca: Some(DataSource::Inline(ca)),
                ..Default::default()
            }));
        }
        let mut keys = self.data.keys().chain(self.string_data.keys());
        let first = keys.next()?.clone();
        self.get(sink, &first).map(|v| Secret::Generic(DataSource::Inline(v)))
    }
}

/// Standard base64 (with or without padding, whitespace ignored), as Kubernetes writes it.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        } as u32)
    }
    let clean: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace() && *b != b'=').collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c)? << (18 - 6 * i);
        }
        match chunk.len() {
            4 => out.extend_from_slice(&[(acc >> 16) as u8, (acc >> 8) as u8, acc as u8]),
            3 => out.extend_from_slice(&[(acc >> 16) as u8, (acc >> 8) as u8]),
            2 => out.push((acc >> 16) as u8),
            _ => return None,
        }
    }
    Some(out)
}

/// Deserialises a Kubernetes object, with a precise message on failure.
pub fn decode<T: for<'de> Deserialize<'de>>(sink: &mut Sink, v: &Value) -> Option<T> {
    match serde_json::from_value(v.clone()) {
        Ok(t) => Some(t),
        Err(e) => {
            sink.error("", format!("invalid object: {e}"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc() -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "echo", "namespace": "test"},
            "spec": {"clusterIP": "10.96.50.104", "ports": [
                {"name": "http", "port": 80, "protocol": "TCP"},
                {"name": "smtp", "port": 25, "protocol": "TCP"}]}
        }))
        .unwrap()
    }

    fn slice(ready: bool, terminating: bool, addr: &str) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": "echo-1", "namespace": "test", "labels": {"kubernetes.io/service-name": "echo"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [addr], "conditions": {"ready": ready, "serving": true, "terminating": terminating}}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "smtp", "port": 25, "protocol": "TCP"}]
        }))
        .unwrap()
    }

    fn addrs(eps: &[Endpoint]) -> Vec<String> {
        eps.iter().map(|e| e.address.to_string()).collect()
    }

    #[test]
    fn port_filter_by_service_port_number() {
        let mut services = BTreeMap::new();
        services.insert("test/echo".to_string(), svc());
        let referenced = BTreeMap::from([("test/echo".to_string(), BTreeSet::from(["80".to_string()]))]);
        let cla = load_assignments(&referenced, &services, &[slice(true, false, "10.244.1.1")]);
        assert_eq!(cla.keys().collect::<Vec<_>>(), vec!["test/echo:80"]);
        assert_eq!(addrs(&cla["test/echo:80"]), vec!["10.244.1.1:8080"]);
    }

    #[test]
    fn port_filter_by_name_and_any_port() {
        let mut services = BTreeMap::new();
        services.insert("test/echo".to_string(), svc());
        let referenced = BTreeMap::from([("test/echo".to_string(), BTreeSet::from(["smtp".to_string()]))]);
        let cla = load_assignments(&referenced, &services, &[slice(true, false, "10.244.1.1")]);
        assert_eq!(addrs(&cla["test/echo:smtp"]), vec!["10.244.1.1:25"]);

        let referenced = BTreeMap::from([("test/echo".to_string(), BTreeSet::new())]);
        let cla = load_assignments(&referenced, &services, &[slice(true, false, "10.244.1.1")]);
        assert_eq!(addrs(&cla["test/echo"]), vec!["10.244.1.1:25", "10.244.1.1:8080"]);
        assert_eq!(cla["test/echo"], cla["test/echo:*"]);
    }

    #[test]
    fn terminating_only_when_no_active() {
        let services = BTreeMap::new();
        let referenced = BTreeMap::from([("test/echo".to_string(), BTreeSet::from(["http".to_string()]))]);
        let both = [slice(true, false, "10.0.0.1"), slice(false, true, "10.0.0.2")];
        let cla = load_assignments(&referenced, &services, &both);
        assert_eq!(addrs(&cla["test/echo:http"]), vec!["10.0.0.1:8080"]);
        let only_term = [slice(false, true, "10.0.0.2")];
        let cla = load_assignments(&referenced, &services, &only_term);
        assert_eq!(addrs(&cla["test/echo:http"]), vec!["10.0.0.2:8080"]);
        let not_ready = [slice(false, false, "10.0.0.3")];
        let cla = load_assignments(&referenced, &services, &not_ready);
        assert!(cla["test/echo:http"].is_empty());
    }

    #[test]
    fn cluster_ip_field_spelling() {
        let s: Service = serde_json::from_value(json!({
            "metadata": {"name": "a", "namespace": "n"},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}
        }))
        .unwrap();
        assert_eq!(s.cluster_ips(), vec!["10.96.0.1".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn base64() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbG8").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVs\nbG8=").unwrap(), b"hello");
        assert!(base64_decode("a*").is_none());
    }
}
