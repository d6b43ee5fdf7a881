//! What the admin endpoint shows about the store.

use serde::Serialize;

/// Reload counters since the store was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ReloadCounters {
    /// Reloads that replaced material with a new, valid version.
    pub reloads_ok: u64,
    /// Reloads that were rejected (the previous material kept serving).
    pub reloads_failed: u64,
}

/// One loaded piece of material (a certificate, a CA of a bundle, a set of ticket keys).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MaterialStatus {
    /// `certificate`, `trusted_ca` or `session_ticket_keys`.
    pub kind: &'static str,
    /// The SDS secret name, or the file the material comes from.
    pub name: String,
    /// `sds`, `file <path>`, `inline` or `env $VAR`.
    pub source: String,
    pub subject: Option<String>,
    pub sans: Vec<String>,
    /// RFC 3339, UTC.
    pub not_after: Option<String>,
    /// Why the last reload was rejected, while the previous material is still serving; or,
    /// with no `subject`, why the material never loaded (nothing is serving it).
    pub last_error: Option<String>,
}

/// The whole store, as served by the admin endpoint.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StoreStatus {
    #[serde(flatten)]
    pub counters: ReloadCounters,
    pub watched_directories: Vec<String>,
    pub material: Vec<MaterialStatus>,
}
