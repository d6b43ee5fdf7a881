//! Upstream TLS origination with `CertStore::client_config` against a rustls backend on
//! 127.0.0.1 that only answers for the SNI it expects.

mod common;

use std::sync::Arc;

use common::*;
use sluice_certs::CertStore;
use sluice_certs::rustls::ServerConfig;
use sluice_certs::rustls::crypto::ring::default_provider;
use sluice_certs::rustls::pki_types::pem::PemObject;
use sluice_certs::rustls::pki_types::{PrivateKeyDer, ServerName};
use sluice_certs::rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use sluice_certs::rustls::sign::CertifiedKey;
use sluice_config::model::{
    CertificateRef, DataSource, SanMatcher, SanType, StringMatchKind, StringMatcher, StringMatcherCmp, UpstreamTls,
    ValidationContext, ValidationRef,
};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Serves `key` only to clients sending SNI `name`; anything else aborts the handshake.
#[derive(Debug)]
struct ExpectSni {
    name: String,
    key: Arc<CertifiedKey>,
}

impl ResolvesServerCert for ExpectSni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        (hello.server_name() == Some(self.name.as_str())).then(|| self.key.clone())
    }
}

/// A backend answering for `sni` with `leaf`, offering h2, optionally requiring client
/// certificates from `client_ca`.
async fn backend(sni: &str, leaf: &Leaf, client_ca: Option<&Ca>) -> Server {
    let provider = Arc::new(default_provider());
    let key = CertifiedKey::from_der(
        vec![leaf.der.clone()],
        PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap(),
        &provider,
    )
    .unwrap();
    let builder = ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions().unwrap();
    let builder = match client_ca {
        Some(ca) => builder.with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&ca.cert_pem)), provider).build().unwrap(),
        ),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(ExpectSni { name: sni.into(), key: Arc::new(key) }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    serve(Arc::new(config)).await
}

fn trusting(ca: &Ca) -> Option<ValidationRef> {
    Some(ValidationRef::Inline(ValidationContext {
        trusted_ca: Some(DataSource::Inline(ca.cert_pem.clone().into_bytes())),
        ..ValidationContext::default()
    }))
}

/// Connects through the store's client config and checks an echo; returns the ALPN result.
async fn originate(
    store: &CertStore,
    tls: &UpstreamTls,
    addr: std::net::SocketAddr,
    host: &str,
) -> std::io::Result<Option<Vec<u8>>> {
    let config = store.client_config(tls).map_err(std::io::Error::other)?;
    let name = store.server_name(tls, host).map_err(std::io::Error::other)?;
    let tcp = TcpStream::connect(addr).await?;
    let mut conn = tokio::time::timeout(TIMEOUT, TlsConnector::from(config).connect(name, tcp)).await??;
    echo(&mut conn, b"upstream").await?;
    Ok(conn.get_ref().1.alpn_protocol().map(<[u8]>::to_vec))
}

#[tokio::test]
async fn verifies_the_backend_against_the_trusted_ca_and_sends_sni() {
    let ca = Ca::new("backend ca");
    let leaf = ca.issue(&["backend.example.com"]);
    let server = backend("backend.example.com", &leaf, None).await;
    let store = CertStore::new();

    let mut tls = upstream();
    tls.sni = Some("backend.example.com".into());
    tls.validation = trusting(&ca);
    tls.alpn = vec!["h2".into()];
    let alpn = originate(&store, &tls, server.addr, "ignored:80").await.unwrap();
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));

    // The backend refuses any other SNI: proves the configured one was sent.
    let mut wrong_sni = tls.clone();
    wrong_sni.sni = Some("elsewhere.example.com".into());
    assert!(originate(&store, &wrong_sni, server.addr, "x").await.is_err());

    // auto_sni: the request's host (port stripped) is the SNI.
    let mut auto = tls.clone();
    auto.sni = None;
    auto.auto_sni = true;
    assert!(originate(&store, &auto, server.addr, "backend.example.com:8443").await.is_ok());
}

