//! Kubernetes Events on CECs/CCECs that the translator rejects.
//!
//! CiliumEnvoyConfig has no status field, so an Event on the object is the only place
//! `kubectl describe` can show why it is not served. Each distinct message is published
//! once per object; a resync that produces the same diagnostics publishes nothing.
//!
//! Events are created through kube's `Recorder` (events.k8s.io/v1; cluster-scoped objects
//! such as CCECs get their Events in the `default` namespace). A fresh `Recorder` is used for
//! every Event on purpose: the `Recorder`'s own cache folds a second Event with the same
//! reason on the same object into a series of the *first* one, keeping the first note, so a
//! changed message would never be shown. Deduplication is done here instead, by message.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use sluice_config::Snapshot;
use sluice_config::model::SourceState;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::KubeCounters;

/// `reason` of the Events, as `kubectl get events --field-selector reason=...` filters.
pub(crate) const REASON: &str = "TranslationFailed";
/// `reportingController` of the Events.
const CONTROLLER: &str = "sluice";
/// Events per object and snapshot; the rest are only logged (every error is in the log).
const MAX_PER_OBJECT: usize = 10;
/// The Events API limits `note` to 1 kB.
const MAX_NOTE: usize = 1024;
/// Publish attempts before an Event is given up (the translation error stays logged).
const ATTEMPTS: u32 = 3;

struct Pending {
    regarding: ObjectReference,
    note: String,
}

/// Decides which Events to publish; a task publishes them off the reconcile loop.
pub(crate) struct EventReporter {
    tx: mpsc::UnboundedSender<Pending>,
    /// Messages already published, by source name, while the source stays rejected.
    published: BTreeMap<String, BTreeSet<String>>,
}

impl EventReporter {
    pub fn spawn(
        client: kube::Client,
        instance: Option<String>,
        counters: Arc<KubeCounters>,
        tasks: &mut JoinSet<()>,
    ) -> EventReporter {
        let (tx, rx) = mpsc::unbounded_channel();
        let reporter = Reporter { controller: CONTROLLER.into(), instance };
        tasks.spawn(publish_loop(client, reporter, counters, rx));
        EventReporter { tx, published: BTreeMap::new() }
    }

    /// Queues Events for the rejected CECs/CCECs of `snapshot` whose messages have not been
    /// published yet. `references` maps source names to the objects.
    pub fn report(&mut self, snapshot: &Snapshot, references: &BTreeMap<String, ObjectReference>) {
        let mut now: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for source in &snapshot.sources {
            let (reason, suffix) = match &source.state {
                SourceState::Rejected { reason } => (reason, ""),
                SourceState::PreviousVersion { reason } => (reason, " (the previous version keeps serving)"),
                SourceState::Accepted | SourceState::NotSelected => continue,
            };
            let mut notes: Vec<String> = Vec::new();
            for d in snapshot.diagnostics.iter().filter(|d| d.is_error() && d.source == source.name) {
                let note = format!("{d}{suffix}");
                if !notes.contains(&note) {
                    notes.push(note);
                }
            }
            if notes.is_empty() {
                notes.push(format!("error: {}: {reason}{suffix}", source.name));
            }
            let Some(regarding) = references.get(&source.name) else {
                tracing::debug!(target: "sluice::kubernetes", "{}: no such object to report on", source.name);
                continue;
            };
            let seen = self.published.get(&source.name);
            let mut queued = 0;
            for note in &notes {
                if seen.is_some_and(|s| s.contains(note)) {
                    continue;
                }
                if queued == MAX_PER_OBJECT {
                    tracing::warn!(
                        target: "sluice::kubernetes",
                        "{}: more than {MAX_PER_OBJECT} new errors; only the first get an Event",
                        source.name
                    );
                    break;
                }
                queued += 1;
                let _ = self.tx.send(Pending { regarding: regarding.clone(), note: note.clone() });
            }
            now.insert(source.name.clone(), notes.into_iter().collect());
        }
        // Accepted, unselected and deleted objects start afresh: a later failure is news.
        self.published = now;
    }
}

async fn publish_loop(
    client: kube::Client,
    reporter: Reporter,
    counters: Arc<KubeCounters>,
    mut rx: mpsc::UnboundedReceiver<Pending>,
) {
    while let Some(p) = rx.recv().await {
        let event = Event {
            type_: EventType::Warning,
            reason: REASON.into(),
            note: Some(truncate(&p.note, MAX_NOTE)),
            action: "Translate".into(),
            secondary: None,
        };
        let what = format!(
            "{} {}{}",
            p.regarding.kind.as_deref().unwrap_or(""),
            p.regarding.namespace.as_deref().map(|n| format!("{n}/")).unwrap_or_default(),
            p.regarding.name.as_deref().unwrap_or("")
        );
        let mut attempt = 1;
        loop {
            match Recorder::new(client.clone(), reporter.clone()).publish(&event, &p.regarding).await {
                Ok(()) => {
                    counters.events_published.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(target: "sluice::kubernetes", "Event {REASON} on {what}: {}", p.note);
                    break;
                }
                Err(e) if attempt < ATTEMPTS => {
                    tracing::debug!(target: "sluice::kubernetes", "cannot publish an Event on {what} ({e}); retrying");
                    tokio::time::sleep(Duration::from_secs(u64::from(attempt))).await;
                    attempt += 1;
                }
                Err(e) => {
                    counters.events_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(target: "sluice::kubernetes", "cannot publish an Event on {what}: {e}");
                    break;
                }
            }
        }
    }
}

/// At most `max` bytes, cut at a character boundary, marked when cut.
fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max - '…'.len_utf8();
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_respects_limit_and_boundaries() {
        assert_eq!(truncate("short", 10), "short");
        let long = "é".repeat(600);
        let t = truncate(&long, MAX_NOTE);
        assert!(t.len() <= MAX_NOTE);
        assert!(t.ends_with('…'));
    }
}
