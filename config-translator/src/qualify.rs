//! Cilium's resource name qualification (`ResourceQualifiedName` in `pkg/policy/api/utils.go`).
//!
//! Names without a `/` are local to their CEC and become `<namespace>/<cec>/<name>`
//! (`/<cec>/<name>` for a CCEC). Names with a `/` are global and left alone — except with
//! `force_namespace`, where a name whose first component is not the CEC's namespace is
//! prefixed too, so a CEC cannot claim another namespace's listener or route names.

/// The CEC a name is qualified within.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// Empty for a CiliumClusterwideEnvoyConfig.
    pub namespace: String,
    pub name: String,
}

impl Scope {
    /// `namespace/name`, or `/name` for a CCEC: how diagnostics name the source.
    pub fn source_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Plain qualification: clusters, secrets, endpoints, route actions.
    pub fn qualify(&self, name: &str) -> String {
        qualified_name(&self.namespace, &self.name, name, false)
    }

    /// With `ForceNamespace`: listeners, route configurations, virtual hosts, RDS names.
    pub fn qualify_forced(&self, name: &str) -> String {
        qualified_name(&self.namespace, &self.name, name, true)
    }
}

pub fn qualified_name(namespace: &str, cec: &str, name: &str, force_namespace: bool) -> String {
    if name.is_empty() {
        return String::new();
    }
    match name.split_once('/') {
        None => format!("{namespace}/{cec}/{name}"),
        Some((first, _)) => {
            if !force_namespace {
                return name.to_string();
            }
            // A CCEC (empty namespace) forcing a name that starts with '/' keeps it.
            if first == namespace { name.to_string() } else { format!("{namespace}/{cec}/{name}") }
        }
    }
}

/// Cilium's `ParseQualifiedName`: splits on the first two slashes into
/// (namespace, cec name, resource name). Names with fewer components are returned as the
/// resource name alone.
pub fn parse_qualified_name(name: &str) -> (&str, &str, &str) {
    let mut it = name.splitn(3, '/');
    match (it.next(), it.next(), it.next()) {
        (Some(ns), Some(cec), Some(rest)) => (ns, cec, rest),
        _ => ("", "", name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cilium_qualification_rules() {
        let s = Scope { namespace: "default".into(), name: "envoy-lb-listener".into() };
        assert_eq!(s.qualify_forced("envoy-lb-listener"), "default/envoy-lb-listener/envoy-lb-listener");
        assert_eq!(s.qualify("lb_route"), "default/envoy-lb-listener/lb_route");
        assert_eq!(s.qualify("default/helloworld-v1"), "default/helloworld-v1");
        assert_eq!(s.qualify("/envoy-admin"), "/envoy-admin");
        assert_eq!(s.qualify(""), "");
        // ForceNamespace: a foreign namespace is prefixed, our own is kept.
        assert_eq!(s.qualify_forced("other/foo"), "default/envoy-lb-listener/other/foo");
        assert_eq!(s.qualify_forced("default/foo"), "default/foo");
        assert_eq!(
            s.qualify("gateway-conformance-infra:infra-backend-v1:8080"),
            "default/envoy-lb-listener/gateway-conformance-infra:infra-backend-v1:8080"
        );
    }

    #[test]
    fn clusterwide_qualification() {
        let s = Scope { namespace: String::new(), name: "ccec".into() };
        assert_eq!(s.qualify("listener"), "/ccec/listener");
        assert_eq!(s.qualify_forced("/foo"), "/foo");
        assert_eq!(s.qualify_forced("ns/foo"), "/ccec/ns/foo");
        assert_eq!(s.source_name(), "/ccec");
    }

    #[test]
    fn parse() {
        assert_eq!(parse_qualified_name("a/b/c/d"), ("a", "b", "c/d"));
        assert_eq!(parse_qualified_name("a/b"), ("", "", "a/b"));
    }
}