#[tokio::test]
async fn a_backend_certificate_from_another_ca_is_rejected() {
    let ca = Ca::new("backend ca");
    let other = Ca::new("other ca");
    let server = backend("backend.example.com", &other.issue(&["backend.example.com"]), None).await;
    let store = CertStore::new();
    let mut tls = upstream();
    tls.sni = Some("backend.example.com".into());
    tls.validation = trusting(&ca);
    assert!(originate(&store, &tls, server.addr, "x").await.is_err());

    // Without a validation context nothing is verified, as in Envoy.
    tls.validation = None;
    assert!(originate(&store, &tls, server.addr, "x").await.is_ok());
}

#[tokio::test]
async fn san_matchers_and_auto_san_validation() {
    let ca = Ca::new("backend ca");
    // The backend answers for backend.example.com with a certificate for other names.
    let server = backend("backend.example.com", &ca.issue(&["api.internal", "db.internal"]), None).await;
    let store = CertStore::new();
    let mut tls = upstream();
    tls.sni = Some("backend.example.com".into());
    tls.validation = trusting(&ca);
    // Envoy does not compare the certificate with the SNI unless asked to.
    assert!(originate(&store, &tls, server.addr, "x").await.is_ok());

    tls.auto_san_validation = true;
    assert!(originate(&store, &tls, server.addr, "x").await.is_err(), "auto_san_validation must check the SNI");
    tls.auto_san_validation = false;

    let dns = |kind| SanMatcher {
        san_type: SanType::Dns,
        matcher: StringMatcherCmp(StringMatcher { kind, ignore_case: false }),
    };
    for (matcher, ok) in [
        (dns(StringMatchKind::Exact("db.internal".into())), true),
        (dns(StringMatchKind::Suffix(".internal".into())), true),
        (dns(StringMatchKind::Exact("backend.example.com".into())), false),
    ] {
        tls.validation = Some(ValidationRef::Inline(ValidationContext {
            trusted_ca: Some(DataSource::Inline(ca.cert_pem.clone().into_bytes())),
            match_subject_alt_names: vec![matcher.clone()],
            ..ValidationContext::default()
        }));
        assert_eq!(originate(&store, &tls, server.addr, "x").await.is_ok(), ok, "{matcher:?}");
    }
}

#[tokio::test]
async fn presents_the_client_certificate_for_mtls_to_the_backend() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("backend ca");
    let client_ca = Ca::new("client ca");
    let server = backend("backend.example.com", &ca.issue(&["backend.example.com"]), Some(&client_ca)).await;
    let store = CertStore::new();
    let mut tls = upstream();
    tls.sni = Some("backend.example.com".into());
    tls.validation = trusting(&ca);
    assert!(originate(&store, &tls, server.addr, "x").await.is_err(), "the backend requires a client certificate");

    tls.certificates = vec![file_cert(dir.path(), "client", &client_ca.issue(&["proxy.example.com"]))];
    assert!(originate(&store, &tls, server.addr, "x").await.is_ok());

    // A client certificate the backend does not trust is presented, and refused.
    let mut rogue = tls.clone();
    rogue.certificates = vec![CertificateRef::Inline(inline_cert(&Ca::new("rogue").issue(&["proxy"])))];
    assert!(originate(&store, &rogue, server.addr, "x").await.is_err());
}

#[test]
fn server_name_prefers_sni_then_the_host() {
    let store = CertStore::new();
    let mut tls = upstream();
    tls.auto_sni = true;
    assert_eq!(
        store.server_name(&tls, "api.example.com:443").unwrap(),
        ServerName::try_from("api.example.com").unwrap()
    );
    assert_eq!(
        store.server_name(&tls, "[::1]:443").unwrap(),
        ServerName::IpAddress(std::net::IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]).into())
    );
    tls.sni = Some("fixed.example.com".into());
    assert_eq!(store.server_name(&tls, "api.example.com").unwrap(), ServerName::try_from("fixed.example.com").unwrap());
    tls.sni = None;
    assert!(store.server_name(&tls, "bad name!").is_err());
}
