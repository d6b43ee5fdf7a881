//! TLS through a real `sluice` process: termination from `DownstreamTlsContext` (files,
//! inline, SDS `Secret` resources, Kubernetes TLS Secrets), SNI filter chain selection, ALPN,
//! `tls_params`, mTLS, session resumption, passthrough by SNI, upstream origination, and
//! certificate rotation under load. Clients are rustls, `curl` and `openssl s_client`.
//!
//! All certificates and keys are generated at test time with rcgen; none is committed.

mod common;

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::client::Resumption;
use rustls::crypto::ring::{cipher_suite, default_provider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CipherSuite, ClientConfig, HandshakeKind, ProtocolVersion, RootCertStore, ServerConfig, SupportedCipherSuite,
    SupportedProtocolVersion,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use common::{Backend, Sluice, blocking_get, free_port};

const TIMEOUT: Duration = Duration::from_secs(10);
const TLS12: &[&SupportedProtocolVersion] = &[&rustls::version::TLS12];
const TLS13: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];

// ---------------------------------------------------------------------------------------------
// Certificates

struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

#[derive(Clone)]
struct Leaf {
    cert: String,
    key: String,
    der: CertificateDer<'static>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("ca key");
        let cert = params.self_signed(&key).expect("ca cert");
        Ca { pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    /// A server and client certificate (ECDSA P-256) for DNS names and URIs.
    fn leaf(&self, names: &[&str]) -> Leaf {
        self.sign(leaf_params(names))
    }

    fn sign(&self, params: CertificateParams) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        Leaf { cert: cert.pem(), key: key.serialize_pem(), der: cert.der().clone() }
    }

    /// A certificate that expired in 2021.
    fn expired(&self, names: &[&str]) -> Leaf {
        let mut params = leaf_params(names);
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        self.sign(params)
    }
}

fn leaf_params(names: &[&str]) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("leaf params");
    for n in names {
        let san = match n.strip_prefix("uri:") {
            Some(uri) => rcgen::SanType::URI(uri.try_into().expect("uri SAN")),
            None => rcgen::SanType::DnsName((*n).try_into().expect("dns SAN")),
        };
        params.subject_alt_names.push(san);
    }
    params.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or("leaf"));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params
}

fn roots(pem: &str) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots.add(cert.expect("CA PEM")).expect("add root");
    }
    roots
}

fn certified(leaf: &Leaf) -> Arc<CertifiedKey> {
    let key = PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).expect("key PEM");
    Arc::new(CertifiedKey::from_der(vec![leaf.der.clone()], key, &default_provider()).expect("certified key"))
}

/// A Kubernetes Secret volume: files reached through the `..data` symlink, which an update
/// swaps atomically (kubelet's AtomicWriter), so certificate and key always change together.
struct SecretVolume {
    dir: PathBuf,
    version: usize,
}

impl SecretVolume {
    fn new(dir: &Path, leaf: &Leaf) -> SecretVolume {
        std::fs::create_dir_all(dir).expect("volume dir");
        let mut v = SecretVolume { dir: dir.to_path_buf(), version: 0 };
        v.swap_raw(&leaf.cert, &leaf.key);
        for f in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(format!("..data/{f}"), dir.join(f)).expect("file symlink");
        }
        v
    }

    fn swap(&mut self, leaf: &Leaf) {
        self.swap_raw(&leaf.cert, &leaf.key);
    }

    fn swap_raw(&mut self, cert: &str, key: &str) {
        self.version += 1;
        let ts = format!("..2026_01_01_00_00_00.{}", self.version);
        std::fs::create_dir(self.dir.join(&ts)).expect("version dir");
        std::fs::write(self.dir.join(&ts).join("tls.crt"), cert).expect("write crt");
        std::fs::write(self.dir.join(&ts).join("tls.key"), key).expect("write key");
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&ts, &tmp).expect("data symlink");
        std::fs::rename(&tmp, self.dir.join("..data")).expect("swap ..data");
    }

    fn cert_path(&self) -> String {
        self.dir.join("tls.crt").display().to_string()
    }

    fn key_path(&self) -> String {
        self.dir.join("tls.key").display().to_string()
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration

const HCM: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const TCP_PROXY: &str = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const DOWNSTREAM_TLS: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
const UPSTREAM_TLS: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";

fn cec(name: &str, resources: Vec<Value>) -> String {
    serde_yaml_ng::to_string(&json!({
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumEnvoyConfig",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"resources": resources},
    }))
    .expect("yaml")
}

/// A listener without an address (Sluice allocates its port, as Cilium does) with Cilium's
/// TLS inspector.
fn listener(name: &str, chains: Vec<Value>) -> Value {
    json!({
        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
        "name": name,
        "listener_filters": [{
            "name": "envoy.filters.listener.tls_inspector",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"},
        }],
        "filter_chains": chains,
    })
}

/// A chain that serves HTTP (optionally over TLS) and routes everything to `cluster`.
fn http_chain(name: &str, matcher: Value, tls: Option<Value>, routes: Value) -> Value {
    let mut chain = json!({
        "name": name,
        "filter_chain_match": matcher,
        "filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": HCM,
                "stat_prefix": name,
                "route_config": {
                    "name": format!("routes-{name}"),
                    "virtual_hosts": [{"name": format!("vh-{name}"), "domains": ["*"], "routes": routes}],
                },
                "http_filters": [{
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                }],
            },
        }],
    });
    if let Some(tls) = tls {
        chain["transport_socket"] = tls;
    }
    chain
}

fn to_cluster(cluster: &str) -> Value {
    json!([{"match": {"prefix": "/"}, "route": {"cluster": cluster}}])
}

fn tcp_chain(name: &str, matcher: Value, proxy: Value) -> Value {
    let mut config = json!({"@type": TCP_PROXY, "stat_prefix": format!("tls-passthrough:{name}")});
    merge(&mut config, proxy);
    json!({
        "name": name,
        "filter_chain_match": matcher,
        "filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": config}],
    })
}

/// A `transport_socket` with a `DownstreamTlsContext`; `extra` is merged into the context.
fn downstream(common: Value, extra: Value) -> Value {
    let mut ctx = json!({"@type": DOWNSTREAM_TLS, "common_tls_context": common});
    merge(&mut ctx, extra);
    json!({"name": "envoy.transport_sockets.tls", "typed_config": ctx})
}

fn inline_cert(leaf: &Leaf) -> Value {
    json!({"certificate_chain": {"inline_string": leaf.cert}, "private_key": {"inline_string": leaf.key}})
}

fn file_cert(cert: &str, key: &str) -> Value {
    json!({"certificate_chain": {"filename": cert}, "private_key": {"filename": key}})
}

fn static_cluster(name: &str, addr: SocketAddr, extra: Value) -> Value {
    let mut c = json!({
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": addr.ip().to_string(), "port_value": addr.port(),
            }}}}]}],
        },
    });
    merge(&mut c, extra);
    c
}

fn secret_resource(name: &str, body: Value) -> Value {
    let mut s = json!({"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret", "name": name});
    merge(&mut s, body);
    s
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s.as_bytes())
}

/// A `kubernetes.io/tls` Secret manifest, as Cilium syncs it into its secrets namespace.
fn k8s_tls_secret(ns: &str, name: &str, leaf: &Leaf) -> String {
    serde_yaml_ng::to_string(&json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": ns},
        "type": "kubernetes.io/tls",
        "data": {"tls.crt": b64(&leaf.cert), "tls.key": b64(&leaf.key)},
    }))
    .expect("yaml")
}

