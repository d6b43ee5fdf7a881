//! Downstream TLS: building a rustls `ServerConfig` from a `DownstreamTls` context.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};
use sluice_config::model::DownstreamTls;

use crate::cert::LoadedCert;
use crate::error::CertError;
use crate::params;
use crate::slot::Slot;
use crate::store::{Dep, Inner};
use crate::tickets::LiveTickets;
use crate::validation::{LoadedValidation, check_sans, with_expiry_policy};

/// Entries in the stateful session cache of one server configuration (Envoy/BoringSSL's
/// default cache is 20k sessions per context; entries are small).
const SESSION_CACHE_SIZE: usize = 20_480;

pub(crate) fn build(
    inner: &Inner,
    tls: &DownstreamTls,
    previous: Option<&ServerConfig>,
) -> Result<(Arc<ServerConfig>, Vec<Dep>), CertError> {
    if tls.certificates.is_empty() {
        return Err(CertError::InvalidContext("downstream TLS context has no certificate".into()));
    }
    let slots = tls.certificates.iter().map(|r| inner.cert_slot(r)).collect::<Result<Vec<_>, _>>()?;
    let protocol = params::protocol(&tls.params)?;
    let builder = ServerConfig::builder_with_provider(protocol.provider.clone())
        .with_protocol_versions(&protocol.versions)
        .map_err(|source| CertError::Rustls { what: "TLS parameters".into(), source })?;

    let mut deps = Vec::new();
    let verifier: Option<Arc<dyn ClientCertVerifier>> = match &tls.validation {
        None if tls.require_client_certificate => {
            return Err(CertError::InvalidContext(
                "require_client_certificate needs a validation context with a trusted_ca".into(),
            ));
        }
        None => None,
        Some(vref) => {
            let slot = inner.validation_slot(vref)?;
            let current = slot.current();
            if current.roots.is_none() {
                if tls.require_client_certificate || !current.matchers.is_empty() {
                    return Err(CertError::InvalidContext(format!(
                        "validation context {} has no trusted_ca, so client certificates cannot be verified",
                        slot.name
                    )));
                }
                None
            } else {
                deps.push((slot.clone(), slot.version()));
                Some(Arc::new(LiveClientVerifier {
                    hints: current.hints.clone(),
                    slot: slot.clone(),
                    mandatory: tls.require_client_certificate,
                    provider: inner.provider.clone(),
                }))
            }
        }
    };
    let builder = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(LiveServerCerts { slots }));

    config.alpn_protocols = tls.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();

    // Session resumption. Reusing the previous configuration's stores keeps sessions resumable
    // across a rebuild of an identical context.
    config.session_storage = if tls.disable_stateful_session_resumption {
        Arc::new(NoServerSessionStorage {})
    } else {
        match previous {
            Some(p) => p.session_storage.clone(),
            None => ServerSessionMemoryCache::new(SESSION_CACHE_SIZE),
        }
    };
    if !tls.disable_stateless_session_resumption {
        config.ticketer = match (&tls.session_ticket_keys, previous) {
            (Some(keys), _) => Arc::new(LiveTickets::new(inner.ticket_slot(keys)?)),
            (None, Some(p)) => p.ticketer.clone(),
            // Random keys, rotated every 6 hours, kept for one more period to decrypt.
            (None, None) => rustls::crypto::ring::Ticketer::new()
                .map_err(|source| CertError::Rustls { what: "session ticketer".into(), source })?,
        };
    }
    if tls.disable_stateful_session_resumption && tls.disable_stateless_session_resumption {
        config.send_tls13_tickets = 0;
    }
    Ok((Arc::new(config), deps))
}

/// Chooses, per handshake, among the live certificates of a context.
#[derive(Debug)]
struct LiveServerCerts {
    slots: Vec<Arc<Slot<LoadedCert>>>,
}

impl ResolvesServerCert for LiveServerCerts {
    /// Preference: a certificate whose names cover the SNI *and* whose key can sign with a
    /// scheme the client offers; then one covering the SNI; then one the client can verify;
    /// then the first (Envoy also falls back to its first certificate).
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello.server_name().map(str::to_ascii_lowercase);
        let schemes = hello.signature_schemes();
        let mut best: Option<(u8, Arc<CertifiedKey>)> = None;
        for slot in &self.slots {
            let cert = slot.current();
            let names_match = sni
                .as_deref()
                .is_some_and(|name| cert.server_names.iter().any(|p| crate::x509::dns_name_matches(p, name)));
            let can_sign = cert.certified.key.choose_scheme(schemes).is_some();
            let rank = (u8::from(names_match) << 1) | u8::from(can_sign);
            if best.as_ref().is_none_or(|(r, _)| rank > *r) {
                best = Some((rank, cert.certified.clone()));
                if rank == 3 {
                    break;
                }
            }
        }
        best.map(|(_, key)| key)
    }
}

/// Client certificate verification against the live validation context: the CA, CRLs and
/// SAN matchers are read per handshake.
#[derive(Debug)]
struct LiveClientVerifier {
    slot: Arc<Slot<LoadedValidation>>,
    mandatory: bool,
    /// CA names at build time. A CA change makes the store rebuild the configuration on the
    /// next `server_config` call; verification itself always uses the current CA.
    hints: Vec<DistinguishedName>,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for LiveClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let validation = self.slot.current();
        // A context that lost its CA (SDS update) fails closed.
        let Some(inner) = validation.client_verifier.as_ref() else {
            return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer));
        };
        with_expiry_policy(validation.allow_expired, end_entity, now, |at| {
            inner.verify_client_cert(end_entity, intermediates, at)
        })?;
        check_sans(&validation.matchers, end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
