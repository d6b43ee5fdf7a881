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
/// is rejected. It is kept as compact JSON text because a parsed [`Value`] costs several
/// times its text (a 10,000-route CEC: ~2 MiB of text, ~30 MiB as a tree), and it is parsed
/// again only in the rare case that it is needed.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredDocument {
    origin: String,
    json: Box<str>,
}

impl StoredDocument {
    pub fn new(doc: &Document) -> StoredDocument {
        StoredDocument { origin: doc.origin.clone(), json: doc.value.to_string().into_boxed_str() }
    }

    /// The document again.
    pub fn document(&self) -> Result<Document, serde_json::Error> {
        Ok(Document { origin: self.origin.clone(), value: serde_json::from_str(&self.json)? })
    }

    /// Whether `doc` is this document (its origin aside).
    pub fn is(&self, doc: &Document) -> bool {
        serde_json::to_string(&doc.value).is_ok_and(|json| *self.json == *json)
    }
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