fn k8s_ca_secret(ns: &str, name: &str, ca: &str) -> String {
    serde_yaml_ng::to_string(&json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": ns},
        "type": "Opaque",
        "data": {"ca.crt": b64(ca)},
    }))
    .expect("yaml")
}

fn merge(into: &mut Value, from: Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (slot, v) => *slot = v,
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

#[derive(Clone, Default)]
struct Opts {
    alpn: Vec<&'static str>,
    versions: Option<&'static [&'static SupportedProtocolVersion]>,
    suites: Option<Vec<SupportedCipherSuite>>,
    cert: Option<Leaf>,
    resume: bool,
    no_sni: bool,
}

fn client_config(ca: &str, o: &Opts) -> Arc<ClientConfig> {
    let mut provider = default_provider();
    if let Some(s) = &o.suites {
        provider.cipher_suites = s.clone();
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(o.versions.unwrap_or(rustls::DEFAULT_VERSIONS))
        .expect("versions")
        .with_root_certificates(roots(ca));
    let mut config = match &o.cert {
        Some(leaf) => builder
            .with_client_auth_cert(
                vec![leaf.der.clone()],
                PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).expect("client key"),
            )
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = o.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    if !o.resume {
        // A resumed handshake carries no certificate; tests observe which one is served.
        config.resumption = Resumption::disabled();
    }
    config.enable_sni = !o.no_sni;
    Arc::new(config)
}

/// What the TLS handshake negotiated.
#[derive(Debug, Clone)]
struct Negotiated {
    cert: Option<CertificateDer<'static>>,
    alpn: Option<Vec<u8>>,
    version: Option<ProtocolVersion>,
    suite: Option<CipherSuite>,
    kind: Option<HandshakeKind>,
}

enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

/// An HTTPS connection to Sluice (HTTP/2 when ALPN chose it, else HTTP/1.1 keep-alive).
struct Conn {
    tls: Negotiated,
    host: String,
    sender: Sender,
}

async fn tls_connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    sni: &str,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_string()).map_err(io::Error::other)?;
    tokio::time::timeout(TIMEOUT, tokio_rustls::TlsConnector::from(config).connect(name, tcp))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"))?
}

fn negotiated(s: &rustls::ClientConnection) -> Negotiated {
    Negotiated {
        cert: s.peer_certificates().and_then(|c| c.first()).map(|c| c.clone().into_owned()),
        alpn: s.alpn_protocol().map(<[u8]>::to_vec),
        version: s.protocol_version(),
        suite: s.negotiated_cipher_suite().map(|s| s.suite()),
        kind: s.handshake_kind(),
    }
}

async fn open(addr: SocketAddr, config: Arc<ClientConfig>, sni: &str) -> Result<Conn, String> {
    let stream = tls_connect(addr, config, sni).await.map_err(|e| format!("handshake: {e}"))?;
    let tls = negotiated(stream.get_ref().1);
    let io = TokioIo::new(stream);
    let sender = if tls.alpn.as_deref() == Some(b"h2") {
        let (sender, conn) =
            http2::handshake(TokioExecutor::new(), io).await.map_err(|e| format!("h2 handshake: {e}"))?;
        tokio::spawn(conn);
        Sender::H2(sender)
    } else {
        let (sender, conn) = http1::handshake(io).await.map_err(|e| format!("h1 handshake: {e}"))?;
        tokio::spawn(conn);
        Sender::H1(sender)
    };
    Ok(Conn { tls, host: sni.to_string(), sender })
}

/// A response: status, HTTP version, and the echo backend's JSON.
type Reply = (StatusCode, Version, Value);

impl Conn {
    async fn get(&mut self, path: &str) -> Result<Reply, String> {
        let fut = async {
            let resp = match &mut self.sender {
                Sender::H1(s) => {
                    s.ready().await.map_err(|e| e.to_string())?;
                    let req = Request::get(path).header("host", &self.host).body(Full::new(Bytes::new()));
                    s.send_request(req.map_err(|e| e.to_string())?).await
                }
                Sender::H2(s) => {
                    s.ready().await.map_err(|e| e.to_string())?;
                    let req = Request::get(format!("https://{}{path}", self.host))
                        .version(Version::HTTP_2)
                        .body(Full::new(Bytes::new()));
                    s.send_request(req.map_err(|e| e.to_string())?).await
                }
            }
            .map_err(|e| format!("request: {e}"))?;
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
            Ok((parts.status, parts.version, serde_json::from_slice(&body).unwrap_or(Value::Null)))
        };
        tokio::time::timeout(TIMEOUT, fut).await.map_err(|_| "request timed out".to_string())?
    }
}

/// One handshake and one request on it.
async fn fetch(addr: SocketAddr, config: Arc<ClientConfig>, sni: &str) -> Result<(Negotiated, Reply), String> {
    let mut conn = open(addr, config, sni).await?;
    let reply = conn.get("/").await?;
    Ok((conn.tls, reply))
}

fn backend_of(reply: &Reply) -> &str {
    reply.2["backend"].as_str().unwrap_or("")
}

fn certificates(sluice_dump: &Value) -> Vec<Value> {
    sluice_dump["certificates"]["material"].as_array().cloned().unwrap_or_default()
}

