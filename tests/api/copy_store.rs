//! `copy-store --to postgres` (SPEC §1): the real binary copies a daemon's SQLite book into
//! an empty PostgreSQL database, verified by counts and checksums; it refuses a missing
//! URL, a store in use and a database that is not empty.
//!
//! Needs a PostgreSQL server: `CASHOUT_RECON_TEST_DATABASE_URL` (a role that may create
//! databases), else the one `.ci/postgres` sets up; fails when none is reachable.

use cashout_recon::store::postgres::PgTarget;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use crate::helpers::{
    assert_accepted, base_config, fiserv_headers, fixtures_dir, now_unix, spawn_sqlite_app,
    test_env, FiservBody, FISERV_SECRET,
};
use crate::test_database::TestDatabase;

const DATABASE_URL_ENV: &str = "CASHOUT_RECON_DATABASE_URL";

/// A fresh database on the test server, dropped afterwards.
struct PgDatabase {
    database: TestDatabase,
    url: String,
}

impl PgDatabase {
    async fn create() -> PgDatabase {
        let database = TestDatabase::create_named("test").await;
        PgDatabase {
            url: database.url().to_string(),
            database,
        }
    }

    async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) = PgTarget::parse(&self.url, None)
            .expect("a connection string")
            .connect()
            .await
            .expect("the test database");
        tokio::spawn(connection);
        client
    }

    async fn count(&self, table: &str) -> i64 {
        self.client()
            .await
            .query_one(&format!("SELECT COUNT(*) FROM {table}"), &[])
            .await
            .expect("count")
            .get(0)
    }

    async fn drop_database(self) {
        drop(self.database);
    }
}

fn write_config(db_path: &Path, dir: &Path) -> PathBuf {
    let keys = format!("{}/keys/", fixtures_dir().display());
    let text = base_config(db_path, "http://127.0.0.1:9").replace("\"keys/", &format!("\"{keys}"));
    let path = dir.join("config.toml");
    std::fs::write(&path, text).expect("config written");
    path
}

async fn copy_store(config: &Path, url: Option<&str>) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_cashout-recon"));
    command
        .args(["copy-store", "--to", "postgres", "--config"])
        .arg(config)
        .envs(test_env())
        .env("RUST_LOG", "warn")
        .env_remove(DATABASE_URL_ENV)
        .kill_on_drop(true);
    if let Some(url) = url {
        command.env(DATABASE_URL_ENV, url);
    }
    tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("copy-store finishes within two minutes")
        .expect("copy-store runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn assert_exit(output: &Output, code: i32, case: &str) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "{case}: exit code; stdout: {}\nstderr: {}",
        text(&output.stdout),
        text(&output.stderr)
    );
}

fn sqlite_count(db_path: &Path, table: &str) -> i64 {
    let connection =
        rusqlite::Connection::open_with_flags(db_path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("store opens");
    connection
        .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |row| {
            row.get(0)
        })
        .expect("count")
}

