//! Loading a certificate chain and its private key, and refusing bad pairs.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sluice_config::model::{CertificateRef, DataSource, Secret, TlsCertificate};

use crate::error::CertError;
use crate::slot::Material;
use crate::source::{InputRecorder, describe, secret_kind};
use crate::status::MaterialStatus;
use crate::x509::{CertInfo, rfc3339, unix_now};

/// How far in the future a certificate's notBefore may be before we call it "not yet valid".
/// Issuers (cert-manager, SPIRE) stamp notBefore with their own clock at issue time; a node
/// whose clock lags by a few seconds must not reject a freshly rotated certificate.
const NOT_BEFORE_SKEW_SECS: i64 = 300;

/// A validated certificate chain with its signing key.
#[derive(Debug)]
pub(crate) struct LoadedCert {
    pub certified: Arc<CertifiedKey>,
    pub info: CertInfo,
    /// Lower-cased DNS names (SANs, or the CN when there are none) for SNI selection.
    pub server_names: Vec<String>,
}

impl Material for LoadedCert {
    type Spec = CertificateRef;
    const KIND: &'static str = "certificate";

    fn name(spec: &CertificateRef) -> String {
        match spec {
            CertificateRef::Sds(name) => name.clone(),
            CertificateRef::Inline(tc) => describe(&tc.certificate_chain),
        }
    }

    fn source(spec: &CertificateRef) -> String {
        match spec {
            CertificateRef::Sds(_) => "sds".to_string(),
            CertificateRef::Inline(tc) => source_kind(&tc.certificate_chain),
        }
    }

    fn load(
        spec: &CertificateRef,
        rec: &mut InputRecorder<'_>,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, CertError> {
        let what = format!("certificate {}", Self::name(spec));
        let tc: TlsCertificate = match spec {
            CertificateRef::Inline(tc) => tc.clone(),
            CertificateRef::Sds(name) => match &*rec.secret(name, &what)? {
                Secret::TlsCertificate(tc) => tc.clone(),
                other => {
                    return Err(CertError::WrongSecretKind {
                        what,
                        name: name.clone(),
                        actual: secret_kind(other),
                        expected: "tls_certificate",
                    });
                }
            },
        };
        let chain = rec.read(&tc.certificate_chain, &what)?;
        let key = rec.read(&tc.private_key, &what)?;
        load_pair(&what, &chain, &key, provider, unix_now())
    }

    fn status(&self, name: &str, source: &str) -> Vec<MaterialStatus> {
        vec![MaterialStatus {
            kind: Self::KIND,
            name: name.to_string(),
            source: source.to_string(),
            subject: Some(self.info.subject.clone()),
            sans: self.info.san_strings(),
            not_after: Some(rfc3339(self.info.not_after)),
            last_error: None,
        }]
    }
}

pub(crate) fn source_kind(ds: &DataSource) -> String {
    match ds {
        DataSource::Filename(f) => format!("file {f}"),
        DataSource::Inline(_) => "inline".to_string(),
        DataSource::EnvironmentVariable(v) => format!("env ${v}"),
    }
}

/// Parses a PEM chain and key, and checks that they belong together and that the leaf is
/// within its validity period at `now` (Unix seconds).
pub(crate) fn load_pair(
    what: &str,
    chain_pem: &[u8],
    key_pem: &[u8],
    provider: &CryptoProvider,
    now: i64,
) -> Result<LoadedCert, CertError> {
    let chain = parse_certificates(what, chain_pem)?;
    let Some(leaf) = chain.first() else {
        return Err(CertError::NoCertificate { what: what.to_string() });
    };
    let info = CertInfo::parse(leaf.as_ref())
        .map_err(|detail| CertError::BadCertificate { what: what.to_string(), detail })?;
    check_validity(what, &info, now)?;

    let key = parse_private_key(what, key_pem)?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| CertError::BadPrivateKey { what: what.to_string(), detail: e.to_string() })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(CertError::KeyMismatch { what: what.to_string() });
        }
        // Every key type the ring provider loads can report its public key, so this is not
        // expected; if a future provider cannot, the first handshake would fail visibly.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            tracing::warn!(%what, "cannot check that the private key matches the certificate");
        }
        Err(e) => {
            return Err(CertError::BadCertificate { what: what.to_string(), detail: e.to_string() });
        }
    }
    let server_names = info.server_names();
    Ok(LoadedCert { certified: Arc::new(certified), info, server_names })
}

/// All certificates of a PEM bundle, in order.
pub(crate) fn parse_certificates(what: &str, pem_bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem_bytes)
        .collect::<Result<Vec<_>, pem::Error>>()
        .map_err(|e| CertError::BadCertificate { what: what.to_string(), detail: e.to_string() })?;
    if certs.is_empty() {
        return Err(CertError::NoCertificate { what: what.to_string() });
    }
    Ok(certs)
}

fn parse_private_key(what: &str, pem_bytes: &[u8]) -> Result<PrivateKeyDer<'static>, CertError> {
    match PrivateKeyDer::from_pem_slice(pem_bytes) {
        Ok(key) => Ok(key),
        Err(pem::Error::NoItemsFound) => Err(CertError::NoPrivateKey {
            what: what.to_string(),
            hint: if contains(pem_bytes, b"ENCRYPTED PRIVATE KEY") {
                " (encrypted private keys are not supported)"
            } else {
                ""
            },
        }),
        Err(e) => Err(CertError::BadPrivateKey { what: what.to_string(), detail: e.to_string() }),
    }
}

fn check_validity(what: &str, info: &CertInfo, now: i64) -> Result<(), CertError> {
    if now > info.not_after {
        return Err(CertError::Expired { what: what.to_string(), not_after: rfc3339(info.not_after) });
    }
    if info.not_before > now.saturating_add(NOT_BEFORE_SKEW_SECS) {
        return Err(CertError::NotYetValid { what: what.to_string(), not_before: rfc3339(info.not_before) });
    }
    Ok(())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
