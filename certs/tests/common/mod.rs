//! Test support: certificates generated with rcgen at test time, TLS peers over 127.0.0.1.
#![allow(dead_code)] // Each test binary uses a different subset.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use sluice_certs::rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use sluice_certs::rustls::client::{Resumption, WebPkiServerVerifier};
use sluice_certs::rustls::crypto::ring::default_provider;
use sluice_certs::rustls::pki_types::pem::PemObject;
use sluice_certs::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use sluice_certs::rustls::{
    self, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme, SupportedProtocolVersion,
};
use sluice_config::model::{CertificateRef, DataSource, DownstreamTls, TlsCertificate, TlsParams, UpstreamTls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A test certificate authority.
pub struct Ca {
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A leaf certificate and its key, PEM.
#[derive(Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { cert_pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    /// A server+client leaf for `names` (DNS names or IPs), ECDSA P-256.
    pub fn issue(&self, names: &[&str]) -> Leaf {
        self.issue_with(leaf_params(names), KeyPair::generate().unwrap())
    }

    /// A CRL revoking the certificates with these serial numbers.
    pub fn crl(&self, revoked: &[u64]) -> String {
        // A fixed past date: rcgen exposes no clock, and only next_update must be ahead.
        let now = rcgen::date_time_ymd(2020, 1, 1);
        let params = rcgen::CertificateRevocationListParams {
            this_update: now,
            next_update: rcgen::date_time_ymd(4000, 1, 1),
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|serial| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from(*serial),
                    revocation_time: now,
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        params.signed_by(&self.issuer).unwrap().pem().unwrap()
    }

    pub fn issue_with(&self, params: CertificateParams, key: KeyPair) -> Leaf {
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf { cert_pem: cert.pem(), key_pem: key.serialize_pem(), der: cert.der().clone() }
    }
}

pub fn leaf_params(names: &[&str]) -> CertificateParams {
    let mut params = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or("leaf"));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params
}

pub fn write(dir: &Path, name: &str, contents: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path.to_str().unwrap().to_string()
}

/// Writes `leaf` as `<prefix>.crt` / `<prefix>.key` and returns the reference to the files.
pub fn file_cert(dir: &Path, prefix: &str, leaf: &Leaf) -> CertificateRef {
    let cert = write(dir, &format!("{prefix}.crt"), &leaf.cert_pem);
    let key = write(dir, &format!("{prefix}.key"), &leaf.key_pem);
    CertificateRef::Inline(TlsCertificate {
        certificate_chain: DataSource::Filename(cert),
        private_key: DataSource::Filename(key),
    })
}

pub fn inline_cert(leaf: &Leaf) -> TlsCertificate {
    TlsCertificate {
        certificate_chain: DataSource::Inline(leaf.cert_pem.clone().into_bytes()),
        private_key: DataSource::Inline(leaf.key_pem.clone().into_bytes()),
    }
}

pub fn downstream(certificates: Vec<CertificateRef>) -> DownstreamTls {
    DownstreamTls {
        certificates,
        alpn: Vec::new(),
        params: TlsParams::default(),
        require_client_certificate: false,
        validation: None,
        session_ticket_keys: None,
        disable_stateless_session_resumption: false,
        disable_stateful_session_resumption: false,
    }
}

pub fn upstream() -> UpstreamTls {
    UpstreamTls {
        sni: None,
        certificates: Vec::new(),
        validation: None,
        alpn: Vec::new(),
        params: TlsParams::default(),
        auto_sni: false,
        auto_san_validation: false,
    }
}

/// A TLS echo server on 127.0.0.1 counting accepted and failed handshakes.
pub struct Server {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::SeqCst)
    }
}

