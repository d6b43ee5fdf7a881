//! Certificate rotation: files rewritten or swapped, secrets updated, bad material rejected.
//! Real handshakes over 127.0.0.1 observe which certificate is served.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use rcgen::{KeyPair, date_time_ymd};
use sluice_certs::rustls::version::TLS13;
use sluice_certs::{CertError, CertStore};
use sluice_config::model::{CertificateRef, DataSource, Secret, TlsCertificate};

fn files_ref(cert: &Path, key: &Path) -> CertificateRef {
    CertificateRef::Inline(TlsCertificate {
        certificate_chain: DataSource::Filename(cert.to_str().unwrap().into()),
        private_key: DataSource::Filename(key.to_str().unwrap().into()),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewriting_the_files_rotates_new_handshakes_only() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("ca");
    let old = ca.issue(&["a.example.com"]);
    let new = ca.issue(&["a.example.com"]);
    let store = CertStore::new();
    let server = serve(store.server_config(&downstream(vec![file_cert(dir.path(), "tls", &old)])).unwrap()).await;
    let cfg = client(&ca.cert_pem, &[], &[&TLS13]);

    let mut established = connect(server.addr, cfg.clone(), "a.example.com").await.unwrap();
    assert_eq!(echo(&mut established, b"before").await.unwrap(), b"before");
    assert_eq!(peer_cert(&established), old.der);

    // In place, key first: for a moment the pair on disk does not match.
    write(dir.path(), "tls.key", &new.key_pem);
    write(dir.path(), "tls.crt", &new.cert_pem);
    wait_for_cert(server.addr, cfg.clone(), "a.example.com", &new.der).await;

    assert_eq!(echo(&mut established, b"after").await.unwrap(), b"after", "established connection broke");
    assert_eq!(peer_cert(&established), old.der);
    assert!(store.counters().reloads_ok >= 1);
    assert_eq!(server.failed(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_symlink_swap_and_rename_over_rotate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("ca");
    let (v1, v2, v3) = (ca.issue(&["a.example.com"]), ca.issue(&["a.example.com"]), ca.issue(&["a.example.com"]));

    // The layout kubelet gives a Secret volume: tls.crt -> ..data/tls.crt, ..data -> ..<ts>.
    let mount = dir.path().join("secret");
    std::fs::create_dir(&mount).unwrap();
    let publish = |version: &str, leaf: &Leaf| {
        let ts = mount.join(format!("..{version}"));
        std::fs::create_dir(&ts).unwrap();
        write(&ts, "tls.crt", &leaf.cert_pem);
        write(&ts, "tls.key", &leaf.key_pem);
        symlink(format!("..{version}"), mount.join("..data_tmp")).unwrap();
        std::fs::rename(mount.join("..data_tmp"), mount.join("..data")).unwrap();
    };
    publish("2026_01_01_v1", &v1);
    symlink("..data/tls.crt", mount.join("tls.crt")).unwrap();
    symlink("..data/tls.key", mount.join("tls.key")).unwrap();

    let store = CertStore::new();
    let tls = downstream(vec![files_ref(&mount.join("tls.crt"), &mount.join("tls.key"))]);
    let server = serve(store.server_config(&tls).unwrap()).await;
    let cfg = client(&ca.cert_pem, &[], &[&TLS13]);
    assert_eq!(served_cert(server.addr, cfg.clone(), "a.example.com").await.unwrap(), v1.der);

    publish("2026_01_02_v2", &v2);
    std::fs::remove_dir_all(mount.join("..2026_01_01_v1")).unwrap();
    wait_for_cert(server.addr, cfg.clone(), "a.example.com", &v2.der).await;

    // A plain `mv new-file tls.crt` over regular files.
    let plain = dir.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    let cert = write(&plain, "cert.pem", &v1.cert_pem);
    let key = write(&plain, "key.pem", &v1.key_pem);
    let tls = downstream(vec![files_ref(Path::new(&cert), Path::new(&key))]);
    let server = serve(store.server_config(&tls).unwrap()).await;
    assert_eq!(served_cert(server.addr, cfg.clone(), "a.example.com").await.unwrap(), v1.der);
    write(&plain, ".key.tmp", &v3.key_pem);
    write(&plain, ".cert.tmp", &v3.cert_pem);
    std::fs::rename(plain.join(".key.tmp"), &key).unwrap();
    std::fs::rename(plain.join(".cert.tmp"), &cert).unwrap();
    wait_for_cert(server.addr, cfg.clone(), "a.example.com", &v3.der).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuous_handshakes_during_rotation_never_fail() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("ca");
    let leaves: Vec<Leaf> = (0..2).map(|_| ca.issue(&["a.example.com"])).collect();
    let store = CertStore::with_options(sluice_certs::StoreOptions {
        debounce: Duration::from_millis(20),
        ..Default::default()
    });
    let server = serve(store.server_config(&downstream(vec![file_cert(dir.path(), "tls", &leaves[0])])).unwrap()).await;
    let cfg = client(&ca.cert_pem, &[], &[&TLS13]);

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let seen = Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let load = {
        let (stop, ok, failed, seen, cfg) = (stop.clone(), ok.clone(), failed.clone(), seen.clone(), cfg.clone());
        let addr = server.addr;
        tokio::spawn(async move {
            // Bounded in count as well as time.
            for _ in 0..5_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                match served_cert(addr, cfg.clone(), "a.example.com").await {
                    Ok(der) => {
                        ok.fetch_add(1, Ordering::SeqCst);
                        seen.lock().unwrap().insert(der.to_vec());
                    }
                    Err(e) => {
                        eprintln!("handshake failed during rotation: {e}");
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        })
    };

    // ~2 s of rotations, non-atomic in-place writes (cert and key written separately), so
    // some reloads see a mismatched pair and must be rejected without any effect.
    for i in 1..=8 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let leaf = &leaves[i % 2];
        write(dir.path(), "tls.crt", &leaf.cert_pem);
        tokio::time::sleep(Duration::from_millis(30)).await;
        write(dir.path(), "tls.key", &leaf.key_pem);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();

    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    eprintln!("rotation under load: {ok} handshakes ok, {failed} failed, {:?}", store.counters());
    assert_eq!(failed, 0, "handshakes failed during rotation");
    assert_eq!(server.failed(), 0, "server-side handshake failures during rotation");
    assert!(ok > 10, "the load loop barely ran ({ok} handshakes)");
    assert_eq!(seen.lock().unwrap().len(), 2, "both certificates should have been served");
    assert!(store.counters().reloads_ok >= 2, "{:?}", store.counters());
}

#[test]
fn bad_pairs_are_rejected_with_specific_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("ca");
    let a = ca.issue(&["a.example.com"]);
    let b = ca.issue(&["b.example.com"]);
    let store = CertStore::new();
    let load = |cert: &str, key: &str| {
        let c = write(dir.path(), "c.pem", cert);
        let k = write(dir.path(), "k.pem", key);
        let tls = downstream(vec![files_ref(Path::new(&c), Path::new(&k))]);
        store.server_config(&tls).map(|_| ()).unwrap_err()
    };
    let c_path = dir.path().join("c.pem").display().to_string();

    let err = load(&a.cert_pem, &b.key_pem);
    assert!(matches!(err, CertError::KeyMismatch { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("certificate {c_path}: private key does not match the certificate's public key")
    );

    let mut params = leaf_params(&["old.example.com"]);
    params.not_before = date_time_ymd(2019, 1, 1);
    params.not_after = date_time_ymd(2020, 1, 1);
    let expired = ca.issue_with(params, KeyPair::generate().unwrap());
    let err = load(&expired.cert_pem, &expired.key_pem);
    assert_eq!(err.to_string(), format!("certificate {c_path}: certificate expired on 2020-01-01T00:00:00Z"));

    let mut params = leaf_params(&["future.example.com"]);
    params.not_before = date_time_ymd(2999, 1, 1);
    params.not_after = date_time_ymd(3000, 1, 1);
    let future = ca.issue_with(params, KeyPair::generate().unwrap());
    let err = load(&future.cert_pem, &future.key_pem);
    assert_eq!(err.to_string(), format!("certificate {c_path}: certificate is not valid before 2999-01-01T00:00:00Z"));

    let err = load("garbage", &a.key_pem);
    assert!(matches!(err, CertError::NoCertificate { .. }), "{err:?}");
    let err = load("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n", &a.key_pem);
    assert!(matches!(err, CertError::BadCertificate { .. }), "{err:?}");
    assert!(err.to_string().starts_with(&format!("certificate {c_path}: unparsable certificate: ")), "{err}");
    let err = load(&a.cert_pem, "garbage");
    assert!(matches!(err, CertError::NoPrivateKey { .. }), "{err:?}");

    let missing = downstream(vec![files_ref(&dir.path().join("nope.crt"), &dir.path().join("nope.key"))]);
    let err = store.server_config(&missing).unwrap_err();
    assert!(matches!(err, CertError::Read { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_rotation_keeps_the_previous_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("ca");
    let good = ca.issue(&["a.example.com"]);
    let next = ca.issue(&["a.example.com"]);
    let store = CertStore::new();
    let server = serve(store.server_config(&downstream(vec![file_cert(dir.path(), "tls", &good)])).unwrap()).await;
    let cfg = client(&ca.cert_pem, &[], &[&TLS13]);

    let mut params = leaf_params(&["a.example.com"]);
    params.not_after = date_time_ymd(2020, 1, 1);
    params.not_before = date_time_ymd(2019, 1, 1);
    let expired = ca.issue_with(params, KeyPair::generate().unwrap());
    let bad_updates: [(&str, &str, &str); 3] = [
        (&next.cert_pem, &good.key_pem, "private key does not match"),
        (&expired.cert_pem, &expired.key_pem, "expired on 2020-01-01T00:00:00Z"),
        ("-----BEGIN CERTIFICATE-----\ngarbage\n", &good.key_pem, "unparsable certificate"),
    ];
    for (n, (cert, key, expected)) in bad_updates.into_iter().enumerate() {
        // Write both files and let one debounced reload see the complete bad pair.
        write(dir.path(), "tls.key", key);
        write(dir.path(), "tls.crt", cert);
        let store2 = store.clone();
        eventually("the bad update is rejected", move || {
            let store = store2.clone();
            async move { store.counters().reloads_failed > n as u64 }
        })
        .await;
        // A reload may have seen only the first of the two files written; the last one sees
        // the complete bad pair.
        eventually("the error names the problem", || {
            let store = store.clone();
            async move { store.status().material[0].last_error.as_deref().is_some_and(|e| e.contains(expected)) }
        })
        .await;
        assert_eq!(served_cert(server.addr, cfg.clone(), "a.example.com").await.unwrap(), good.der);
    }
    assert_eq!(store.counters().reloads_ok, 0);

    write(dir.path(), "tls.key", &next.key_pem);
    write(dir.path(), "tls.crt", &next.cert_pem);
    wait_for_cert(server.addr, cfg.clone(), "a.example.com", &next.der).await;
    assert_eq!(store.status().material[0].last_error, None);
}

#[tokio::test]
async fn sds_secret_updates_change_new_handshakes() {
    let ca = Ca::new("ca");
    let (one, two) = (ca.issue(&["a.example.com"]), ca.issue(&["a.example.com"]));
    let name = "cilium-secrets/default-tls";
    let secrets =
        |leaf: &Leaf| BTreeMap::from([(name.to_string(), Arc::new(Secret::TlsCertificate(inline_cert(leaf))))]);
    let store = CertStore::new();
    let tls = downstream(vec![CertificateRef::Sds(name.into())]);

    let err = store.server_config(&tls).unwrap_err();
    assert_eq!(err.to_string(), format!("certificate {name}: secret {name} not found"));

    store.update_secrets(&secrets(&one));
    let config = store.server_config(&tls).unwrap();
    let server = serve(config.clone()).await;
    let cfg = client(&ca.cert_pem, &[], &[&TLS13]);
    let mut established = connect(server.addr, cfg.clone(), "a.example.com").await.unwrap();
    assert_eq!(peer_cert(&established), one.der);

    store.update_secrets(&secrets(&two));
    assert!(Arc::ptr_eq(&config, &store.server_config(&tls).unwrap()));
    assert_eq!(served_cert(server.addr, cfg.clone(), "a.example.com").await.unwrap(), two.der);
    assert_eq!(echo(&mut established, b"still").await.unwrap(), b"still");
    assert_eq!(store.counters().reloads_ok, 1);

    // A bad secret: mismatched key. Rejected, counted, the previous certificate serves.
    let bad = BTreeMap::from([(
        name.to_string(),
        Arc::new(Secret::TlsCertificate(TlsCertificate {
            certificate_chain: DataSource::Inline(one.cert_pem.clone().into_bytes()),
            private_key: DataSource::Inline(two.key_pem.clone().into_bytes()),
        })),
    )]);
    store.update_secrets(&bad);
    assert_eq!(store.counters().reloads_failed, 1);
    assert_eq!(served_cert(server.addr, cfg.clone(), "a.example.com").await.unwrap(), two.der);

    // A secret of the wrong kind is rejected the same way.
    let wrong = BTreeMap::from([(name.to_string(), Arc::new(Secret::Generic(DataSource::Inline(b"x".to_vec()))))]);
    store.update_secrets(&wrong);
    assert_eq!(store.counters().reloads_failed, 2);
    let status = store.status();
    assert!(
        status.material[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("is a generic_secret, expected a tls_certificate")),
        "{status:?}"
    );
    assert_eq!(served_cert(server.addr, cfg, "a.example.com").await.unwrap(), two.der);
}

#[test]
fn status_lists_material_for_the_admin_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("status ca");
    let leaf = ca.issue(&["a.example.com", "10.0.0.1"]);
    let store = CertStore::new();
    let mut tls = downstream(vec![file_cert(dir.path(), "tls", &leaf)]);
    tls.validation = Some(sluice_config::model::ValidationRef::Inline(sluice_config::model::ValidationContext {
        trusted_ca: Some(DataSource::Inline(ca.cert_pem.clone().into_bytes())),
        ..Default::default()
    }));
    let _config = store.server_config(&tls).unwrap();
    let json = serde_json::to_value(store.status()).unwrap();
    assert_eq!(json["reloads_ok"], 0);
    let cert = &json["material"][0];
    assert_eq!(cert["kind"], "certificate");
    assert_eq!(cert["name"], dir.path().join("tls.crt").display().to_string());
    assert_eq!(cert["source"], format!("file {}", dir.path().join("tls.crt").display()));
    assert_eq!(cert["subject"], "CN=a.example.com");
    assert_eq!(cert["sans"], serde_json::json!(["DNS:a.example.com", "IP:10.0.0.1"]));
    assert_eq!(cert["not_after"], "4096-01-01T00:00:00Z");
    assert_eq!(json["material"][1]["kind"], "trusted_ca");
    assert_eq!(json["material"][1]["subject"], "CN=status ca");
    assert_eq!(json["watched_directories"][0], dir.path().display().to_string());
}
