//! TLS contexts (`envoy.extensions.transport_sockets.tls.v3`) and `Secret` resources.
//!
//! SDS secret names are qualified like clusters (a name with a `/` such as
//! `cilium-secrets/server` is global: a Kubernetes Secret; a bare name is a `Secret`
//! resource of the same CEC).

use super::Cx;
use super::common::*;
use crate::json::{Msg, Path};
use crate::model::*;

struct Common {
    certificates: Vec<CertificateRef>,
    validation: Option<ValidationRef>,
    alpn: Vec<String>,
    params: TlsParams,
}

/// Cipher suites rustls (ring provider) implements, in OpenSSL/BoringSSL spelling.
pub const SUPPORTED_CIPHERS: &[&str] = &[
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
];

/// Envoy's default cipher list contains CBC and plain-RSA suites rustls deliberately does not
/// implement; those are dropped silently when they are part of a longer list, because a
/// BoringSSL-style list only ever restricts the set. A list with nothing usable is an error.
const LEGACY_CIPHERS: &[&str] = &[
    "ECDHE-ECDSA-AES128-SHA",
    "ECDHE-RSA-AES128-SHA",
    "AES128-GCM-SHA256",
    "AES128-SHA",
    "ECDHE-ECDSA-AES256-SHA",
    "ECDHE-RSA-AES256-SHA",
    "AES256-GCM-SHA384",
    "AES256-SHA",
];

fn tls_version(cx: &mut Cx, m: &Msg, name: &str) -> Option<TlsVersion> {
    m.enumeration(
        cx.sink,
        name,
        &[
            ("TLS_AUTO", None),
            ("TLSv1_0", Some(TlsVersion::V1_0)),
            ("TLSv1_1", Some(TlsVersion::V1_1)),
            ("TLSv1_2", Some(TlsVersion::V1_2)),
            ("TLSv1_3", Some(TlsVersion::V1_3)),
        ],
    )
    .flatten()
}

fn tls_params(cx: &mut Cx, m: Msg) -> TlsParams {
    let mut p = TlsParams::default();
    let path = m.path.clone();
    if let Some(v) = tls_version(cx, &m, "tls_minimum_protocol_version") {
        if v < TlsVersion::V1_2 {
            cx.sink.warning(
                path.field("tls_minimum_protocol_version").as_str(),
                "TLS 1.0 and 1.1 are not supported by Sluice; the minimum is TLS 1.2",
            );
        } else {
            p.min_version = v;
        }
    }
    if let Some(v) = tls_version(cx, &m, "tls_maximum_protocol_version") {
        if v < TlsVersion::V1_2 {
            cx.sink.error(
                path.field("tls_maximum_protocol_version").as_str(),
                "a maximum below TLS 1.2 cannot be honoured: Sluice supports TLS 1.2 and 1.3 only",
            );
        } else {
            p.max_version = v;
        }
    }
    if p.min_version > p.max_version {
        cx.sink.error(path.as_str(), "tls_minimum_protocol_version is above tls_maximum_protocol_version");
    }
    let cpath = path.field("cipher_suites");
    let ciphers = m.strs(cx.sink, "cipher_suites");
    let mut unknown = Vec::new();
    for entry in ciphers.iter().flat_map(|c| c.trim_matches(['[', ']']).split('|')) {
        let c = entry.trim();
        if SUPPORTED_CIPHERS.contains(&c) {
            p.cipher_suites.push(c.to_string());
        } else if !LEGACY_CIPHERS.contains(&c) {
            unknown.push(c.to_string());
        }
    }
    if !unknown.is_empty() {
        cx.sink.error(
            cpath.as_str(),
            format!("unsupported cipher suites {}; supported: {}", unknown.join(", "), SUPPORTED_CIPHERS.join(", ")),
        );
    } else if !ciphers.is_empty() && p.cipher_suites.is_empty() {
        cx.sink.error(cpath.as_str(), "none of the listed cipher suites is supported (no CBC or static-RSA suites)");
    }
    p.ecdh_curves = m.strs(cx.sink, "ecdh_curves");
    for c in &p.ecdh_curves {
        if !matches!(c.as_str(), "X25519" | "P-256" | "P-384" | "X25519MLKEM768") {
            cx.sink.error(path.field("ecdh_curves").as_str(), format!("unsupported curve {c}"));
        }
    }
    m.unsupported(cx.sink, "signature_algorithms", "not implemented");
    m.unsupported(cx.sink, "compliance_policies", "not implemented");
    m.finish(cx.sink);
    p
}

