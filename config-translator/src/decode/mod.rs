//! Decoders from Envoy v3 proto3 JSON to the native model, one module per resource family.
//!
//! Each decoder takes a [`Msg`](crate::json::Msg), consumes the fields it implements, ignores
//! (with a warning) those that are safe to ignore, and lets [`Msg::finish`](crate::json::Msg::finish)
//! turn the rest into errors. References to other resources (clusters, secrets) are
//! collected in [`Refs`] and checked once every CEC has been decoded.

pub mod cluster;
pub mod common;
pub mod listener;
pub mod route;
pub mod tls;

use crate::diag::Sink;
use crate::qualify::Scope;

/// Decoding context for one CEC.
pub struct Cx<'a> {
    pub sink: &'a mut Sink,
    pub scope: &'a Scope,
    pub refs: Refs,
}

/// Names a CEC refers to, with the JSON path of each reference, for validation after all
/// CECs are known.
#[derive(Debug, Default)]
pub struct Refs {
    pub clusters: Vec<(String, String)>,
    pub secrets: Vec<(String, String)>,
    pub internal_listeners: Vec<(String, String)>,
}
