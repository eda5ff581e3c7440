//! Fresh PostgreSQL databases for the suite's postgres mode, one per test app, dropped after.
//!
//! The server is `CASHOUT_RECON_TEST_DATABASE_URL` (a role that may `CREATE DATABASE`;
//! `.ci/postgres` starts one and prints it). Without it a postgres-mode test fails, never
//! skips. Connections use the store's connector (the URL's `sslmode`).

use cashout_recon::store::postgres::scratch::ScratchDatabase;

/// Names the test server's connection string.
pub const TEST_DATABASE_URL_ENV: &str = "CASHOUT_RECON_TEST_DATABASE_URL";

/// A database created for one test app; dropped (with its connections) when this is dropped.
pub struct TestDatabase {
    /// Taken by `drop`.
    scratch: Option<ScratchDatabase>,
    url: String,
}

impl TestDatabase {
    /// Creates `<prefix>_<uuid>` on the test server. Panics, saying what to do, when the
    /// server is not named or cannot be reached.
    pub async fn create_named(prefix: &str) -> TestDatabase {
        let admin_url = std::env::var(TEST_DATABASE_URL_ENV)
            .ok()
            .filter(|url| !url.trim().is_empty())
            .unwrap_or_else(|| {
                panic!(
                    "{TEST_DATABASE_URL_ENV} is not set: the PostgreSQL runs of the suite need a \
                     server whose role may CREATE DATABASE. Start one with `sudo .ci/postgres` \
                     and export {TEST_DATABASE_URL_ENV} with the URL it prints."
                )
            });
        let scratch = ScratchDatabase::create(&admin_url, prefix)
            .await
            .unwrap_or_else(|err| {
                panic!(
                    "cannot create a database on the test PostgreSQL server of \
                     {TEST_DATABASE_URL_ENV} ({err}). Start one with `sudo .ci/postgres`."
                )
            });
        TestDatabase {
            url: scratch.url().to_string(),
            scratch: Some(scratch),
        }
    }

    /// Creates `api_<uuid>` on the test server.
    pub async fn create() -> TestDatabase {
        TestDatabase::create_named("api").await
    }

    /// The test database's connection string.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let Some(scratch) = self.scratch.take() else {
            return;
        };
        let name = scratch.describe();
        // Drop may run inside the test's runtime: the DROP DATABASE runs on a thread of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(scratch.drop_database()).ok()
        })
        .join();
        if !matches!(dropped, Ok(Some(()))) {
            eprintln!("test database {name} was not dropped");
        }
    }
}