fn tls_certificate(cx: &mut Cx, m: Msg) -> Option<TlsCertificate> {
    let chain = m.msg(cx.sink, "certificate_chain", "DataSource").and_then(|d| data_source(cx, d));
    let key = m.msg(cx.sink, "private_key", "DataSource").and_then(|d| data_source(cx, d));
    m.unsupported(cx.sink, "password", "encrypted private keys are not supported");
    m.unsupported(cx.sink, "private_key_provider", "private key providers are not supported");
    m.ignore(cx.sink, "ocsp_staple", "OCSP stapling is not implemented");
    m.unsupported(cx.sink, "pkcs12", "PKCS#12 is not supported; use PEM");
    m.skip("watched_directory");
    m.ignore(cx.sink, "signed_certificate_timestamp", "not implemented");
    let path = m.path.clone();
    m.finish(cx.sink);
    match (chain, key) {
        (Some(certificate_chain), Some(private_key)) => Some(TlsCertificate { certificate_chain, private_key }),
        _ => {
            cx.sink.error(path.as_str(), "a TLS certificate needs certificate_chain and private_key");
            None
        }
    }
}

pub fn validation_context(cx: &mut Cx, m: Msg) -> Option<ValidationContext> {
    let mut v = ValidationContext {
        trusted_ca: m.msg(cx.sink, "trusted_ca", "DataSource").and_then(|d| data_source(cx, d)),
        ..Default::default()
    };
    for san in m.msgs(cx.sink, "match_typed_subject_alt_names", "SubjectAltNameMatcher") {
        let san_type = san.enumeration(
            cx.sink,
            "san_type",
            &[
                ("SAN_TYPE_UNSPECIFIED", None),
                ("EMAIL", Some(SanType::Email)),
                ("DNS", Some(SanType::Dns)),
                ("URI", Some(SanType::Uri)),
                ("IP_ADDRESS", Some(SanType::IpAddress)),
                ("OTHER_NAME", None),
            ],
        );
        let matcher = san.msg(cx.sink, "matcher", "StringMatcher").and_then(|s| string_matcher(cx, s));
        san.unsupported(cx.sink, "oid", "OTHER_NAME SANs are not supported");
        let path = san.path.clone();
        san.finish(cx.sink);
        match (san_type.flatten(), matcher) {
            (Some(san_type), Some(matcher)) => {
                v.match_subject_alt_names.push(SanMatcher { san_type, matcher: StringMatcherCmp(matcher) })
            }
            _ => cx.sink.error(
                path.as_str(),
                "subject alt name matcher needs a san_type (DNS, URI, EMAIL, IP_ADDRESS) and a matcher",
            ),
        }
    }
    // The deprecated untyped form matches any SAN type; keep its meaning by expanding it.
    for sm in m.msgs(cx.sink, "match_subject_alt_names", "StringMatcher") {
        if let Some(matcher) = string_matcher(cx, sm) {
            for san_type in [SanType::Dns, SanType::Uri, SanType::Email, SanType::IpAddress] {
                v.match_subject_alt_names.push(SanMatcher { san_type, matcher: StringMatcherCmp(matcher.clone()) });
            }
        }
    }
    v.crl = m.msg(cx.sink, "crl", "DataSource").and_then(|d| data_source(cx, d));
    v.allow_expired_certificate = m.bool_or(cx.sink, "allow_expired_certificate", false);
    m.reject_unless_default(cx.sink, "verify_certificate_spki", "certificate pinning is not implemented");
    m.reject_unless_default(cx.sink, "verify_certificate_hash", "certificate pinning is not implemented");
    m.unsupported(cx.sink, "custom_validator_config", "custom certificate validators are not supported");
    m.unsupported(cx.sink, "system_root_certs", "system roots are not supported; give trusted_ca");
    m.skip("watched_directory");
    m.skip("only_verify_leaf_cert_crl");
    if let Some(t) =
        m.enumeration(cx.sink, "trust_chain_verification", &[("VERIFY_TRUST_CHAIN", true), ("ACCEPT_UNTRUSTED", false)])
        && !t
    {
        cx.sink.error(m.path.field("trust_chain_verification").as_str(), "ACCEPT_UNTRUSTED is not supported");
    }
    m.skip("max_verify_depth");
    m.finish(cx.sink);
    Some(v)
}

