//! Documents: the unit every configuration source hands to the translator.
//!
//! File mode parses YAML or JSON text into documents; Kubernetes mode serialises the objects
//! it watches. Either way the translator sees the same thing: a JSON value and where it came
//! from.

use serde::Deserialize;
use serde_json::Value;

use crate::diag::Diagnostic;

#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// Where the document came from, for messages: `examples/x.yaml#2`, `k8s:CiliumEnvoyConfig`.
    pub origin: String,
    pub value: Value,
}

/// A document kept for later: the last good version of a CEC, served again if a new version
/// is rejected, and Kubernetes mode's record of what it last handed on.
///
/// It is kept as deflated compact JSON: a parsed [`Value`] costs several times its text (a
/// 10,000-route CEC: ~1.3 MiB of text, ~30 MiB as a tree), and CEC text is so repetitive
/// that the fastest deflate level shrinks it ~17x (to ~75 KiB). It is inflated and parsed
/// again only in the rare case that it is needed.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredDocument {
    origin: String,
    deflated: Box<[u8]>,
}

/// Deflate's fastest level: nearly all of the gain on JSON, at a fraction of the time.
const LEVEL: u8 = 1;

impl StoredDocument {
    pub fn new(doc: &Document) -> StoredDocument {
        StoredDocument { origin: doc.origin.clone(), deflated: deflate(&doc.value) }
    }

    /// The document again.
    pub fn document(&self) -> Result<Document, serde_json::Error> {
        let json = miniz_oxide::inflate::decompress_to_vec(&self.deflated)
            .map_err(|e| <serde_json::Error as serde::de::Error>::custom(format!("stored document: {e}")))?;
        Ok(Document { origin: self.origin.clone(), value: serde_json::from_slice(&json)? })
    }

    /// Whether `doc` is this document (its origin aside). Deflate is deterministic, so equal
    /// documents deflate to equal bytes.
    pub fn is(&self, doc: &Document) -> bool {
        *self.deflated == *deflate(&doc.value)
    }
}

fn deflate(value: &Value) -> Box<[u8]> {
    miniz_oxide::deflate::compress_to_vec(value.to_string().as_bytes(), LEVEL).into_boxed_slice()
}

/// What a document is, judged by `apiVersion` and `kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocKind {
    CiliumEnvoyConfig,
    CiliumClusterwideEnvoyConfig,
    Service,
    EndpointSlice,
    Secret,
    /// Any other Kubernetes object (Deployments next to a CEC in one file): ignored.
    Other,
}

impl Document {
    pub fn kind(&self) -> DocKind {
        let kind = self.value.get("kind").and_then(Value::as_str);
        let api = self.value.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        match kind {
            Some("CiliumEnvoyConfig") => DocKind::CiliumEnvoyConfig,
            Some("CiliumClusterwideEnvoyConfig") => DocKind::CiliumClusterwideEnvoyConfig,
            Some("Service") if api == "v1" => DocKind::Service,
            Some("EndpointSlice") if api.starts_with("discovery.k8s.io/") => DocKind::EndpointSlice,
            Some("Secret") if api == "v1" => DocKind::Secret,
            Some(_) => DocKind::Other,
            // Cilium's golden translator outputs carry only metadata and spec.
            None if self.value.pointer("/spec/resources").is_some() => DocKind::CiliumEnvoyConfig,
            None => DocKind::Other,
        }
    }

    pub fn has_explicit_kind(&self) -> bool {
        self.value.get("kind").is_some()
    }

    pub fn namespace(&self) -> &str {
        self.value.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("")
    }

    pub fn name(&self) -> &str {
        self.value.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("")
    }
}

/// Parses a YAML stream (several `---` documents) or JSON text. `kind: List` objects are
/// flattened. Empty documents are skipped.
///
/// A syntax error anywhere rejects the whole text: a half-read file must not be applied.
pub fn parse_documents(origin: &str, text: &str) -> Result<Vec<Document>, Diagnostic> {
    let mut values = Vec::new();
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        let v: Value = serde_json::from_str(text).map_err(|e| {
            Diagnostic::error(origin, "", format!("invalid JSON at line {} column {}: {e}", e.line(), e.column()))
        })?;
        match v {
            Value::Array(items) => values.extend(items),
            v => values.push(v),
        }
    } else {
        for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let v = Value::deserialize(de).map_err(|e| {
                let at =
                    e.location().map(|l| format!(" at line {} column {}", l.line(), l.column())).unwrap_or_default();
                Diagnostic::error(origin, "", format!("invalid YAML in document {}{at}: {e}", i + 1))
            })?;
            values.push(v);
        }
    }
    let mut docs = Vec::new();
    let mut n = 0;
    for v in values {
        flatten(origin, v, &mut n, &mut docs)?;
    }
    Ok(docs)
}

fn flatten(origin: &str, v: Value, n: &mut usize, out: &mut Vec<Document>) -> Result<(), Diagnostic> {
    match v {
        Value::Null => Ok(()),
        Value::Object(ref o) if o.get("kind").and_then(Value::as_str) == Some("List") => {
            if let Some(Value::Array(items)) = o.get("items") {
                for item in items.clone() {
                    flatten(origin, item, n, out)?;
                }
            }
            Ok(())
        }
        Value::Object(_) => {
            *n += 1;
            out.push(Document { origin: format!("{origin}#{n}"), value: v });
            Ok(())
        }
        other => Err(Diagnostic::error(
            format!("{origin}#{}", *n + 1),
            "",
            format!("expected a Kubernetes object, found {}", crate::json::kind(&other)),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_document_comes_back_whole_and_recognises_itself() {
        let routes: Vec<Value> = (0..500)
            .map(
                |i| serde_json::json!({"match": {"prefix": format!("/svc-{i}/")}, "route": {"cluster": "default/web"}}),
            )
            .collect();
        let doc = Document {
            origin: "big.yaml#1".into(),
            value: serde_json::json!({"kind": "CiliumEnvoyConfig", "spec": {"routes": routes}}),
        };
        let stored = StoredDocument::new(&doc);
        assert_eq!(stored.document().unwrap(), doc);
        assert!(stored.is(&doc));
        let mut changed = doc.clone();
        changed.value["spec"]["routes"][499]["route"]["cluster"] = "default/other".into();
        assert!(!stored.is(&changed));
        // What it is for: a large, repetitive CEC is kept at a fraction of its text.
        let text = doc.value.to_string().len();
        assert!(stored.deflated.len() * 8 < text, "{} bytes deflated of {text}", stored.deflated.len());
    }

    #[test]
    fn yaml_stream_with_lists_and_empty_docs() {
        let text = "---\napiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\n---\napiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Secret\n  metadata: {name: s}\n";
        let docs = parse_documents("f.yaml", text).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].kind(), DocKind::Service);
        assert_eq!(docs[1].kind(), DocKind::Secret);
        assert_eq!(docs[1].origin, "f.yaml#2");
    }

    #[test]
    fn yaml_syntax_error_names_the_line() {
        let err = parse_documents("bad.yaml", "a: b\n  c: : d\n").unwrap_err();
        assert!(err.message.contains("line"), "{}", err.message);
        assert_eq!(err.source, "bad.yaml");
    }

    #[test]
    fn json_documents() {
        let docs = parse_documents(
            "x.json",
            r#"{"apiVersion":"cilium.io/v2","kind":"CiliumEnvoyConfig","metadata":{"name":"a"}}"#,
        )
        .unwrap();
        assert_eq!(docs[0].kind(), DocKind::CiliumEnvoyConfig);
        assert!(parse_documents("x.json", "{").is_err());
    }
}
