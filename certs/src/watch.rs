//! Watching the directories of certificate files, with debouncing.
//!
//! Directories are watched rather than files: Kubernetes Secret volumes update by writing a
//! new timestamped directory and renaming a `..data` symlink over the old one, and many tools
//! (cert-manager's csi driver, `mv` of a temp file, editors) replace a file by rename. A
//! watch on the file itself would follow the old inode and miss all of these.
//!
//! Events are collected on a dedicated thread until the directory has been quiet for the
//! debounce interval (bounded by ten intervals under a continuous stream of events), so that
//! a certificate and its key written one after the other are normally reloaded together. If
//! they are not, the half-updated pair fails validation, is rejected, and the next event
//! reloads the complete pair: the previous certificate serves in between.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Weak;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};

use crate::store::Inner;

pub(crate) struct DirWatcher {
    watcher: RecommendedWatcher,
    watched: BTreeSet<PathBuf>,
}

impl DirWatcher {
    pub fn start(inner: Weak<Inner>, debounce: Duration) -> Result<DirWatcher, notify::Error> {
        let (tx, rx) = mpsc::channel::<PathBuf>();
        let watcher = notify::recommended_watcher(move |res: notify::Result<Event>| match res {
            Ok(event) if relevant(&event.kind) => {
                for path in event.paths {
                    // The receiver only goes away when the store is dropped.
                    let _ = tx.send(path);
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "certificate file watcher error"),
        })?;
        std::thread::Builder::new()
            .name("sluice-cert-watch".into())
            .spawn(move || debounce_loop(&rx, &inner, debounce))
            .map_err(notify::Error::io)?;
        Ok(DirWatcher { watcher, watched: BTreeSet::new() })
    }

    /// Starts watching `dir` unless it already is.
    pub fn ensure(&mut self, dir: &Path) {
        if self.watched.contains(dir) {
            return;
        }
        match self.watcher.watch(dir, RecursiveMode::NonRecursive) {
            Ok(()) => {
                tracing::debug!(dir = %dir.display(), "watching certificate directory");
                self.watched.insert(dir.to_path_buf());
            }
            Err(e) => tracing::warn!(
                dir = %dir.display(),
                error = %e,
                "cannot watch certificate directory; changes there will not be picked up"
            ),
        }
    }

    /// Stops watching directories no live material depends on any more.
    pub fn retain(&mut self, keep: &BTreeSet<PathBuf>) {
        let gone: Vec<PathBuf> = self.watched.difference(keep).cloned().collect();
        for dir in gone {
            // The directory may have been deleted, which already removed the watch.
            let _ = self.watcher.unwatch(&dir);
            self.watched.remove(&dir);
        }
    }

    pub fn watched(&self) -> impl Iterator<Item = &PathBuf> {
        self.watched.iter()
    }
}

/// Reads do not change anything (and our own reloads read the files: reacting to those would
/// loop); metadata changes (atime, chmod) neither, in practice.
fn relevant(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        EventKind::Modify(ModifyKind::Metadata(_)) => false,
        _ => true,
    }
}

fn debounce_loop(rx: &mpsc::Receiver<PathBuf>, inner: &Weak<Inner>, debounce: Duration) {
    while let Ok(first) = rx.recv() {
        let mut paths = BTreeSet::from([first]);
        let deadline = Instant::now() + debounce * 10;
        loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            match rx.recv_timeout(debounce.min(deadline - now)) {
                Ok(path) => {
                    paths.insert(path);
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        let Some(inner) = inner.upgrade() else { return };
        // An event names a file in a watched directory, or the directory itself.
        let mut dirs: Vec<PathBuf> = Vec::new();
        for path in &paths {
            dirs.push(path.clone());
            if let Some(parent) = path.parent() {
                dirs.push(parent.to_path_buf());
            }
        }
        dirs.sort();
        dirs.dedup();
        inner.reload_dirs(&dirs);
    }
}
