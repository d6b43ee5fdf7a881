//! # sluice-config
//!
//! Turns CiliumEnvoyConfig / CiliumClusterwideEnvoyConfig documents (plus the Kubernetes
//! Services, EndpointSlices and Secrets they refer to) into Sluice's native [`model`].
//!
//! The crate is pure: no I/O, no async, no clocks. Every source of configuration (files,
//! the Kubernetes API) hands it documents and gets back a [`model::Snapshot`] with
//! [`diag::Diagnostic`]s attached.

pub mod decode;
pub mod diag;
pub mod document;
pub mod envoy_export;
pub mod json;
pub mod k8s;
pub mod model;
pub mod qualify;
pub mod route_index;
pub mod translate;

pub use diag::{Diagnostic, Severity};
pub use document::{DocKind, Document, StoredDocument, parse_documents};
pub use model::Snapshot;
pub use translate::{Options, Translation, translate};