/// Polls until `f` holds, panicking with `what` after the timeout.
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// A listener's address once it accepts connections: the admin API lists a listener as soon
/// as the snapshot has it, a moment before the worker has bound its socket.
fn accepting(addr: SocketAddr) -> SocketAddr {
    let deadline = Instant::now() + TIMEOUT;
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err() {
        assert!(Instant::now() < deadline, "nothing accepts on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
    addr
}

/// Backends named after `names`, started on this runtime.
async fn backends(names: &[&str]) -> Vec<Backend> {
    let mut v = Vec::new();
    for n in names {
        v.push(Backend::start(n).await);
    }
    v
}

// ---------------------------------------------------------------------------------------------
// Downstream termination

/// SNI picks the chain, and each chain's certificate comes from a different source: a file, an
/// inline string, an SDS `Secret` resource of the same CEC, and a Kubernetes TLS Secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_selects_chains_with_certificates_from_every_source() {
    let ca = Ca::new("test CA");
    let file = ca.leaf(&["a.example.com"]);
    let wild = ca.leaf(&["*.wild.example.com"]);
    let sds = ca.leaf(&["sds.example.com"]);
    let k8s = ca.leaf(&["k8s.example.com"]);
    let default = ca.leaf(&["default.example.com", "other.example.org", "x.a.example.com"]);
    let certs = tempfile::tempdir().expect("tempdir");
    let crt = certs.path().join("a.crt");
    let key = certs.path().join("a.key");
    std::fs::write(&crt, &file.cert).unwrap();
    std::fs::write(&key, &file.key).unwrap();

    let names = ["file", "inline", "sds", "k8s", "default", "plain"];
    let bs = backends(&names).await;
    let mut resources = vec![listener(
        "edge",
        vec![
            http_chain(
                "file",
                json!({"server_names": ["a.example.com"], "transport_protocol": "tls"}),
                Some(downstream(
                    json!({"tls_certificates": [file_cert(crt.to_str().unwrap(), key.to_str().unwrap())]}),
                    json!({}),
                )),
                to_cluster("file"),
            ),
            http_chain(
                "inline",
                json!({"server_names": ["*.wild.example.com"], "transport_protocol": "tls"}),
                Some(downstream(json!({"tls_certificates": [inline_cert(&wild)]}), json!({}))),
                to_cluster("inline"),
            ),
            http_chain(
                "sds",
                json!({"server_names": ["sds.example.com"], "transport_protocol": "tls"}),
                Some(downstream(json!({"tls_certificate_sds_secret_configs": [{"name": "local-cert"}]}), json!({}))),
                to_cluster("sds"),
            ),
            http_chain(
                "k8s",
                json!({"server_names": ["k8s.example.com"], "transport_protocol": "tls"}),
                Some(downstream(
                    json!({"tls_certificate_sds_secret_configs": [{"name": "cilium-secrets/k8s-cert"}]}),
                    json!({}),
                )),
                to_cluster("k8s"),
            ),
            http_chain(
                "default",
                json!({"transport_protocol": "tls"}),
                Some(downstream(json!({"tls_certificates": [inline_cert(&default)]}), json!({}))),
                to_cluster("default"),
            ),
            http_chain("plain", json!({"transport_protocol": "raw_buffer"}), None, to_cluster("plain")),
        ],
    )];
    resources.push(secret_resource("local-cert", json!({"tls_certificate": inline_cert(&sds)})));
    for (n, b) in names.iter().zip(&bs) {
        resources.push(static_cluster(n, b.addr, json!({})));
    }
    let sluice = Sluice::start(&[
        ("cec.yaml", &cec("tls", resources)),
        ("secrets.yaml", &k8s_tls_secret("cilium-secrets", "k8s-cert", &k8s)),
    ]);
    let addr = accepting(sluice.listener("default/tls/edge"));
    let config = client_config(&ca.pem, &Opts::default());

    for (sni, want_cert, want_backend) in [
        ("a.example.com", &file, "file"),
        ("x.wild.example.com", &wild, "inline"),
        ("sds.example.com", &sds, "sds"),
        ("k8s.example.com", &k8s, "k8s"),
        // No chain names these: the chain without server_names is the default.
        ("other.example.org", &default, "default"),
        // An exact server name does not match its subdomains.
        ("x.a.example.com", &default, "default"),
    ] {
        let (tls, reply) = fetch(addr, config.clone(), sni).await.unwrap_or_else(|e| panic!("{sni}: {e}"));
        assert_eq!(tls.cert.as_ref(), Some(&want_cert.der), "certificate served for {sni}");
        assert_eq!(reply.0, StatusCode::OK, "{sni}");
        assert_eq!(backend_of(&reply), want_backend, "chain chosen for {sni}");
    }

    // Without SNI the default chain answers (the client still verifies its certificate).
    let no_sni = client_config(&ca.pem, &Opts { no_sni: true, ..Opts::default() });
    let (tls, reply) = fetch(addr, no_sni, "default.example.com").await.expect("no SNI");
    assert_eq!(tls.cert.as_ref(), Some(&default.der));
    assert_eq!(backend_of(&reply), "default");

    // A client trusting another CA refuses every certificate.
    let stranger = client_config(&Ca::new("other CA").pem, &Opts::default());
    assert!(fetch(addr, stranger, "a.example.com").await.is_err(), "a certificate from an unknown CA was accepted");

    // Plain HTTP on the same port takes the raw_buffer chain.
    let (status, body) = blocking_get(addr, "/").expect("plain request");
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["backend"], "plain");

    let dump = sluice.config_dump();
    let key_body = |leaf: &Leaf| leaf.key.lines().nth(1).unwrap_or_default().to_string();
    for leaf in [&wild, &sds, &k8s, &default] {
        assert!(!dump.to_string().contains(&key_body(leaf)), "a private key leaked into /config_dump");
    }
    assert!(!dump.to_string().contains("PRIVATE KEY"), "a private key leaked into /config_dump");
    let material = certificates(&dump);
    for name in ["cilium-secrets/k8s-cert", "default/tls/local-cert"] {
        let entry = material.iter().find(|m| m["name"] == name).unwrap_or_else(|| panic!("{name} in {material:?}"));
        assert!(entry["not_after"].is_string() && entry["last_error"].is_null(), "{entry}");
    }
    assert!(material.iter().any(|m| m["name"].as_str().is_some_and(|n| n.ends_with("a.crt"))), "{material:?}");
}

type AlpnCase = (&'static str, &'static [&'static str], Option<&'static [u8]>, Version);

/// ALPN from Cilium's single-string form, HTTP/2 served when h2 is negotiated, and Envoy's
/// behaviour when the client's protocols do not overlap: the handshake goes on without ALPN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_selects_the_http_version_and_tolerates_unknown_protocols() {
    let ca = Ca::new("alpn CA");
    let cert = ca.leaf(&["alpn.example.com", "h1.example.com"]);
    let bs = backends(&["echo"]).await;
    let resources = vec![
        listener(
            "edge",
            vec![
                http_chain(
                    "both",
                    json!({"server_names": ["alpn.example.com"]}),
                    Some(downstream(
                        json!({"tls_certificates": [inline_cert(&cert)], "alpn_protocols": ["h2,http/1.1"]}),
                        json!({}),
                    )),
                    to_cluster("echo"),
                ),
                http_chain(
                    "h1",
                    json!({"server_names": ["h1.example.com"]}),
                    Some(downstream(
                        json!({"tls_certificates": [inline_cert(&cert)], "alpn_protocols": ["http/1.1"]}),
                        json!({}),
                    )),
                    to_cluster("echo"),
                ),
            ],
        ),
        static_cluster("echo", bs[0].addr, json!({})),
    ];
    let sluice = Sluice::start(&[("cec.yaml", &cec("alpn", resources))]);
    let addr = accepting(sluice.listener("default/alpn/edge"));

    // (SNI, protocols the client offers, protocol negotiated, HTTP version served)
    let cases: [AlpnCase; 7] = [
        ("alpn.example.com", &["h2"], Some(b"h2"), Version::HTTP_2),
        ("alpn.example.com", &["h2", "http/1.1"], Some(b"h2"), Version::HTTP_2),
        ("alpn.example.com", &["http/1.1"], Some(b"http/1.1"), Version::HTTP_11),
        ("alpn.example.com", &[], None, Version::HTTP_11),
        // No overlap: rustls alone would abort with no_application_protocol.
        ("alpn.example.com", &["acme-tls/1"], None, Version::HTTP_11),
        ("h1.example.com", &["h2", "http/1.1"], Some(b"http/1.1"), Version::HTTP_11),
        ("h1.example.com", &["spdy/3"], None, Version::HTTP_11),
    ];
    for (sni, offered, want_alpn, want_version) in cases {
        let config = client_config(&ca.pem, &Opts { alpn: offered.to_vec(), ..Opts::default() });
        let (tls, reply) = fetch(addr, config, sni).await.unwrap_or_else(|e| panic!("{sni} offering {offered:?}: {e}"));
        assert_eq!(tls.alpn.as_deref(), want_alpn, "{sni} offering {offered:?}");
        assert_eq!(reply.0, StatusCode::OK);
        assert_eq!(reply.1, want_version, "{sni} offering {offered:?}");
        assert_eq!(backend_of(&reply), "echo");
    }
}

