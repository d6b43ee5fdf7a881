//! File mode: documents from a file or a directory of YAML/JSON files, watched for changes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use sluice_config::{Diagnostic, Document, parse_documents};
use tokio::sync::mpsc;

/// Reads every document under `path`. A file that does not parse is reported as an error
/// diagnostic (and contributes no documents); the caller decides what that means for the
/// reload (file mode keeps the previous configuration).
pub fn load(path: &Path) -> (Vec<Document>, Vec<Diagnostic>) {
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    for file in files(path) {
        let origin = file.display().to_string();
        match std::fs::read_to_string(&file) {
            Ok(text) => match parse_documents(&origin, &text) {
                Ok(d) => docs.extend(d),
                Err(e) => errors.push(e),
            },
            Err(e) => errors.push(Diagnostic::error(origin, "", format!("cannot read: {e}"))),
        }
    }
    if !path.exists() {
        errors.push(Diagnostic::error(path.display().to_string(), "", "no such file or directory"));
    }
    (docs, errors)
}

/// The configuration files under `path`, sorted: the path itself if it is a file, else the
/// `.yaml`/`.yml`/`.json` files in it and its subdirectories. Hidden entries (Kubernetes'
/// `..data` symlink farms in ConfigMap mounts) are skipped so every file is read once.
pub fn files(path: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if path.is_file() {
        out.push(path.to_path_buf());
        return out;
    }
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else { continue };
        for entry in rd.flatten() {
            let p = entry.path();
            let hidden = p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
            if hidden {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json")) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Watches `path` and sends a unit on `tx` after each burst of changes, debounced by
/// `debounce` so an editor's write-rename-chmod sequence causes one reload.
pub fn watch(path: &Path, debounce: Duration, tx: mpsc::Sender<()>) -> notify::Result<notify::RecommendedWatcher> {
    let (raw_tx, mut raw_rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res
            && !matches!(ev.kind, notify::EventKind::Access(_))
        {
            let _ = raw_tx.send(());
        }
    })?;
    // Watch the directory (or the file's directory): editors and Kubernetes replace files by
    // rename, which a watch on the file itself would lose.
    let dir = if path.is_dir() {
        path.to_path_buf()
    } else {
        path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
    };
    watcher.watch(&dir, RecursiveMode::Recursive)?;
    tokio::spawn(async move {
        while raw_rx.recv().await.is_some() {
            // Collect the rest of the burst.
            loop {
                match tokio::time::timeout(debounce, raw_rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            if tx.send(()).await.is_err() {
                return;
            }
        }
    });
    Ok(watcher)
}
