//! One watcher + reflector store per watched kind, and the notices they send to the loop.

use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Node, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::reflector::Store;
use kube::runtime::reflector::store::Writer;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::documents::ObjectId;
use super::{KubeCounters, KubeOptions};

/// The watched kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Kind {
    CiliumEnvoyConfig,
    CiliumClusterwideEnvoyConfig,
    Service,
    EndpointSlice,
    Secret,
    Node,
}

/// A watcher's report to the loop. The store has already been updated when it is sent.
#[derive(Debug)]
pub(crate) struct Notice {
    /// Index of the watcher (several watch Secrets, one per namespace).
    pub watcher: usize,
    pub kind: Kind,
    pub what: What,
}

#[derive(Debug)]
pub(crate) enum What {
    /// A (re)list completed and was swapped into the store.
    Synced,
    /// One object was added, changed or deleted. `service` is the `namespace/name` of the
    /// Service a Service or EndpointSlice belongs to, so irrelevant churn can be ignored.
    Touched { object: ObjectId, service: Option<String> },
}

/// The reader side of every store.
pub(crate) struct Stores {
    pub cec: Store<DynamicObject>,
    pub ccec: Store<DynamicObject>,
    pub services: Store<Service>,
    pub slices: Store<EndpointSlice>,
    pub secrets: Vec<Store<Secret>>,
    pub node: Option<Store<Node>>,
    count: usize,
}

impl Stores {
    pub fn watcher_count(&self) -> usize {
        self.count
    }
}

pub(crate) fn cec_resource() -> ApiResource {
    ApiResource {
        group: "cilium.io".into(),
        version: "v2".into(),
        api_version: "cilium.io/v2".into(),
        kind: "CiliumEnvoyConfig".into(),
        plural: "ciliumenvoyconfigs".into(),
    }
}

pub(crate) fn ccec_resource() -> ApiResource {
    ApiResource {
        group: "cilium.io".into(),
        version: "v2".into(),
        api_version: "cilium.io/v2".into(),
        kind: "CiliumClusterwideEnvoyConfig".into(),
        plural: "ciliumclusterwideenvoyconfigs".into(),
    }
}

/// Starts every watcher on `tasks`.
pub(crate) fn start(
    client: &kube::Client,
    opts: &KubeOptions,
    tx: mpsc::UnboundedSender<Notice>,
    tasks: &mut JoinSet<()>,
) -> Stores {
    let mut w = Spawner { tx, tasks, counters: opts.counters.clone(), next: 0 };
    let config = watcher::Config::default;
    let (cec_ar, ccec_ar) = (cec_resource(), ccec_resource());
    let cec = w.spawn(
        Kind::CiliumEnvoyConfig,
        "ciliumenvoyconfigs.cilium.io".into(),
        Api::all_with(client.clone(), &cec_ar),
        config(),
        cec_ar,
        |_| None,
    );
    let ccec = w.spawn(
        Kind::CiliumClusterwideEnvoyConfig,
        "ciliumclusterwideenvoyconfigs.cilium.io".into(),
        Api::all_with(client.clone(), &ccec_ar),
        config(),
        ccec_ar,
        |_| None,
    );
    let services = w.spawn(Kind::Service, "services".into(), Api::all(client.clone()), config(), (), |s: &Service| {
        Some(format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any()))
    });
    let slices = w.spawn(
        Kind::EndpointSlice,
        "endpointslices.discovery.k8s.io".into(),
        Api::all(client.clone()),
        config(),
        (),
        |s: &EndpointSlice| {
            let svc = s.labels().get("kubernetes.io/service-name")?;
            Some(format!("{}/{svc}", s.namespace().unwrap_or_default()))
        },
    );
    let mut namespaces = opts.secrets_namespaces.clone();
    namespaces.sort();
    namespaces.dedup();
    let secrets = namespaces
        .iter()
        .map(|ns| {
            w.spawn(Kind::Secret, format!("secrets in {ns}"), Api::namespaced(client.clone(), ns), config(), (), |_| {
                None
            })
        })
        .collect();
    let node = opts.node_name.as_ref().map(|name| {
        w.spawn(
            Kind::Node,
            format!("node {name}"),
            Api::all(client.clone()),
            config().fields(&format!("metadata.name={name}")),
            (),
            |_| None,
        )
    });
    Stores { cec, ccec, services, slices, secrets, node, count: w.next }
}

struct Spawner<'a> {
    tx: mpsc::UnboundedSender<Notice>,
    tasks: &'a mut JoinSet<()>,
    counters: Arc<KubeCounters>,
    next: usize,
}

/// Written by `kubectl apply`: a second copy of the whole object, of no use to the proxy.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

impl Spawner<'_> {
    /// Starts a watcher whose events go through a reflector into a store, then become
    /// notices. `service_of` names the Service an object belongs to (for relevance).
    fn spawn<K>(
        &mut self,
        kind: Kind,
        what: String,
        api: Api<K>,
        config: watcher::Config,
        dyntype: K::DynamicType,
        service_of: fn(&K) -> Option<String>,
    ) -> Store<K>
    where
        K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        K::DynamicType: Eq + Hash + Clone + Send + Sync + 'static,
    {
        let id = self.next;
        self.next += 1;
        let writer = Writer::new(dyntype);
        let store = writer.as_reader();
        let tx = self.tx.clone();
        let counters = self.counters.clone();
        let stream = watcher(api, config)
            .map(|r| {
                r.map(|ev| {
                    // Managed fields and the last-applied copy are large and never read.
                    ev.modify(|o| {
                        o.meta_mut().managed_fields = None;
                        o.annotations_mut().remove(LAST_APPLIED);
                    })
                })
            })
            .default_backoff()
            .reflect(writer);
        self.tasks.spawn(async move {
            let mut stream = std::pin::pin!(stream);
            let mut synced_once = false;
            while let Some(item) = stream.next().await {
                let what = match item {
                    Ok(watcher::Event::InitDone) => {
                        if synced_once {
                            tracing::info!(target: "sluice::kubernetes", "{what}: relisted");
                        } else {
                            tracing::debug!(target: "sluice::kubernetes", "{what}: initial list complete");
                        }
                        synced_once = true;
                        What::Synced
                    }
                    Ok(watcher::Event::Apply(o) | watcher::Event::Delete(o)) => What::Touched {
                        object: ObjectId::new(kind, o.namespace().unwrap_or_default(), o.name_any()),
                        service: service_of(&o),
                    },
                    // A relist in progress: the store keeps the previous state until InitDone.
                    Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
                    Err(e) => {
                        counters.watch_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            target: "sluice::kubernetes",
                            "{what}: {e}; retrying, the last known state keeps serving"
                        );
                        continue;
                    }
                };
                if tx.send(Notice { watcher: id, kind, what }).is_err() {
                    return;
                }
            }
        });
        store
    }
}
