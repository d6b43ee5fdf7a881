//! Validation contexts: trusted CAs, CRLs and subject-alt-name matchers, for verifying
//! client certificates (downstream mTLS) and server certificates (upstream TLS).

use std::sync::Arc;
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::{CertificateError, DistinguishedName, RootCertStore};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use sluice_config::model::{SanMatcher, SanType, Secret, StringMatchKind, ValidationContext, ValidationRef};

use crate::cert::{parse_certificates, source_kind};
use crate::error::CertError;
use crate::slot::Material;
use crate::source::{InputRecorder, describe, secret_kind};
use crate::status::MaterialStatus;
use crate::x509::{CertInfo, San, dns_name_matches, rfc3339};

/// A resolved, loaded validation context.
#[derive(Debug)]
pub(crate) struct LoadedValidation {
    /// `None` when the context has no `trusted_ca`: chains are then not verified (upstream,
    /// as in Envoy) or client certificates are refused (downstream).
    pub roots: Option<Arc<RootCertStore>>,
    pub ca_infos: Vec<CertInfo>,
    pub matchers: Vec<SanMatcher>,
    pub allow_expired: bool,
    /// Chain verification for client certificates (optional-auth flavour; whether a
    /// certificate is mandatory is decided by the per-context wrapper).
    pub client_verifier: Option<Arc<dyn ClientCertVerifier>>,
    /// Chain verification for server certificates.
    pub server_verifier: Option<Arc<WebPkiServerVerifier>>,
    /// CA subjects for the CertificateRequest's `certificate_authorities`.
    pub hints: Vec<DistinguishedName>,
}

impl Material for LoadedValidation {
    type Spec = ValidationRef;
    const KIND: &'static str = "trusted_ca";

    fn name(spec: &ValidationRef) -> String {
        match spec {
            ValidationRef::Sds(name) | ValidationRef::Combined { sds: name, .. } => name.clone(),
            ValidationRef::Inline(vc) => vc.trusted_ca.as_ref().map(describe).unwrap_or_else(|| "inline".to_string()),
        }
    }

    fn source(spec: &ValidationRef) -> String {
        match spec {
            ValidationRef::Sds(_) => "sds".to_string(),
            ValidationRef::Combined { .. } => "sds (combined)".to_string(),
            ValidationRef::Inline(vc) => {
                vc.trusted_ca.as_ref().map(source_kind).unwrap_or_else(|| "inline".to_string())
            }
        }
    }

    fn load(
        spec: &ValidationRef,
        rec: &mut InputRecorder<'_>,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, CertError> {
        let what = format!("trusted CA {}", Self::name(spec));
        let vc = match spec {
            ValidationRef::Inline(vc) => vc.clone(),
            ValidationRef::Sds(name) => sds_context(rec, name, &what)?,
            ValidationRef::Combined { default, sds } => merge(default, &sds_context(rec, sds, &what)?),
        };
        // Matchers from an SDS secret can change without any byte of a file changing.
        rec.note(&format!("{:?}|{}", vc.match_subject_alt_names, vc.allow_expired_certificate));

        let mut ca_infos = Vec::new();
        let roots = match &vc.trusted_ca {
            None => None,
            Some(ds) => {
                let pem_bytes = rec.read(ds, &what)?;
                let certs = parse_certificates(&what, &pem_bytes)?;
                let mut roots = RootCertStore::empty();
                let (added, ignored) = roots.add_parsable_certificates(certs.iter().cloned());
                if added == 0 {
                    return Err(CertError::BadTrustedCa {
                        what,
                        detail: format!("none of the {ignored} certificate(s) is a usable trust anchor"),
                    });
                }
                if ignored > 0 {
                    tracing::warn!(%what, ignored, "ignoring unusable certificates in the CA bundle");
                }
                ca_infos = certs.iter().filter_map(|c| CertInfo::parse(c.as_ref()).ok()).collect();
                Some(Arc::new(roots))
            }
        };
        let crls = match &vc.crl {
            None => Vec::new(),
            Some(ds) => {
                let pem_bytes = rec.read(ds, &what)?;
                let crls = CertificateRevocationListDer::pem_slice_iter(&pem_bytes)
                    .collect::<Result<Vec<_>, pem::Error>>()
                    .map_err(|e| CertError::BadCrl { what: what.clone(), detail: e.to_string() })?;
                if crls.is_empty() {
                    return Err(CertError::BadCrl { what, detail: "no PEM X509 CRL found".into() });
                }
                crls
            }
        };

        let (client_verifier, server_verifier, hints) = match &roots {
            None => {
                if !crls.is_empty() {
                    return Err(CertError::BadCrl {
                        what,
                        detail: "a CRL needs a trusted_ca to be checked against".into(),
                    });
                }
                (None, None, Vec::new())
            }
            Some(roots) => {
                let client = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                    .with_crls(crls.iter().cloned())
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| CertError::Verifier { what: what.clone(), detail: e.to_string() })?;
                let server = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
                    .with_crls(crls.iter().cloned())
                    .build()
                    .map_err(|e| CertError::Verifier { what: what.clone(), detail: e.to_string() })?;
                (Some(client), Some(server), roots.subjects())
            }
        };

