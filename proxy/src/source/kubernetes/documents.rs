//! From the reflector stores to the document set the translator reads.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use kube::api::ApiResource;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde_json::Value;
use sluice_config::Document;
use sluice_config::json::snake_case;

use super::watch::{Kind, Stores, ccec_resource, cec_resource};

/// Identifies one watched object, to tell whether a change touches the last document set.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ObjectId {
    kind: Kind,
    namespace: String,
    name: String,
}

impl ObjectId {
    pub fn new(kind: Kind, namespace: String, name: String) -> ObjectId {
        ObjectId { kind, namespace, name }
    }
}

/// One rebuild: the documents, and what the loop needs to judge later changes.
pub(crate) struct Built {
    /// CECs, CCECs, Services, EndpointSlices and Secrets, sorted by kind and name so equal
    /// states give equal sets.
    pub documents: Vec<Document>,
    pub node_labels: Option<BTreeMap<String, String>>,
    /// A node name was given but no such Node exists.
    pub node_missing: bool,
    /// `namespace/name` of every Service some CEC or CCEC may refer to.
    pub interest: BTreeSet<String>,
    /// The Services and EndpointSlices in `documents`.
    pub included: BTreeSet<ObjectId>,
    /// Each CEC/CCEC by the translator's source name (`namespace/name`, `/name` for a
    /// CCEC), for Events about it.
    pub references: BTreeMap<String, ObjectReference>,
}

/// Builds the complete document set from the stores. Stores hold either their initial list
/// or a complete relist, never a partial one, so neither does the result.
pub(crate) fn build(stores: &Stores) -> Built {
    let mut documents = Vec::new();
    let mut references = BTreeMap::new();
    let mut interest = BTreeSet::new();
    let mut included = BTreeSet::new();

    for (store, ar, cluster_scoped) in [(&stores.cec, cec_resource(), false), (&stores.ccec, ccec_resource(), true)] {
        for o in sorted(store.state()) {
            let namespace = o.namespace().unwrap_or_default();
            let name = o.name_any();
            // The translator's source names: a CEC without namespace is in "default".
            let source = if cluster_scoped {
                format!("/{name}")
            } else if namespace.is_empty() {
                format!("default/{name}")
            } else {
                format!("{namespace}/{name}")
            };
            referenced_services(&o.data, if cluster_scoped { "default" } else { &namespace }, &mut interest);
            references.insert(source, o.object_ref(&ar));
            if let Some(d) = document(&ar, &*o) {
                documents.push(d);
            }
        }
    }

    let services_ar = ApiResource::erase::<k8s_openapi::api::core::v1::Service>(&());
    for s in sorted(stores.services.state()) {
        let namespace = s.namespace().unwrap_or_default();
        if interest.contains(&format!("{namespace}/{}", s.name_any())) {
            included.insert(ObjectId::new(Kind::Service, namespace, s.name_any()));
            documents.extend(document(&services_ar, &*s));
        }
    }
    let slices_ar = ApiResource::erase::<k8s_openapi::api::discovery::v1::EndpointSlice>(&());
    for s in sorted(stores.slices.state()) {
        let namespace = s.namespace().unwrap_or_default();
        let Some(service) = s.labels().get("kubernetes.io/service-name") else { continue };
        if interest.contains(&format!("{namespace}/{service}")) {
            included.insert(ObjectId::new(Kind::EndpointSlice, namespace, s.name_any()));
            documents.extend(document(&slices_ar, &*s));
        }
    }
    let secrets_ar = ApiResource::erase::<Secret>(&());
    for store in &stores.secrets {
        for s in sorted(store.state()) {
            if sds_candidate(&s) {
                documents.extend(document(&secrets_ar, &*s));
            }
        }
    }

    let (node_labels, node_missing) = node_labels(stores);
    Built { documents, node_labels, node_missing, interest, included, references }
}

/// This node's labels (`None` without a node name), and whether the named node is missing.
pub(crate) fn node_labels(stores: &Stores) -> (Option<BTreeMap<String, String>>, bool) {
    let Some(store) = &stores.node else { return (None, false) };
    match store.state().first() {
        Some(node) => (Some(node.labels().clone()), false),
        None => (Some(BTreeMap::new()), true),
    }
}

