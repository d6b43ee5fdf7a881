//! Statistics, exported in Prometheus text format with Envoy's names.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::control::ReloadOutcome;
use crate::runtime::Shared;

#[derive(Default)]
pub struct Stats {
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    tls_handshake_failures: AtomicU64,
}

impl Stats {
    pub fn new() -> Self {
        Stats::default()
    }

    pub fn record_reload(&self, outcome: &ReloadOutcome) {
        match outcome {
            ReloadOutcome::Applied { .. } => self.reloads_ok.fetch_add(1, Ordering::Relaxed),
            ReloadOutcome::Refused { .. } => self.reloads_failed.fetch_add(1, Ordering::Relaxed),
        };
    }

    pub fn tls_handshake_failed(&self) {
        self.tls_handshake_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self, _shared: &Shared) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# TYPE sluice_config_reloads counter");
        let _ = writeln!(s, "sluice_config_reloads{{result=\"success\"}} {}", self.reloads_ok.load(Ordering::Relaxed));
        let _ =
            writeln!(s, "sluice_config_reloads{{result=\"failure\"}} {}", self.reloads_failed.load(Ordering::Relaxed));
        let _ = writeln!(s, "# TYPE sluice_tls_handshake_failures counter");
        let _ = writeln!(s, "sluice_tls_handshake_failures {}", self.tls_handshake_failures.load(Ordering::Relaxed));
        s
    }
}