        Ok(LoadedValidation {
            roots,
            ca_infos,
            matchers: vc.match_subject_alt_names.clone(),
            allow_expired: vc.allow_expired_certificate,
            client_verifier,
            server_verifier,
            hints,
        })
    }

    fn status(&self, name: &str, source: &str) -> Vec<MaterialStatus> {
        self.ca_infos
            .iter()
            .map(|info| MaterialStatus {
                kind: Self::KIND,
                name: name.to_string(),
                source: source.to_string(),
                subject: Some(info.subject.clone()),
                sans: info.san_strings(),
                not_after: Some(rfc3339(info.not_after)),
                last_error: None,
            })
            .collect()
    }
}

fn sds_context(rec: &mut InputRecorder<'_>, name: &str, what: &str) -> Result<ValidationContext, CertError> {
    match &*rec.secret(name, what)? {
        Secret::ValidationContext(vc) => Ok(vc.clone()),
        other => Err(CertError::WrongSecretKind {
            what: what.to_string(),
            name: name.to_string(),
            actual: secret_kind(other),
            expected: "validation_context",
        }),
    }
}

/// Envoy's `combined_validation_context`: the dynamic (SDS) context is merged into the
/// default one the way protobuf `MergeFrom` does: set scalar fields of the SDS context win,
/// repeated fields are concatenated.
fn merge(default: &ValidationContext, sds: &ValidationContext) -> ValidationContext {
    let mut merged = default.clone();
    if sds.trusted_ca.is_some() {
        merged.trusted_ca = sds.trusted_ca.clone();
    }
    if sds.crl.is_some() {
        merged.crl = sds.crl.clone();
    }
    merged.match_subject_alt_names.extend(sds.match_subject_alt_names.iter().cloned());
    merged.allow_expired_certificate |= sds.allow_expired_certificate;
    merged
}

/// Envoy's `match_typed_subject_alt_names`: the certificate passes if any matcher matches any
/// SAN of the matcher's type. No matchers means no SAN restriction.
pub(crate) fn sans_match(matchers: &[SanMatcher], sans: &[San]) -> bool {
    if matchers.is_empty() {
        return true;
    }
    matchers.iter().any(|m| {
        let matcher = &m.matcher.0;
        sans.iter().any(|san| match (m.san_type, san) {
            (SanType::Dns, San::Dns(name)) => {
                matcher.matches(name)
                    // A wildcard SAN satisfies an exact matcher for a name it covers, as in
                    // Envoy's `dnsNameMatch`.
                    || match &matcher.kind {
                        StringMatchKind::Exact(want) => dns_name_matches(
                            &name.to_ascii_lowercase(),
                            &want.to_ascii_lowercase(),
                        ) && name.starts_with("*."),
                        _ => false,
                    }
            }
            (SanType::Uri, San::Uri(uri)) => matcher.matches(uri),
            (SanType::Email, San::Email(email)) => matcher.matches(email),
            (SanType::IpAddress, San::Ip(ip)) => matcher.matches(&ip.to_string()),
            _ => false,
        })
    })
}

/// Runs `verify` at `now`; if the only problem is an expired certificate and the context has
/// `allow_expired_certificate`, runs it again at a moment inside the leaf's validity period
/// (so that signatures and the rest of the chain are still checked, which simply ignoring
/// the error would not guarantee).
pub(crate) fn with_expiry_policy<T>(
    allow_expired: bool,
    end_entity: &CertificateDer<'_>,
    now: UnixTime,
    verify: impl Fn(UnixTime) -> Result<T, rustls::Error>,
) -> Result<T, rustls::Error> {
    match verify(now) {
        Err(rustls::Error::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. }))
            if allow_expired =>
        {
            let not_after = CertInfo::parse(end_entity.as_ref())
                .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?
                .not_after;
            let secs = u64::try_from(not_after.saturating_sub(1)).unwrap_or(0);
            verify(UnixTime::since_unix_epoch(Duration::from_secs(secs)))
        }
        other => other,
    }
}

/// Checks the SAN matchers against a peer's end-entity certificate.
pub(crate) fn check_sans(matchers: &[SanMatcher], end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
    if matchers.is_empty() {
        return Ok(());
    }
    let info = CertInfo::parse(end_entity.as_ref())
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
    if sans_match(matchers, &info.sans) {
        Ok(())
    } else {
        tracing::debug!(
            subject = %info.subject,
            sans = ?info.san_strings(),
            "peer certificate rejected: no subject alternative name matches"
        );
        Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
    }
}