fn sds_name(cx: &mut Cx, m: Msg) -> Option<String> {
    let path = m.path.field("name");
    let name = m.str(cx.sink, "name").unwrap_or_default();
    // The config source is Cilium's (or ours): there is nothing to configure.
    m.skip("sds_config");
    m.finish(cx.sink);
    if name.is_empty() {
        cx.sink.error(path.as_str(), "SDS secret config without a name");
        return None;
    }
    let q = cx.scope.qualify(&name);
    cx.refs.secrets.push((q.clone(), path.to_string()));
    Some(q)
}

fn common_tls_context(cx: &mut Cx, m: Msg) -> Common {
    let params = m.msg(cx.sink, "tls_params", "TlsParameters").map(|p| tls_params(cx, p)).unwrap_or_default();
    let mut certificates = Vec::new();
    for c in m.msgs(cx.sink, "tls_certificates", "TlsCertificate") {
        if let Some(c) = tls_certificate(cx, c) {
            certificates.push(CertificateRef::Inline(c));
        }
    }
    for s in m.msgs(cx.sink, "tls_certificate_sds_secret_configs", "SdsSecretConfig") {
        if let Some(n) = sds_name(cx, s) {
            certificates.push(CertificateRef::Sds(n));
        }
    }
    let validation = match m
        .oneof(cx.sink, &["validation_context", "validation_context_sds_secret_config", "combined_validation_context"])
    {
        Some("validation_context") => m
            .msg(cx.sink, "validation_context", "CertificateValidationContext")
            .and_then(|v| validation_context(cx, v))
            .map(ValidationRef::Inline),
        Some("validation_context_sds_secret_config") => m
            .msg(cx.sink, "validation_context_sds_secret_config", "SdsSecretConfig")
            .and_then(|s| sds_name(cx, s))
            .map(ValidationRef::Sds),
        Some("combined_validation_context") => {
            m.msg(cx.sink, "combined_validation_context", "CombinedCertificateValidationContext").and_then(|c| {
                let default = c
                    .msg(cx.sink, "default_validation_context", "CertificateValidationContext")
                    .and_then(|v| validation_context(cx, v))
                    .unwrap_or_default();
                let sds = c
                    .msg(cx.sink, "validation_context_sds_secret_config", "SdsSecretConfig")
                    .and_then(|s| sds_name(cx, s));
                c.unsupported(cx.sink, "validation_context_certificate_provider", "not supported");
                c.unsupported(cx.sink, "validation_context_certificate_provider_instance", "not supported");
                let path = c.path.clone();
                c.finish(cx.sink);
                match sds {
                    Some(sds) => Some(ValidationRef::Combined { default, sds }),
                    None => {
                        cx.sink.error(
                            path.as_str(),
                            "combined_validation_context needs validation_context_sds_secret_config",
                        );
                        None
                    }
                }
            })
        }
        _ => None,
    };
    let mut alpn = Vec::new();
    for a in m.strs(cx.sink, "alpn_protocols") {
        // Cilium writes `"h2,http/1.1"` as one entry; Envoy splits on commas too.
        alpn.extend(a.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from));
    }
    m.unsupported(cx.sink, "tls_certificate_provider_instance", "certificate providers are not supported");
    m.unsupported(cx.sink, "tls_certificate_certificate_provider", "certificate providers are not supported");
    m.unsupported(cx.sink, "tls_certificate_certificate_provider_instance", "certificate providers are not supported");
    m.unsupported(cx.sink, "custom_handshaker", "custom handshakers are not supported");
    m.unsupported(cx.sink, "custom_tls_certificate_selector", "not supported");
    m.ignore(cx.sink, "key_log", "TLS key logging is deliberately not supported");
    m.finish(cx.sink);
    Common { certificates, validation, alpn, params }
}

