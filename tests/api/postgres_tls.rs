//! A daemon on PostgreSQL over TLS: `sslmode=require` in the URL and `[store] ca_file` the
//! test CA `.ci/postgres` signs the local server's certificate with. Every connection it
//! opens — the pool's and the wake-up listener's — is TLS (the server's `pg_stat_ssl`), and
//! a webhook is stored and read back. Runs on PostgreSQL whatever the suite's backend.

use std::path::Path;
use std::time::Duration;

use cashout_recon::store::postgres::PgTarget;

use crate::helpers::{
    assert_accepted, fiserv_headers, now_unix, spawn_app_in, FiservBody, TestStore, FISERV_SECRET,
};
use crate::test_database::TestDatabase;

/// Where `.ci/postgres` writes the test CA's certificate (the store's tests read it too).
const TEST_CA_FILE: &str = "/var/lib/postgresql/cashout-recon-tls/ca.pem";

#[tokio::test]
async fn a_daemon_with_sslmode_require_and_ca_file_connects_only_over_tls() {
    // Arrange: the test CA, a fresh database, its URL asking for TLS.
    assert!(
        Path::new(TEST_CA_FILE).is_file(),
        "the test CA {TEST_CA_FILE} does not exist: run `sudo .ci/postgres`, which gives the \
         test PostgreSQL server a certificate signed by that CA and turns TLS on"
    );
    let database = TestDatabase::create().await;
    let separator = if database.url().contains('?') {
        '&'
    } else {
        '?'
    };
    let url = format!("{}{separator}sslmode=require", database.url());
    let app = spawn_app_in(TestStore::postgres_at(database, url.clone()), |config| {
        config.replacen(
            "[store]\n",
            &format!("[store]\nca_file = \"{TEST_CA_FILE}\"\n"),
            1,
        )
    })
    .await;

    // Act: a webhook.
    let body = FiservBody::new("7600001", 3).bytes();
    let headers = fiserv_headers(
        &body,
        "/webhooks/fiserv",
        FISERV_SECRET,
        now_unix(),
        "req-tls-1",
    );
    let answer = app.post_webhook("fiserv", &headers, &body).await;

    // Assert: stored and read back, and the daemon's connections (the pool's, the
    // listener's once it has subscribed) are all TLS.
    assert_accepted(&answer, "a webhook over a TLS store");
    let (status, cashout) = app.get_cashout("fiserv", "7600001").await;
    assert_eq!(status, 200, "{cashout}");
    let target = PgTarget::parse(&url, Some(Path::new(TEST_CA_FILE))).expect("the URL");
    let (client, connection) = target.connect().await.expect("the test database");
    tokio::spawn(connection);
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let rows = client
            .query(
                "SELECT a.application_name, s.ssl FROM pg_stat_activity a
                 JOIN pg_stat_ssl s USING (pid)
                 WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
                   AND a.application_name LIKE 'cashout-recon%'",
                &[],
            )
            .await
            .expect("pg_stat_ssl");
        let seen: Vec<(String, bool)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        assert!(
            seen.iter().all(|(_, ssl)| *ssl),
            "a plaintext connection: {seen:?}"
        );
        let listener = seen
            .iter()
            .any(|(name, _)| name == "cashout-recon listener");
        let pool = seen.iter().any(|(name, _)| name == "cashout-recon");
        if listener && pool {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "the pool's and the listener's connections within 30 s: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.stop().await;
}
