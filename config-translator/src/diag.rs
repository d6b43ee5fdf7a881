//! Diagnostics: what the translator reports about its input.
//!
//! Cilium silently drops what it cannot use. Sluice says what it dropped or refused, where
//! (the CEC and the JSON path into it) and why. The policy:
//!
//! * **error** — a field or extension that would change routing, security or the response
//!   if honoured, and that Sluice does not implement; or input that is invalid. The CEC that
//!   carries it is rejected as a whole; every other CEC still applies.
//! * **warning** — something that is safe to ignore (`stat_prefix`, `socket_options`, ...),
//!   or a reference that may be satisfied later (a Service that has not arrived yet).

use std::fmt;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warning,
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    /// `namespace/name` of the CEC (`/name` for a CCEC), or the document origin
    /// (`file.yaml#2`) when the document could not be identified.
    pub source: String,
    /// JSON path inside the document, e.g. `spec.resources[2].filter_chains[0]`.
    pub path: String,
    pub message: String,
}

impl Diagnostic {
    pub fn error(source: impl Into<String>, path: impl Into<String>, message: impl Into<String>) -> Self {
        Diagnostic { severity: Severity::Error, source: source.into(), path: path.into(), message: message.into() }
    }

    pub fn warning(source: impl Into<String>, path: impl Into<String>, message: impl Into<String>) -> Self {
        Diagnostic { severity: Severity::Warning, source: source.into(), path: path.into(), message: message.into() }
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    /// `default/lb: spec.resources[2].filter_chains[0]: unsupported ...` (the format users grep
    /// for in `sluice check`, logs and Kubernetes Events).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        if self.path.is_empty() {
            write!(f, "{sev}: {}: {}", self.source, self.message)
        } else {
            write!(f, "{sev}: {}: {}: {}", self.source, self.path, self.message)
        }
    }
}

/// Collects diagnostics for one source (one CEC) and remembers whether any was an error.
#[derive(Debug, Default)]
pub struct Sink {
    pub source: String,
    pub items: Vec<Diagnostic>,
}

impl Sink {
    pub fn new(source: impl Into<String>) -> Self {
        Sink { source: source.into(), items: Vec::new() }
    }

    pub fn error(&mut self, path: &str, message: impl Into<String>) {
        self.items.push(Diagnostic::error(self.source.clone(), path, message));
    }

    pub fn warning(&mut self, path: &str, message: impl Into<String>) {
        self.items.push(Diagnostic::warning(self.source.clone(), path, message));
    }

    pub fn has_errors(&self) -> bool {
        self.items.iter().any(Diagnostic::is_error)
    }

    pub fn first_error(&self) -> Option<&Diagnostic> {
        self.items.iter().find(|d| d.is_error())
    }
}
