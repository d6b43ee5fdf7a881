//! Replays the scenarios of Cilium's agent tests (`pkg/ciliumenvoyconfig/testdata/*.txtar`,
//! read in place from the corpus) through the translator and compares what Cilium's agent
//! would publish to Envoy at each `envoy/cmp` step: the qualified listener and cluster names,
//! and the EDS (ClusterLoadAssignment) names with their endpoint addresses.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use sluice_config::{Document, Options, parse_documents, translate};

struct Txtar {
    script: String,
    files: BTreeMap<String, String>,
}

fn parse_txtar(text: &str) -> Txtar {
    let mut script = String::new();
    let mut files = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("-- ").and_then(|l| l.strip_suffix(" --")) {
            if let Some((n, body)) = current.take() {
                files.insert(n, body);
            }
            current = Some((name.to_string(), String::new()));
        } else if let Some((_, body)) = current.as_mut() {
            body.push_str(line);
            body.push('\n');
        } else {
            script.push_str(line);
            script.push('\n');
        }
    }
    if let Some((n, body)) = current {
        files.insert(n, body);
    }
    Txtar { script, files }
}

/// What an `envoy*.expected` file says Envoy received: listener and cluster names, and
/// endpoint addresses per EDS name.
#[derive(Debug, Default, PartialEq)]
struct Expected {
    listeners: BTreeSet<String>,
    clusters: BTreeSet<String>,
    endpoints: BTreeMap<String, BTreeSet<String>>,
}

fn parse_expected(text: &str) -> Expected {
    let mut e = Expected::default();
    let mut current_eds: Option<String> = None;
    let mut addr: Option<String> = None;
    for line in text.lines() {
        if !line.starts_with(' ') {
            current_eds = None;
            if let Some(n) = line.strip_prefix("listener:").and_then(|l| l.strip_suffix(':')) {
                e.listeners.insert(n.to_string());
            } else if let Some(n) = line.strip_prefix("clusters:").and_then(|l| l.strip_suffix(':')) {
                e.clusters.insert(n.to_string());
            } else if let Some(n) = line.strip_prefix("endpoints:").and_then(|l| l.strip_suffix(':')) {
                e.endpoints.insert(n.to_string(), BTreeSet::new());
                current_eds = Some(n.to_string());
            }
            continue;
        }
        let Some(eds) = &current_eds else { continue };
        let t = line.trim();
        if let Some(a) = t.strip_prefix("address:  \"").and_then(|a| a.strip_suffix('"')) {
            addr = Some(a.to_string());
        } else if let Some(p) = t.strip_prefix("port_value:  ")
            && let Some(a) = addr.take()
        {
            let a = if a.contains(':') { format!("[{a}]:{p}") } else { format!("{a}:{p}") };
            e.endpoints.get_mut(eds).unwrap().insert(a);
        }
    }
    e
}

fn object_key(doc: &Document) -> (String, String, String) {
    let kind = doc.value.get("kind").and_then(|k| k.as_str()).unwrap_or("").to_string();
    (kind, doc.namespace().to_string(), doc.name().to_string())
}

