//! # sluice-certs
//!
//! TLS material for Sluice: loading and validating certificates, keys, CAs and session ticket
//! keys; keeping them current (file watching, secret updates); and turning the translator's
//! TLS contexts ([`DownstreamTls`], [`UpstreamTls`]) into live rustls configurations.
//!
//! ## Using it from the data plane
//!
//! ```text
//! on each config snapshot:  store.update_secrets(&snapshot.secrets)
//!                           for each filter chain with tls:  store.server_config(&chain.tls)
//!                           for each cluster with tls:       store.client_config(&cluster.tls)
//! on accept:   peek ClientHello -> choose filter chain -> TlsAcceptor::from(server_config)
//! on connect:  TlsConnector::from(client_config).connect(store.server_name(&tls, host)?, tcp)
//! admin:       store.status() (serde::Serialize), store.counters()
//! ```
//!
//! ## Crypto provider: ring
//!
//! Every configuration is built with `builder_with_provider(ring::default_provider())`,
//! never with a process-wide default provider, so the choice cannot be changed behind our
//! back by another crate installing a default. *ring* was chosen over aws-lc-rs because it
//! builds on a fresh machine with nothing but a C compiler (aws-lc-rs needs CMake and, for
//! some targets, NASM/Go, and takes several times longer to compile), which keeps CI and
//! contributor setup simple on small machines; the Kubernetes client uses the same provider,
//! so the binary carries one implementation. ring offers every suite Sluice needs:
//! TLS 1.3 AES-GCM/ChaCha20 and TLS 1.2 ECDHE with AES-GCM/ChaCha20, with X25519, P-256 and
//! P-384 key exchange. It lacks FIPS validation and post-quantum hybrid key exchange; either
//! would be a reason to revisit.
//!
//! ## Rotation semantics
//!
//! - A configuration resolves its certificates, CA and ticket keys from the store on **every
//!   handshake**. A rotation therefore applies to the next handshake; established connections
//!   keep the keys they negotiated and are never interrupted.
//! - New material is fully read, parsed and validated (chain parses, key matches the leaf,
//!   leaf within its validity period) before it replaces the old. A bad pair is rejected with
//!   a specific error (logged with `tracing::error!`, counted in
//!   [`ReloadCounters::reloads_failed`], shown as `last_error` in [`CertStore::status`]) and
//!   the previous certificate keeps serving.
//! - Files are watched through their directories (see the `watch` module docs for why),
//!   debounced, and compared by content, so touching a file is not a reload.
//! - Secrets (SDS, Kubernetes TLS Secrets) arrive with each snapshot through
//!   [`CertStore::update_secrets`]; only material depending on a changed secret reloads.
//!
//! [`DownstreamTls`]: sluice_config::model::DownstreamTls
//! [`UpstreamTls`]: sluice_config::model::UpstreamTls

mod cert;
mod client;
mod error;
mod params;
mod server;
mod slot;
mod source;
mod status;
mod store;
mod tickets;
mod validation;
mod watch;
mod x509;

pub use error::CertError;
pub use status::{MaterialStatus, ReloadCounters, StoreStatus};
pub use store::{CertStore, StoreOptions};

/// Re-exported so that users name exactly the rustls this crate builds configurations for.
pub use rustls;