/// `tls_params`: version bounds and a cipher suite restriction are enforced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_params_bound_versions_and_cipher_suites() {
    let ca = Ca::new("params CA");
    let cert = ca.leaf(&["v13.example.com", "v12.example.com"]);
    let bs = backends(&["echo"]).await;
    let resources = vec![
        listener(
            "edge",
            vec![
                http_chain(
                    "v13",
                    json!({"server_names": ["v13.example.com"]}),
                    Some(downstream(
                        json!({"tls_certificates": [inline_cert(&cert)],
                               "tls_params": {"tls_minimum_protocol_version": "TLSv1_3"}}),
                        json!({}),
                    )),
                    to_cluster("echo"),
                ),
                http_chain(
                    "v12",
                    json!({"server_names": ["v12.example.com"]}),
                    Some(downstream(
                        json!({"tls_certificates": [inline_cert(&cert)],
                               "tls_params": {"tls_maximum_protocol_version": "TLSv1_2",
                                              "cipher_suites": ["ECDHE-ECDSA-CHACHA20-POLY1305"]}}),
                        json!({}),
                    )),
                    to_cluster("echo"),
                ),
            ],
        ),
        static_cluster("echo", bs[0].addr, json!({})),
    ];
    let sluice = Sluice::start(&[("cec.yaml", &cec("params", resources))]);
    let addr = accepting(sluice.listener("default/params/edge"));
    let c = |o: Opts| client_config(&ca.pem, &o);

    let (tls, _) = fetch(addr, c(Opts::default()), "v13.example.com").await.expect("TLS 1.3");
    assert_eq!(tls.version, Some(ProtocolVersion::TLSv1_3));
    let only12 = c(Opts { versions: Some(TLS12), ..Opts::default() });
    assert!(fetch(addr, only12.clone(), "v13.example.com").await.is_err(), "TLS 1.2 accepted below the minimum");

    let (tls, reply) = fetch(addr, c(Opts::default()), "v12.example.com").await.expect("TLS 1.2");
    assert_eq!(reply.0, StatusCode::OK);
    assert_eq!(tls.version, Some(ProtocolVersion::TLSv1_2), "the maximum is TLS 1.2");
    assert_eq!(tls.suite, Some(CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256));
    let only13 = c(Opts { versions: Some(TLS13), ..Opts::default() });
    assert!(fetch(addr, only13, "v12.example.com").await.is_err(), "TLS 1.3 accepted above the maximum");
    let other_suite = c(Opts {
        versions: Some(TLS12),
        suites: Some(vec![cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256]),
        ..Opts::default()
    });
    assert!(fetch(addr, other_suite, "v12.example.com").await.is_err(), "a cipher suite outside the list was accepted");
}

/// mTLS with an inline CA and a DNS SAN matcher, and with a combined validation context whose
/// CA comes from a Kubernetes Secret (`ca.crt`) and whose URI SAN matcher is inline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_accepts_trusted_clients_and_rejects_the_rest() {
    let ca = Ca::new("server CA");
    let server = ca.leaf(&["mtls.example.com", "combined.example.com"]);
    let clients = Ca::new("client CA");
    let good = clients.leaf(&["client.example.com", "uri:spiffe://cluster.local/ns/default/sa/client"]);
    let wrong_san = clients.leaf(&["intruder.example.com", "uri:spiffe://cluster.local/ns/other/sa/client"]);
    let untrusted =
        Ca::new("rogue CA").leaf(&["client.example.com", "uri:spiffe://cluster.local/ns/default/sa/client"]);
    let bs = backends(&["echo"]).await;
    let resources = vec![
        listener(
            "edge",
            vec![
                http_chain(
                    "inline-ca",
                    json!({"server_names": ["mtls.example.com"]}),
                    Some(downstream(
                        json!({"tls_certificates": [inline_cert(&server)],
                        "validation_context": {
                            "trusted_ca": {"inline_string": clients.pem},
                            "match_typed_subject_alt_names": [
                                {"san_type": "DNS", "matcher": {"exact": "client.example.com"}}],
                        }}),
                        json!({"require_client_certificate": true}),
                    )),
                    to_cluster("echo"),
                ),
                http_chain(
                    "combined",
                    json!({"server_names": ["combined.example.com"]}),
                    Some(downstream(
                        json!({"tls_certificates": [inline_cert(&server)],
                        "combined_validation_context": {
                            "default_validation_context": {"match_typed_subject_alt_names": [
                                {"san_type": "URI", "matcher": {"prefix": "spiffe://cluster.local/ns/default/"}}]},
                            "validation_context_sds_secret_config": {"name": "cilium-secrets/client-ca"},
                        }}),
                        json!({"require_client_certificate": true}),
                    )),
                    to_cluster("echo"),
                ),
            ],
        ),
        static_cluster("echo", bs[0].addr, json!({})),
    ];
    let sluice = Sluice::start(&[
        ("cec.yaml", &cec("mtls", resources)),
        ("ca.yaml", &k8s_ca_secret("cilium-secrets", "client-ca", &clients.pem)),
    ]);
    let addr = accepting(sluice.listener("default/mtls/edge"));
    let with = |leaf: Option<&Leaf>| client_config(&ca.pem, &Opts { cert: leaf.cloned(), ..Opts::default() });

    for sni in ["mtls.example.com", "combined.example.com"] {
        let (_, reply) = fetch(addr, with(Some(&good)), sni).await.unwrap_or_else(|e| panic!("{sni} good client: {e}"));
        assert_eq!(reply.0, StatusCode::OK, "{sni}");
        for (what, leaf) in
            [("no certificate", None), ("untrusted CA", Some(&untrusted)), ("wrong SAN", Some(&wrong_san))]
        {
            // With TLS 1.3 the client learns of the rejection on its first read.
            let r = fetch(addr, with(leaf), sni).await;
            assert!(r.is_err(), "{sni}: a client with {what} was served: {:?}", r.map(|(_, reply)| reply.0));
        }
        // And the same over TLS 1.2, where the rejection is part of the handshake.
        let tls12 = |leaf: Option<&Leaf>| {
            client_config(&ca.pem, &Opts { cert: leaf.cloned(), versions: Some(TLS12), ..Opts::default() })
        };
        assert!(fetch(addr, tls12(Some(&good)), sni).await.is_ok(), "{sni}: TLS 1.2 good client");
        assert!(fetch(addr, tls12(None), sni).await.is_err(), "{sni}: TLS 1.2 without a certificate");
    }
    assert_eq!(bs[0].hits(), 4, "only the good clients reached the backend");
}

