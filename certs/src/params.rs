//! `tls_params` (versions, cipher suites, ECDH curves) mapped onto the ring provider.

use std::sync::Arc;

use rustls::SupportedCipherSuite;
use rustls::SupportedProtocolVersion;
use rustls::crypto::ring::{cipher_suite as cs, default_provider, kx_group};
use rustls::crypto::{CryptoProvider, SupportedKxGroup};
use rustls::version::{TLS12, TLS13};
use sluice_config::model::{TlsParams, TlsVersion};

use crate::error::CertError;

/// A provider restricted to the configured suites and groups, and the enabled versions.
pub(crate) struct Protocol {
    pub provider: Arc<CryptoProvider>,
    pub versions: Vec<&'static SupportedProtocolVersion>,
}

/// Cipher suite names, OpenSSL/BoringSSL spelling first, then the IANA/RFC names.
static CIPHER_SUITES: &[(&[&str], SupportedCipherSuite)] = &[
    (&["TLS_AES_128_GCM_SHA256"], cs::TLS13_AES_128_GCM_SHA256),
    (&["TLS_AES_256_GCM_SHA384"], cs::TLS13_AES_256_GCM_SHA384),
    (&["TLS_CHACHA20_POLY1305_SHA256"], cs::TLS13_CHACHA20_POLY1305_SHA256),
    (
        &["ECDHE-ECDSA-AES128-GCM-SHA256", "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"],
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    ),
    (
        &["ECDHE-ECDSA-AES256-GCM-SHA384", "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"],
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    ),
    (
        &["ECDHE-ECDSA-CHACHA20-POLY1305", "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"],
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ),
    (
        &["ECDHE-RSA-AES128-GCM-SHA256", "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"],
        cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    ),
    (
        &["ECDHE-RSA-AES256-GCM-SHA384", "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384"],
        cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    ),
    (
        &["ECDHE-RSA-CHACHA20-POLY1305", "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256"],
        cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ),
];

static CURVES: &[(&[&str], &dyn SupportedKxGroup)] = &[
    (&["X25519"], kx_group::X25519),
    (&["P-256", "prime256v1", "secp256r1"], kx_group::SECP256R1),
    (&["P-384", "secp384r1"], kx_group::SECP384R1),
];

/// Maps `params` to a provider and a version list.
///
/// Cipher suites follow Envoy's split: BoringSSL's `cipher_suites` only governs TLS 1.2, and
/// TLS 1.3 suites are not configurable there. Here TLS 1.2 names restrict the TLS 1.2 suites
/// and TLS 1.3 names (`TLS_AES_128_GCM_SHA256`, ...) restrict the TLS 1.3 suites; a family
/// with no name in the list keeps all of its suites, so an Envoy config listing only TLS 1.2
/// ciphers behaves as it does in Envoy. BoringSSL's equal-preference groups
/// (`[A|B]`) are flattened in order.
pub(crate) fn protocol(params: &TlsParams) -> Result<Protocol, CertError> {
    let versions = versions(params.min_version, params.max_version)?;
    let mut provider = default_provider();

    if !params.cipher_suites.is_empty() {
        let mut unknown = Vec::new();
        let mut chosen: Vec<SupportedCipherSuite> = Vec::new();
        for name in params.cipher_suites.iter().flat_map(|n| split_group(n)) {
            match CIPHER_SUITES.iter().find(|(names, _)| names.iter().any(|n| n.eq_ignore_ascii_case(name))) {
                Some((_, suite)) => {
                    if !chosen.iter().any(|c| c.suite() == suite.suite()) {
                        chosen.push(*suite);
                    }
                }
                None => unknown.push(name.to_string()),
            }
        }
        if !unknown.is_empty() {
            return Err(CertError::UnknownCipherSuites { names: unknown });
        }
        let is12 = |s: &SupportedCipherSuite| s.tls13().is_none();
        let any12 = chosen.iter().any(is12);
        let any13 = chosen.iter().any(|s| !is12(s));
        provider.cipher_suites.retain(|s| {
            let listed = chosen.iter().any(|c| c.suite() == s.suite());
            if is12(s) { listed || !any12 } else { listed || !any13 }
        });
        // Keep the configured order within each family (server preference when the server
        // is configured to ignore the client's order).
        provider
            .cipher_suites
            .sort_by_key(|s| chosen.iter().position(|c| c.suite() == s.suite()).unwrap_or(usize::MAX));
    }

    if !params.ecdh_curves.is_empty() {
        let mut unknown = Vec::new();
        let mut groups: Vec<&'static dyn SupportedKxGroup> = Vec::new();
        for name in &params.ecdh_curves {
            match CURVES.iter().find(|(names, _)| names.iter().any(|n| n.eq_ignore_ascii_case(name))) {
                Some((_, group)) => {
                    if !groups.iter().any(|g| g.name() == group.name()) {
                        groups.push(*group);
                    }
                }
                None => unknown.push(name.clone()),
            }
        }
        if !unknown.is_empty() {
            return Err(CertError::UnknownCurves { names: unknown });
        }
        provider.kx_groups = groups;
    }

    Ok(Protocol { provider: Arc::new(provider), versions })
}