#[tokio::test]
async fn copy_store_copies_a_daemons_book_into_an_empty_postgres_database_verified() {
    // Arrange: a book with three cash-outs from webhooks, its daemon stopped.
    let app = spawn_sqlite_app().await;
    for (i, txid) in ["7400101", "7400102", "7400103"].into_iter().enumerate() {
        let body = FiservBody::new(txid, 3).bytes();
        let headers = fiserv_headers(
            &body,
            "/webhooks/fiserv",
            FISERV_SECRET,
            now_unix(),
            &format!("req-copy-{i}"),
        );
        assert_accepted(&app.post_webhook("fiserv", &headers, &body).await, txid);
        app.wait_for_cashout("fiserv", txid, Duration::from_secs(10), |_| true)
            .await;
    }
    let db_path = app.db_path.clone();
    let store = app.stop_keeping_store().await;
    let dir = &store.dir;
    let config = write_config(&db_path, dir.path());
    let db = PgDatabase::create().await;

    // Act + Assert: no URL is a usage error naming the variable.
    let no_url = copy_store(&config, None).await;
    assert_exit(&no_url, 2, "without a URL");
    assert!(
        text(&no_url.stderr).contains(DATABASE_URL_ENV),
        "{}",
        text(&no_url.stderr)
    );

    // A store in use (its lock held, as `serve` holds it) is refused.
    {
        let _serve = cashout_recon::store::StoreLock::acquire(&db_path).expect("lock");
        let in_use = copy_store(&config, Some(&db.url)).await;
        assert_exit(&in_use, 1, "store in use");
        assert!(
            text(&in_use.stderr).contains("in use"),
            "{}",
            text(&in_use.stderr)
        );
    }
    assert_eq!(
        db.count("pg_tables WHERE schemaname = 'public'").await,
        0,
        "nothing created"
    );

    // The copy.
    let copied = copy_store(&config, Some(&db.url)).await;
    assert_exit(&copied, 0, "copy");
    let stdout = text(&copied.stdout);
    assert!(stdout.contains("verified"), "{stdout}");
    for table in ["cashouts", "events"] {
        let sqlite = sqlite_count(&db_path, table);
        assert!(sqlite > 0, "{table} has rows in SQLite");
        assert_eq!(
            db.count(table).await,
            sqlite,
            "{table}: same rows in PostgreSQL"
        );
        assert!(
            stdout.contains(&format!("{table} ")) && stdout.contains(&format!("{sqlite} rows")),
            "{table} in the summary: {stdout}"
        );
    }

    // The book's replay cache (in the daemon's memory, each nonce on its event) becomes
    // PostgreSQL's shared one.
    let nonces = sqlite_count(&db_path, "events WHERE replay_nonce IS NOT NULL");
    assert_eq!(nonces, 3, "each signed webhook kept its nonce");
    assert_eq!(db.count("replay_cache").await, nonces);

    // A second copy into the now filled database is refused (exit 2), changing nothing.
    let again = copy_store(&config, Some(&db.url)).await;
    assert_exit(&again, 2, "second copy");
    assert!(
        text(&again.stderr).contains("not empty"),
        "{}",
        text(&again.stderr)
    );
    assert_eq!(db.count("cashouts").await, 3);
    db.drop_database().await;
}

#[tokio::test]
async fn copy_store_reads_the_url_from_the_variable_store_url_env_names() {
    // Review finding: SPEC §1 copies into "the `url_env` of `[store]`", but the key was
    // refused as unknown and the URL read from a fixed variable.
    let app = spawn_sqlite_app().await;
    let body = FiservBody::new("7400201", 3).bytes();
    let headers = fiserv_headers(&body, "/webhooks/fiserv", FISERV_SECRET, now_unix(), "u1");
    assert_accepted(&app.post_webhook("fiserv", &headers, &body).await, "u1");
    app.wait_for_cashout("fiserv", "7400201", Duration::from_secs(10), |_| true)
        .await;
    let db_path = app.db_path.clone();
    let store = app.stop_keeping_store().await;
    let dir = &store.dir;
    let config = write_config(&db_path, dir.path());
    let text_of_config = std::fs::read_to_string(&config).expect("config");
    let with_url_env = text_of_config.replacen(
        "[store]\n",
        "[store]\nbackend = \"sqlite\"\nurl_env = \"REVIEW_BOOK_URL\"\n",
        1,
    );
    assert_ne!(
        with_url_env, text_of_config,
        "the config has a [store] table"
    );
    std::fs::write(&config, with_url_env).expect("config written");
    let db = PgDatabase::create().await;

    // The default variable is not read any more: the one url_env names is.
    let unset = copy_store(&config, Some(&db.url)).await;
    assert_exit(&unset, 2, "REVIEW_BOOK_URL unset");
    assert!(
        text(&unset.stderr).contains("REVIEW_BOOK_URL"),
        "{}",
        text(&unset.stderr)
    );
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_cashout-recon"));
    command
        .args(["copy-store", "--to", "postgres", "--config"])
        .arg(&config)
        .envs(test_env())
        .env("RUST_LOG", "warn")
        .env_remove(DATABASE_URL_ENV)
        .env("REVIEW_BOOK_URL", &db.url)
        .kill_on_drop(true);
    let copied = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("copy-store finishes within two minutes")
        .expect("copy-store runs");
    assert_exit(&copied, 0, "copy with url_env");
    assert_eq!(db.count("cashouts").await, 1);
    db.drop_database().await;
}