/// Stateless (tickets) and stateful (session cache) resumption, TLS 1.3 and 1.2; a context
/// with both disabled never resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_resume_with_tickets_and_with_the_session_cache() {
    let ca = Ca::new("resumption CA");
    let cert = ca.leaf(&["tickets.example.com", "stateful.example.com", "never.example.com"]);
    let bs = backends(&["echo"]).await;
    let chain = |name: &str, extra: Value| {
        http_chain(
            name,
            json!({"server_names": [format!("{name}.example.com")]}),
            Some(downstream(json!({"tls_certificates": [inline_cert(&cert)]}), extra)),
            to_cluster("echo"),
        )
    };
    let resources = vec![
        listener(
            "edge",
            vec![
                chain("tickets", json!({})),
                chain("stateful", json!({"disable_stateless_session_resumption": true})),
                chain(
                    "never",
                    json!({"disable_stateless_session_resumption": true, "disable_stateful_session_resumption": true}),
                ),
            ],
        ),
        static_cluster("echo", bs[0].addr, json!({})),
    ];
    let sluice = Sluice::start(&[("cec.yaml", &cec("resume", resources))]);
    let addr = accepting(sluice.listener("default/resume/edge"));

    for (versions, label) in [(TLS13, "TLS 1.3"), (TLS12, "TLS 1.2")] {
        for (sni, resumes) in
            [("tickets.example.com", true), ("stateful.example.com", true), ("never.example.com", false)]
        {
            // One client configuration = one client session cache.
            let config = client_config(&ca.pem, &Opts { versions: Some(versions), resume: true, ..Opts::default() });
            let (first, reply) = fetch(addr, config.clone(), sni).await.expect("first handshake");
            assert_eq!(reply.0, StatusCode::OK);
            assert_eq!(first.kind, Some(HandshakeKind::Full), "{label} {sni}");
            let (second, reply) = fetch(addr, config, sni).await.expect("second handshake");
            assert_eq!(reply.0, StatusCode::OK);
            let want = if resumes { HandshakeKind::Resumed } else { HandshakeKind::Full };
            assert_eq!(second.kind, Some(want), "{label} {sni}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Passthrough

/// A TLS server that greets with its name and the SNI it received, then echoes bytes.
struct TlsEcho {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn tls_echo(name: &'static str, leaf: &Leaf) -> TlsEcho {
    let config = ServerConfig::builder_with_provider(Arc::new(default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der.clone()], PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).expect("key"))
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let sni = tls.get_ref().1.server_name().unwrap_or("-").to_string();
                if tls.write_all(format!("{name} {sni}\n").as_bytes()).await.is_err() {
                    return;
                }
                let mut buf = [0u8; 4096];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    TlsEcho { addr, task }
}

/// Reads the greeting line, then checks that `payload` comes back unchanged.
async fn greet_and_echo(stream: &mut tokio_rustls::client::TlsStream<TcpStream>, payload: &[u8]) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') {
        tokio::time::timeout(TIMEOUT, stream.read_exact(&mut byte)).await??;
        line.push(byte[0]);
    }
    stream.write_all(payload).await?;
    let mut back = vec![0u8; payload.len()];
    tokio::time::timeout(TIMEOUT, stream.read_exact(&mut back)).await??;
    assert_eq!(back, payload, "bytes changed on the way through");
    Ok(String::from_utf8_lossy(&line).trim().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_by_sni_to_a_cluster_and_to_weighted_clusters() {
    let backend_ca = Ca::new("backend CA");
    let b1_cert = backend_ca.leaf(&["pass.example.com", "split.example.com"]);
    let b2_cert = backend_ca.leaf(&["pass.example.com", "split.example.com"]);
    let b1 = tls_echo("b1", &b1_cert).await;
    let b2 = tls_echo("b2", &b2_cert).await;
    let edge_ca = Ca::new("edge CA");
    let edge_cert = edge_ca.leaf(&["term.example.com"]);
    let bs = backends(&["terminated"]).await;
    let resources = vec![
        listener(
            "edge",
            vec![
                tcp_chain("pass", json!({"server_names": ["pass.example.com"]}), json!({"cluster": "tls-b1"})),
                tcp_chain(
                    "split",
                    json!({"server_names": ["split.example.com"]}),
                    json!({"weighted_clusters": {"clusters": [{"name": "tls-b1", "weight": 50}, {"name": "tls-b2", "weight": 50}]}}),
                ),
                http_chain(
                    "term",
                    json!({"server_names": ["term.example.com"]}),
                    Some(downstream(json!({"tls_certificates": [inline_cert(&edge_cert)]}), json!({}))),
                    to_cluster("terminated"),
                ),
            ],
        ),
        static_cluster("tls-b1", b1.addr, json!({})),
        static_cluster("tls-b2", b2.addr, json!({})),
        static_cluster("terminated", bs[0].addr, json!({})),
    ];
    let sluice = Sluice::start(&[("cec.yaml", &cec("pass", resources))]);
    let addr = accepting(sluice.listener("default/pass/edge"));
    // Trusting only the backends' CA proves the client talks TLS with the backend itself.
    let to_backends = client_config(&backend_ca.pem, &Opts::default());
    let payload: Vec<u8> = (0..=255u8).cycle().take(64 * 1024).collect();

    let mut s = tls_connect(addr, to_backends.clone(), "pass.example.com").await.expect("passthrough handshake");
    assert_eq!(negotiated(s.get_ref().1).cert.as_ref(), Some(&b1_cert.der));
    assert_eq!(greet_and_echo(&mut s, &payload).await.expect("echo"), "b1 pass.example.com");

    let (mut seen1, mut seen2) = (0, 0);
    for _ in 0..24 {
        let mut s = tls_connect(addr, to_backends.clone(), "split.example.com").await.expect("weighted handshake");
        let cert = negotiated(s.get_ref().1).cert;
        match greet_and_echo(&mut s, b"hello").await.expect("echo").as_str() {
            "b1 split.example.com" => {
                assert_eq!(cert.as_ref(), Some(&b1_cert.der));
                seen1 += 1;
            }
            "b2 split.example.com" => {
                assert_eq!(cert.as_ref(), Some(&b2_cert.der));
                seen2 += 1;
            }
            other => panic!("unexpected greeting {other:?}"),
        }
    }
    // 24 connections at 50/50: the chance of missing one side is 2 * 2^-24.
    assert!(seen1 > 0 && seen2 > 0, "weighted passthrough: b1 {seen1}, b2 {seen2}");

    // The terminating chain on the same port presents Sluice's own certificate...
    let (tls, reply) =
        fetch(addr, client_config(&edge_ca.pem, &Opts::default()), "term.example.com").await.expect("term");
    assert_eq!(tls.cert.as_ref(), Some(&edge_cert.der));
    assert_eq!(backend_of(&reply), "terminated");
    // ...which a client expecting the backend refuses; and a name no chain matches is closed.
    assert!(tls_connect(addr, to_backends.clone(), "term.example.com").await.is_err());
    assert!(tls_connect(addr, to_backends, "nope.example.com").await.is_err(), "no chain should match");
}

// ---------------------------------------------------------------------------------------------
// Upstream origination

/// An HTTPS backend that only answers for SNI `backend.internal`, requires a client certificate
/// from `client_ca`, offers h2 and http/1.1, and echoes what it negotiated.
struct HttpsBackend {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    handshakes_failed: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HttpsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Debug)]
struct OnlyName {
    name: &'static str,
    key: Arc<CertifiedKey>,
}

impl ResolvesServerCert for OnlyName {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        (hello.server_name() == Some(self.name)).then(|| self.key.clone())
    }
}

async fn https_backend(leaf: &Leaf, client_ca: &str) -> HttpsBackend {
    let provider = Arc::new(default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(client_ca)), provider.clone())
        .build()
        .expect("client verifier");
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(OnlyName { name: "backend.internal", key: certified(leaf) }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let requests = Arc::new(AtomicUsize::new(0));
    let handshakes_failed = Arc::new(AtomicUsize::new(0));
    let (req_count, failed) = (requests.clone(), handshakes_failed.clone());
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let (req_count, failed) = (req_count.clone(), failed.clone());
            tokio::spawn(async move {
                let tls = match acceptor.accept(tcp).await {
                    Ok(tls) => tls,
                    Err(_) => {
                        failed.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                };
                let session = tls.get_ref().1;
                let info = json!({
                    "backend": "https",
                    "sni": session.server_name(),
                    "alpn": session.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned()),
                    "client_cert": session.peer_certificates().is_some_and(|c| !c.is_empty()),
                });
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    req_count.fetch_add(1, Ordering::SeqCst);
                    let mut v = info.clone();
                    v["version"] = json!(format!("{:?}", req.version()));
                    async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(v.to_string()))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    HttpsBackend { addr, requests, handshakes_failed, task }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_with_sni_trusted_ca_alpn_and_client_certificate() {
    let backend_ca = Ca::new("backend CA");
    let mesh_ca = Ca::new("mesh CA");
    let backend = https_backend(&backend_ca.leaf(&["backend.internal"]), &mesh_ca.pem).await;
    let client = mesh_ca.leaf(&["sluice.mesh"]);
    let h2 = json!({"typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}},
    }}});
    let auto = json!({"typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "auto_config": {},
    }}});
    let tls = |ctx: Value| {
        json!({"transport_socket": {"name": "envoy.transport_sockets.tls",
            "typed_config": {"@type": UPSTREAM_TLS, "sni": ctx["sni"].clone(), "common_tls_context": ctx["common"].clone()}}})
    };
    let with = |mut base: Value, more: Value| {
        merge(&mut base, more);
        base
    };
    let good_common = json!({
        "alpn_protocols": ["h2"],
        "tls_certificates": [inline_cert(&client)],
        "validation_context": {"trusted_ca": {"inline_string": backend_ca.pem}},
    });
    let clusters = [
        ("inline", with(tls(json!({"sni": "backend.internal", "common": good_common})), h2.clone())),
        (
            // CA from an SDS Secret resource, client certificate from a Kubernetes Secret,
            // ALPN left to the cluster's protocol options.
            "sds",
            with(
                tls(json!({"sni": "backend.internal", "common": {
                    "tls_certificate_sds_secret_configs": [{"name": "cilium-secrets/mesh-client"}],
                    "validation_context_sds_secret_config": {"name": "backend-ca"},
                }})),
                auto,
            ),
        ),
        (
            "wrong-ca",
            with(
                tls(json!({"sni": "backend.internal", "common": {
                    "tls_certificates": [inline_cert(&client)],
                    "validation_context": {"trusted_ca": {"inline_string": Ca::new("unrelated CA").pem}},
                }})),
                h2.clone(),
            ),
        ),
        (
            "wrong-sni",
            with(
                tls(json!({"sni": "other.internal", "common": {
                    "tls_certificates": [inline_cert(&client)],
                    "validation_context": {"trusted_ca": {"inline_string": backend_ca.pem}},
                }})),
                h2.clone(),
            ),
        ),
        (
            "no-client-cert",
            with(
                tls(json!({"sni": "backend.internal", "common": {
                    "validation_context": {"trusted_ca": {"inline_string": backend_ca.pem}},
                }})),
                h2,
            ),
        ),
    ];
    let routes: Vec<Value> =
        clusters.iter().map(|(n, _)| json!({"match": {"prefix": format!("/{n}")}, "route": {"cluster": n}})).collect();
    let mut resources = vec![listener("edge", vec![http_chain("plain", json!({}), None, Value::Array(routes))])];
    for (n, extra) in &clusters {
        resources.push(static_cluster(n, backend.addr, extra.clone()));
    }
    resources.push(secret_resource(
        "backend-ca",
        json!({"validation_context": {"trusted_ca": {"inline_string": backend_ca.pem}}}),
    ));
    let sluice = Sluice::start(&[
        ("cec.yaml", &cec("up", resources)),
        ("client.yaml", &k8s_tls_secret("cilium-secrets", "mesh-client", &client)),
    ]);
    let addr = accepting(sluice.listener("default/up/edge"));

    for path in ["/inline", "/sds"] {
        let (status, body) = blocking_get(addr, path).expect("request");
        assert_eq!(status, 200, "{path}: {body}");
        let seen: Value = serde_json::from_str(&body).expect("backend json");
        assert_eq!(seen["sni"], "backend.internal", "{path}");
        assert_eq!(seen["alpn"], "h2", "{path}");
        assert_eq!(seen["version"], "HTTP/2.0", "{path}");
        assert_eq!(seen["client_cert"], true, "{path}");
    }
    assert_eq!(backend.requests.load(Ordering::SeqCst), 2);
    for path in ["/wrong-ca", "/wrong-sni", "/no-client-cert"] {
        let (status, body) = blocking_get(addr, path).expect("request");
        assert!(status >= 500, "{path} should fail upstream, got {status}: {body}");
    }
    assert_eq!(backend.requests.load(Ordering::SeqCst), 2, "no request got through a failed handshake");
    assert!(backend.handshakes_failed.load(Ordering::SeqCst) >= 2, "wrong SNI and missing client cert are refused");
}