fn sorted<K: ResourceExt>(mut objects: Vec<Arc<K>>) -> Vec<Arc<K>> {
    objects.sort_by_cached_key(|o| (o.namespace(), o.name_any()));
    objects
}

/// The object as the API server would print it, with `apiVersion` and `kind` (list items
/// may lack them).
fn document<K: Serialize + ResourceExt>(ar: &ApiResource, o: &K) -> Option<Document> {
    let key = match o.namespace() {
        Some(ns) => format!("{ns}/{}", o.name_any()),
        None => o.name_any(),
    };
    let mut value = match serde_json::to_value(o) {
        Ok(v) => v,
        Err(e) => {
            // Cannot happen for objects that were just deserialised; never silent if it does.
            tracing::error!(target: "sluice::kubernetes", "{} {key}: cannot be serialised ({e}); left out", ar.kind);
            return None;
        }
    };
    if let Value::Object(map) = &mut value {
        map.insert("apiVersion".into(), Value::String(ar.api_version.clone()));
        map.insert("kind".into(), Value::String(ar.kind.clone()));
    }
    Some(Document { origin: format!("k8s:{} {key}", ar.kind), value })
}

/// Adds every Service a CEC/CCEC spec may name to `out`. A superset of what the translator
/// resolves (both the given namespace and the object's own), so filtering by it never
/// hides a Service the translator would use.
fn referenced_services(data: &Value, own_namespace: &str, out: &mut BTreeSet<String>) {
    let Some(spec) = data.get("spec").and_then(Value::as_object) else { return };
    for (key, list) in spec {
        if !matches!(snake_case(key).as_str(), "services" | "backend_services") {
            continue;
        }
        for item in list.as_array().map(Vec::as_slice).unwrap_or_default() {
            let Some(name) = item.get("name").and_then(Value::as_str) else { continue };
            out.insert(format!("{own_namespace}/{name}"));
            if let Some(ns) = item.get("namespace").and_then(Value::as_str).filter(|ns| !ns.is_empty()) {
                out.insert(format!("{ns}/{name}"));
            }
        }
    }
}

/// Secrets Cilium's secret sync would hand to the proxy: TLS key pairs, CA bundles and
/// generic (Opaque) secrets. Service-account tokens, registry credentials and Helm release
/// records that share the namespace are left out: they are large and never referenced.
fn sds_candidate(s: &Secret) -> bool {
    const KEYS: [&str; 3] = ["tls.crt", "tls.key", "ca.crt"];
    let has_key = |k: &str| {
        s.data.as_ref().is_some_and(|d| d.contains_key(k)) || s.string_data.as_ref().is_some_and(|d| d.contains_key(k))
    };
    match s.type_.as_deref() {
        None | Some("" | "Opaque" | "kubernetes.io/tls") => true,
        Some(_) => KEYS.iter().any(|k| has_key(k)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn interest_covers_both_spellings_and_namespaces() {
        let data = json!({"spec": {
            "services": [{"name": "front", "namespace": "other"}],
            "backendServices": [{"name": "v1"}, {"name": "v2", "namespace": "shop"}],
            "backend_services": [{"name": "v3"}],
            "resources": []
        }});
        let mut out = BTreeSet::new();
        referenced_services(&data, "web", &mut out);
        let want: BTreeSet<String> = ["web/front", "other/front", "web/v1", "web/v2", "shop/v2", "web/v3"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(out, want);
    }

    #[test]
    fn secrets_filter() {
        let secret = |ty: Option<&str>, keys: &[&str]| Secret {
            type_: ty.map(str::to_string),
            data: Some(
                keys.iter()
                    .map(|k| (k.to_string(), k8s_openapi::ByteString(b"x".to_vec())))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..Default::default()
        };
        assert!(sds_candidate(&secret(Some("kubernetes.io/tls"), &["tls.crt", "tls.key"])));
        assert!(sds_candidate(&secret(Some("Opaque"), &["session-ticket"])));
        assert!(sds_candidate(&secret(None, &["ca.crt"])));
        assert!(sds_candidate(&secret(Some("example.com/custom"), &["ca.crt"])));
        assert!(!sds_candidate(&secret(Some("kubernetes.io/service-account-token"), &["token"])));
        assert!(!sds_candidate(&secret(Some("helm.sh/release.v1"), &["release"])));
    }
}