pub fn downstream_tls_context(cx: &mut Cx, m: Msg) -> Option<DownstreamTls> {
    let path = m.path.clone();
    let common = m
        .msg(cx.sink, "common_tls_context", "CommonTlsContext")
        .map(|c| common_tls_context(cx, c))
        .unwrap_or(Common { certificates: vec![], validation: None, alpn: vec![], params: TlsParams::default() });
    let require_client_certificate = m.bool_or(cx.sink, "require_client_certificate", false);
    let session_ticket_keys = match m.oneof(
        cx.sink,
        &["session_ticket_keys", "session_ticket_keys_sds_secret_config", "disable_stateless_session_resumption"],
    ) {
        Some("session_ticket_keys") => m.msg(cx.sink, "session_ticket_keys", "TlsSessionTicketKeys").map(|k| {
            let keys = k.msgs(cx.sink, "keys", "DataSource").into_iter().filter_map(|d| data_source(cx, d)).collect();
            k.finish(cx.sink);
            SessionTickets::Inline(keys)
        }),
        Some("session_ticket_keys_sds_secret_config") => m
            .msg(cx.sink, "session_ticket_keys_sds_secret_config", "SdsSecretConfig")
            .and_then(|s| sds_name(cx, s))
            .map(SessionTickets::Sds),
        _ => None,
    };
    let disable_stateless_session_resumption = m.bool_or(cx.sink, "disable_stateless_session_resumption", false);
    let disable_stateful_session_resumption = m.bool_or(cx.sink, "disable_stateful_session_resumption", false);
    m.skip("session_timeout");
    m.ignore(cx.sink, "ocsp_staple_policy", "OCSP stapling is not implemented");
    m.skip("full_scan_certs_on_sni_mismatch");
    m.skip("prefer_client_ciphers");
    m.unsupported(cx.sink, "require_sni", "not implemented");
    m.skip("disable_stateless_session_resumption");
    m.finish(cx.sink);
    if common.certificates.is_empty() {
        cx.sink.error(path.as_str(), "a downstream TLS context needs at least one certificate");
        return None;
    }
    if require_client_certificate && common.validation.is_none() {
        cx.sink.error(path.as_str(), "require_client_certificate needs a validation context with a trusted CA");
    }
    Some(DownstreamTls {
        certificates: common.certificates,
        alpn: common.alpn,
        params: common.params,
        require_client_certificate,
        validation: common.validation,
        session_ticket_keys,
        disable_stateless_session_resumption,
        disable_stateful_session_resumption,
    })
}