fn versions(min: TlsVersion, max: TlsVersion) -> Result<Vec<&'static SupportedProtocolVersion>, CertError> {
    // Below 1.2 is clamped: the translator already warned that rustls has no TLS 1.0/1.1.
    let min = min.max(TlsVersion::V1_2);
    let mut versions = Vec::new();
    if min <= TlsVersion::V1_3 && max >= TlsVersion::V1_3 {
        versions.push(&TLS13);
    }
    if min <= TlsVersion::V1_2 && max >= TlsVersion::V1_2 {
        versions.push(&TLS12);
    }
    if versions.is_empty() {
        return Err(CertError::NoTlsVersion { min: format!("{min:?}"), max: format!("{max:?}") });
    }
    Ok(versions)
}

/// `[A|B]` -> `A`, `B`; a plain name -> itself.
fn split_group(name: &str) -> Vec<&str> {
    let trimmed = name.trim();
    match trimmed.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
        Some(inner) => inner.split('|').map(str::trim).filter(|s| !s.is_empty()).collect(),
        None => vec![trimmed],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::CipherSuite;

    fn params(ciphers: &[&str]) -> TlsParams {
        TlsParams { cipher_suites: ciphers.iter().map(|s| s.to_string()).collect(), ..TlsParams::default() }
    }

    fn suites(p: &Protocol) -> Vec<CipherSuite> {
        p.provider.cipher_suites.iter().map(|s| s.suite()).collect()
    }

    #[test]
    fn tls12_names_leave_tls13_alone() {
        let p = protocol(&params(&[
            "[ECDHE-ECDSA-AES128-GCM-SHA256|ECDHE-ECDSA-CHACHA20-POLY1305]",
            "ECDHE-RSA-AES256-GCM-SHA384",
        ]))
        .unwrap();
        let s = suites(&p);
        assert_eq!(
            s[..3],
            [
                CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            ]
        );
        assert_eq!(s.len(), 6, "three TLS 1.2 suites and all three TLS 1.3 suites: {s:?}");
        assert!(!s.contains(&CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256));
    }

    #[test]
    fn tls13_names_restrict_tls13() {
        let p = protocol(&params(&["TLS_AES_128_GCM_SHA256", "ECDHE-RSA-CHACHA20-POLY1305"])).unwrap();
        assert_eq!(
            suites(&p),
            [CipherSuite::TLS13_AES_128_GCM_SHA256, CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256]
        );
    }

    #[test]
    fn unknown_names_are_listed() {
        let err = protocol(&params(&["AES128-SHA", "ECDHE-RSA-AES128-GCM-SHA256", "DES-CBC3-SHA"])).err().unwrap();
        assert_eq!(err.to_string(), "unknown or unsupported cipher suite(s): AES128-SHA, DES-CBC3-SHA");
    }

    #[test]
    fn versions_map_to_rustls() {
        assert_eq!(versions(TlsVersion::V1_0, TlsVersion::V1_3).unwrap().len(), 2);
        assert_eq!(versions(TlsVersion::V1_3, TlsVersion::V1_3).unwrap(), [&TLS13]);
        assert_eq!(versions(TlsVersion::V1_2, TlsVersion::V1_2).unwrap(), [&TLS12]);
        assert!(versions(TlsVersion::V1_0, TlsVersion::V1_1).is_err());
    }

    #[test]
    fn curves_map_and_unknown_fail() {
        let p = protocol(&TlsParams { ecdh_curves: vec!["P-256".into(), "X25519".into()], ..TlsParams::default() })
            .unwrap();
        assert_eq!(p.provider.kx_groups.len(), 2);
        let err =
            protocol(&TlsParams { ecdh_curves: vec!["X25519MLKEM768".into()], ..TlsParams::default() }).err().unwrap();
        assert!(err.to_string().contains("X25519MLKEM768"));
    }
}