pub async fn serve(config: Arc<ServerConfig>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(config);
    let accepted = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let (ok, bad) = (accepted.clone(), failed.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let (ok, bad) = (ok.clone(), bad.clone());
            tokio::spawn(async move {
                match acceptor.accept(tcp).await {
                    Ok(mut tls) => {
                        ok.fetch_add(1, Ordering::SeqCst);
                        let mut buf = [0u8; 1024];
                        loop {
                            match tls.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if tls.write_all(&buf[..n]).await.is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                    }
                    Err(_) => {
                        bad.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    Server { addr, accepted, failed, task }
}

pub type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// A client trusting `ca_pem`, offering `alpn`, limited to `versions`. It never resumes
/// sessions: a resumed handshake carries no certificate, and tests observe which certificate
/// the server picks.
pub fn client(ca_pem: &str, alpn: &[&str], versions: &[&'static SupportedProtocolVersion]) -> Arc<ClientConfig> {
    let mut config = resuming_client(ca_pem, versions);
    config.resumption = Resumption::disabled();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(config)
}

/// A client with rustls's default in-memory session cache.
pub fn resuming_client(ca_pem: &str, versions: &[&'static SupportedProtocolVersion]) -> ClientConfig {
    ClientConfig::builder_with_provider(Arc::new(default_provider()))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots(ca_pem))
        .with_no_client_auth()
}

/// A client presenting `leaf` as its certificate.
pub fn client_with_cert(ca_pem: &str, leaf: &Leaf) -> Arc<ClientConfig> {
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
    let mut config = ClientConfig::builder_with_provider(Arc::new(default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(ca_pem))
        .with_client_auth_cert(vec![leaf.der.clone()], key)
        .unwrap();
    config.resumption = Resumption::disabled();
    Arc::new(config)
}

/// Accepts any server certificate but only advertises ECDSA signature schemes, to steer the
/// server's certificate choice.
pub fn ecdsa_only_client() -> Arc<ClientConfig> {
    #[derive(Debug)]
    struct EcdsaOnly(Arc<WebPkiServerVerifier>);
    impl ServerCertVerifier for EcdsaOnly {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls12_signature(m, c, d)
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls13_signature(m, c, d)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            vec![SignatureScheme::ECDSA_NISTP256_SHA256, SignatureScheme::ECDSA_NISTP384_SHA384]
        }
    }
    let provider = Arc::new(default_provider());
    // Any root will do: the wrapped verifier is only used for handshake signatures.
    let ca = Ca::new("unused");
    let inner =
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots(&ca.cert_pem)), provider.clone()).build().unwrap();
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(EcdsaOnly(inner)))
        .with_no_client_auth();
    config.resumption = Resumption::disabled();
    Arc::new(config)
}

pub fn roots(ca_pem: &str) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    roots
}

pub async fn connect(addr: SocketAddr, config: Arc<ClientConfig>, sni: &str) -> io::Result<Tls> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_string()).map_err(io::Error::other)?;
    tokio::time::timeout(TIMEOUT, TlsConnector::from(config).connect(name, tcp))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"))?
}

/// Sends `msg` and reads the echo. With TLS 1.3 a rejected client certificate surfaces here,
/// after the client considers its handshake complete.
pub async fn echo(tls: &mut Tls, msg: &[u8]) -> io::Result<Vec<u8>> {
    tls.write_all(msg).await?;
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(TIMEOUT, tls.read_exact(&mut buf))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "echo timed out"))??;
    Ok(buf)
}

pub fn peer_cert(tls: &Tls) -> CertificateDer<'static> {
    tls.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned()
}

/// Connects, checks the echo, and returns the served certificate.
pub async fn served_cert(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    sni: &str,
) -> io::Result<CertificateDer<'static>> {
    let mut tls = connect(addr, config, sni).await?;
    let back = echo(&mut tls, b"ping").await?;
    assert_eq!(back, b"ping");
    Ok(peer_cert(&tls))
}

/// Polls `f` until it returns true or the timeout expires.
pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// Polls handshakes until `want` is the certificate served for `sni`.
pub async fn wait_for_cert(addr: SocketAddr, config: Arc<ClientConfig>, sni: &str, want: &CertificateDer<'_>) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let served = served_cert(addr, config.clone(), sni).await.unwrap();
        if served == *want {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for the new certificate on {sni}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
