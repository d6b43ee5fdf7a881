//! Walks every CiliumEnvoyConfig / CiliumClusterwideEnvoyConfig in Cilium's own examples,
//! docs and golden translator outputs (`../shared/corpus/cec`, read in place) and translates
//! each one. At least 90 % must be accepted, and every rejection must name a feature that
//! `docs/SUPPORTED.md` lists as not supported.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sluice_config::model::SourceState;
use sluice_config::{DocKind, Document, Options, parse_documents, translate};

fn corpus_dir() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus/cec");
    dir.is_dir().then_some(dir)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out);
        } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json")) {
            out.push(p);
        }
    }
}

/// The keys of the "Not supported" table in docs/SUPPORTED.md (first column, in backticks).
fn unsupported_features() -> Vec<String> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/SUPPORTED.md"))
        .expect("docs/SUPPORTED.md must exist");
    let section = text.split("## Not supported").nth(1).expect("docs/SUPPORTED.md needs a '## Not supported' section");
    let section = section.split("\n## ").next().unwrap_or(section);
    section.lines().filter(|l| l.starts_with("| `")).filter_map(|l| l.split('`').nth(1).map(str::to_string)).collect()
}

#[test]
fn corpus_acceptance() {
    let Some(dir) = corpus_dir() else {
        eprintln!("SKIPPED corpus_acceptance: ../shared/corpus/cec is not present next to the checkout");
        return;
    };
    let mut files = Vec::new();
    walk(&dir, &mut files);
    let features = unsupported_features();
    let (mut total, mut accepted) = (0usize, 0usize);
    let mut rejected: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut unlisted = Vec::new();
    let mut unparsable = 0;
    let mut warnings: BTreeMap<String, usize> = BTreeMap::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let rel = file.strip_prefix(&dir).unwrap().display().to_string();
        let Ok(docs) = parse_documents(&rel, &text) else {
            unparsable += 1;
            continue;
        };
        let (cecs, others): (Vec<&Document>, Vec<&Document>) = docs
            .iter()
            .partition(|d| matches!(d.kind(), DocKind::CiliumEnvoyConfig | DocKind::CiliumClusterwideEnvoyConfig));
        for cec in cecs {
            total += 1;
            let mut input: Vec<Document> = others.iter().map(|d| (*d).clone()).collect();
            input.push(cec.clone());
            let opts = Options { admin_address: Some("127.0.0.1:9879".parse().unwrap()), ..Options::default() };
            let t = translate(&input, &opts);
            for d in t.snapshot.diagnostics.iter().filter(|d| !d.is_error()) {
                let key: String = d.message.chars().take(70).collect();
                *warnings.entry(key).or_default() += 1;
            }
            let report = &t.snapshot.sources[0];
            match &report.state {
                SourceState::Accepted => accepted += 1,
                SourceState::Rejected { reason } => {
                    if !features.iter().any(|f| reason.contains(f.as_str())) {
                        unlisted.push(format!("{rel}: {reason}"));
                    }
                    rejected.entry(reason.clone()).or_default().push(rel.clone());
                }
                other => panic!("{rel}: unexpected state {other:?}"),
            }
        }
    }
    println!("corpus: {total} CEC/CCEC documents in {} files ({unparsable} files not YAML/JSON)", files.len());
    println!("accepted: {accepted}");
    println!("rejected: {}", total - accepted);
    for (reason, files) in &rejected {
        println!("  {:>3} x {reason}", files.len());
        for f in files.iter().take(3) {
            println!("        e.g. {f}");
        }
    }
    println!("warnings (first 70 characters, count):");
    for (w, n) in &warnings {
        println!("  {n:>4} x {w}");
    }
    assert!(total >= 233, "expected the 233 corpus documents, found {total}");
    assert!(accepted * 100 >= total * 90, "only {accepted} of {total} accepted");
    assert!(unlisted.is_empty(), "rejections for features not listed in docs/SUPPORTED.md:\n{}", unlisted.join("\n"));
}
