//! Upstream TLS origination: building a rustls `ClientConfig` from an `UpstreamTls` context.
//!
//! Server certificate checks mirror Envoy's `UpstreamTlsContext`:
//! - no validation context: the server certificate is **not** verified (a warning is logged);
//! - with a `trusted_ca`: the chain must lead to it (CRLs and `allow_expired_certificate`
//!   honoured);
//! - the host name is checked only when asked: `match_subject_alt_names` if present, else
//!   `auto_san_validation` checks the SNI sent. Envoy does not compare the certificate with
//!   `sni` otherwise, and neither do we.

use std::net::IpAddr;
use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sluice_config::model::UpstreamTls;

use crate::cert::LoadedCert;
use crate::error::CertError;
use crate::params;
use crate::slot::Slot;
use crate::store::Inner;
use crate::validation::{LoadedValidation, check_sans, with_expiry_policy};

pub(crate) fn build(inner: &Inner, tls: &UpstreamTls) -> Result<Arc<ClientConfig>, CertError> {
    let protocol = params::protocol(&tls.params)?;
    let validation = match &tls.validation {
        Some(vref) => Some(inner.validation_slot(vref)?),
        None => {
            tracing::warn!(
                sni = tls.sni.as_deref().unwrap_or(""),
                "upstream TLS context without a validation context: the server certificate \
                 will not be verified (Envoy's behaviour); configure trusted_ca to verify it"
            );
            None
        }
    };
    let client_certs = tls.certificates.iter().map(|r| inner.cert_slot(r)).collect::<Result<Vec<_>, _>>()?;

    let builder = ClientConfig::builder_with_provider(protocol.provider.clone())
        .with_protocol_versions(&protocol.versions)
        .map_err(|source| CertError::Rustls { what: "TLS parameters".into(), source })?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(UpstreamVerifier {
            validation,
            auto_san_validation: tls.auto_san_validation,
            provider: inner.provider.clone(),
        }));
    let mut config = if client_certs.is_empty() {
        builder.with_no_client_auth()
    } else {
        builder.with_client_cert_resolver(Arc::new(LiveClientCerts { slots: client_certs }))
    };
    config.alpn_protocols = tls.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    config.enable_sni = tls.sni.as_deref().is_some_and(|s| !s.is_empty()) || tls.auto_sni;
    Ok(Arc::new(config))
}

pub(crate) fn server_name(tls: &UpstreamTls, host: &str) -> Result<ServerName<'static>, CertError> {
    let name = match tls.sni.as_deref() {
        Some(sni) if !sni.is_empty() => sni,
        _ => strip_port(host),
    };
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(name.to_string()).map_err(|_| CertError::BadServerName { name: name.to_string() })
}

/// `host:port`, `[v6]:port`, `[v6]` -> the host part.
fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(h, _)| h);
    }
    match host.rsplit_once(':') {
        // A bare IPv6 address has more than one colon; leave it alone.
        Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

#[derive(Debug)]
struct UpstreamVerifier {
    validation: Option<Arc<Slot<LoadedValidation>>>,
    auto_san_validation: bool,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for UpstreamVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(slot) = &self.validation else {
            return Ok(ServerCertVerified::assertion());
        };
        let validation = slot.current();
        let check_name = validation.matchers.is_empty() && self.auto_san_validation;
        if let Some(verifier) = &validation.server_verifier {
            let chain = with_expiry_policy(validation.allow_expired, end_entity, now, |at| {
                verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, at)
            });
            match chain {
                Ok(_) => {}
                // webpki checks the name only after the whole chain (signatures, validity,
                // revocation) verified, so a name mismatch means the chain itself is good.
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
                )) if !check_name => {}
                Err(e) => return Err(e),
            }
        } else if check_name {
            // No CA (Envoy then skips chain verification) but the name is still checked.
            let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_name(&cert, server_name)?;
        }
        check_sans(&validation.matchers, end_entity)?;
        Ok(ServerCertVerified::assertion())
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

/// Client certificates for mTLS to the backend, read live from the store.
#[derive(Debug)]
struct LiveClientCerts {
    slots: Vec<Arc<Slot<LoadedCert>>>,
}

impl ResolvesClientCert for LiveClientCerts {
    fn resolve(&self, _root_hint_subjects: &[&[u8]], sigschemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        let mut first = None;
        for slot in &self.slots {
            let cert = slot.current();
            if cert.certified.key.choose_scheme(sigschemes).is_some() {
                return Some(cert.certified.clone());
            }
            first.get_or_insert_with(|| cert.certified.clone());
        }
        first
    }

    fn has_certs(&self) -> bool {
        !self.slots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_ports() {
        assert_eq!(strip_port("example.com:8443"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:443"), "::1");
        assert_eq!(strip_port("::1"), "::1");
        assert_eq!(strip_port("10.0.0.1:80"), "10.0.0.1");
    }
}