fn run(name: &str, tx: &Txtar) -> Result<usize, String> {
    let mut files = tx.files.clone();
    let mut objects: BTreeMap<(String, String, String), Document> = BTreeMap::new();
    let mut compared = 0;
    let mut opts = Options::default();
    for raw in tx.script.lines() {
        let line = raw.trim().trim_start_matches("* ").trim();
        let words: Vec<String> = shell_words(line);
        let Some(cmd) = words.first() else { continue };
        match cmd.as_str() {
            "k8s/add" | "k8s/update" | "k8s/delete" => {
                for f in &words[1..] {
                    let text = files.get(f).ok_or_else(|| format!("{name}: missing file {f}"))?;
                    let docs = parse_documents(f, text).map_err(|e| format!("{name}: {e}"))?;
                    for d in docs {
                        let key = object_key(&d);
                        if cmd == "k8s/delete" {
                            objects.remove(&key);
                        } else {
                            objects.insert(key, d);
                        }
                    }
                }
            }
            "set-node-labels" => {
                let labels = words[1..]
                    .iter()
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                opts.node_labels = Some(labels);
            }
            "cp" => {
                let body = files.get(&words[1]).cloned().unwrap_or_default();
                files.insert(words[2].clone(), body);
            }
            "replace" => {
                let body = files.get(&words[3]).cloned().unwrap_or_default();
                files.insert(words[3].clone(), body.replace(&words[1], &words[2]));
            }
            "db/cmp" if words.get(1).map(String::as_str) == Some("envoy-resources") => {
                let table = files.get(&words[2]).ok_or("missing table file")?;
                let want = parse_resources_table(table);
                let docs: Vec<Document> = objects.values().cloned().collect();
                let s = translate(&docs, &opts).snapshot;
                let mut got = BTreeMap::new();
                for (n, eps) in s.endpoints.iter().filter(|(n, e)| !e.is_empty() && want.contains_key(*n)) {
                    let ips: BTreeSet<String> = eps
                        .iter()
                        .map(|e| match &e.address {
                            sluice_config::model::EndpointAddress::Socket(a) => a.ip().to_string(),
                            other => other.to_string(),
                        })
                        .collect();
                    got.insert(n.clone(), ips);
                }
                if got != want {
                    return Err(format!("{name} at `{line}`: expected endpoints {want:?}, got {got:?}"));
                }
                compared += 1;
            }
            "envoy/cmp" => {
                let expected = parse_expected(files.get(&words[1]).ok_or("missing expected file")?);
                let docs: Vec<Document> = objects.values().cloned().collect();
                let t = translate(&docs, &opts);
                let s = &t.snapshot;
                let got = Expected {
                    listeners: s.listeners.iter().map(|l| l.name.clone()).collect(),
                    clusters: s.clusters.keys().cloned().collect(),
                    endpoints: s
                        .endpoints
                        .iter()
                        .filter(|(_, eps)| !eps.is_empty())
                        .map(|(n, eps)| (n.clone(), eps.iter().map(|e| e.address.to_string()).collect()))
                        .collect(),
                };
                // Cilium publishes empty assignments too in some versions; compare non-empty ones.
                let want = Expected {
                    endpoints: expected.endpoints.into_iter().filter(|(_, a)| !a.is_empty()).collect(),
                    ..expected
                };
                if got != want {
                    return Err(format!(
                        "{name} at `{line}`:\n  expected {want:#?}\n  got      {got:#?}\n  diagnostics: {:#?}",
                        s.diagnostics
                    ));
                }
                compared += 1;
            }
            _ => {}
        }
    }
    Ok(compared)
}

/// The `Endpoints` column of an `envoy-resources` table: `test/echo:80: 10.244.1.1, 10.244.1.2`.
fn parse_resources_table(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let re = regex::Regex::new(r"^backendsync:\S+\s+(\S+): ((?:[0-9a-f.:]+(?:, )?)+)\s").unwrap();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if let Some(c) = re.captures(line) {
            let ips = c[2].split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
            out.insert(c[1].to_string(), ips);
        }
    }
    out
}

fn shell_words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote = None;
    for c in line.chars() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, ' ') => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            (_, c) => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[test]
fn cilium_agent_scenarios() {
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus/cec/cilium/pkg/ciliumenvoyconfig/testdata");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        eprintln!("SKIPPED cilium_agent_scenarios: {} is not present", dir.display());
        return;
    };
    let mut paths: Vec<_> =
        entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "txtar")).collect();
    paths.sort();
    let mut failures = Vec::new();
    let mut total = 0;
    for p in &paths {
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        let tx = parse_txtar(&std::fs::read_to_string(p).unwrap());
        match run(&name, &tx) {
            Ok(n) => {
                println!("{name}: {n} comparisons match");
                total += n;
            }
            Err(e) => failures.push(e),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(total >= 20, "only {total} comparisons ran");
}
