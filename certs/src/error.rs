//! The one error type of the crate.
//!
//! Every variant names *what* failed (`certificate cilium-secrets/foo`, `trusted CA
//! /etc/ca.pem`, ...) so that a log line or an admin status entry is actionable on its own,
//! without the reader having to correlate it with the configuration.

use std::path::PathBuf;

/// Why TLS material could not be loaded or a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    #[error("{what}: cannot read {path}: {source}")]
    Read { what: String, path: PathBuf, source: std::io::Error },

    #[error("{what}: environment variable {var} is not set")]
    EnvVar { what: String, var: String },

    #[error("{what}: secret {name} not found")]
    SecretNotFound { what: String, name: String },

    #[error("{what}: secret {name} is a {actual}, expected a {expected}")]
    WrongSecretKind { what: String, name: String, actual: &'static str, expected: &'static str },

    #[error("{what}: no PEM certificate found")]
    NoCertificate { what: String },

    #[error("{what}: unparsable certificate: {detail}")]
    BadCertificate { what: String, detail: String },

    #[error("{what}: no PEM private key found{hint}")]
    NoPrivateKey { what: String, hint: &'static str },

    #[error("{what}: unparsable or unsupported private key: {detail}")]
    BadPrivateKey { what: String, detail: String },

    #[error("{what}: private key does not match the certificate's public key")]
    KeyMismatch { what: String },

    #[error("{what}: certificate expired on {not_after}")]
    Expired { what: String, not_after: String },

    #[error("{what}: certificate is not valid before {not_before}")]
    NotYetValid { what: String, not_before: String },

    #[error("{what}: no usable CA certificate: {detail}")]
    BadTrustedCa { what: String, detail: String },

    #[error("{what}: unparsable certificate revocation list: {detail}")]
    BadCrl { what: String, detail: String },

    #[error("{what}: session ticket key {index} is {len} bytes, expected 80")]
    BadTicketKey { what: String, index: usize, len: usize },

    #[error("{what}: no session ticket keys")]
    NoTicketKeys { what: String },

    #[error("unknown or unsupported cipher suite(s): {}", names.join(", "))]
    UnknownCipherSuites { names: Vec<String> },

    #[error("unknown or unsupported ECDH curve(s): {}", names.join(", "))]
    UnknownCurves { names: Vec<String> },

    #[error("no supported TLS version between {min} and {max} (only TLSv1_2 and TLSv1_3 are supported)")]
    NoTlsVersion { min: String, max: String },

    #[error("{0}")]
    InvalidContext(String),

    #[error("invalid upstream server name {name:?}")]
    BadServerName { name: String },

    #[error("{what}: {source}")]
    Rustls { what: String, source: rustls::Error },

    #[error("{what}: {detail}")]
    Verifier { what: String, detail: String },
}
