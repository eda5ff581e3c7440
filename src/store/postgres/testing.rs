//! Test databases on a real PostgreSQL server: one fresh database per test, dropped after.
//!
//! The server is `CASHOUT_RECON_TEST_DATABASE_URL` (a connection string whose role may
//! create databases), else the one `.ci/postgres` sets up. No server is a failure, not a
//! skip: the message says how to start one.

use super::{PgOptions, PgStore, PgTarget};

/// Names the test server's connection string.
pub const TEST_DATABASE_URL_ENV: &str = "CASHOUT_RECON_TEST_DATABASE_URL";

/// What `.ci/postgres` prints (its role, on the default port).
pub const DEFAULT_TEST_DATABASE_URL: &str =
    "postgres://cashout_recon_test:cashout_recon_test@127.0.0.1:5432/postgres";

/// The test CA's certificate: `.ci/postgres` signs the local server's certificate
/// (subjectAltName `IP:127.0.0.1`, `DNS:localhost`) with it and writes it here.
pub const TEST_CA_FILE: &str = "/var/lib/postgresql/cashout-recon-tls/ca.pem";

/// [`TEST_CA_FILE`], or a failure (never a skip) saying how to make it.
pub fn test_ca_file() -> std::path::PathBuf {
    let path = std::path::PathBuf::from(TEST_CA_FILE);
    assert!(
        path.is_file(),
        "the test CA {TEST_CA_FILE} does not exist: run `sudo .ci/postgres`, which gives the \
         test PostgreSQL server a certificate signed by that CA and turns TLS on"
    );
    path
}

/// `url` with `params` (`key=value&…`) added to its query.
pub fn with_params(url: &str, params: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{params}")
}

/// A database created for one test; dropped (with its connections) when this is dropped.
pub struct TestDatabase {
    admin: PgTarget,
    name: String,
    url: String,
}

impl TestDatabase {
    /// Creates `test_<uuid>` on the test server. Panics when the server cannot be reached.
    pub async fn create() -> TestDatabase {
        let admin_url = std::env::var(TEST_DATABASE_URL_ENV)
            .unwrap_or_else(|_| DEFAULT_TEST_DATABASE_URL.to_string());
        let admin = PgTarget::parse(&admin_url, None).unwrap_or_else(|err| {
            panic!("{TEST_DATABASE_URL_ENV} is not a connection string: {err}")
        });
        let name = format!("test_{}", uuid::Uuid::new_v4().simple());
        let (client, connection) = admin.connect().await.unwrap_or_else(|err| {
            panic!(
                "cannot reach the test PostgreSQL server {} ({}). Start one with `sudo .ci/postgres` \
                 (installs Debian's postgresql if needed, starts a cluster and creates the test role) \
                 and export {TEST_DATABASE_URL_ENV} with the URL it prints, or point \
                 {TEST_DATABASE_URL_ENV} at a server whose role may CREATE DATABASE.",
                admin.describe(),
                super::from_postgres(&err)
            )
        });
        let driver = tokio::spawn(connection);
        // A linguistic collation (as production databases often have), so code that
        // assumes byte-ordered text fails here; plain when the server has no ICU.
        let icu = format!(
            "CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
        );
        if let Err(err) = client.batch_execute(&icu).await {
            eprintln!(
                "test database without ICU collation ({})",
                super::from_postgres(&err)
            );
            client
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .unwrap_or_else(|err| {
                    panic!("CREATE DATABASE {name}: {}", super::from_postgres(&err))
                });
        }
        drop(client);
        let _ = driver.await;
        let url = with_database(&admin_url, &name);
        TestDatabase { admin, name, url }
    }

    /// The test database's connection string.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A pool on the test database (not migrated).
    pub fn store(&self, max_connections: usize) -> PgStore {
        PgStore::connect(
            &self.url,
            PgOptions {
                max_connections,
                // The machine may be busy (two cores, parallel builds).
                connect_timeout: std::time::Duration::from_secs(30),
                wait_timeout: std::time::Duration::from_secs(30),
                lock_timeout: std::time::Duration::from_secs(30),
            },
        )
        .expect("a pool on the test database")
    }

    /// The options of the test pools (the machine may be busy).
    pub fn options(max_connections: usize) -> PgOptions {
        PgOptions {
            max_connections,
            connect_timeout: std::time::Duration::from_secs(30),
            wait_timeout: std::time::Duration::from_secs(30),
            lock_timeout: std::time::Duration::from_secs(30),
        }
    }

    /// A migrated pool on the test database.
    pub async fn migrated(&self, max_connections: usize) -> PgStore {
        let store = self.store(max_connections);
        store.migrate().await.expect("migrations apply");
        store
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime: the DROP DATABASE runs on a thread of its own.
        let admin = self.admin.clone();
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async move {
                let (client, connection) = admin.connect().await.ok()?;
                tokio::spawn(connection);
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                    .ok()
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(()))) {
            eprintln!("test database {} was not dropped", self.name);
        }
    }
}

pub use super::scratch::with_database;
