//! `sluice check` and `sluice translate` on good and bad files: exit codes and messages.

use std::path::Path;
use std::process::Command;

fn check(file: &str) -> (i32, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/check").join(file);
    let out = Command::new(env!("CARGO_BIN_EXE_sluice")).arg("check").arg(&path).output().expect("run sluice check");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn good_file_passes_with_only_warnings() {
    let (code, out) = check("good.yaml");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("default/good: accepted"), "{out}");
    // Checked alone, the Service it redirects and the EDS endpoints are simply not known yet.
    assert!(!out.contains("error:"), "{out}");
}

#[test]
fn yaml_syntax_error() {
    let (code, out) = check("yaml-syntax.yaml");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("invalid YAML") && out.contains("line"), "{out}");
}

#[test]
fn unknown_type() {
    let (code, out) = check("unknown-type.yaml");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(
            "default/good: spec.resources[1]: unsupported resource type envoy.config.route.v3.ScopedRouteConfiguration"
        ),
        "{out}"
    );
    assert!(out.contains("REJECTED"), "{out}");
}

#[test]
fn duplicate_name() {
    let (code, out) = check("duplicate-name.yaml");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("spec.resources[3]: duplicate cluster name \"default/web\" (also at spec.resources[2])"),
        "{out}"
    );
}

#[test]
fn route_to_missing_cluster() {
    let (code, out) = check("missing-cluster.yaml");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("spec.resources[1].virtual_hosts[0].routes[0].route.cluster: undefined cluster \"default/nope\""),
        "{out}"
    );
}

#[test]
fn invalid_regex() {
    let (code, out) = check("invalid-regex.yaml");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(
            "spec.resources[1].virtual_hosts[0].routes[0].match.safe_regex.regex: invalid regex \"/(unclosed\""
        ),
        "{out}"
    );
}

#[test]
fn unsupported_filter_names_the_filter_and_path() {
    let (code, out) = check("unsupported-filter.yaml");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("default/good: spec.resources[0].filter_chains[0].filters[0].typed_config.http_filters[0]: unsupported HTTP filter envoy.filters.http.lua"),
        "{out}"
    );
}

#[test]
fn directory_with_a_good_and_a_bad_cec() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/check");
    std::fs::copy(fixtures.join("good.yaml"), dir.path().join("a.yaml")).unwrap();
    let bad = std::fs::read_to_string(fixtures.join("invalid-regex.yaml")).unwrap().replace("name: good", "name: bad");
    std::fs::write(dir.path().join("b.yaml"), bad).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice")).arg("check").arg(dir.path()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(text.contains("default/good: accepted"), "{text}");
    assert!(text.contains("default/bad: REJECTED"), "{text}");
    assert!(text.contains("1 CECs accepted, 1 rejected"), "{text}");
}

#[test]
fn json_output() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/check/missing-cluster.yaml");
    let out =
        Command::new(env!("CARGO_BIN_EXE_sluice")).args(["check", "--format", "json"]).arg(&path).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["ok"], false);
    assert_eq!(v["sources"][0]["state"], "rejected");
    assert!(v["diagnostics"].as_array().unwrap().iter().any(|d| d["severity"] == "error"));
}

#[test]
fn translate_prints_the_model() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/check/good.yaml");
    let out = Command::new(env!("CARGO_BIN_EXE_sluice")).arg("translate").arg(&path).output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["listeners"][0]["name"], "default/good/web");
    assert!(v["route_configs"]["default/good/web"].is_object());
    assert_eq!(v["clusters"]["default/web"]["discovery"]["eds"]["service_name"], "default/web");
}

#[test]
fn version_and_usage_errors() {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice")).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("sluice "));
    let out = Command::new(env!("CARGO_BIN_EXE_sluice")).args(["check"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("<PATH>"));
    let out = Command::new(env!("CARGO_BIN_EXE_sluice")).args(["check", "/nonexistent/x.yaml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such file"));
}
