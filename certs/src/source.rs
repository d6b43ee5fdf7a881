//! Reading [`DataSource`]s and SDS secrets while recording what was read.
//!
//! Every load goes through an [`InputRecorder`]: it remembers which files were read (so the
//! watcher knows which directories matter), which SDS secrets were consulted (so a secret
//! update reloads exactly the material that depends on it), and a SHA-256 fingerprint of all
//! bytes read (so a file event that did not change anything is not counted as a reload).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ring::digest;
use sluice_config::model::{DataSource, Secret};

use crate::error::CertError;

/// What one load read.
#[derive(Debug, Clone)]
pub(crate) struct Inputs {
    /// Files read, as configured but made absolute.
    pub files: Vec<PathBuf>,
    /// SDS secret names consulted (found or not).
    pub secrets: Vec<String>,
    pub fingerprint: [u8; 32],
}

impl Inputs {
    /// Directories whose events should trigger a reload: the directory of each file as
    /// configured (Kubernetes Secret volumes swap a `..data` symlink there), and the
    /// directory of its resolved target when the file is a symlink elsewhere.
    pub fn watch_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        for file in &self.files {
            if let Some(dir) = file.parent() {
                dirs.push(dir.to_path_buf());
            }
            if let Ok(real) = std::fs::canonicalize(file)
                && let Some(dir) = real.parent()
            {
                dirs.push(dir.to_path_buf());
            }
        }
        dirs.sort();
        dirs.dedup();
        dirs
    }

    /// True if a change in one of `dirs` may have changed this material.
    pub fn depends_on_dir(&self, dirs: &[PathBuf]) -> bool {
        self.files.iter().any(|f| {
            let configured = f.parent().is_some_and(|p| dirs.iter().any(|d| d == p));
            configured
                || std::fs::canonicalize(f)
                    .ok()
                    .and_then(|r| r.parent().map(Path::to_path_buf))
                    .is_some_and(|p| dirs.contains(&p))
        })
    }
}

/// Reads sources for one load, see the module docs.
pub(crate) struct InputRecorder<'a> {
    secrets: &'a BTreeMap<String, Arc<Secret>>,
    files: Vec<PathBuf>,
    secret_names: Vec<String>,
    digest: digest::Context,
}

impl<'a> InputRecorder<'a> {
    pub fn new(secrets: &'a BTreeMap<String, Arc<Secret>>) -> Self {
        InputRecorder {
            secrets,
            files: Vec::new(),
            secret_names: Vec::new(),
            digest: digest::Context::new(&digest::SHA256),
        }
    }

    /// The bytes of `source`. `what` names the material for error messages.
    pub fn read(&mut self, source: &DataSource, what: &str) -> Result<Vec<u8>, CertError> {
        let bytes = match source {
            DataSource::Inline(bytes) => bytes.clone(),
            DataSource::Filename(name) => {
                let path = absolute(Path::new(name));
                // Recorded before reading so a file that does not exist yet is still watched
                // once a slot exists (it only matters for reloads; first loads fail loudly).
                if !self.files.contains(&path) {
                    self.files.push(path.clone());
                }
                std::fs::read(&path).map_err(|source| CertError::Read {
                    what: what.to_string(),
                    path: path.clone(),
                    source,
                })?
            }
            DataSource::EnvironmentVariable(var) => match std::env::var_os(var) {
                Some(v) => v.into_encoded_bytes(),
                None => {
                    return Err(CertError::EnvVar { what: what.to_string(), var: var.clone() });
                }
            },
        };
        self.digest.update(&(bytes.len() as u64).to_be_bytes());
        self.digest.update(&bytes);
        Ok(bytes)
    }

    /// The SDS secret `name`, recording the dependency even when it is missing so that its
    /// later arrival triggers a reload.
    pub fn secret(&mut self, name: &str, what: &str) -> Result<Arc<Secret>, CertError> {
        if !self.secret_names.iter().any(|n| n == name) {
            self.secret_names.push(name.to_string());
        }
        self.secrets
            .get(name)
            .cloned()
            .ok_or_else(|| CertError::SecretNotFound { what: what.to_string(), name: name.to_string() })
    }

    /// Mixes non-byte inputs (such as SAN matchers of an SDS validation context) into the
    /// fingerprint.
    pub fn note(&mut self, data: &str) {
        self.digest.update(&(data.len() as u64).to_be_bytes());
        self.digest.update(data.as_bytes());
    }

    pub fn finish(self) -> Inputs {
        let mut fingerprint = [0u8; 32];
        fingerprint.copy_from_slice(self.digest.finish().as_ref());
        Inputs { files: self.files, secrets: self.secret_names, fingerprint }
    }
}

/// `path` made absolute against the current directory (without resolving symlinks: the
/// configured name is what Kubernetes keeps stable).
pub(crate) fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// A short human name for where a data source points, for status and error messages.
pub(crate) fn describe(source: &DataSource) -> String {
    match source {
        DataSource::Filename(f) => f.clone(),
        DataSource::Inline(b) => format!("inline ({} bytes)", b.len()),
        DataSource::EnvironmentVariable(v) => format!("${v}"),
    }
}

pub(crate) fn secret_kind(secret: &Secret) -> &'static str {
    match secret {
        Secret::TlsCertificate(_) => "tls_certificate",
        Secret::ValidationContext(_) => "validation_context",
        Secret::SessionTicketKeys(_) => "session_ticket_keys",
        Secret::Generic(_) => "generic_secret",
    }
}