// ---------------------------------------------------------------------------------------------
// Rotation

/// Outcome of one load loop.
#[derive(Default, Debug)]
struct LoadStats {
    ok: usize,
    failed: Vec<String>,
    /// Handshakes that saw the new certificate, and old ones seen after a new one.
    saw_new: usize,
    old_after_new: usize,
}

/// New handshakes in a loop until `stop`, one request each, recording which certificate served.
async fn handshake_loop(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    sni: &'static str,
    new: CertificateDer<'static>,
    stop: Arc<AtomicBool>,
    new_seen: Arc<AtomicUsize>,
) -> LoadStats {
    let mut s = LoadStats::default();
    while !stop.load(Ordering::Relaxed) {
        match fetch(addr, config.clone(), sni).await {
            Ok((tls, reply)) if reply.0 == StatusCode::OK => {
                s.ok += 1;
                if tls.cert.as_ref() == Some(&new) {
                    s.saw_new += 1;
                    new_seen.fetch_add(1, Ordering::Relaxed);
                } else if s.saw_new > 0 {
                    s.old_after_new += 1;
                }
            }
            Ok((_, reply)) => s.failed.push(format!("{sni}: status {}", reply.0)),
            Err(e) => s.failed.push(format!("{sni}: {e}")),
        }
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_load_fails_nothing_and_spares_established_connections() {
    let ca = Ca::new("rotation CA");
    let files_old = ca.leaf(&["files.example.com"]);
    let files_new = ca.leaf(&["files.example.com"]);
    let sds_old = ca.leaf(&["sds.example.com"]);
    let sds_new = ca.leaf(&["sds.example.com"]);
    let certs = tempfile::tempdir().expect("tempdir");
    let mut volume = SecretVolume::new(&certs.path().join("tls"), &files_old);
    let bs = backends(&["echo"]).await;
    let resources = vec![
        listener(
            "edge",
            vec![
                http_chain(
                    "files",
                    json!({"server_names": ["files.example.com"]}),
                    Some(downstream(
                        json!({"tls_certificates": [file_cert(&volume.cert_path(), &volume.key_path())]}),
                        json!({}),
                    )),
                    to_cluster("echo"),
                ),
                http_chain(
                    "sds",
                    json!({"server_names": ["sds.example.com"]}),
                    Some(downstream(
                        json!({"tls_certificate_sds_secret_configs": [{"name": "cilium-secrets/rotating"}]}),
                        json!({}),
                    )),
                    to_cluster("echo"),
                ),
            ],
        ),
        static_cluster("echo", bs[0].addr, json!({})),
    ];
    let sluice = Sluice::start(&[
        ("cec.yaml", &cec("rot", resources)),
        ("secret.yaml", &k8s_tls_secret("cilium-secrets", "rotating", &sds_old)),
    ]);
    let addr = accepting(sluice.listener("default/rot/edge"));
    let config = client_config(&ca.pem, &Opts::default());

    // An established keep-alive connection on each chain, opened before any rotation.
    let mut kept = Vec::new();
    for (sni, old) in [("files.example.com", &files_old), ("sds.example.com", &sds_old)] {
        let conn = open(addr, config.clone(), sni).await.expect("keep-alive connection");
        assert_eq!(conn.tls.cert.as_ref(), Some(&old.der));
        kept.push(conn);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let seen = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
    let loads = [("files.example.com", &files_new, &seen[0]), ("sds.example.com", &sds_new, &seen[1])].map(
        |(sni, new, seen)| {
            tokio::spawn(handshake_loop(addr, config.clone(), sni, new.der.clone(), stop.clone(), seen.clone()))
        },
    );
    let keepalive = tokio::spawn({
        let stop = stop.clone();
        async move {
            let (mut ok, mut failed) = (0usize, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                for c in &mut kept {
                    match c.get("/").await {
                        Ok(r) if r.0 == StatusCode::OK => ok += 1,
                        other => failed.push(format!("{}: {:?}", c.host, other.map(|r| r.0))),
                    }
                }
            }
            (ok, failed, kept)
        }
    });

    // Each rotation happens under load, and the load goes on until new handshakes see the
    // new certificate (normally ~3 s in all; bounded by `eventually`).
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    volume.swap(&files_new);
    eventually("new handshakes to see the rotated file", || async { seen[0].load(Ordering::Relaxed) > 0 }).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    sluice.write("secret.yaml", &k8s_tls_secret("cilium-secrets", "rotating", &sds_new));
    eventually("new handshakes to see the updated secret", || async { seen[1].load(Ordering::Relaxed) > 0 }).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let [files_load, sds_load] = loads;
    let files_load = files_load.await.expect("files load");
    let sds_load = sds_load.await.expect("sds load");
    let (kept_ok, kept_failed, mut kept) = keepalive.await.expect("keep-alive load");
    println!(
        "rotation load over {:?}: files {files_load:?}, sds {sds_load:?}, keep-alive ok {kept_ok}",
        started.elapsed()
    );

    for (what, load) in [("file rotation", &files_load), ("SDS rotation", &sds_load)] {
        assert!(load.failed.is_empty(), "{what}: failed handshakes or requests: {:?}", load.failed);
        assert!(load.ok > 20, "{what}: too little load to mean anything ({})", load.ok);
        assert!(load.saw_new > 0, "{what}: new handshakes never saw the new certificate");
        assert!(load.saw_new < load.ok, "{what}: the old certificate was never served before the rotation");
        assert_eq!(load.old_after_new, 0, "{what}: the old certificate came back after the new one");
    }
    assert!(kept_failed.is_empty(), "established connections were disturbed: {kept_failed:?}");
    assert!(kept_ok > 20, "keep-alive requests: {kept_ok}");
    // The established connections still work and still hold the certificate they negotiated.
    for (c, old) in kept.iter_mut().zip([&files_old, &sds_old]) {
        assert_eq!(c.tls.cert.as_ref(), Some(&old.der));
        assert_eq!(c.get("/").await.expect("established connection after rotation").0, StatusCode::OK);
    }
    let material = certificates(&sluice.config_dump());
    assert!(material.iter().all(|m| m["last_error"].is_null()), "{material:?}");
    assert!(sluice.config_dump()["certificates"]["reloads_ok"].as_u64().unwrap_or(0) >= 2);
}

/// A `sluice run` with its log captured, for tests that assert on what an operator reads.
struct LoggedSluice {
    child: Child,
    admin: SocketAddr,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl LoggedSluice {
    fn start(files: &[(&str, &str)]) -> LoggedSluice {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("config")).expect("config dir");
        for (name, content) in files {
            std::fs::write(dir.path().join("config").join(name), content).expect("write config");
        }
        let log = dir.path().join("sluice.log");
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("admin address");
        let lo = common::proxy_port_block(20);
        let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["run", "--config"])
            .arg(dir.path().join("config"))
            .args(["--workers", "1", "--no-health-metrics", "--admin-address", &admin.to_string()])
            .args(["--proxy-port-range", &format!("{lo}-{}", lo + 19)])
            .env("SLUICE_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn sluice");
        let s = LoggedSluice { child, admin, log, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while blocking_get(s.admin, "/ready").map(|r| r.0).ok() != Some(200) {
            assert!(Instant::now() < deadline, "sluice did not become ready:\n{}", s.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn write(&self, name: &str, content: &str) {
        let tmp = self.dir.path().join("config").join(format!(".{name}.tmp"));
        std::fs::write(&tmp, content).expect("write");
        std::fs::rename(&tmp, self.dir.path().join("config").join(name)).expect("rename");
    }

    fn dump(&self) -> Value {
        serde_json::from_str(&blocking_get(self.admin, "/config_dump").expect("config_dump").1).expect("json")
    }

    fn listener(&self, name: &str) -> SocketAddr {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let body = blocking_get(self.admin, "/listeners").expect("listeners").1;
            let v: Value = serde_json::from_str(&body).expect("listeners json");
            let found = v.as_array().into_iter().flatten().find(|l| l["name"] == name).and_then(|l| {
                l["addresses"]
                    .as_array()?
                    .iter()
                    .filter_map(Value::as_str)
                    .find(|a| !a.starts_with('['))
                    .map(String::from)
            });
            if let Some(a) = found {
                return a.parse().expect("listener address");
            }
            assert!(Instant::now() < deadline, "listener {name} not in {body}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The `last_error` of the material named `name` (or whose file name ends with it).
    fn last_error(&self, name: &str) -> Option<String> {
        certificates(&self.dump())
            .iter()
            .find(|m| m["name"].as_str().is_some_and(|n| n == name || n.ends_with(name)))
            .and_then(|m| m["last_error"].as_str().map(String::from))
    }
}

impl Drop for LoggedSluice {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Expired and key-mismatched updates are refused with specific errors in the status and the
/// log, the previous certificate keeps serving, and a good update afterwards is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificates_are_refused_and_the_previous_one_keeps_serving() {
    let ca = Ca::new("bad CA");
    let good = ca.leaf(&["rot.example.com"]);
    let later = ca.leaf(&["rot.example.com"]);
    let sds_good = ca.leaf(&["sds.example.com"]);
    let expired_at_start = ca.expired(&["broken.example.com"]);
    let work = tempfile::tempdir().expect("tempdir");
    let mut volume = SecretVolume::new(&work.path().join("rot"), &good);
    let broken = SecretVolume::new(&work.path().join("broken"), &expired_at_start);
    let bs = backends(&["echo"]).await;
    let chain = |name: &str, certs: Value| {
        http_chain(
            name,
            json!({"server_names": [format!("{name}.example.com")]}),
            Some(downstream(certs, json!({}))),
            to_cluster("echo"),
        )
    };
    let resources = vec![
        listener(
            "edge",
            vec![
                chain("rot", json!({"tls_certificates": [file_cert(&volume.cert_path(), &volume.key_path())]})),
                chain("sds", json!({"tls_certificate_sds_secret_configs": [{"name": "cilium-secrets/served"}]})),
                chain("broken", json!({"tls_certificates": [file_cert(&broken.cert_path(), &broken.key_path())]})),
            ],
        ),
        static_cluster("echo", bs[0].addr, json!({})),
    ];
    let sluice = LoggedSluice::start(&[
        ("cec.yaml", &cec("bad", resources)),
        ("secret.yaml", &k8s_tls_secret("cilium-secrets", "served", &sds_good)),
    ]);
    let addr = accepting(sluice.listener("default/bad/edge"));
    let config = client_config(&ca.pem, &Opts::default());
    let served = |sni: &'static str| {
        let config = config.clone();
        async move { fetch(addr, config, sni).await.map(|(tls, _)| tls.cert) }
    };
    assert_eq!(served("rot.example.com").await.expect("rot").as_ref(), Some(&good.der));
    assert_eq!(served("sds.example.com").await.expect("sds").as_ref(), Some(&sds_good.der));

    // A chain whose only certificate is expired from the start serves nothing, and says why,
    // in the log and in the certificate status.
    assert!(served("broken.example.com").await.is_err(), "an expired certificate was served");
    let log = sluice.log();
    assert!(
        log.lines().any(|l| l.contains("broken") && l.contains("certificate expired on 2021-01-01")),
        "the log does not explain the broken chain:\n{log}"
    );
    let why = sluice.last_error("broken/tls.crt").expect("the broken certificate in the status");
    assert!(why.contains("certificate expired on 2021-01-01"), "{why}");

    // Expired update: refused, previous keeps serving.
    volume.swap(&ca.expired(&["rot.example.com"]));
    eventually("the expired update to be refused", || async {
        sluice.last_error("rot/tls.crt").is_some_and(|e| e.contains("certificate expired on 2021-01-01"))
    })
    .await;
    assert_eq!(served("rot.example.com").await.expect("rot after expired update").as_ref(), Some(&good.der));

    // Certificate and key that do not belong together: refused, previous keeps serving.
    let other = ca.leaf(&["rot.example.com"]);
    volume.swap_raw(&later.cert, &other.key);
    eventually("the mismatched update to be refused", || async {
        sluice.last_error("rot/tls.crt").is_some_and(|e| e.contains("private key does not match"))
    })
    .await;
    assert_eq!(served("rot.example.com").await.expect("rot after mismatched update").as_ref(), Some(&good.der));

    // The same through an SDS secret update.
    sluice.write("secret.yaml", &k8s_tls_secret("cilium-secrets", "served", &ca.expired(&["sds.example.com"])));
    eventually("the expired secret to be refused", || async {
        sluice.last_error("cilium-secrets/served").is_some_and(|e| e.contains("certificate expired"))
    })
    .await;
    assert_eq!(served("sds.example.com").await.expect("sds after expired update").as_ref(), Some(&sds_good.der));

    let log = sluice.log();
    for needle in ["certificate expired on 2021-01-01", "private key does not match", "cilium-secrets/served"] {
        assert!(log.contains(needle), "log lacks {needle:?}:\n{log}");
    }

    // A good certificate afterwards is taken and clears the error.
    volume.swap(&later);
    eventually("the good update to be served", || async {
        served("rot.example.com").await.ok().flatten().as_ref() == Some(&later.der)
    })
    .await;
    assert_eq!(sluice.last_error("rot/tls.crt"), None);
}

// ---------------------------------------------------------------------------------------------
// Real clients

fn have(tool: &str) -> bool {
    let found = Command::new(tool).arg("version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
    if !found {
        eprintln!("SKIPPED: `{tool}` is not installed (scripts/setup installs it)");
    }
    found
}

/// Runs a command with stdin closed; returns (success, stdout + stderr).
async fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = tokio::time::timeout(
        TIMEOUT,
        tokio::process::Command::new(cmd).args(args).stdin(Stdio::null()).kill_on_drop(true).output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{cmd} {args:?} timed out"))
    .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_and_openssl_s_client_against_sluice() {
    if !have("curl") || !have("openssl") {
        return;
    }
    let ca = Ca::new("cli CA");
    let server = ca.leaf(&["web.example.com", "mtls.example.com"]);
    let client = ca.leaf(&["cli-client"]);
    let files = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, content: &str| {
        let p = files.path().join(name);
        std::fs::write(&p, content).expect("write");
        p.display().to_string()
    };
    let ca_file = write("ca.pem", &ca.pem);
    let (crt, key) = (write("server.crt", &server.cert), write("server.key", &server.key));
    let (client_crt, client_key) = (write("client.crt", &client.cert), write("client.key", &client.key));
    let bs = backends(&["echo"]).await;
    let resources = vec![
        listener(
            "edge",
            vec![
                http_chain(
                    "web",
                    json!({"server_names": ["web.example.com"]}),
                    Some(downstream(
                        json!({"tls_certificates": [file_cert(&crt, &key)], "alpn_protocols": ["h2,http/1.1"]}),
                        json!({}),
                    )),
                    to_cluster("echo"),
                ),
                http_chain(
                    "mtls",
                    json!({"server_names": ["mtls.example.com"]}),
                    Some(downstream(
                        json!({"tls_certificates": [file_cert(&crt, &key)],
                               "validation_context": {"trusted_ca": {"filename": ca_file}}}),
                        json!({"require_client_certificate": true}),
                    )),
                    to_cluster("echo"),
                ),
            ],
        ),
        static_cluster("echo", bs[0].addr, json!({})),
    ];
    let sluice = Sluice::start(&[("cec.yaml", &cec("cli", resources))]);
    let addr = accepting(sluice.listener("default/cli/edge"));
    let port = addr.port().to_string();
    let resolve = |host: &str| format!("{host}:{port}:127.0.0.1");
    let url = |host: &str| format!("https://{host}:{port}/curl");
    let curl = |extra: &[&str], host: &str| {
        let mut args: Vec<String> = ["-sS", "--max-time", "5", "--cacert", &ca_file, "--resolve", &resolve(host)]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(["-w".to_string(), "\n%{http_code} %{http_version}".to_string(), url(host)]);
        args
    };
    let curl_run = |args: Vec<String>| async move {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        run("curl", &refs).await
    };

    let (ok, out) = curl_run(curl(&[], "web.example.com")).await;
    assert!(ok && out.ends_with("200 2"), "curl over h2: {out}");
    assert!(out.contains("\"backend\":\"echo\""), "{out}");
    let (ok, out) = curl_run(curl(&["--http1.1", "--tlsv1.2", "--tls-max", "1.2"], "web.example.com")).await;
    assert!(ok && out.ends_with("200 1.1"), "curl HTTP/1.1 over TLS 1.2: {out}");
    let (ok, out) = curl_run(curl(&["--cert", &client_crt, "--key", &client_key], "mtls.example.com")).await;
    // This chain configures no ALPN, so curl speaks HTTP/1.1.
    assert!(ok && out.ends_with("200 1.1"), "curl with a client certificate: {out}");
    let (ok, out) = curl_run(curl(&[], "mtls.example.com")).await;
    assert!(!ok, "curl without a client certificate was served: {out}");

    let connect = addr.to_string();
    let s_client = |extra: &[&str]| {
        let mut args = vec!["s_client", "-connect", &connect, "-servername", "web.example.com", "-CAfile", &ca_file];
        args.extend_from_slice(extra);
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let openssl = |args: Vec<String>| async move {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        run("openssl", &refs).await
    };
    let served = ["subject=CN = web.example.com", "Verify return code: 0 (ok)"];
    let (_, out) = openssl(s_client(&["-alpn", "h2,http/1.1"])).await;
    for want in served.iter().chain(&["New, TLSv1.3, Cipher is TLS_", "ALPN protocol: h2"]) {
        assert!(out.contains(want), "openssl s_client: missing {want:?} in\n{out}");
    }
    let (_, out) = openssl(s_client(&["-tls1_2", "-alpn", "http/1.1"])).await;
    for want in served.iter().chain(&["New, TLSv1.2, Cipher is ECDHE-ECDSA-", "ALPN protocol: http/1.1"]) {
        assert!(out.contains(want), "openssl s_client -tls1_2: missing {want:?} in\n{out}");
    }
    // Refusals. Security level 0 makes OpenSSL 3 really offer TLS 1.0/1.1 and CBC suites, so
    // the refusal is Sluice's.
    for (what, args) in [
        ("TLS 1.1", &["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"][..]),
        ("TLS 1.0", &["-tls1", "-cipher", "DEFAULT@SECLEVEL=0"][..]),
        ("a CBC suite", &["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA:@SECLEVEL=0"][..]),
        ("static RSA key exchange", &["-tls1_2", "-cipher", "AES128-GCM-SHA256:@SECLEVEL=0"][..]),
    ] {
        let (ok, out) = openssl(s_client(args)).await;
        assert!(
            !ok && out.contains("Cipher is (NONE)") && out.contains("no peer certificate available"),
            "{what} was accepted:\n{out}"
        );
    }
}