pub fn upstream_tls_context(cx: &mut Cx, m: Msg) -> Option<UpstreamTls> {
    let common = m
        .msg(cx.sink, "common_tls_context", "CommonTlsContext")
        .map(|c| common_tls_context(cx, c))
        .unwrap_or(Common { certificates: vec![], validation: None, alpn: vec![], params: TlsParams::default() });
    let sni = m.str(cx.sink, "sni").filter(|s| !s.is_empty());
    let auto_sni = m.bool_or(cx.sink, "auto_host_sni", false);
    let auto_san_validation = m.bool_or(cx.sink, "auto_sni_san_validation", false);
    m.skip("allow_renegotiation");
    m.skip("max_session_keys");
    m.skip("enforce_rsa_key_usage");
    m.finish(cx.sink);
    Some(UpstreamTls {
        sni,
        certificates: common.certificates,
        validation: common.validation,
        alpn: common.alpn,
        params: common.params,
        auto_sni,
        auto_san_validation,
    })
}

/// A `transport_socket`: `None` for raw_buffer, a TLS context otherwise. `downstream`
/// selects which context type is expected.
pub enum TransportSocket {
    Raw,
    Downstream(DownstreamTls),
    Upstream(UpstreamTls),
}

pub fn transport_socket(cx: &mut Cx, m: Msg, downstream: bool) -> Option<TransportSocket> {
    let name = m.str(cx.sink, "name").unwrap_or_default();
    let typed = m.take("typed_config");
    let path = m.path.clone();
    m.finish(cx.sink);
    let Some((v, p)) = typed else {
        return match name.as_str() {
            "envoy.transport_sockets.raw_buffer" | "raw_buffer" | "" => Some(TransportSocket::Raw),
            other => {
                cx.sink.error(path.as_str(), format!("transport socket {other} without typed_config"));
                None
            }
        };
    };
    let (ty, val, vp) = crate::json::any(cx.sink, &p, v)?;
    match ty.as_str() {
        "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer" => Some(TransportSocket::Raw),
        "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext" if downstream => {
            let m = Msg::new(cx.sink, "DownstreamTlsContext", vp, val)?;
            downstream_tls_context(cx, m).map(TransportSocket::Downstream)
        }
        "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext" if !downstream => {
            let m = Msg::new(cx.sink, "UpstreamTlsContext", vp, val)?;
            upstream_tls_context(cx, m).map(TransportSocket::Upstream)
        }
        other => {
            cx.sink.error(path.as_str(), format!("unsupported transport socket {other}"));
            None
        }
    }
}

/// A `Secret` resource.
pub fn secret(cx: &mut Cx, m: Msg) -> Option<(String, Secret)> {
    let raw = m.str(cx.sink, "name").unwrap_or_default();
    let name = cx.scope.qualify(&raw);
    let which = m.oneof(cx.sink, &["tls_certificate", "session_ticket_keys", "validation_context", "generic_secret"]);
    let secret = match which {
        Some("tls_certificate") => m
            .msg(cx.sink, "tls_certificate", "TlsCertificate")
            .and_then(|c| tls_certificate(cx, c))
            .map(Secret::TlsCertificate),
        Some("validation_context") => m
            .msg(cx.sink, "validation_context", "CertificateValidationContext")
            .and_then(|v| validation_context(cx, v))
            .map(Secret::ValidationContext),
        Some("session_ticket_keys") => m.msg(cx.sink, "session_ticket_keys", "TlsSessionTicketKeys").map(|k| {
            let keys = k.msgs(cx.sink, "keys", "DataSource").into_iter().filter_map(|d| data_source(cx, d)).collect();
            k.finish(cx.sink);
            Secret::SessionTicketKeys(keys)
        }),
        Some("generic_secret") => m.msg(cx.sink, "generic_secret", "GenericSecret").and_then(|g| {
            let s = g.msg(cx.sink, "secret", "DataSource").and_then(|d| data_source(cx, d));
            g.finish(cx.sink);
            s.map(Secret::Generic)
        }),
        _ => {
            cx.sink.error(m.path.as_str(), "secret without content");
            None
        }
    };
    let path: Path = m.path.clone();
    m.finish(cx.sink);
    if name.is_empty() {
        cx.sink.error(path.as_str(), "secret without a name");
        return None;
    }
    secret.map(|s| (name, s))
}
