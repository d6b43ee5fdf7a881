//! Downstream TLS termination with configurations from `CertStore::server_config`, against
//! real rustls clients (and `openssl s_client`) over 127.0.0.1.

mod common;

use std::process::Command;
use std::sync::Arc;

use common::*;
use rcgen::{KeyPair, SanType as RcgenSan};
use sluice_certs::rustls::version::{TLS12, TLS13};
use sluice_certs::rustls::{CipherSuite, HandshakeKind, ProtocolVersion};
use sluice_certs::{CertError, CertStore};
use sluice_config::model::{
    DataSource, SanMatcher, SanType, SessionTickets, StringMatchKind, StringMatcher, StringMatcherCmp, TlsVersion,
    ValidationContext, ValidationRef,
};

#[tokio::test]
async fn serves_the_certificate_and_negotiates_h2() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let leaf = ca.issue(&["a.example.com"]);
    let mut tls = downstream(vec![file_cert(dir.path(), "a", &leaf)]);
    tls.alpn = vec!["h2".into(), "http/1.1".into()];
    let store = CertStore::new();
    let server = serve(store.server_config(&tls).unwrap()).await;

    let mut conn =
        connect(server.addr, client(&ca.cert_pem, &["h2"], &[&TLS13, &TLS12]), "a.example.com").await.unwrap();
    assert_eq!(echo(&mut conn, b"hello").await.unwrap(), b"hello");
    assert_eq!(peer_cert(&conn), leaf.der);
    assert_eq!(conn.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(conn.get_ref().1.protocol_version(), Some(ProtocolVersion::TLSv1_3));

    let mut conn = connect(server.addr, client(&ca.cert_pem, &["http/1.1"], &[&TLS13]), "a.example.com").await.unwrap();
    echo(&mut conn, b"x").await.unwrap();
    assert_eq!(conn.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
}

#[tokio::test]
async fn tls_version_limits_are_enforced() {
    let ca = Ca::new("test ca");
    let leaf = ca.issue(&["a.example.com"]);
    let store = CertStore::new();
    for (version, allowed, refused) in [(TlsVersion::V1_2, &TLS12, &TLS13), (TlsVersion::V1_3, &TLS13, &TLS12)] {
        let mut tls = downstream(vec![sluice_config::model::CertificateRef::Inline(inline_cert(&leaf))]);
        tls.params.min_version = version;
        tls.params.max_version = version;
        let server = serve(store.server_config(&tls).unwrap()).await;

        let conn = connect(server.addr, client(&ca.cert_pem, &[], &[allowed]), "a.example.com").await.unwrap();
        assert_eq!(conn.get_ref().1.protocol_version(), Some(allowed.version));

        let refused_conn = connect(server.addr, client(&ca.cert_pem, &[], &[refused]), "a.example.com").await;
        assert!(refused_conn.is_err(), "{version:?}-only server accepted {:?}", refused.version);
    }
}

#[tokio::test]
async fn cipher_suites_are_restricted() {
    let ca = Ca::new("test ca");
    let leaf = ca.issue(&["a.example.com"]);
    let store = CertStore::new();
    let mut tls = downstream(vec![sluice_config::model::CertificateRef::Inline(inline_cert(&leaf))]);
    tls.params.max_version = TlsVersion::V1_2;
    tls.params.cipher_suites = vec!["ECDHE-ECDSA-CHACHA20-POLY1305".into()];
    let server = serve(store.server_config(&tls).unwrap()).await;
    let conn = connect(server.addr, client(&ca.cert_pem, &[], &[&TLS12]), "a.example.com").await.unwrap();
    assert_eq!(
        conn.get_ref().1.negotiated_cipher_suite().map(|s| s.suite()),
        Some(CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256)
    );

    tls.params.cipher_suites = vec!["ECDHE-ECDSA-AES128-SHA".into(), "RC4-MD5".into()];
    match store.server_config(&tls) {
        Err(e @ CertError::UnknownCipherSuites { .. }) => {
            assert_eq!(e.to_string(), "unknown or unsupported cipher suite(s): ECDHE-ECDSA-AES128-SHA, RC4-MD5")
        }
        other => panic!("expected unknown cipher suites, got {other:?}"),
    }
}

#[tokio::test]
async fn sni_selects_among_the_certificates_of_a_context() {
    let ca = Ca::new("test ca");
    let a = ca.issue(&["a.example.com"]);
    let b = ca.issue(&["*.b.example.com"]);
    let store = CertStore::new();
    let tls = downstream(vec![
        sluice_config::model::CertificateRef::Inline(inline_cert(&a)),
        sluice_config::model::CertificateRef::Inline(inline_cert(&b)),
    ]);
    let server = serve(store.server_config(&tls).unwrap()).await;
    let cfg = client(&ca.cert_pem, &[], &[&TLS13]);

    assert_eq!(served_cert(server.addr, cfg.clone(), "x.b.example.com").await.unwrap(), b.der);
    assert_eq!(served_cert(server.addr, cfg.clone(), "A.example.com").await.unwrap(), a.der);
    // No certificate covers the name: the first one is served (and the client rejects it).
    let unknown = connect(server.addr, ecdsa_only_client(), "other.example.org").await.unwrap();
    assert_eq!(peer_cert(&unknown), a.der);
    // A wildcard covers exactly one label.
    let deep = connect(server.addr, ecdsa_only_client(), "y.x.b.example.com").await.unwrap();
    assert_eq!(peer_cert(&deep), a.der);
}

#[tokio::test]
async fn rsa_or_ecdsa_by_the_client_signature_schemes() {
    // ring cannot generate RSA keys; openssl makes one at test time.
    let Some(rsa_pem) = openssl_rsa_key() else {
        eprintln!("SKIPPED rsa_or_ecdsa_by_the_client_signature_schemes: `openssl genrsa` unavailable");
        return;
    };
    let ca = Ca::new("test ca");
    let rsa_key = KeyPair::from_pem(&rsa_pem).unwrap();
    let rsa = ca.issue_with(leaf_params(&["a.example.com"]), rsa_key);
    let ecdsa = ca.issue(&["a.example.com"]);
    let store = CertStore::new();
    let tls = downstream(vec![
        sluice_config::model::CertificateRef::Inline(inline_cert(&rsa)),
        sluice_config::model::CertificateRef::Inline(inline_cert(&ecdsa)),
    ]);
    let server = serve(store.server_config(&tls).unwrap()).await;

    let default_client = client(&ca.cert_pem, &[], &[&TLS13]);
    assert_eq!(served_cert(server.addr, default_client, "a.example.com").await.unwrap(), rsa.der);
    let conn = connect(server.addr, ecdsa_only_client(), "a.example.com").await.unwrap();
    assert_eq!(peer_cert(&conn), ecdsa.der, "an ECDSA-only client must get the ECDSA certificate");
}

fn openssl_rsa_key() -> Option<String> {
    let out = Command::new("openssl").args(["genrsa", "2048"]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn uri_matcher(uri: &str) -> SanMatcher {
    SanMatcher {
        san_type: SanType::Uri,
        matcher: StringMatcherCmp(StringMatcher { kind: StringMatchKind::Exact(uri.into()), ignore_case: false }),
    }
}

fn client_leaf(ca: &Ca, uri: &str) -> Leaf {
    let mut params = leaf_params(&["client.example.com"]);
    params.subject_alt_names.push(RcgenSan::URI(uri.try_into().unwrap()));
    ca.issue_with(params, KeyPair::generate().unwrap())
}

#[tokio::test]
async fn mtls_accepts_good_and_rejects_missing_untrusted_and_san_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server ca");
    let client_ca = Ca::new("client ca");
    let rogue_ca = Ca::new("rogue ca");
    let leaf = server_ca.issue(&["a.example.com"]);
    let good_id = "spiffe://cluster.local/ns/a/sa/good";

    let mut tls = downstream(vec![file_cert(dir.path(), "server", &leaf)]);
    tls.require_client_certificate = true;
    tls.validation = Some(ValidationRef::Inline(ValidationContext {
        trusted_ca: Some(DataSource::Filename(write(dir.path(), "client-ca.pem", &client_ca.cert_pem))),
        match_subject_alt_names: vec![uri_matcher(good_id)],
        ..ValidationContext::default()
    }));
    let store = CertStore::new();
    let server = serve(store.server_config(&tls).unwrap()).await;

    let round_trip = |cfg| async move {
        let mut conn = connect(server.addr, cfg, "a.example.com").await?;
        echo(&mut conn, b"hi").await
    };
    let good = client_with_cert(&server_ca.cert_pem, &client_leaf(&client_ca, good_id));
    assert_eq!(round_trip(good).await.unwrap(), b"hi");

    let missing = client(&server_ca.cert_pem, &[], &[&TLS13, &TLS12]);
    assert!(round_trip(missing).await.is_err(), "a missing client certificate must be rejected");
    let missing12 = client(&server_ca.cert_pem, &[], &[&TLS12]);
    assert!(round_trip(missing12).await.is_err(), "a missing client certificate must be rejected (TLS 1.2)");

    let untrusted = client_with_cert(&server_ca.cert_pem, &client_leaf(&rogue_ca, good_id));
    assert!(round_trip(untrusted).await.is_err(), "a certificate from another CA must be rejected");

    let wrong_san =
        client_with_cert(&server_ca.cert_pem, &client_leaf(&client_ca, "spiffe://cluster.local/ns/a/sa/bad"));
    assert!(round_trip(wrong_san).await.is_err(), "a SAN matcher mismatch must be rejected");
    assert!(server.failed() >= 4, "server saw {} failed handshakes", server.failed());
}

#[tokio::test]
async fn validation_without_require_requests_but_does_not_require() {
    let server_ca = Ca::new("server ca");
    let client_ca = Ca::new("client ca");
    let rogue_ca = Ca::new("rogue ca");
    let leaf = server_ca.issue(&["a.example.com"]);
    let mut tls = downstream(vec![sluice_config::model::CertificateRef::Inline(inline_cert(&leaf))]);
    tls.validation = Some(ValidationRef::Inline(ValidationContext {
        trusted_ca: Some(DataSource::Inline(client_ca.cert_pem.clone().into_bytes())),
        ..ValidationContext::default()
    }));
    let store = CertStore::new();
    let server = serve(store.server_config(&tls).unwrap()).await;
    let round_trip = |cfg| async move {
        let mut conn = connect(server.addr, cfg, "a.example.com").await?;
        echo(&mut conn, b"hi").await
    };
    assert!(round_trip(client(&server_ca.cert_pem, &[], &[&TLS13])).await.is_ok());
    let good = client_with_cert(&server_ca.cert_pem, &client_ca.issue(&["c.example.com"]));
    assert!(round_trip(good).await.is_ok());
    let rogue = client_with_cert(&server_ca.cert_pem, &rogue_ca.issue(&["c.example.com"]));
    assert!(round_trip(rogue).await.is_err(), "a presented but untrusted certificate is still rejected");
}

#[tokio::test]
async fn require_client_certificate_without_ca_is_a_config_error() {
    let ca = Ca::new("ca");
    let mut tls = downstream(vec![sluice_config::model::CertificateRef::Inline(inline_cert(&ca.issue(&["a"])))]);
    tls.require_client_certificate = true;
    let err = CertStore::new().server_config(&tls).unwrap_err();
    assert!(err.to_string().contains("require_client_certificate"), "{err}");
}

async fn resumed(addr: std::net::SocketAddr, cfg: Arc<sluice_certs::rustls::ClientConfig>) -> bool {
    let mut conn = connect(addr, cfg, "a.example.com").await.unwrap();
    // Reading processes the NewSessionTicket messages that follow a TLS 1.3 handshake.
    echo(&mut conn, b"x").await.unwrap();
    conn.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed)
}

#[tokio::test]
async fn sessions_resume_and_envoy_ticket_keys_are_shared_between_stores() {
    let ca = Ca::new("ca");
    let leaf = ca.issue(&["a.example.com"]);
    let key: Vec<u8> = (0u8..80).collect();
    let mut tls = downstream(vec![sluice_config::model::CertificateRef::Inline(inline_cert(&leaf))]);
    tls.session_ticket_keys = Some(SessionTickets::Inline(vec![DataSource::Inline(key)]));

    // Two independent stores (two proxy processes) with the same keys.
    let one = serve(CertStore::new().server_config(&tls).unwrap()).await;
    let two = serve(CertStore::new().server_config(&tls).unwrap()).await;
    for versions in [&[&TLS13][..], &[&TLS12][..]] {
        let cfg = Arc::new(resuming_client(&ca.cert_pem, versions));
        assert!(!resumed(one.addr, cfg.clone()).await, "first connection is a full handshake");
        assert!(resumed(two.addr, cfg.clone()).await, "a ticket from one instance resumes on the other");
    }

    // Default: stateless tickets with random keys, per configuration.
    let plain = downstream(vec![sluice_config::model::CertificateRef::Inline(inline_cert(&leaf))]);
    let server = serve(CertStore::new().server_config(&plain).unwrap()).await;
    let cfg = Arc::new(resuming_client(&ca.cert_pem, &[&TLS13]));
    assert!(!resumed(server.addr, cfg.clone()).await);
    assert!(resumed(server.addr, cfg).await);

    // Both mechanisms disabled: every handshake is full.
    let mut off = plain.clone();
    off.disable_stateful_session_resumption = true;
    off.disable_stateless_session_resumption = true;
    let server = serve(CertStore::new().server_config(&off).unwrap()).await;
    for versions in [&[&TLS13][..], &[&TLS12][..]] {
        let cfg = Arc::new(resuming_client(&ca.cert_pem, versions));
        assert!(!resumed(server.addr, cfg.clone()).await);
        assert!(!resumed(server.addr, cfg).await, "resumption must be off");
    }
}

#[tokio::test]
async fn identical_contexts_share_one_config() {
    let ca = Ca::new("ca");
    let tls = downstream(vec![sluice_config::model::CertificateRef::Inline(inline_cert(&ca.issue(&["a"])))]);
    let store = CertStore::new();
    let first = store.server_config(&tls).unwrap();
    store.update_secrets(&Default::default());
    let second = store.server_config(&tls.clone()).unwrap();
    assert!(Arc::ptr_eq(&first, &second), "an unchanged context must not rebuild its config");
    let mut other = tls.clone();
    other.alpn = vec!["h2".into()];
    assert!(!Arc::ptr_eq(&first, &store.server_config(&other).unwrap()));
}

#[tokio::test]
async fn openssl_s_client_negotiates_tls13_and_tls11_is_refused() {
    if Command::new("openssl").arg("version").output().is_err() {
        eprintln!("SKIPPED openssl_s_client_negotiates_tls13_and_tls11_is_refused: openssl is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let leaf = ca.issue(&["a.example.com"]);
    let ca_file = write(dir.path(), "ca.pem", &ca.cert_pem);
    let mut tls = downstream(vec![file_cert(dir.path(), "a", &leaf)]);
    tls.alpn = vec!["h2".into(), "http/1.1".into()];
    let server = serve(CertStore::new().server_config(&tls).unwrap()).await;
    let addr = server.addr.to_string();

    let run = move |extra: Vec<&'static str>| {
        let ca_file = ca_file.clone();
        let addr = addr.clone();
        tokio::task::spawn_blocking(move || {
            let mut args = vec!["s_client", "-connect", &addr, "-servername", "a.example.com", "-CAfile", &ca_file];
            args.extend(["-verify_return_error", "-alpn", "h2"]);
            args.extend(extra);
            let out = Command::new("openssl").args(&args).stdin(std::process::Stdio::null()).output().unwrap();
            (
                out.status.success(),
                format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
            )
        })
    };

    let (ok, out) = run(vec![]).await.unwrap();
    assert!(ok, "openssl s_client failed:\n{out}");
    assert!(out.contains("TLSv1.3"), "TLS 1.3 not negotiated:\n{out}");
    assert!(out.contains("ALPN protocol: h2"), "h2 not negotiated:\n{out}");
    assert!(out.contains("Verify return code: 0 (ok)"), "certificate did not verify:\n{out}");

    // SECLEVEL=0 lets openssl really offer TLS 1.1, so the refusal is the server's.
    let (ok, out) = run(vec!["-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"]).await.unwrap();
    assert!(!ok, "TLS 1.1 handshake succeeded:\n{out}");
    assert!(out.contains("Cipher is (NONE)"), "a cipher was negotiated over TLS 1.1:\n{out}");
    // The refusal comes from the server (a TLS alert), not from openssl's own policy.
    assert!(out.contains("alert"), "no alert from the server:\n{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ca_rotation_applies_to_the_same_config() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server ca");
    let (old_ca, new_ca) = (Ca::new("client ca 1"), Ca::new("client ca 2"));
    let mut tls = downstream(vec![sluice_config::model::CertificateRef::Inline(inline_cert(
        &server_ca.issue(&["a.example.com"]),
    ))]);
    tls.require_client_certificate = true;
    let ca_file = write(dir.path(), "ca.pem", &old_ca.cert_pem);
    tls.validation = Some(ValidationRef::Inline(ValidationContext {
        trusted_ca: Some(DataSource::Filename(ca_file)),
        ..ValidationContext::default()
    }));
    let store = CertStore::new();
    let config = store.server_config(&tls).unwrap();
    let server = serve(config.clone()).await;
    let round_trip = |cfg| async move {
        let mut conn = connect(server.addr, cfg, "a.example.com").await?;
        echo(&mut conn, b"hi").await
    };
    let old_client = client_with_cert(&server_ca.cert_pem, &old_ca.issue(&["c"]));
    let new_client = client_with_cert(&server_ca.cert_pem, &new_ca.issue(&["c"]));
    assert!(round_trip(old_client.clone()).await.is_ok());
    assert!(round_trip(new_client.clone()).await.is_err());

    write(dir.path(), "ca.pem", &new_ca.cert_pem);
    let deadline = std::time::Instant::now() + TIMEOUT;
    while round_trip(new_client.clone()).await.is_err() {
        assert!(std::time::Instant::now() < deadline, "the new client CA was never trusted");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Verification on the running config follows the file; the old CA is gone.
    assert!(round_trip(old_client).await.is_err());
    // The next server_config call rebuilds (fresh CA names in the CertificateRequest).
    assert!(!Arc::ptr_eq(&config, &store.server_config(&tls).unwrap()));
}

#[tokio::test]
async fn expired_and_revoked_client_certificates() {
    let server_ca = Ca::new("server ca");
    let client_ca = Ca::new("client ca");
    let mut expired_params = leaf_params(&["expired.example.com"]);
    expired_params.not_before = rcgen::date_time_ymd(2019, 1, 1);
    expired_params.not_after = rcgen::date_time_ymd(2020, 1, 1);
    let expired = client_ca.issue_with(expired_params, KeyPair::generate().unwrap());
    let mut revoked_params = leaf_params(&["revoked.example.com"]);
    revoked_params.serial_number = Some(rcgen::SerialNumber::from(4242u64));
    let revoked = client_ca.issue_with(revoked_params, KeyPair::generate().unwrap());
    let mut fine_params = leaf_params(&["fine.example.com"]);
    fine_params.serial_number = Some(rcgen::SerialNumber::from(7u64));
    let fine = client_ca.issue_with(fine_params, KeyPair::generate().unwrap());

    let context = |allow_expired: bool, crl: Option<String>| {
        let mut tls = downstream(vec![sluice_config::model::CertificateRef::Inline(inline_cert(
            &server_ca.issue(&["a.example.com"]),
        ))]);
        tls.require_client_certificate = true;
        tls.validation = Some(ValidationRef::Inline(ValidationContext {
            trusted_ca: Some(DataSource::Inline(client_ca.cert_pem.clone().into_bytes())),
            crl: crl.map(|c| DataSource::Inline(c.into_bytes())),
            allow_expired_certificate: allow_expired,
            ..ValidationContext::default()
        }));
        tls
    };
    let store = CertStore::new();
    let attempt = |tls: sluice_config::model::DownstreamTls, leaf: &Leaf| {
        let cfg = client_with_cert(&server_ca.cert_pem, leaf);
        let config = store.server_config(&tls).unwrap();
        async move {
            let server = serve(config).await;
            let mut conn = connect(server.addr, cfg, "a.example.com").await?;
            echo(&mut conn, b"hi").await
        }
    };
    assert!(attempt(context(false, None), &expired).await.is_err(), "expired client certificate accepted");
    assert!(attempt(context(true, None), &expired).await.is_ok(), "allow_expired_certificate not honoured");
    // allow_expired_certificate does not make an untrusted expired certificate acceptable.
    let mut rogue_params = leaf_params(&["rogue"]);
    rogue_params.not_after = rcgen::date_time_ymd(2020, 1, 1);
    let rogue = Ca::new("rogue").issue_with(rogue_params, KeyPair::generate().unwrap());
    assert!(attempt(context(true, None), &rogue).await.is_err());

    let crl = client_ca.crl(&[4242]);
    assert!(attempt(context(false, Some(crl.clone())), &revoked).await.is_err(), "revoked certificate accepted");
    assert!(attempt(context(false, Some(crl)), &fine).await.is_ok());
}
