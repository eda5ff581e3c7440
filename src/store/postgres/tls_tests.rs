//! TLS to PostgreSQL against the local test server, to which `.ci/postgres` gives a
//! certificate signed by a test CA ([`TEST_CA_FILE`](super::testing::TEST_CA_FILE)):
//! `sslmode=require` connects with TLS and verifies the certificate, the public roots
//! alone refuse it, a host the certificate does not name is refused, and no `sslmode` is
//! plaintext.

use std::path::Path;

use super::ingest_tests::Book;
use super::testing::{test_ca_file, with_params, TestDatabase};
use super::{PgStore, PgTarget, TlsSetting};
use crate::store::StoreError;

/// Whether the pooled connection of `store` runs over TLS (the server's own view).
async fn pooled_connection_uses_tls(store: &PgStore) -> bool {
    let client = store.client().await.expect("a pooled connection");
    uses_tls(&client).await
}

/// Whether `client`'s connection runs over TLS (the server's own view).
async fn uses_tls(client: &tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_require_with_the_ca_file_connects_over_tls_and_ingests() {
    let ca = test_ca_file();
    let db = TestDatabase::create().await;
    let target = PgTarget::parse(&with_params(db.url(), "sslmode=require"), Some(&ca))
        .expect("the URL and the CA file");
    assert!(target.uses_tls());
    assert_eq!(
        target.describe_tls(),
        format!(
            "TLS: required (sslmode=require), server certificate and host name verified \
             against the public roots and {}",
            ca.display()
        )
    );
    let (store, _) = PgStore::open_target(target, TestDatabase::options(2))
        .await
        .expect("a verified TLS connection");
    assert!(pooled_connection_uses_tls(&store).await, "pg_stat_ssl.ssl");

    let webhook = crate::store::sqlite::tests::webhook("tls-1");
    store.ingest(webhook).await.expect("a webhook ingested");
    assert!(
        store.event_outcome("tls-1").await.is_some(),
        "the webhook read back"
    );

    // The listener's connection of its own is made with the same connector.
    let (client, connection) = store.connect_to().connect().await.expect("a connection");
    let driver = tokio::spawn(connection);
    assert!(
        uses_tls(&client).await,
        "a connection of its own uses TLS too"
    );
    drop(client);
    let _ = driver.await;
    store.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslrootcert_in_the_url_and_verify_full_are_honoured() {
    let ca = test_ca_file();
    let db = TestDatabase::create().await;
    let url = with_params(
        db.url(),
        &format!("sslmode=verify-full&sslrootcert={}", ca.display()),
    );
    let target = PgTarget::parse(&url, None).expect("verify-full and sslrootcert");
    assert_eq!(
        target.setting(),
        &TlsSetting::Verified {
            sslmode: "verify-full".to_string(),
            rootcert: Some(ca.display().to_string()),
        }
    );
    let store = PgStore::from_target(target, TestDatabase::options(1)).expect("a pool");
    assert!(pooled_connection_uses_tls(&store).await, "pg_stat_ssl.ssl");
    store.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_require_refuses_a_certificate_the_public_roots_do_not_trust() {
    // The CA is made and installed by .ci/postgres: without it the server's certificate
    // verifies against nothing, and this test would pass for the wrong reason.
    test_ca_file();
    let db = TestDatabase::create().await;
    let target = PgTarget::parse(&with_params(db.url(), "sslmode=require"), None).expect("the URL");
    let err = PgStore::open_target(target.clone(), TestDatabase::options(1))
        .await
        .expect_err("an untrusted certificate refused");
    let StoreError::Open { path, reason } = &err else {
        panic!("not an Open error: {err:?}");
    };
    assert_eq!(path, &target.describe());
    assert!(
        reason.contains("the server's certificate is not trusted"),
        "{reason}"
    );
    assert!(!err.to_string().contains("cashout_recon_test:"), "{err}");

    // A pooled connection at run time says the same.
    let store = PgStore::from_target(target, TestDatabase::options(1)).expect("a pool");
    let err = store.client().await.expect_err("refused");
    assert!(
        matches!(&err, StoreError::Unavailable(reason) if reason.contains("not trusted")),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_refuses_a_host_the_certificate_does_not_name() {
    let ca = test_ca_file();
    let db = TestDatabase::create().await;
    // The same server (hostaddr=127.0.0.1), reached under a name its certificate (IP
    // 127.0.0.1, DNS localhost) does not hold: the name is what TLS verifies.
    let renamed = db
        .url()
        .replacen("@127.0.0.1:", "@not-in-the-certificate.invalid:", 1);
    assert_ne!(renamed, db.url(), "the test URL's host is 127.0.0.1");
    let url = with_params(&renamed, "hostaddr=127.0.0.1");
    let plain = PgStore::from_target(
        PgTarget::parse(&url, None).expect("the URL"),
        TestDatabase::options(1),
    )
    .expect("a pool");
    plain
        .ping()
        .await
        .expect("the server, plaintext, by hostaddr");
    plain.close();
    for mode in ["verify-full", "verify-ca", "require"] {
        let target = PgTarget::parse(&with_params(&url, &format!("sslmode={mode}")), Some(&ca))
            .expect("the URL and the CA file");
        let store = PgStore::from_target(target, TestDatabase::options(1)).expect("a pool");
        let err = store.client().await.expect_err("refused");
        assert!(
            matches!(&err, StoreError::Unavailable(reason)
                if reason.contains("not valid for the host name")),
            "{mode}: {err:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_sslmode_and_prefer_are_plaintext() {
    let ca = test_ca_file();
    let db = TestDatabase::create().await;
    for (url, described) in [
        (db.url().to_string(), "TLS: off (no sslmode in the URL)"),
        (
            with_params(db.url(), "sslmode=prefer"),
            "TLS: off (sslmode=prefer)",
        ),
        (
            with_params(db.url(), "sslmode=disable"),
            "TLS: off (sslmode=disable)",
        ),
    ] {
        let target = PgTarget::parse(&url, None).expect("the URL");
        assert_eq!(target.describe_tls(), described);
        let store = PgStore::from_target(target, TestDatabase::options(1)).expect("a pool");
        assert!(!pooled_connection_uses_tls(&store).await, "{described}");
        store.close();
    }
    // A CA file without sslmode=require is read (and must be valid) but changes nothing.
    let target = PgTarget::parse(db.url(), Some(&ca)).expect("the URL");
    assert!(!target.uses_tls());
    assert!(
        target
            .describe_tls()
            .contains("unused without sslmode=require"),
        "{}",
        target.describe_tls()
    );
}

#[test]
fn a_ca_file_that_is_missing_or_not_pem_is_an_error_naming_it() {
    let url = "postgres://u:secret@127.0.0.1:5432/db?sslmode=require";
    let missing = Path::new("/nonexistent/ca.pem");
    let err = PgTarget::parse(url, Some(missing)).expect_err("refused");
    assert!(
        err.to_string()
            .starts_with("store.ca_file /nonexistent/ca.pem: cannot read it"),
        "{err}"
    );
    let dir = tempfile::tempdir().expect("a temporary directory");
    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "not a certificate\n").expect("written");
    let err = PgTarget::parse(url, Some(&not_pem)).expect_err("refused");
    assert!(
        err.to_string().contains("holds no PEM certificate"),
        "{err}"
    );
}

#[test]
fn sslmode_values_and_key_value_strings_parse() {
    use tokio_postgres::config::SslMode;
    for (url, mode, ssl) in [
        ("postgres://u:p@h/db", None, SslMode::Disable),
        (
            "postgres://u:p@h/db?sslmode=prefer",
            Some("prefer"),
            SslMode::Disable,
        ),
        (
            "postgres://u:p@h/db?sslmode=require&application_name=x",
            Some("require"),
            SslMode::Require,
        ),
        (
            "postgres://u:p@h/db?application_name=x&sslmode=verify-ca",
            Some("verify-ca"),
            SslMode::Require,
        ),
        (
            "host=h user=u sslmode=verify-full dbname=db",
            Some("verify-full"),
            SslMode::Require,
        ),
        (
            "host=h user=u sslmode = 'disable' password='a b\\'c'",
            Some("disable"),
            SslMode::Disable,
        ),
    ] {
        let target = PgTarget::parse(url, None).unwrap_or_else(|err| panic!("{url}: {err}"));
        assert_eq!(target.config().get_ssl_mode(), ssl, "{url}");
        let got = match target.setting() {
            TlsSetting::Off { sslmode } => sslmode.clone(),
            TlsSetting::Verified { sslmode, .. } => Some(sslmode.clone()),
        };
        assert_eq!(got.as_deref(), mode, "{url}");
    }
    let target = PgTarget::parse(
        "postgres://u:p@h/db?application_name=x&sslmode=verify-ca",
        None,
    )
    .expect("parsed");
    assert_eq!(target.config().get_application_name(), Some("x"));
    let target = PgTarget::parse("host=h user=u sslmode = 'disable' password='a b\\'c'", None)
        .expect("parsed");
    assert_eq!(target.config().get_password(), Some(&b"a b'c"[..]));
    let err = PgTarget::parse("postgres://u:p@h/db?sslmode=allow", None).expect_err("refused");
    assert!(
        err.to_string().contains("sslmode=allow is not supported"),
        "{err}"
    );
}
